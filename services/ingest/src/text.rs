//! Text normalization rules: mojibake repair, control characters, Unicode NFKC, whitespace.
//! Each returns `None` when the text is unchanged, so the caller counts changes per rule and
//! the common case (already clean text) allocates nothing.

use unicode_normalization::{IsNormalized, UnicodeNormalization, is_nfkc_quick};

/// Repairs UTF-8 that was decoded as Windows-1252/Latin-1 (`Ã©` → `é`, `ä½ å¥½` → `你好`).
///
/// Works on maximal runs of characters that Windows-1252 can encode; a run containing a
/// non-ASCII character is re-encoded to bytes and replaced only when those bytes are valid
/// UTF-8, so genuine Latin-1 text (`café`) is left alone.
pub fn fix_mojibake(text: &str) -> Option<String> {
    // Mojibake of UTF-8 always holds Latin-1 letters (the lead bytes 0xC2–0xF4).
    if text.is_ascii() || !text.chars().any(|c| ('\u{C2}'..='\u{F4}').contains(&c)) {
        return None;
    }
    let mut out = String::new();
    let mut changed = false;
    let mut run: Vec<u8> = Vec::new();
    let mut run_start = 0usize;
    let mut run_has_high = false;
    let mut flush = |out: &mut String, run: &mut Vec<u8>, start: usize, end: usize, high: bool| {
        if high
            && let Ok(decoded) = std::str::from_utf8(run)
            && decoded != &text[start..end]
        {
            out.push_str(decoded);
            changed = true;
        } else {
            out.push_str(&text[start..end]);
        }
        run.clear();
    };
    for (i, c) in text.char_indices() {
        match cp1252_byte(c) {
            Some(b) => {
                if run.is_empty() {
                    run_start = i;
                    run_has_high = false;
                }
                run.push(b);
                run_has_high |= b >= 0x80;
            }
            None => {
                if !run.is_empty() {
                    flush(&mut out, &mut run, run_start, i, run_has_high);
                }
                out.push(c);
            }
        }
    }
    if !run.is_empty() {
        flush(&mut out, &mut run, run_start, text.len(), run_has_high);
    }
    changed.then_some(out)
}

/// The Windows-1252 byte of `c` (C1 controls map to themselves, as lenient decoders do).
fn cp1252_byte(c: char) -> Option<u8> {
    let u = c as u32;
    if u < 0x100 {
        return Some(u as u8);
    }
    const TABLE: [(u32, u8); 27] = [
        (0x20AC, 0x80),
        (0x201A, 0x82),
        (0x0192, 0x83),
        (0x201E, 0x84),
        (0x2026, 0x85),
        (0x2020, 0x86),
        (0x2021, 0x87),
        (0x02C6, 0x88),
        (0x2030, 0x89),
        (0x0160, 0x8A),
        (0x2039, 0x8B),
        (0x0152, 0x8C),
        (0x017D, 0x8E),
        (0x2018, 0x91),
        (0x2019, 0x92),
        (0x201C, 0x93),
        (0x201D, 0x94),
        (0x2022, 0x95),
        (0x2013, 0x96),
        (0x2014, 0x97),
        (0x02DC, 0x98),
        (0x2122, 0x99),
        (0x0161, 0x9A),
        (0x203A, 0x9B),
        (0x0153, 0x9C),
        (0x017E, 0x9E),
        (0x0178, 0x9F),
    ];
    TABLE.iter().find(|(cp, _)| *cp == u).map(|(_, b)| *b)
}

fn is_removed_control(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{200B}' | '\u{FEFF}' | '\u{2028}' | '\u{2029}')
}

/// Removes control characters other than `\n` and `\t` (and zero-width space, BOM).
pub fn strip_control(text: &str) -> Option<String> {
    if !text.chars().any(is_removed_control) {
        return None;
    }
    Some(text.chars().filter(|c| !is_removed_control(*c)).collect())
}

