//! PII redaction: e-mail addresses, phone numbers (mainland China mobile and landline,
//! E.164), Chinese resident identity numbers (check digit verified) and bank card numbers
//! (Luhn verified) are replaced in place by placeholders.

use std::sync::LazyLock;

use regex::Regex;

/// Which redactions are on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiiRules {
    /// `[EMAIL]`.
    pub email: bool,
    /// `[PHONE]`.
    pub phone: bool,
    /// `[ID_CARD]`.
    pub cn_resident_id: bool,
    /// `[BANK_CARD]`.
    pub bank_card: bool,
}

impl Default for PiiRules {
    fn default() -> Self {
        Self {
            email: true,
            phone: true,
            cn_resident_id: true,
            bank_card: true,
        }
    }
}

/// What a redaction pass replaced.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PiiCounts {
    /// E-mail addresses replaced.
    pub email: u32,
    /// Phone numbers replaced.
    pub phone: u32,
    /// Resident ID numbers replaced.
    pub cn_resident_id: u32,
    /// Bank card numbers replaced.
    pub bank_card: u32,
}

impl PiiCounts {
    /// True when nothing was replaced.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Adds another pass's counts.
    pub fn add(&mut self, other: PiiCounts) {
        self.email += other.email;
        self.phone += other.phone;
        self.cn_resident_id += other.cn_resident_id;
        self.bank_card += other.bank_card;
    }
}

static EMAIL: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
        .expect("the e-mail pattern is valid")
});
/// A digit run with optional single spaces or dashes between digits, an optional leading
/// `+` and an optional trailing `X` (resident IDs).
static NUMBER: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\+?\d(?:[ \-]?\d){6,22}[Xx]?").expect("the number pattern is valid")
});

/// Redacts `text`; returns the new text when something was replaced.
pub fn redact(text: &str, rules: PiiRules) -> Option<(String, PiiCounts)> {
    let bytes = text.as_bytes();
    let has_at = rules.email && memchr::memchr(b'@', bytes).is_some();
    let digits = bytes.iter().filter(|b| b.is_ascii_digit()).count();
    let check_numbers = (rules.phone || rules.cn_resident_id || rules.bank_card) && digits >= 7;
    if !has_at && !check_numbers {
        return None;
    }
    let mut counts = PiiCounts::default();
    let mut current: std::borrow::Cow<'_, str> = std::borrow::Cow::Borrowed(text);
    if has_at && EMAIL.is_match(&current) {
        let mut n = 0;
        let replaced = EMAIL.replace_all(&current, |_: &regex::Captures<'_>| {
            n += 1;
            "[EMAIL]"
        });
        counts.email = n;
        current = std::borrow::Cow::Owned(replaced.into_owned());
    }
    if check_numbers {
        let mut out = String::with_capacity(current.len());
        let mut last = 0;
        let mut changed = false;
        for m in NUMBER.find_iter(&current) {
            let before = current[..m.start()].chars().next_back();
            let after = current[m.end()..].chars().next();
            if before.is_some_and(|c| c.is_ascii_alphanumeric())
                || after.is_some_and(|c| c.is_ascii_alphanumeric())
            {
                continue;
            }
            let replacement = classify(m.as_str(), rules, &mut counts);
            if let Some(replacement) = replacement {
                out.push_str(&current[last..m.start()]);
                out.push_str(&replacement);
                last = m.end();
                changed = true;
            }
        }
        if changed {
            out.push_str(&current[last..]);
            current = std::borrow::Cow::Owned(out);
        }
    }
    (!counts.is_empty()).then(|| (current.into_owned(), counts))
}

/// The placeholder text for a candidate number (pieces separated by spaces are tried one by
/// one when the whole does not match), or `None` to leave it.
fn classify(candidate: &str, rules: PiiRules, counts: &mut PiiCounts) -> Option<String> {
    if let Some(tag) = classify_one(candidate, rules, counts) {
        return Some(tag.to_owned());
    }
    if !candidate.contains(' ') {
        return None;
    }
    let mut any = false;
    let pieces: Vec<String> = candidate
        .split(' ')
        .map(|piece| match classify_one(piece, rules, counts) {
            Some(tag) => {
                any = true;
                tag.to_owned()
            }
            None => piece.to_owned(),
        })
        .collect();
    any.then(|| pieces.join(" "))
}

