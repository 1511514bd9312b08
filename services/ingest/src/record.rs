//! The canonical dataset record (ARCHITECTURE.md, "canonical dataset record"): one JSON object
//! per line, `{"id", "messages": [{"role", "content"}…], "labels", "source"}`, plus `text` for
//! raw-text (pretraining) documents.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Author of a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// System prompt.
    System,
    /// The user.
    User,
    /// The model.
    Assistant,
}

impl Role {
    /// Lowercase name as written in JSONL.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// What is said.
    pub content: String,
}

/// A conversation (or a raw-text document) in canonical form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The source's id, else the first 16 hex chars of the sha256 of the content.
    pub id: String,
    /// Turns, in order; empty for raw text.
    #[serde(default)]
    pub messages: Vec<Message>,
    /// Document text of a raw-text record; empty for conversations.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub text: String,
    /// Labels (source labels, CSV label columns, flags, augmentation origin).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Provenance, `<filename>:<line>`.
    #[serde(default)]
    pub source: String,
    /// 1-based input line where the record started (not serialized: `source` carries it).
    #[serde(skip)]
    pub line: u64,
}

impl Record {
    /// A record with a content-derived id.
    pub fn new(messages: Vec<Message>, text: String, source_name: &str, line: u64) -> Self {
        let mut record = Record {
            id: String::new(),
            messages,
            text,
            labels: BTreeMap::new(),
            source: format!("{source_name}:{line}"),
            line,
        };
        record.id = record.content_id();
        record
    }

    /// First 16 hex chars of the sha256 over roles and contents (or the text).
    pub fn content_id(&self) -> String {
        let mut hasher = Sha256::new();
        for m in &self.messages {
            hasher.update(m.role.as_str().as_bytes());
            hasher.update([0]);
            hasher.update(m.content.as_bytes());
            hasher.update([1]);
        }
        hasher.update(self.text.as_bytes());
        hex::encode(&hasher.finalize()[..8])
    }

    /// True for a raw-text (pretraining) document.
    pub fn is_raw_text(&self) -> bool {
        self.messages.is_empty() && !self.text.is_empty()
    }

    /// Every content joined by `\n` (the text a filter looks at).
    pub fn joined_text(&self) -> String {
        if self.messages.is_empty() {
            return self.text.clone();
        }
        let mut out = String::with_capacity(self.char_capacity());
        for (i, m) in self.messages.iter().enumerate() {
            if i > 0 {
                out.push('\n');
            }
            out.push_str(&m.content);
        }
        out
    }

    fn char_capacity(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.len() + 1)
            .sum::<usize>()
            + self.text.len()
    }

    /// Length in Unicode scalar values over every content (or the text).
    pub fn char_len(&self) -> usize {
        self.messages
            .iter()
            .map(|m| m.content.chars().count())
            .sum::<usize>()
            + self.text.chars().count()
    }

    /// Mutable access to every text field.
    pub fn texts_mut(&mut self) -> impl Iterator<Item = &mut String> {
        self.messages
            .iter_mut()
            .map(|m| &mut m.content)
            .chain(std::iter::once(&mut self.text))
    }

    /// Every text field (contents, then the raw text).
    pub fn texts_ref(&self) -> impl Iterator<Item = &str> {
        self.messages
            .iter()
            .map(|m| m.content.as_str())
            .chain(std::iter::once(self.text.as_str()))
    }

    /// An excerpt of at most `max` chars for reports.
    pub fn excerpt(&self, max: usize) -> String {
        let text = if self.messages.is_empty() {
            self.text.clone()
        } else {
            self.messages
                .iter()
                .map(|m| format!("{}: {}", m.role.as_str(), m.content))
                .collect::<Vec<_>>()
                .join(" | ")
        };
        truncate_chars(&text, max)
    }

    /// The JSONL line (without the newline).
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a record of strings always serializes")
    }
}

/// The first `max` chars of `text`.
pub fn truncate_chars(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((at, _)) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_id_is_stable_and_json_round_trips() {
        let r = Record::new(
            vec![
                Message {
                    role: Role::User,
                    content: "你好".into(),
                },
                Message {
                    role: Role::Assistant,
                    content: "您好！".into(),
                },
            ],
            String::new(),
            "a.jsonl",
            3,
        );
        assert_eq!(r.id.len(), 16);
        assert_eq!(r.id, r.content_id());
        let line = r.to_json_line();
        assert!(line.starts_with(r#"{"id":""#), "{line}");
        assert!(line.contains(r#""source":"a.jsonl:3""#), "{line}");
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.messages, r.messages);
        assert_eq!(truncate_chars("你好世界", 2), "你好");
    }
}
