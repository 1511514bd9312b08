//! Each cleaning rule on hand-made records (unit tests of [`super`]).

use super::*;
use crate::record::Message;

fn conv(turns: &[(Role, &str)]) -> Record {
    Record::new(
        turns
            .iter()
            .map(|(role, c)| Message {
                role: *role,
                content: (*c).to_owned(),
            })
            .collect(),
        String::new(),
        "t",
        1,
    )
}

fn qa(q: &str, a: &str) -> Record {
    conv(&[(Role::User, q), (Role::Assistant, a)])
}

fn kept(outcome: Outcome) -> Kept {
    match outcome {
        Outcome::Kept(k) => k,
        Outcome::Removed(r) => panic!("removed by {:?}: {}", r.rule, r.detail),
    }
}

fn removed(outcome: Outcome) -> Removed {
    match outcome {
        Outcome::Removed(r) => r,
        Outcome::Kept(k) => panic!("kept: {:?}", k.record),
    }
}

#[test]
fn text_rules_change_and_count() {
    let rules = CleanRules::default();
    let k = kept(rules.apply(qa("ＡＰＲ是什么？\u{7}  ", "年化利率  \n\n\n\n即 APR")));
    assert_eq!(k.record.messages[0].content, "APR是什么?");
    assert_eq!(k.record.messages[1].content, "年化利率\n\n即 APR");
    assert_ne!(k.changed & (1 << Rule::Nfkc as u32), 0);
    assert_ne!(k.changed & (1 << Rule::ControlChars as u32), 0);
    assert_ne!(k.changed & (1 << Rule::Whitespace as u32), 0);
    assert_eq!(k.changed & (1 << Rule::Mojibake as u32), 0);
    assert!(k.before.unwrap().contains("ＡＰＲ"));
    let k = kept(rules.apply(qa("cafÃ©?", "oui")));
    assert_eq!(k.record.messages[0].content, "café?");
    assert_ne!(k.changed & (1 << Rule::Mojibake as u32), 0);
    let off = CleanRules {
        nfkc: false,
        ..CleanRules::default()
    };
    assert_eq!(
        kept(off.apply(qa("ＡＢ", "x"))).record.messages[0].content,
        "ＡＢ"
    );
}

#[test]
fn incomplete_and_role_broken_dialogues_are_dropped() {
    let rules = CleanRules::default();
    let cases = [
        (conv(&[]), "no_turns"),
        (qa("hello", "   "), "empty_turn"),
        (
            conv(&[(Role::User, "a"), (Role::User, "b"), (Role::Assistant, "c")]),
            "bad_order",
        ),
        (
            conv(&[(Role::Assistant, "a"), (Role::User, "b")]),
            "bad_order",
        ),
        (
            conv(&[(Role::User, "a"), (Role::Assistant, "b"), (Role::User, "c")]),
            "last_not_assistant",
        ),
    ];
    for (record, key) in cases {
        let r = removed(rules.apply(record));
        assert_eq!((r.rule, r.key.as_str()), (Rule::IncompleteDialogue, key));
    }
    kept(rules.apply(conv(&[
        (Role::System, "s"),
        (Role::User, "a"),
        (Role::Assistant, "b"),
    ])));
    let off = CleanRules {
        drop_incomplete: false,
        ..CleanRules::default()
    };
    kept(off.apply(conv(&[(Role::User, "a"), (Role::User, "b")])));
    // Raw text is not a dialogue.
    kept(rules.apply(Record::new(Vec::new(), "a document".into(), "t", 1)));
}

#[test]
fn length_bounds_in_chars_and_tokens() {
    let rules = CleanRules {
        min_chars: 5,
        max_chars: Some(12),
        ..CleanRules::default()
    };
    assert_eq!(removed(rules.apply(qa("你好", "好"))).key, "too_short");
    assert_eq!(
        removed(rules.apply(qa("一二三四五六七", "八九十一二三"))).key,
        "too_long"
    );
    kept(rules.apply(qa("一二三", "四五六")));
    let tokenizer = tokenizers::Tokenizer::from_file(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../libs/model/fixtures/tiny-llama/tokenizer.json"
    ))
    .unwrap();
    let n = TokenCounter::count(&tokenizer, "hello world");
    assert!(n >= 2, "{n}");
    let rules = CleanRules {
        tokenizer: Some(std::sync::Arc::new(tokenizer)),
        max_tokens: Some(2 * n + 1),
        ..CleanRules::default()
    };
    let k = kept(rules.apply(qa("hello world", "hello world")));
    assert_eq!(k.tokens, Some(2 * n));
    let long = "hello world ".repeat(20);
    let r = removed(rules.apply(qa(&long, "ok")));
    assert_eq!((r.rule, r.key.as_str()), (Rule::Length, "too_many_tokens"));
}

