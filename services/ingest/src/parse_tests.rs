//! Every input format, including malformed lines (unit tests of [`super`]).

use super::*;

fn parse_all(
    input: &str,
    format: Format,
    options: &ParseOptions,
) -> (Vec<Record>, Vec<ParseError>, u64) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let lines = read_units(input.as_bytes(), format, options, "f", &mut |unit| {
        let r = match unit {
            Unit::Text { line, text } => parse_unit(line, &text, format, options, "f"),
            Unit::Parsed(r) => r,
        };
        match r {
            Ok(r) => records.push(r),
            Err(e) => errors.push(e),
        }
    })
    .unwrap();
    (records, errors, lines)
}

fn turns(r: &Record) -> Vec<(Role, &str)> {
    r.messages
        .iter()
        .map(|m| (m.role, m.content.as_str()))
        .collect()
}

#[test]
fn openai_messages_with_a_malformed_line() {
    let input = r#"{"id": "a1", "messages": [{"role": "user", "content": "头痛怎么办？"}, {"role": "assistant", "content": "注意休息。"}], "labels": {"category": "neuro", "n": 3}}
{"messages": [{"role": "user", "content": "broken"
{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "hello"}]}
{"messages": [{"role": "tool", "content": "x"}]}
"#;
    let (records, errors, lines) =
        parse_all(input, Format::OpenAiMessages, &ParseOptions::default());
    assert_eq!(lines, 4);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].id, "a1");
    assert_eq!(records[0].labels["category"], "neuro");
    assert_eq!(records[0].labels["n"], "3");
    assert_eq!(records[0].source, "f:1");
    assert_eq!(
        turns(&records[1]),
        vec![(Role::User, "hi"), (Role::Assistant, "hello")]
    );
    assert_eq!(records[1].id.len(), 16, "content-derived id");
    assert_eq!(
        errors.iter().map(|e| e.line).collect::<Vec<_>>(),
        vec![2, 4]
    );
    assert!(errors[0].message.contains("EOF"), "{}", errors[0].message);
    assert!(errors[1].message.contains("unknown role `tool`"));
    assert!(errors[0].excerpt.starts_with(r#"{"messages""#));
}

#[test]
fn sharegpt_jsonl_and_json_array() {
    let jsonl = r#"{"conversations": [{"from": "human", "value": "Where is my order?"}, {"from": "gpt", "value": "It ships today."}], "system": "You are a shop assistant."}
{"conversations": "not a list"}
"#;
    let (records, errors, _) = parse_all(jsonl, Format::ShareGpt, &ParseOptions::default());
    assert_eq!(
        turns(&records[0]),
        vec![
            (Role::System, "You are a shop assistant."),
            (Role::User, "Where is my order?"),
            (Role::Assistant, "It ships today.")
        ]
    );
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 2);
    let array = r#"[{"conversations": [{"from": "human", "value": "退货流程？"}, {"from": "gpt", "value": "七天无理由。"}]},
 {"conversations": [{"from": "alien", "value": "?"}]}]"#;
    let (records, errors, lines) = parse_all(array, Format::ShareGpt, &ParseOptions::default());
    assert_eq!(lines, 2);
    assert_eq!(records.len(), 1);
    assert_eq!(errors[0].line, 2, "array items are numbered");
}

#[test]
fn alpaca_with_input_system_and_history() {
    let input = r#"{"instruction": "解释基金定投", "input": "面向新手", "output": "定期定额投资基金。", "system": "你是理财顾问", "history": [["你好", "您好"]]}
{"instruction": "no output"}
"#;
    let (records, errors, _) = parse_all(input, Format::Alpaca, &ParseOptions::default());
    assert_eq!(
        turns(&records[0]),
        vec![
            (Role::System, "你是理财顾问"),
            (Role::User, "你好"),
            (Role::Assistant, "您好"),
            (Role::User, "解释基金定投\n\n面向新手"),
            (Role::Assistant, "定期定额投资基金。")
        ]
    );
    assert_eq!(errors[0].line, 2);
    assert!(errors[0].message.contains("output"));
}

