//! Gopher repetition filters (Rae et al. 2021, as implemented by datatrove's
//! `GopherRepetitionFilter`): fractions of duplicated lines and paragraphs (by count and by
//! characters) and the fraction of characters covered by the most frequent n-gram.
//! Words are whitespace-separated tokens; CJK text counts each ideograph as a word.

use std::collections::{HashMap, HashSet};

/// Bounds; a text over any of them is removed.
#[derive(Debug, Clone, PartialEq)]
pub struct RepetitionRules {
    /// Max fraction of lines duplicating another line.
    pub max_dup_line_frac: f64,
    /// Max fraction of paragraphs duplicating another paragraph.
    pub max_dup_para_frac: f64,
    /// Max fraction of characters inside duplicated lines.
    pub max_dup_line_char_frac: f64,
    /// `(n, max char fraction of the top n-gram)`.
    pub top_ngram: Vec<(usize, f64)>,
}

impl Default for RepetitionRules {
    fn default() -> Self {
        Self {
            max_dup_line_frac: 0.30,
            max_dup_para_frac: 0.30,
            max_dup_line_char_frac: 0.20,
            top_ngram: vec![(2, 0.20), (3, 0.18), (4, 0.16)],
        }
    }
}

/// `(duplicated elements, characters in duplicated elements)`, first occurrences not counted.
fn find_duplicates<'a>(elements: impl Iterator<Item = &'a str>) -> (usize, usize) {
    let mut seen = HashSet::new();
    let (mut dup_elements, mut dup_chars) = (0, 0);
    for e in elements {
        if !seen.insert(e) {
            dup_elements += 1;
            dup_chars += e.chars().count();
        }
    }
    (dup_elements, dup_chars)
}

fn is_cjk(c: char) -> bool {
    matches!(c as u32, 0x3040..=0x30FF | 0x3400..=0x4DBF | 0x4E00..=0x9FFF | 0xAC00..=0xD7AF | 0xF900..=0xFAFF)
}

/// Words of `text`: whitespace tokens, with CJK characters split out one per word.
pub fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for token in text.split_whitespace() {
        if !token.chars().any(is_cjk) {
            out.push(token);
            continue;
        }
        let mut start: Option<usize> = None;
        for (i, c) in token.char_indices() {
            if is_cjk(c) {
                if let Some(s) = start.take() {
                    out.push(&token[s..i]);
                }
                out.push(&token[i..i + c.len_utf8()]);
            } else if start.is_none() {
                start = Some(i);
            }
        }
        if let Some(s) = start {
            out.push(&token[s..]);
        }
    }
    out
}

/// The rule that fires first, as a reason (`dup_line_frac 0.50 > 0.30`), or `None`.
pub fn check(text: &str, rules: &RepetitionRules) -> Option<String> {
    let total_chars = text.chars().count().max(1);
    let paragraphs: Vec<&str> = text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if paragraphs.len() > 1 {
        let (dups, _) = find_duplicates(paragraphs.iter().copied());
        let frac = dups as f64 / paragraphs.len() as f64;
        if frac > rules.max_dup_para_frac {
            return Some(format!(
                "dup_para_frac {frac:.2} > {:.2}",
                rules.max_dup_para_frac
            ));
        }
    }
    let lines: Vec<&str> = text
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    if lines.len() > 1 {
        let (dups, dup_chars) = find_duplicates(lines.iter().copied());
        let frac = dups as f64 / lines.len() as f64;
        if frac > rules.max_dup_line_frac {
            return Some(format!(
                "dup_line_frac {frac:.2} > {:.2}",
                rules.max_dup_line_frac
            ));
        }
        let char_frac = dup_chars as f64 / total_chars as f64;
        if char_frac > rules.max_dup_line_char_frac {
            return Some(format!(
                "dup_line_char_frac {char_frac:.2} > {:.2}",
                rules.max_dup_line_char_frac
            ));
        }
    }
    let words = words(text);
    let word_chars: usize = words.iter().map(|w| w.chars().count()).sum();
    if word_chars == 0 {
        return None;
    }
    for &(n, max) in &rules.top_ngram {
        if words.len() < n {
            continue;
        }
        let mut counts: HashMap<&[&str], usize> = HashMap::new();
        for gram in words.windows(n) {
            *counts.entry(gram).or_default() += 1;
        }
        let (top, count) = counts
            .iter()
            .max_by_key(|(gram, count)| (**count, std::cmp::Reverse(**gram)))
            .expect("at least one n-gram when words.len() >= n");
        if *count < 2 {
            continue;
        }
        let gram_chars: usize = top.iter().map(|w| w.chars().count()).sum();
        let frac = (gram_chars * count) as f64 / word_chars as f64;
        if frac > max {
            return Some(format!("top_{n}gram_char_frac {frac:.2} > {max:.2}"));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicated_lines_are_caught() {
        let rules = RepetitionRules::default();
        let text = "buy now\nbuy now\nbuy now\nthe weather is fine today";
        assert!(
            check(text, &rules)
                .unwrap()
                .starts_with("dup_line_frac 0.50")
        );
    }

    #[test]
    fn duplicated_paragraphs_are_caught() {
        let rules = RepetitionRules::default();
        let text = "第一段内容。\n\n重复的段落。\n\n重复的段落。";
        assert!(
            check(text, &rules)
                .unwrap()
                .starts_with("dup_para_frac 0.33")
        );
    }

    #[test]
    fn top_ngram_fraction_is_caught_in_english_and_chinese() {
        let rules = RepetitionRules::default();
        let en = "click here click here click here for the best deals on the market";
        assert!(
            check(en, &rules)
                .unwrap()
                .starts_with("top_2gram_char_frac"),
            "{:?}",
            check(en, &rules)
        );
        let zh = "保本保本保本保本的理财产品";
        assert!(
            check(zh, &rules)
                .unwrap()
                .starts_with("top_2gram_char_frac")
        );
    }

    #[test]
    fn ordinary_text_passes() {
        let rules = RepetitionRules::default();
        assert_eq!(
            check(
                "What are the symptoms of influenza?\nFever, cough and fatigue are common.",
                &rules
            ),
            None
        );
        assert_eq!(
            check("感冒的常见症状有哪些？\n发热、咳嗽和乏力较为常见。", &rules),
            None
        );
        assert_eq!(
            words("我爱NLP模型 ok"),
            vec!["我", "爱", "NLP", "模", "型", "ok"]
        );
    }
}
