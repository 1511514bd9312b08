//! Input formats → canonical records.
//!
//! Reading is split in two so that parsing can run in parallel: [`read_units`] walks the
//! file sequentially and cuts it into units (a JSONL line, a blank-line-separated block, a
//! CSV row), and [`parse_unit`] turns one unit into a [`Record`] or a line-numbered error.
//! [`detect_format`] picks the format from the file name and the first bytes.

use std::collections::BTreeMap;
use std::io::BufRead;

use serde::Deserialize;

use crate::record::{Message, Record, Role};

/// Input formats (`lmforge.v1.DatasetFormat` without UNSPECIFIED).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `{"messages": [{"role", "content"}…]}` per line.
    OpenAiMessages,
    /// `{"conversations": [{"from", "value"}…]}`.
    ShareGpt,
    /// `{"instruction", "input", "output", "system", "history"}`.
    Alpaca,
    /// Delimited text with a header row.
    Csv,
    /// `用户：…` / `助手：…` turns, dialogues separated by blank lines.
    PlainDialogue,
    /// Documents separated by blank lines, or `{"text"}` JSONL.
    RawText,
}

/// CSV column mapping with defaults filled.
#[derive(Debug, Clone, PartialEq)]
pub struct CsvMapping {
    /// User turn column.
    pub question: String,
    /// Assistant turn column.
    pub answer: String,
    /// Optional system prompt column.
    pub system: Option<String>,
    /// Optional id column.
    pub id: Option<String>,
    /// Columns copied into labels.
    pub labels: Vec<String>,
    /// Field delimiter.
    pub delimiter: u8,
}

impl Default for CsvMapping {
    fn default() -> Self {
        Self {
            question: "question".into(),
            answer: "answer".into(),
            system: None,
            id: None,
            labels: Vec::new(),
            delimiter: b',',
        }
    }
}

/// Speaker prefixes of plain-text dialogues.
#[derive(Debug, Clone, PartialEq)]
pub struct DialoguePrefixes {
    /// Start a user turn.
    pub user: Vec<String>,
    /// Start an assistant turn.
    pub assistant: Vec<String>,
    /// Start a system turn.
    pub system: Vec<String>,
}

impl Default for DialoguePrefixes {
    fn default() -> Self {
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect();
        Self {
            user: v(&["用户：", "用户:", "User:", "Q:"]),
            assistant: v(&["助手：", "助手:", "Assistant:", "A:"]),
            system: v(&["系统：", "System:"]),
        }
    }
}

impl DialoguePrefixes {
    fn split_turn<'a>(&self, line: &'a str) -> Option<(Role, &'a str)> {
        let lists = [
            (Role::User, &self.user),
            (Role::Assistant, &self.assistant),
            (Role::System, &self.system),
        ];
        for (role, prefixes) in lists {
            for p in prefixes.iter() {
                if let Some(rest) = line.strip_prefix(p.as_str()) {
                    return Some((role, rest.trim_start()));
                }
            }
        }
        None
    }
}

/// Parsing options with defaults filled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParseOptions {
    /// CSV mapping.
    pub csv: CsvMapping,
    /// Plain-dialogue prefixes.
    pub dialogue: DialoguePrefixes,
    /// System prompt added to conversations that have none.
    pub default_system_prompt: String,
}

/// A line that could not be parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct ParseError {
    /// 1-based line.
    pub line: u64,
    /// What is wrong.
    pub message: String,
    /// The offending text, at most 200 chars.
    pub excerpt: String,
}

/// A piece of input cut by [`read_units`].
#[derive(Debug)]
pub enum Unit {
    /// Raw text starting at `line`, parsed later by [`parse_unit`].
    Text { line: u64, text: String },
    /// Already parsed (CSV rows, JSON array items).
    Parsed(Result<Record, ParseError>),
}

/// Why a whole input is refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The format could not be recognized.
    #[error("unknown format: {0}")]
    Unknown(String),
    /// The input does not fit the (declared or detected) format as a whole.
    #[error("{0}")]
    Invalid(String),
    /// Reading the input failed.
    #[error("reading the input: {0}")]
    Io(#[from] std::io::Error),
}

