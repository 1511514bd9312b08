//! The compliance filter: blocked phrases (Aho-Corasick, case-insensitive) and regexes, with
//! one action per policy: `replace` the match, `refuse` the whole answer with a fixed
//! message, or `flag` it (pass through, mark `filtered`).
//!
//! Streams: [`StreamFilter`] holds back the last `longest match − 1` characters of each
//! choice, so a phrase split across chunks is always seen whole before any of it is sent;
//! regexes are assumed to match at most `max_regex_chars` characters.

use std::collections::BTreeSet;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use serde::Deserialize;

use crate::error::GatewayError;

/// What a policy does with a match.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FilterAction {
    /// Replace each match with `replacement`.
    #[default]
    Replace,
    /// Replace the whole answer with `refusal`; finish_reason `content_filter`.
    Refuse,
    /// Leave the text, mark the response `filtered`.
    Flag,
}

/// A filter as written in the routing file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterSpec {
    #[serde(default)]
    pub phrases: Vec<String>,
    #[serde(default)]
    pub regexes: Vec<String>,
    #[serde(default)]
    pub action: FilterAction,
    #[serde(default = "default_replacement")]
    pub replacement: String,
    #[serde(default = "default_refusal")]
    pub refusal: String,
    /// Also check request inputs (a match refuses the request with 400).
    #[serde(default)]
    pub inputs: bool,
    /// Longest text a regex is expected to match (stream hold-back).
    #[serde(default = "default_regex_chars")]
    pub max_regex_chars: usize,
}

fn default_replacement() -> String {
    "[removed]".to_owned()
}

fn default_refusal() -> String {
    "I can't provide that information.".to_owned()
}

fn default_regex_chars() -> usize {
    64
}

/// A compiled filter.
#[derive(Debug)]
pub struct FilterPolicy {
    pub name: String,
    matcher: Option<AhoCorasick>,
    regexes: Vec<regex::Regex>,
    pub action: FilterAction,
    replacement: String,
    pub refusal: String,
    pub inputs: bool,
    holdback: usize,
}

impl PartialEq for FilterPolicy {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

/// One match: byte range and rule id.
#[derive(Debug, Clone)]
struct Hit {
    start: usize,
    end: usize,
    rule: String,
}

impl FilterPolicy {
    /// Compiles `spec`; bad regexes are named.
    pub fn compile(name: &str, spec: &FilterSpec) -> Result<Self, GatewayError> {
        let phrases: Vec<String> = spec
            .phrases
            .iter()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect();
        let matcher = if phrases.is_empty() {
            None
        } else {
            Some(
                AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&phrases)
                    .map_err(|e| {
                        GatewayError::invalid(format!("filters.{name}.phrases"), e.to_string())
                    })?,
            )
        };
        let regexes = spec
            .regexes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                regex::RegexBuilder::new(r)
                    .case_insensitive(true)
                    .build()
                    .map_err(|e| {
                        GatewayError::invalid(format!("filters.{name}.regexes[{i}]"), e.to_string())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let longest_phrase = phrases.iter().map(|p| p.chars().count()).max().unwrap_or(0);
        let longest = if regexes.is_empty() {
            longest_phrase
        } else {
            longest_phrase.max(spec.max_regex_chars)
        };
        Ok(Self {
            name: name.to_owned(),
            matcher,
            regexes,
            action: spec.action,
            replacement: spec.replacement.clone(),
            refusal: spec.refusal.clone(),
            inputs: spec.inputs,
            holdback: longest.saturating_sub(1),
        })
    }

    fn hits(&self, text: &str) -> Vec<Hit> {
        let mut hits = Vec::new();
        if let Some(matcher) = &self.matcher {
            for m in matcher.find_iter(text) {
                hits.push(Hit {
                    start: m.start(),
                    end: m.end(),
                    rule: format!("{}/phrases[{}]", self.name, m.pattern().as_usize()),
                });
            }
        }
        for (i, regex) in self.regexes.iter().enumerate() {
            for m in regex.find_iter(text) {
                if m.start() < m.end() {
                    hits.push(Hit {
                        start: m.start(),
                        end: m.end(),
                        rule: format!("{}/regexes[{i}]", self.name),
                    });
                }
            }
        }
        hits.sort_by_key(|h| (h.start, std::cmp::Reverse(h.end)));
        hits
    }

    /// Rule ids that fire on `text` (input checks).
    pub fn check(&self, text: &str) -> Vec<String> {
        self.hits(text).into_iter().map(|h| h.rule).collect()
    }

    /// Filters a whole text.
    pub fn apply(&self, text: &str) -> Filtered {
        let mut stream = StreamFilter::new(self);
        let mut out = stream.push(text);
        let rest = stream.finish();
        out.text.push_str(&rest.text);
        Filtered {
            text: out.text,
            refused: out.refused || rest.refused,
            rules: stream.fired.into_iter().collect(),
        }
    }
}

/// The result of filtering a whole text.
#[derive(Debug, Clone, PartialEq)]
pub struct Filtered {
    pub text: String,
    pub refused: bool,
    pub rules: Vec<String>,
}

/// What a streamed chunk may send now.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Emit {
    /// Text safe to send.
    pub text: String,
    /// The answer was refused: `text` is the refusal, and the choice ends.
    pub refused: bool,
}

/// Filters one streamed choice. Rule ids name the filter and the rule's position
/// (`finance/phrases[2]`), never the blocked text itself.
#[derive(Debug)]
pub struct StreamFilter<'a> {
    policy: &'a FilterPolicy,
    pending: String,
    done: bool,
    /// Rule ids that fired so far.
    pub fired: BTreeSet<String>,
}