/// Unicode NFKC (full-width forms, compatibility characters).
pub fn nfkc(text: &str) -> Option<String> {
    if text.is_ascii() || is_nfkc_quick(text.chars()) == IsNormalized::Yes {
        return None;
    }
    let normalized: String = text.nfkc().collect();
    (normalized != text).then_some(normalized)
}

/// Collapses runs of spaces/tabs to one space, trims every line, keeps at most one blank
/// line in a row and trims the whole text.
pub fn normalize_whitespace(text: &str) -> Option<String> {
    if is_whitespace_normal(text) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    let mut blank_run = 0usize;
    for line in text.split('\n') {
        let mut collapsed = String::with_capacity(line.len());
        for word in line
            .split(|c: char| c.is_whitespace())
            .filter(|w| !w.is_empty())
        {
            if !collapsed.is_empty() {
                collapsed.push(' ');
            }
            collapsed.push_str(word);
        }
        if collapsed.is_empty() {
            blank_run += 1;
            continue;
        }
        if !out.is_empty() {
            out.push('\n');
            if blank_run > 0 {
                out.push('\n');
            }
        }
        blank_run = 0;
        out.push_str(&collapsed);
    }
    (out != text).then_some(out)
}

fn is_whitespace_normal(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.is_empty() {
        return true;
    }
    if !text.is_ascii()
        && text
            .chars()
            .any(|c| c.is_whitespace() && c != ' ' && c != '\n')
    {
        return false;
    }
    let first = bytes[0];
    let last = bytes[bytes.len() - 1];
    if first == b' ' || first == b'\n' || last == b' ' || last == b'\n' {
        return false;
    }
    let mut prev = 0u8;
    let mut prev2 = 0u8;
    for &b in bytes {
        match b {
            b'\t' | b'\r' | 0x0B | 0x0C => return false,
            b' ' if prev == b' ' || prev == b'\n' => return false,
            b'\n' if prev == b' ' || (prev == b'\n' && prev2 == b'\n') => return false,
            _ => {}
        }
        prev2 = prev;
        prev = b;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mojibake_is_repaired_and_latin1_left_alone() {
        assert_eq!(
            fix_mojibake("cafÃ© au lait").as_deref(),
            Some("café au lait")
        );
        let garbled: String = "你好".as_bytes().iter().map(|&b| b as char).collect();
        assert_eq!(
            fix_mojibake(&format!("用户 {garbled}")).as_deref(),
            Some("用户 你好")
        );
        assert_eq!(fix_mojibake("café"), None);
        assert_eq!(fix_mojibake("plain ascii"), None);
        assert_eq!(fix_mojibake("中文没有问题"), None);
        assert_eq!(fix_mojibake("itâ€™s"), Some("it’s".to_owned()));
    }

    #[test]
    fn control_chars_are_removed_but_newline_and_tab_kept() {
        assert_eq!(
            strip_control("a\u{7}b\r\nc\td\u{200B}").as_deref(),
            Some("ab\nc\td")
        );
        assert_eq!(strip_control("a\nb\tc"), None);
    }

    #[test]
    fn nfkc_folds_full_width_forms() {
        assert_eq!(nfkc("ＡＢＣ１２３").as_deref(), Some("ABC123"));
        assert_eq!(nfkc("ﬁ").as_deref(), Some("fi"));
        assert_eq!(nfkc("普通中文"), None);
        assert_eq!(nfkc("ascii"), None);
    }

    #[test]
    fn whitespace_is_collapsed_trimmed_and_blank_lines_limited() {
        assert_eq!(
            normalize_whitespace("  a   b \n\n\n\n c\t d  ").as_deref(),
            Some("a b\n\nc d")
        );
        assert_eq!(normalize_whitespace("a b\n\nc"), None);
        assert_eq!(normalize_whitespace("a\u{3000}b").as_deref(), Some("a b"));
        assert_eq!(normalize_whitespace("a \nb").as_deref(), Some("a\nb"));
    }
}