/// Detects the format from the file name and the first bytes of the (UTF-8) input.
pub fn detect_format(
    filename: &str,
    head: &str,
    prefixes: &DialoguePrefixes,
) -> Result<Format, FormatError> {
    let lower = filename.to_ascii_lowercase();
    if lower.ends_with(".csv") || lower.ends_with(".tsv") {
        return Ok(Format::Csv);
    }
    if head.contains('\0') {
        return Err(FormatError::Unknown(
            "the input is binary (NUL bytes)".into(),
        ));
    }
    let trimmed = head.trim_start_matches('\u{feff}').trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let first = if let Some(rest) = trimmed.strip_prefix('[') {
            // The first object of an array: up to the first line that closes it is enough for
            // typical pretty-printed or one-line files; fall back to scanning keys.
            rest.trim_start()
        } else {
            trimmed.lines().next().unwrap_or("")
        };
        let key = |k: &str| first.contains(&format!("\"{k}\""));
        return if key("messages") {
            Ok(Format::OpenAiMessages)
        } else if key("conversations") {
            Ok(Format::ShareGpt)
        } else if key("instruction") {
            Ok(Format::Alpaca)
        } else if key("text") {
            Ok(Format::RawText)
        } else {
            Err(FormatError::Unknown(
                "JSON records need `messages`, `conversations`, `instruction` or `text`".into(),
            ))
        };
    }
    let dialogue = head
        .lines()
        .take(200)
        .any(|l| prefixes.split_turn(l.trim_start()).is_some());
    if dialogue {
        return Ok(Format::PlainDialogue);
    }
    if [".txt", ".md", ".text"].iter().any(|e| lower.ends_with(e)) {
        return Ok(Format::RawText);
    }
    Err(FormatError::Unknown(format!(
        "cannot tell the format of `{filename}`: declare it (JSONL, CSV, plain dialogue or raw text)"
    )))
}

/// Cuts the input into units and hands each to `sink`; returns the number of input lines
/// (or JSON array items) read.
pub fn read_units<R: BufRead>(
    mut input: R,
    format: Format,
    options: &ParseOptions,
    source_name: &str,
    sink: &mut dyn FnMut(Unit),
) -> Result<u64, FormatError> {
    match format {
        Format::Csv => read_csv(input, &options.csv, options, source_name, sink),
        Format::PlainDialogue => read_blocks(input, sink),
        Format::OpenAiMessages | Format::ShareGpt | Format::Alpaca | Format::RawText => {
            // A JSON array file (`[ {...}, … ]`) is read whole; JSONL streams line by line.
            let head = input.fill_buf()?;
            let first = head
                .iter()
                .find(|b| !b.is_ascii_whitespace() && **b != 0xEF && **b != 0xBB && **b != 0xBF);
            match (format, first) {
                (_, Some(b'[')) => read_json_array(input, format, options, source_name, sink),
                (Format::RawText, Some(b'{'))
                | (Format::OpenAiMessages | Format::ShareGpt | Format::Alpaca, _) => {
                    read_lines(input, sink)
                }
                (_, _) => read_blocks(input, sink),
            }
        }
    }
}

fn read_lines<R: BufRead>(mut input: R, sink: &mut dyn FnMut(Unit)) -> Result<u64, FormatError> {
    let mut line_no = 0u64;
    let mut buf = String::new();
    loop {
        buf.clear();
        if input.read_line(&mut buf)? == 0 {
            return Ok(line_no);
        }
        line_no += 1;
        let text = buf
            .trim_end_matches(['\n', '\r'])
            .trim_start_matches('\u{feff}');
        if text.trim().is_empty() {
            continue;
        }
        sink(Unit::Text {
            line: line_no,
            text: text.to_owned(),
        });
    }
}

fn read_blocks<R: BufRead>(mut input: R, sink: &mut dyn FnMut(Unit)) -> Result<u64, FormatError> {
    let mut line_no = 0u64;
    let mut buf = String::new();
    let mut block = String::new();
    let mut start = 0u64;
    loop {
        buf.clear();
        let n = input.read_line(&mut buf)?;
        let line = buf
            .trim_end_matches(['\n', '\r'])
            .trim_start_matches('\u{feff}');
        if n == 0 || line.trim().is_empty() {
            if !block.is_empty() {
                sink(Unit::Text {
                    line: start,
                    text: std::mem::take(&mut block),
                });
            }
            if n == 0 {
                return Ok(line_no);
            }
            line_no += 1;
            continue;
        }
        line_no += 1;
        if block.is_empty() {
            start = line_no;
        } else {
            block.push('\n');
        }
        block.push_str(line);
    }
}

fn read_json_array<R: BufRead>(
    mut input: R,
    format: Format,
    options: &ParseOptions,
    source_name: &str,
    sink: &mut dyn FnMut(Unit),
) -> Result<u64, FormatError> {
    let mut all = String::new();
    input.read_to_string(&mut all)?;
    let items: Vec<serde_json::Value> = serde_json::from_str(all.trim_start_matches('\u{feff}'))
        .map_err(|e| FormatError::Invalid(format!("the JSON array does not parse: {e}")))?;
    let count = items.len() as u64;
    for (i, item) in items.into_iter().enumerate() {
        let line = i as u64 + 1;
        let excerpt = crate::record::truncate_chars(&item.to_string(), 200);
        let parsed = serde_json::from_value::<JsonRecord>(item)
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_record(format, options, source_name, line))
            .map_err(|message| ParseError {
                line,
                message,
                excerpt,
            });
        sink(Unit::Parsed(parsed));
    }
    Ok(count)
}