impl<'a> StreamFilter<'a> {
    /// A filter for one choice.
    pub fn new(policy: &'a FilterPolicy) -> Self {
        Self {
            policy,
            pending: String::new(),
            done: false,
            fired: BTreeSet::new(),
        }
    }

    /// Adds generated text; returns what may be sent now.
    pub fn push(&mut self, text: &str) -> Emit {
        if self.done {
            return Emit::default();
        }
        self.pending.push_str(text);
        // Keep the last `holdback` characters: a match starting before them ends inside the
        // pending text, so it is already visible whole.
        let chars = self.pending.chars().count();
        let cut = if chars > self.policy.holdback {
            self.pending
                .char_indices()
                .nth(chars - self.policy.holdback)
                .map_or(self.pending.len(), |(i, _)| i)
        } else {
            0
        };
        self.release(cut)
    }

    /// The choice ended: releases the held-back text.
    pub fn finish(&mut self) -> Emit {
        if self.done {
            return Emit::default();
        }
        let cut = self.pending.len();
        let emit = self.release(cut);
        self.done = true;
        emit
    }

    fn release(&mut self, mut cut: usize) -> Emit {
        let hits = self.policy.hits(&self.pending);
        if !hits.is_empty() && self.policy.action == FilterAction::Refuse {
            self.fired.extend(hits.into_iter().map(|h| h.rule));
            self.done = true;
            self.pending.clear();
            return Emit {
                text: self.policy.refusal.clone(),
                refused: true,
            };
        }
        for hit in &hits {
            if hit.start < cut {
                cut = cut.max(hit.end);
            }
        }
        let mut out = String::with_capacity(cut);
        let mut at = 0;
        for hit in hits.iter().filter(|h| h.start < cut) {
            self.fired.insert(hit.rule.clone());
            if self.policy.action == FilterAction::Flag || hit.start < at {
                continue;
            }
            out.push_str(&self.pending[at..hit.start]);
            out.push_str(&self.policy.replacement);
            at = hit.end;
        }
        if at < cut {
            out.push_str(&self.pending[at..cut]);
        }
        self.pending.drain(..cut);
        Emit {
            text: out,
            refused: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(action: FilterAction) -> FilterPolicy {
        FilterPolicy::compile(
            "finance",
            &FilterSpec {
                phrases: vec!["保本".into(), "无风险".into(), "guaranteed return".into()],
                regexes: vec![r"\d+% (?:sure|certain)".into()],
                action,
                max_regex_chars: 16,
                ..FilterSpec {
                    replacement: "[removed]".into(),
                    refusal: "Sorry, I can't say that.".into(),
                    ..Default::default()
                }
            },
        )
        .expect("valid")
    }

    /// Every way of splitting `text` into three chunks.
    fn splits(text: &str) -> Vec<Vec<String>> {
        let bounds: Vec<usize> = text
            .char_indices()
            .map(|(i, _)| i)
            .chain([text.len()])
            .collect();
        let mut out = Vec::new();
        for (ai, &a) in bounds.iter().enumerate() {
            for &b in &bounds[ai..] {
                out.push(vec![
                    text[..a].to_owned(),
                    text[a..b].to_owned(),
                    text[b..].to_owned(),
                ]);
            }
        }
        out
    }

    #[test]
    fn phrases_split_across_chunks_never_reach_the_client() {
        let p = policy(FilterAction::Replace);
        let text = "This fund is 保本 with a Guaranteed Return, 100% sure!";
        for chunks in splits(text) {
            let mut f = StreamFilter::new(&p);
            let mut sent = Vec::new();
            for c in &chunks {
                sent.push(f.push(c).text);
            }
            sent.push(f.finish().text);
            // No prefix of the client's view ever contains a blocked phrase.
            let mut seen = String::new();
            for s in &sent {
                seen.push_str(s);
                let lower = seen.to_lowercase();
                assert!(!lower.contains("guaranteed return") && !seen.contains("保本"));
                assert!(!seen.contains("100% sure"), "{chunks:?} → {sent:?}");
            }
            assert_eq!(seen, "This fund is [removed] with a [removed], [removed]!");
            assert_eq!(f.fired.len(), 3);
        }
    }

    #[test]
    fn refuse_replaces_the_whole_answer_and_flag_passes_through() {
        let p = policy(FilterAction::Refuse);
        let mut f = StreamFilter::new(&p);
        let first = f.push("Totally safe and guaran");
        assert!(!first.refused && !first.text.contains("guaran"));
        let second = f.push("teed return.");
        assert!(second.refused);
        assert_eq!(second.text, "Sorry, I can't say that.");
        assert_eq!(f.push("more").text, "");

        let flagged = policy(FilterAction::Flag).apply("it is 无风险");
        assert_eq!(flagged.text, "it is 无风险");
        assert!(!flagged.refused);
        assert_eq!(flagged.rules, vec!["finance/phrases[1]".to_owned()]);
    }

    #[test]
    fn clean_text_is_unchanged() {
        let out = policy(FilterAction::Replace).apply("nothing to see here");
        assert_eq!(out.text, "nothing to see here");
        assert!(out.rules.is_empty());
    }
}
