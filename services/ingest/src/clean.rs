//! Cleaning and filtering of one record: the text rules of [`crate::text`], then the
//! filters (incomplete dialogue, length, repetition, language), PII redaction and the
//! phrase blocklist. [`CleanRules::apply`] is pure and thread-safe, so records are cleaned
//! in parallel; what it did comes back as an outcome the report adds up in input order.

use aho_corasick::AhoCorasick;

use crate::pii::{self, PiiCounts, PiiRules};
use crate::record::{Record, Role};
use crate::repetition::{self, RepetitionRules};
use crate::rules::Rule;
use crate::text;

/// A text rule: on/off, its id, and the function (`None` when the text is unchanged).
type TextRule = (bool, Rule, fn(&str) -> Option<String>);

/// Language filter.
#[derive(Debug, Clone, PartialEq)]
pub struct LanguageRules {
    /// ISO 639-1 codes to keep; empty → every language.
    pub allowed: Vec<String>,
    /// Below this confidence the language is `und` (kept).
    pub min_confidence: f64,
}

/// Blocklist action.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlocklistAction {
    /// Remove the record.
    Drop,
    /// Keep it with label `blocklist` = the phrase.
    Flag,
}

/// A compiled phrase blocklist.
#[derive(Debug, Clone)]
pub struct Blocklist {
    phrases: Vec<String>,
    matcher: AhoCorasick,
    /// What a match does.
    pub action: BlocklistAction,
}

impl Blocklist {
    /// Phrases are NFKC-normalized like the text they are matched against; matching ignores
    /// ASCII case when `case_insensitive` (CJK has no case).
    pub fn new(
        phrases: &[String],
        action: BlocklistAction,
        case_insensitive: bool,
    ) -> Result<Self, String> {
        let phrases: Vec<String> = phrases
            .iter()
            .map(|p| text::nfkc(p).unwrap_or_else(|| p.clone()))
            .collect();
        let matcher = AhoCorasick::builder()
            .ascii_case_insensitive(case_insensitive)
            .build(&phrases)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            phrases,
            matcher,
            action,
        })
    }

    /// The first phrase found in `text`.
    pub fn find(&self, text: &str) -> Option<&str> {
        self.matcher
            .find(text)
            .map(|m| self.phrases[m.pattern().as_usize()].as_str())
    }
}

/// Counts tokens with a model's tokenizer.
pub trait TokenCounter: Send + Sync + std::fmt::Debug {
    /// Tokens of `text` (no special tokens).
    fn count(&self, text: &str) -> usize;
}

impl TokenCounter for tokenizers::Tokenizer {
    fn count(&self, text: &str) -> usize {
        self.encode_fast(text, false).map_or(0, |e| e.len())
    }
}

/// Every cleaning rule with defaults filled.
#[derive(Debug, Clone)]
pub struct CleanRules {
    /// Repair mojibake.
    pub fix_mojibake: bool,
    /// Remove control characters.
    pub strip_control: bool,
    /// Unicode NFKC.
    pub nfkc: bool,
    /// Whitespace normalization.
    pub normalize_whitespace: bool,
    /// Drop empty or role-broken conversations.
    pub drop_incomplete: bool,
    /// Character bounds.
    pub min_chars: usize,
    /// Character bounds.
    pub max_chars: Option<usize>,
    /// Token bounds (need `tokenizer`).
    pub min_tokens: Option<usize>,
    /// Token bounds (need `tokenizer`).
    pub max_tokens: Option<usize>,
    /// Tokenizer of the target model.
    pub tokenizer: Option<std::sync::Arc<dyn TokenCounter>>,
    /// Repetition filters; `None` → off.
    pub repetition: Option<RepetitionRules>,
    /// Language filter; `None` → off (and languages not detected).
    pub language: Option<LanguageRules>,
    /// PII redaction.
    pub pii: PiiRules,
    /// Phrase blocklist.
    pub blocklist: Option<Blocklist>,
}

impl Default for CleanRules {
    fn default() -> Self {
        Self {
            fix_mojibake: true,
            strip_control: true,
            nfkc: true,
            normalize_whitespace: true,
            drop_incomplete: true,
            min_chars: 1,
            max_chars: None,
            min_tokens: None,
            max_tokens: None,
            tokenizer: None,
            repetition: None,
            language: None,
            pii: PiiRules::default(),
            blocklist: None,
        }
    }
}