fn read_csv<R: BufRead>(
    input: R,
    mapping: &CsvMapping,
    options: &ParseOptions,
    source_name: &str,
    sink: &mut dyn FnMut(Unit),
) -> Result<u64, FormatError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(mapping.delimiter)
        .has_headers(true)
        .from_reader(input);
    let headers = reader
        .headers()
        .map_err(|e| FormatError::Invalid(format!("the CSV header does not parse: {e}")))?
        .clone();
    let column = |name: &str| {
        headers
            .iter()
            .position(|h| h.trim_start_matches('\u{feff}').trim() == name)
    };
    let need = |name: &str| {
        column(name).ok_or_else(|| {
            FormatError::Invalid(format!(
                "missing column \"{name}\" (header: {})",
                headers.iter().collect::<Vec<_>>().join(",")
            ))
        })
    };
    let q = need(&mapping.question)?;
    let a = need(&mapping.answer)?;
    let system = mapping.system.as_deref().map(need).transpose()?;
    let id = mapping.id.as_deref().map(need).transpose()?;
    let labels = mapping
        .labels
        .iter()
        .map(|l| need(l).map(|i| (l.clone(), i)))
        .collect::<Result<Vec<_>, _>>()?;
    let mut last_line = 1u64;
    let mut row = csv::StringRecord::new();
    loop {
        let line = reader.position().line() + 1;
        match reader.read_record(&mut row) {
            Ok(false) => break,
            Ok(true) => {
                let line = row.position().map_or(line, |p| p.line());
                last_line = reader.position().line();
                let field = |i: usize| row.get(i).unwrap_or("").to_owned();
                let mut messages = Vec::with_capacity(3);
                let sys = system.map(field).filter(|s| !s.trim().is_empty());
                if let Some(s) = sys.or_else(|| non_empty(&options.default_system_prompt)) {
                    messages.push(Message {
                        role: Role::System,
                        content: s,
                    });
                }
                messages.push(Message {
                    role: Role::User,
                    content: field(q),
                });
                messages.push(Message {
                    role: Role::Assistant,
                    content: field(a),
                });
                let mut record = Record::new(messages, String::new(), source_name, line);
                if let Some(i) = id {
                    let v = field(i);
                    if !v.is_empty() {
                        record.id = v;
                    }
                }
                for (name, i) in &labels {
                    record.labels.insert(name.clone(), field(*i));
                }
                sink(Unit::Parsed(Ok(record)));
            }
            Err(e) => {
                let line = e.position().map_or(line, |p| p.line());
                last_line = reader.position().line();
                let message = match e.kind() {
                    csv::ErrorKind::UnequalLengths {
                        expected_len, len, ..
                    } => {
                        format!("expected {expected_len} fields, found {len}")
                    }
                    _ => e.to_string(),
                };
                sink(Unit::Parsed(Err(ParseError {
                    line,
                    message,
                    excerpt: String::new(),
                })));
            }
        }
    }
    Ok(last_line)
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// Parses one unit cut by [`read_units`].
pub fn parse_unit(
    line: u64,
    text: &str,
    format: Format,
    options: &ParseOptions,
    source_name: &str,
) -> Result<Record, ParseError> {
    let result = match format {
        Format::PlainDialogue => {
            parse_dialogue(text, &options.dialogue, options, source_name, line)
        }
        Format::RawText if !text.trim_start().starts_with('{') => {
            Ok(Record::new(Vec::new(), text.to_owned(), source_name, line))
        }
        _ => serde_json::from_str::<JsonRecord>(text)
            .map_err(|e| e.to_string())
            .and_then(|r| r.into_record(format, options, source_name, line)),
    };
    result.map_err(|message| ParseError {
        line,
        message,
        excerpt: crate::record::truncate_chars(text, 200),
    })
}

fn parse_dialogue(
    block: &str,
    prefixes: &DialoguePrefixes,
    options: &ParseOptions,
    source_name: &str,
    line: u64,
) -> Result<Record, String> {
    let mut messages: Vec<Message> = Vec::new();
    for (i, raw) in block.lines().enumerate() {
        match prefixes.split_turn(raw.trim_start()) {
            Some((role, rest)) => messages.push(Message {
                role,
                content: rest.to_owned(),
            }),
            None => match messages.last_mut() {
                Some(last) => {
                    last.content.push('\n');
                    last.content.push_str(raw);
                }
                None => {
                    return Err(format!(
                        "line {}: text before the first speaker prefix",
                        line + i as u64
                    ));
                }
            },
        }
    }
    add_default_system(&mut messages, options);
    Ok(Record::new(messages, String::new(), source_name, line))
}