#[test]
fn repetition_filter_removes_spam_only() {
    let rules = CleanRules {
        repetition: Some(RepetitionRules::default()),
        ..CleanRules::default()
    };
    let r = removed(rules.apply(qa("买买买", "限时抢购\n限时抢购\n限时抢购\n点击链接")));
    assert_eq!(r.rule, Rule::Repetition);
    assert!(r.key.starts_with("dup_line_frac"), "{}", r.key);
    kept(rules.apply(qa("感冒了怎么办？", "多休息，多喝水，必要时就医。")));
}

#[test]
fn language_filter_keeps_the_allow_list_and_undetermined() {
    let rules = CleanRules {
        language: Some(LanguageRules {
            allowed: vec!["zh".into(), "en".into()],
            min_confidence: 0.5,
        }),
        ..CleanRules::default()
    };
    let k = kept(rules.apply(qa(
        "糖尿病的早期症状有哪些？",
        "常见症状包括口渴、多尿和体重下降。",
    )));
    assert_eq!(k.language.as_deref(), Some("zh"));
    let k = kept(rules.apply(qa(
        "What are the early symptoms of diabetes?",
        "Thirst, frequent urination and weight loss are common.",
    )));
    assert_eq!(k.language.as_deref(), Some("en"));
    let r = removed(rules.apply(qa(
        "Quels sont les premiers symptômes du diabète chez les adultes ?",
        "La soif, des mictions fréquentes et une perte de poids sont fréquentes.",
    )));
    assert_eq!((r.rule, r.key.as_str()), (Rule::Language, "language:fr"));
    // Too short to tell: undetermined, kept.
    let k = kept(rules.apply(qa("ok", "ja")));
    assert_eq!(k.language.as_deref(), Some("und"));
}

#[test]
fn pii_is_redacted_and_counted() {
    let rules = CleanRules::default();
    let k = kept(rules.apply(qa(
        "我的邮箱 li@example.cn, 手机 13912345678, 身份证 11010519491231002X",
        "卡号 6222 0200 0000 0000 009? 已记录",
    )));
    assert_eq!(
        k.record.messages[0].content,
        "我的邮箱 [EMAIL], 手机 [PHONE], 身份证 [ID_CARD]"
    );
    assert_eq!((k.pii.email, k.pii.phone, k.pii.cn_resident_id), (1, 1, 1));
    // 6222020000000000009 fails Luhn: not a card.
    assert_eq!(k.pii.bank_card, 0);
    let k = kept(rules.apply(qa("card 4539 1488 0343 6467 please", "ok")));
    assert_eq!(k.record.messages[0].content, "card [BANK_CARD] please");
    assert_eq!(k.pii.bank_card, 1);
    let off = CleanRules {
        pii: PiiRules {
            email: false,
            ..PiiRules::default()
        },
        ..CleanRules::default()
    };
    assert!(kept(off.apply(qa("a@b.cn", "x"))).pii.is_empty());
}

#[test]
fn blocklist_drops_or_flags() {
    let phrases = vec![
        "保本".to_owned(),
        "无风险".to_owned(),
        "Guaranteed Return".to_owned(),
    ];
    let drop = CleanRules {
        blocklist: Some(Blocklist::new(&phrases, BlocklistAction::Drop, true).unwrap()),
        ..CleanRules::default()
    };
    let r = removed(drop.apply(qa("这个产品保本吗？", "是的。")));
    assert_eq!((r.rule, r.key.as_str()), (Rule::Blocklist, "phrase:保本"));
    let r = removed(drop.apply(qa("Is there a guaranteed return?", "No.")));
    assert_eq!(r.key, "phrase:Guaranteed Return");
    kept(drop.apply(qa("基金有风险吗？", "投资有风险，入市需谨慎。")));
    let flag = CleanRules {
        blocklist: Some(Blocklist::new(&phrases, BlocklistAction::Flag, true).unwrap()),
        ..CleanRules::default()
    };
    let k = kept(flag.apply(qa("理财产品无风险吗？", "任何投资都有风险。")));
    assert_eq!(k.flagged.as_deref(), Some("无风险"));
    assert_eq!(k.record.labels["blocklist"], "无风险");
    let sensitive = CleanRules {
        blocklist: Some(Blocklist::new(&phrases, BlocklistAction::Drop, false).unwrap()),
        ..CleanRules::default()
    };
    kept(sensitive.apply(qa("Is there a guaranteed return?", "No.")));
}