fn classify_one(candidate: &str, rules: PiiRules, counts: &mut PiiCounts) -> Option<&'static str> {
    let plus = candidate.starts_with('+');
    let compact: String = candidate
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    let separated = compact.len() + usize::from(plus) != candidate.len();
    if rules.cn_resident_id && !plus && !separated && is_cn_resident_id(&compact) {
        counts.cn_resident_id += 1;
        return Some("[ID_CARD]");
    }
    if compact.ends_with(['X', 'x']) {
        return None;
    }
    if rules.bank_card && !plus && (13..=19).contains(&compact.len()) && luhn_valid(&compact) {
        counts.bank_card += 1;
        return Some("[BANK_CARD]");
    }
    if rules.phone && is_phone(&compact, plus) {
        counts.phone += 1;
        return Some("[PHONE]");
    }
    None
}

/// 18 characters: 17 digits and a check character (`0-9` or `X`) over the ISO 7064 MOD 11-2
/// weights, with a plausible birth date.
pub fn is_cn_resident_id(s: &str) -> bool {
    const WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = s.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let num = |r: std::ops::Range<usize>| s[r].parse::<u32>().unwrap_or(0);
    let (year, month, day) = (num(6..10), num(10..12), num(12..14));
    if !(1900..=2100).contains(&year) || !(1..=12).contains(&month) || !(1..=31).contains(&day) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(WEIGHTS)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    CHECK[(sum % 11) as usize] == b[17].to_ascii_uppercase()
}

/// The Luhn check of a digit string.
pub fn luhn_valid(digits: &str) -> bool {
    let mut sum = 0u32;
    for (i, c) in digits.bytes().rev().enumerate() {
        if !c.is_ascii_digit() {
            return false;
        }
        let mut d = u32::from(c - b'0');
        if i % 2 == 1 {
            d *= 2;
            if d > 9 {
                d -= 9;
            }
        }
        sum += d;
    }
    sum.is_multiple_of(10)
}

fn is_phone(digits: &str, plus: bool) -> bool {
    let b = digits.as_bytes();
    let mobile = |d: &[u8]| d.len() == 11 && d[0] == b'1' && (b'3'..=b'9').contains(&d[1]);
    if plus {
        return (b.starts_with(b"86") && mobile(&b[2..])) || (8..=15).contains(&b.len());
    }
    mobile(b)
        || (b.starts_with(b"86") && mobile(&b[2..]))
        // Landline: trunk 0, area code 2–3 digits, subscriber 7–8 digits.
        || (b.first() == Some(&b'0') && (10..=12).contains(&b.len()) && b.get(1) != Some(&b'0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str) -> String {
        redact(text, PiiRules::default()).map_or_else(|| text.to_owned(), |(t, _)| t)
    }

    #[test]
    fn emails_and_phones_are_replaced() {
        assert_eq!(
            r("联系 zhang.san@example.com 或 13812345678"),
            "联系 [EMAIL] 或 [PHONE]"
        );
        assert_eq!(r("call +1 4155552671 now"), "call [PHONE] now");
        assert_eq!(r("办公室 010-62345678"), "办公室 [PHONE]");
        assert_eq!(r("+86 138 1234 5678"), "[PHONE]");
    }

    #[test]
    fn resident_id_needs_a_valid_check_digit() {
        // 11010519491231002X is the standard's published example.
        assert!(is_cn_resident_id("11010519491231002X"));
        assert_eq!(r("身份证11010519491231002X。"), "身份证[ID_CARD]。");
        assert!(!is_cn_resident_id("110105194912310021"));
        assert_eq!(r("编号 110105194912310021"), "编号 110105194912310021");
    }

    #[test]
    fn bank_cards_need_luhn() {
        assert!(luhn_valid("4111111111111111"));
        assert_eq!(r("卡号 4111 1111 1111 1111 谢谢"), "卡号 [BANK_CARD] 谢谢");
        assert_eq!(r("card 4111111111111112"), "card 4111111111111112");
    }

    #[test]
    fn ordinary_numbers_and_text_stay() {
        assert_eq!(
            redact("价格 1234 元, order 2024", PiiRules::default()),
            None
        );
        assert_eq!(redact("no digits here", PiiRules::default()), None);
        let off = PiiRules {
            email: false,
            ..PiiRules::default()
        };
        assert_eq!(redact("a@b.com", off), None);
    }
}