/// A record that survived cleaning, with what was done to it.
#[derive(Debug)]
pub struct Kept {
    /// The cleaned record.
    pub record: Record,
    /// Text rules that changed it (bit = `Rule as u32`).
    pub changed: u32,
    /// PII replacements.
    pub pii: PiiCounts,
    /// Excerpt before cleaning when anything changed.
    pub before: Option<String>,
    /// Blocklist phrase when flagged.
    pub flagged: Option<String>,
    /// ISO 639-1 language (`und` when unsure), when the language filter is on.
    pub language: Option<String>,
    /// Token count, when a tokenizer is configured.
    pub tokens: Option<usize>,
}

/// A record removed by a rule.
#[derive(Debug)]
pub struct Removed {
    /// Which rule.
    pub rule: Rule,
    /// Finer reason key (`too_short`, `language:ja`).
    pub key: String,
    /// Human-readable reason (`min_chars 10 > 3`).
    pub detail: String,
    /// The record's id.
    pub id: String,
    /// Its input line.
    pub line: u64,
    /// Excerpt of the record.
    pub excerpt: String,
}

/// What cleaning did to one record.
#[derive(Debug)]
pub enum Outcome {
    /// Kept (maybe changed or flagged).
    Kept(Kept),
    /// Removed.
    Removed(Removed),
}

fn bit(rule: Rule) -> u32 {
    1 << (rule as u32)
}

/// ISO 639-1 of a whatlang language (its 639-3 code when there is no 639-1 code).
pub fn iso639_1(lang: whatlang::Lang) -> &'static str {
    use whatlang::Lang::*;
    match lang {
        Cmn => "zh",
        Eng => "en",
        Jpn => "ja",
        Kor => "ko",
        Fra => "fr",
        Deu => "de",
        Spa => "es",
        Rus => "ru",
        Por => "pt",
        Ita => "it",
        Ara => "ar",
        Hin => "hi",
        Vie => "vi",
        Tha => "th",
        Nld => "nl",
        Tur => "tr",
        Pol => "pl",
        Ukr => "uk",
        Ind => "id",
        Swe => "sv",
        Heb => "he",
        Ell => "el",
        Ces => "cs",
        Dan => "da",
        Fin => "fi",
        Hun => "hu",
        Ron => "ro",
        Pes => "fa",
        Ben => "bn",
        Urd => "ur",
        other => other.code(),
    }
}

/// The detected language of `text` (ISO 639-1), `und` below `min_confidence`.
pub fn detect_language(text: &str, min_confidence: f64) -> String {
    let sample = match text.char_indices().nth(2000) {
        Some((at, _)) => &text[..at],
        None => text,
    };
    match whatlang::detect(sample) {
        Some(info) if info.confidence() >= min_confidence => iso639_1(info.lang()).to_owned(),
        _ => "und".to_owned(),
    }
}