#[test]
fn csv_with_mapping_labels_and_a_bad_row() {
    let input = "q,a,cat,id\n\"What is APR?\",\"The yearly rate.\",bank,r1\nonly,two\n\"多行\n问题\",答案,medical,r3\n";
    let options = ParseOptions {
        csv: CsvMapping {
            question: "q".into(),
            answer: "a".into(),
            id: Some("id".into()),
            labels: vec!["cat".into()],
            ..CsvMapping::default()
        },
        ..ParseOptions::default()
    };
    let (records, errors, _) = parse_all(input, Format::Csv, &options);
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].id, "r1");
    assert_eq!(records[0].labels["cat"], "bank");
    assert_eq!(records[0].line, 2);
    assert_eq!(turns(&records[1])[0], (Role::User, "多行\n问题"));
    assert_eq!(records[1].line, 4);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 3);
    assert!(
        errors[0].message.contains("expected 4 fields, found 2"),
        "{}",
        errors[0].message
    );
    // A missing mapped column is a whole-file error.
    let err = read_units(
        "x,y\n1,2\n".as_bytes(),
        Format::Csv,
        &ParseOptions::default(),
        "f",
        &mut |_| {},
    )
    .unwrap_err();
    assert!(
        err.to_string().contains("missing column \"question\""),
        "{err}"
    );
}

#[test]
fn plain_dialogues_in_chinese_and_english() {
    let input = "用户：我发烧了\n助手：多喝水，\n注意休息。\n用户：要吃药吗？\n助手：体温超过38.5度可以服用退烧药。\n\n\nUser: Is this fund risk-free?\nAssistant: No investment is risk-free.\n\nno prefix here\nAssistant: orphan\n";
    let (records, errors, lines) =
        parse_all(input, Format::PlainDialogue, &ParseOptions::default());
    assert_eq!(lines, 12);
    assert_eq!(records.len(), 2);
    assert_eq!(
        turns(&records[0]),
        vec![
            (Role::User, "我发烧了"),
            (Role::Assistant, "多喝水，\n注意休息。"),
            (Role::User, "要吃药吗？"),
            (Role::Assistant, "体温超过38.5度可以服用退烧药。")
        ]
    );
    assert_eq!(records[1].line, 8);
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].line, 11);
    assert!(
        errors[0]
            .message
            .contains("before the first speaker prefix")
    );
}

#[test]
fn raw_text_blocks_and_jsonl() {
    let (records, _, _) = parse_all(
        "First document.\nStill first.\n\nSecond 文档。\n",
        Format::RawText,
        &ParseOptions::default(),
    );
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].text, "First document.\nStill first.");
    assert!(records[0].messages.is_empty());
    assert_eq!(records[1].line, 4);
    let (records, errors, _) = parse_all(
        "{\"text\": \"doc one\"}\n{\"txt\": 1}\n",
        Format::RawText,
        &ParseOptions::default(),
    );
    assert_eq!(records[0].text, "doc one");
    assert_eq!(errors[0].line, 2);
}

#[test]
fn default_system_prompt_is_added_when_missing() {
    let options = ParseOptions {
        default_system_prompt: "You are helpful.".into(),
        ..ParseOptions::default()
    };
    let (records, _, _) = parse_all(
        "User: hi\nAssistant: hello\n",
        Format::PlainDialogue,
        &options,
    );
    assert_eq!(records[0].messages[0].role, Role::System);
}

#[test]
fn formats_are_detected() {
    let p = DialoguePrefixes::default();
    assert_eq!(
        detect_format("a.jsonl", r#"{"messages": []}"#, &p).unwrap(),
        Format::OpenAiMessages
    );
    assert_eq!(
        detect_format("a.json", "[\n {\"conversations\": []}]", &p).unwrap(),
        Format::ShareGpt
    );
    assert_eq!(
        detect_format("a.jsonl", r#"{"instruction": "x", "output": "y"}"#, &p).unwrap(),
        Format::Alpaca
    );
    assert_eq!(
        detect_format("a.jsonl", r#"{"text": "x"}"#, &p).unwrap(),
        Format::RawText
    );
    assert_eq!(
        detect_format("a.csv", "question,answer", &p).unwrap(),
        Format::Csv
    );
    assert_eq!(
        detect_format("chat", "用户：你好\n助手：您好", &p).unwrap(),
        Format::PlainDialogue
    );
    assert_eq!(
        detect_format("book.txt", "Once upon a time.", &p).unwrap(),
        Format::RawText
    );
    assert!(matches!(
        detect_format("a.jsonl", r#"{"foo": 1}"#, &p),
        Err(FormatError::Unknown(_))
    ));
    assert!(matches!(
        detect_format("blob.bin", "\0\0\u{1}", &p),
        Err(FormatError::Unknown(_))
    ));
    assert!(matches!(
        detect_format("data", "just words", &p),
        Err(FormatError::Unknown(_))
    ));
}