fn add_default_system(messages: &mut Vec<Message>, options: &ParseOptions) {
    if !options.default_system_prompt.is_empty()
        && messages.first().is_none_or(|m| m.role != Role::System)
    {
        messages.insert(
            0,
            Message {
                role: Role::System,
                content: options.default_system_prompt.clone(),
            },
        );
    }
}

/// Every JSON shape the formats use; which fields matter depends on the format.
#[derive(Deserialize)]
struct JsonRecord {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    messages: Option<Vec<JsonTurn>>,
    #[serde(default)]
    conversations: Option<Vec<JsonTurn>>,
    #[serde(default)]
    instruction: Option<String>,
    #[serde(default)]
    input: Option<String>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    history: Option<Vec<(String, String)>>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, serde_json::Value>>,
}

#[derive(Deserialize)]
struct JsonTurn {
    #[serde(alias = "from")]
    role: Option<String>,
    #[serde(alias = "value")]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize)]
struct ContentPart {
    #[serde(default)]
    text: Option<String>,
}

fn role_of(name: &str) -> Result<Role, String> {
    match name {
        "system" => Ok(Role::System),
        "user" | "human" => Ok(Role::User),
        "assistant" | "gpt" | "chatgpt" | "bot" | "model" => Ok(Role::Assistant),
        other => Err(format!("unknown role `{other}`")),
    }
}

impl JsonRecord {
    fn into_record(
        self,
        format: Format,
        options: &ParseOptions,
        source_name: &str,
        line: u64,
    ) -> Result<Record, String> {
        let turns = |list: Option<Vec<JsonTurn>>, field: &str| -> Result<Vec<Message>, String> {
            let list = list.ok_or_else(|| format!("missing field `{field}`"))?;
            list.into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let role = role_of(
                        t.role
                            .as_deref()
                            .ok_or_else(|| format!("{field}[{i}]: missing role"))?,
                    )?;
                    let content = match t.content {
                        Some(Content::Text(s)) => s,
                        Some(Content::Parts(parts)) => parts
                            .into_iter()
                            .filter_map(|p| p.text)
                            .collect::<Vec<_>>()
                            .join("\n"),
                        None => return Err(format!("{field}[{i}]: missing content")),
                    };
                    Ok(Message { role, content })
                })
                .collect()
        };
        let (mut messages, text) = match format {
            Format::OpenAiMessages => (turns(self.messages, "messages")?, String::new()),
            Format::ShareGpt => {
                let mut m = turns(self.conversations, "conversations")?;
                if let Some(s) = self.system.filter(|s| !s.is_empty())
                    && m.first().is_none_or(|t| t.role != Role::System)
                {
                    m.insert(
                        0,
                        Message {
                            role: Role::System,
                            content: s,
                        },
                    );
                }
                (m, String::new())
            }
            Format::Alpaca => {
                let instruction = self.instruction.ok_or("missing field `instruction`")?;
                let output = self.output.ok_or("missing field `output`")?;
                let mut m = Vec::new();
                if let Some(s) = self.system.filter(|s| !s.is_empty()) {
                    m.push(Message {
                        role: Role::System,
                        content: s,
                    });
                }
                for (q, a) in self.history.unwrap_or_default() {
                    m.push(Message {
                        role: Role::User,
                        content: q,
                    });
                    m.push(Message {
                        role: Role::Assistant,
                        content: a,
                    });
                }
                let user = match self.input.filter(|s| !s.trim().is_empty()) {
                    Some(input) => format!("{instruction}\n\n{input}"),
                    None => instruction,
                };
                m.push(Message {
                    role: Role::User,
                    content: user,
                });
                m.push(Message {
                    role: Role::Assistant,
                    content: output,
                });
                (m, String::new())
            }
            Format::RawText => (Vec::new(), self.text.ok_or("missing field `text`")?),
            Format::Csv | Format::PlainDialogue => {
                return Err("not a JSON format".into());
            }
        };
        if format != Format::RawText {
            add_default_system(&mut messages, options);
        }
        let mut record = Record::new(messages, text, source_name, line);
        match self.id {
            Some(serde_json::Value::String(s)) if !s.is_empty() => record.id = s,
            Some(serde_json::Value::Number(n)) => record.id = n.to_string(),
            _ => {}
        }
        for (k, v) in self.labels.unwrap_or_default() {
            let v = match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            };
            record.labels.insert(k, v);
        }
        Ok(record)
    }
}

#[cfg(test)]
#[path = "parse_tests.rs"]
mod tests;
