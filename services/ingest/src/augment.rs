//! Augmentation of train records: synonym replacement from a dictionary (a small Chinese and
//! English one ships in `data/synonyms.txt`) and model rewrites (paraphrase or
//! back-translation) through a [`Rewriter`]. Only user turns change; every copy carries
//! labels `augmented` and `origin` (the original's id).

use std::collections::HashMap;

use crate::minhash::splitmix64;
use crate::record::{Record, Role};

/// The dictionary shipped with the service.
pub const BUILTIN_SYNONYMS: &str = include_str!("../data/synonyms.txt");

/// Synonym groups: every word of a group can replace any other.
#[derive(Debug, Clone, Default)]
pub struct SynonymDict {
    groups: Vec<Vec<String>>,
    word_group: HashMap<String, usize>,
    max_chars: usize,
}

impl SynonymDict {
    /// Parses one group per line, words separated by spaces or tabs; `#` starts a comment.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut dict = SynonymDict::default();
        for (i, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let words: Vec<String> = line.split_whitespace().map(str::to_lowercase).collect();
            if words.len() < 2 {
                return Err(format!("line {}: a group needs at least two words", i + 1));
            }
            let g = dict.groups.len();
            for w in &words {
                dict.max_chars = dict.max_chars.max(w.chars().count());
                dict.word_group.entry(w.clone()).or_insert(g);
            }
            dict.groups.push(words);
        }
        if dict.groups.is_empty() {
            return Err("the dictionary has no synonym groups".into());
        }
        Ok(dict)
    }

    /// Number of groups.
    pub fn len(&self) -> usize {
        self.groups.len()
    }

    /// True when there are no groups.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Replaces dictionary words of `text` with probability `p` each, deterministically from
    /// `seed`. Longest match first; ASCII words match whole words only.
    pub fn replace(&self, text: &str, p: f64, seed: u64) -> String {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let mut out = String::with_capacity(text.len());
        let mut state = seed;
        let mut i = 0;
        while i < chars.len() {
            let mut matched = None;
            let prev_alnum = i > 0 && chars[i - 1].1.is_ascii_alphanumeric();
            for len in (1..=self.max_chars.min(chars.len() - i)).rev() {
                let start = chars[i].0;
                let end = chars.get(i + len).map_or(text.len(), |c| c.0);
                let candidate = &text[start..end];
                let ascii = candidate.is_ascii();
                if ascii
                    && (prev_alnum
                        || chars
                            .get(i + len)
                            .is_some_and(|c| c.1.is_ascii_alphanumeric()))
                {
                    continue;
                }
                let lowered = candidate.to_lowercase();
                if let Some(&g) = self.word_group.get(&lowered) {
                    matched = Some((len, g, lowered));
                    break;
                }
            }
            match matched {
                Some((len, g, word)) => {
                    state = splitmix64(state);
                    let roll = (state >> 11) as f64 / (1u64 << 53) as f64;
                    let group = &self.groups[g];
                    if roll < p {
                        let others: Vec<&String> = group.iter().filter(|w| **w != word).collect();
                        state = splitmix64(state);
                        out.push_str(others[(state % others.len() as u64) as usize]);
                    } else {
                        let start = chars[i].0;
                        let end = chars.get(i + len).map_or(text.len(), |c| c.0);
                        out.push_str(&text[start..end]);
                    }
                    i += len;
                }
                None => {
                    out.push(chars[i].1);
                    i += 1;
                }
            }
        }
        out
    }
}

/// Synonym replacement settings.
#[derive(Debug, Clone)]
pub struct SynonymSettings {
    /// The dictionary.
    pub dict: SynonymDict,
    /// Replacement probability per eligible word.
    pub probability: f64,
    /// Copies per record.
    pub copies: u32,
}

/// Rewrites text with a model (paraphrase or back-translation).
pub trait Rewriter: Send + Sync + std::fmt::Debug {
    /// The rewritten text, or why it failed.
    fn rewrite(&self, text: &str) -> Result<String, String>;
}

/// Model rewrite settings.
#[derive(Debug, Clone)]
pub struct RewriteSettings {
    /// Calls the model.
    pub rewriter: std::sync::Arc<dyn Rewriter>,
    /// Copies per record.
    pub copies: u32,
    /// Fraction of train records to rewrite.
    pub sample_fraction: f64,
}

/// A copy of `origin` with its user turns transformed; `None` when nothing changed.
pub fn augmented_copy(
    origin: &Record,
    kind: &str,
    copy: u32,
    mut transform: impl FnMut(&str) -> Result<String, String>,
) -> Result<Option<Record>, String> {
    let mut record = origin.clone();
    let mut changed = false;
    let targets: Vec<usize> = if record.is_raw_text() {
        Vec::new()
    } else {
        (0..record.messages.len())
            .filter(|i| record.messages[*i].role == Role::User)
            .collect()
    };
    if record.is_raw_text() {
        let new = transform(&record.text)?;
        changed = new != record.text;
        record.text = new;
    }
    for i in targets {
        let new = transform(&record.messages[i].content)?;
        if !new.trim().is_empty() && new != record.messages[i].content {
            record.messages[i].content = new;
            changed = true;
        }
    }
    if !changed {
        return Ok(None);
    }
    record.id = format!("{}~{kind}{copy}", origin.id);
    // The label names the method in full (dataset.proto); the id suffix stays short.
    let label = match kind {
        "syn" => "synonym",
        "rw" => "rewrite",
        other => other,
    };
    record.labels.insert("augmented".into(), label.to_owned());
    record.labels.insert("origin".into(), origin.id.clone());
    Ok(Some(record))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_dictionary_parses() {
        let dict = SynonymDict::parse(BUILTIN_SYNONYMS).unwrap();
        assert!(dict.len() >= 30);
    }

    #[test]
    fn replacement_is_deterministic_and_uses_group_words() {
        let dict = SynonymDict::parse("医生 大夫\ndoctor physician\n").unwrap();
        let a = dict.replace("我想问医生, ask a doctor", 1.0, 7);
        assert_eq!(a, "我想问大夫, ask a physician");
        assert_eq!(dict.replace("我想问医生, ask a doctor", 1.0, 7), a);
        assert_eq!(dict.replace("我想问医生", 0.0, 7), "我想问医生");
        // Whole words only for ASCII.
        assert_eq!(dict.replace("doctoral", 1.0, 7), "doctoral");
        assert!(SynonymDict::parse("lonely\n").is_err());
    }
}