impl CleanRules {
    /// Cleans one record.
    pub fn apply(&self, mut record: Record) -> Outcome {
        let mut changed = 0u32;
        let mut before: Option<String> = None;
        let snapshot = |record: &Record, before: &mut Option<String>| {
            if before.is_none() {
                *before = Some(record.excerpt(500));
            }
        };
        let text_rules: [TextRule; 4] = [
            (self.fix_mojibake, Rule::Mojibake, text::fix_mojibake),
            (self.strip_control, Rule::ControlChars, text::strip_control),
            (self.nfkc, Rule::Nfkc, text::nfkc),
            (
                self.normalize_whitespace,
                Rule::Whitespace,
                text::normalize_whitespace,
            ),
        ];
        for (on, rule, f) in text_rules {
            if !on {
                continue;
            }
            for i in 0..record.messages.len() + 1 {
                let current = if i < record.messages.len() {
                    &record.messages[i].content
                } else {
                    &record.text
                };
                if let Some(new) = f(current) {
                    snapshot(&record, &mut before);
                    changed |= bit(rule);
                    match record.messages.get_mut(i) {
                        Some(m) => m.content = new,
                        None => record.text = new,
                    }
                }
            }
        }
        let removed = |rule: Rule, key: &str, detail: String, record: &Record| {
            Outcome::Removed(Removed {
                rule,
                key: key.to_owned(),
                detail,
                id: record.id.clone(),
                line: record.line,
                excerpt: record.excerpt(500),
            })
        };
        if self.drop_incomplete
            && !record.is_raw_text()
            && let Some((key, detail)) = dialogue_problem(&record)
        {
            return removed(Rule::IncompleteDialogue, key, detail, &record);
        }
        let chars = record.char_len();
        if chars < self.min_chars {
            return removed(
                Rule::Length,
                "too_short",
                format!("min_chars {} > {chars}", self.min_chars),
                &record,
            );
        }
        if let Some(max) = self.max_chars
            && chars > max
        {
            return removed(
                Rule::Length,
                "too_long",
                format!("max_chars {max} < {chars}"),
                &record,
            );
        }
        let tokens = self.tokenizer.as_ref().map(|t| {
            record
                .texts_ref()
                .map(|s| if s.is_empty() { 0 } else { t.count(s) })
                .sum::<usize>()
        });
        if let Some(tokens) = tokens {
            if let Some(min) = self.min_tokens
                && tokens < min
            {
                return removed(
                    Rule::Length,
                    "too_few_tokens",
                    format!("min_tokens {min} > {tokens}"),
                    &record,
                );
            }
            if let Some(max) = self.max_tokens
                && tokens > max
            {
                return removed(
                    Rule::Length,
                    "too_many_tokens",
                    format!("max_tokens {max} < {tokens}"),
                    &record,
                );
            }
        }
        let joined = if self.repetition.is_some() || self.language.is_some() {
            Some(record.joined_text())
        } else {
            None
        };
        if let (Some(rules), Some(joined)) = (&self.repetition, &joined)
            && let Some(detail) = repetition::check(joined, rules)
        {
            let key = detail.split(' ').next().unwrap_or("repetition").to_owned();
            return removed(Rule::Repetition, &key, detail, &record);
        }
        let mut language = None;
        if let (Some(rules), Some(joined)) = (&self.language, &joined) {
            let lang = detect_language(joined, rules.min_confidence);
            if lang != "und" && !rules.allowed.is_empty() && !rules.allowed.contains(&lang) {
                return removed(
                    Rule::Language,
                    &format!("language:{lang}"),
                    format!("language {lang} not in [{}]", rules.allowed.join(", ")),
                    &record,
                );
            }
            language = Some(lang);
        }
        let mut pii_counts = PiiCounts::default();
        for i in 0..record.messages.len() + 1 {
            let current = match record.messages.get(i) {
                Some(m) => &m.content,
                None => &record.text,
            };
            if let Some((new, counts)) = pii::redact(current, self.pii) {
                snapshot(&record, &mut before);
                pii_counts.add(counts);
                match record.messages.get_mut(i) {
                    Some(m) => m.content = new,
                    None => record.text = new,
                }
            }
        }
        let mut flagged = None;
        if let Some(blocklist) = &self.blocklist {
            let hit = record
                .texts_ref()
                .find_map(|t| blocklist.find(t))
                .map(str::to_owned);
            if let Some(phrase) = hit {
                match blocklist.action {
                    BlocklistAction::Drop => {
                        return removed(
                            Rule::Blocklist,
                            &format!("phrase:{phrase}"),
                            format!("contains `{phrase}`"),
                            &record,
                        );
                    }
                    BlocklistAction::Flag => {
                        record.labels.insert("blocklist".into(), phrase.clone());
                        flagged = Some(phrase);
                    }
                }
            }
        }
        Outcome::Kept(Kept {
            record,
            changed,
            pii: pii_counts,
            before,
            flagged,
            language,
            tokens,
        })
    }
}

/// Why a conversation is incomplete or role-broken: `(key, detail)`.
fn dialogue_problem(record: &Record) -> Option<(&'static str, String)> {
    let messages = &record.messages;
    if messages.is_empty() {
        return Some(("no_turns", "no turns".into()));
    }
    if let Some(i) = messages.iter().position(|m| m.content.trim().is_empty()) {
        return Some(("empty_turn", format!("turn {i} is empty")));
    }
    let start = usize::from(messages[0].role == Role::System);
    let mut expected = Role::User;
    for (i, m) in messages.iter().enumerate().skip(start) {
        if m.role != expected {
            return Some((
                "bad_order",
                format!(
                    "turn {i} is {} where {} was expected",
                    m.role.as_str(),
                    expected.as_str()
                ),
            ));
        }
        expected = if expected == Role::User {
            Role::Assistant
        } else {
            Role::User
        };
    }
    if messages.last().map(|m| m.role) != Some(Role::Assistant) {
        return Some((
            "last_not_assistant",
            "the last turn is not an assistant turn".into(),
        ));
    }
    None
}

#[cfg(test)]
#[path = "clean_tests.rs"]
mod tests;
