//! JSON mode (`response_format: json_object`) by constrained decoding: before each sampling
//! step, every token that would not keep the output a valid prefix of one JSON object gets
//! logit −∞, and so does every token after which the object could no longer be closed within
//! the tokens left (`max_tokens`, context); once the object is closed only EOS remains.
//!
//! Why hand-written rather than `llguidance`: JSON-object mode needs one fixed grammar, which
//! a byte-level pushdown automaton with a `Copy` state (the container stack is a bit set)
//! checks in a few nanoseconds per byte, with no new dependency tree in the engine; a general
//! grammar engine becomes worth it with JSON-schema or regex constraints.
//!
//! - [`JsonVocab`]: each token's bytes as the detokenizer emits them, built once per model.
//! - [`JsonState`]: the automaton; [`JsonConstraint`]: one sequence's state plus the mask.

use std::sync::Arc;

use lmforge_model::tokenizer::TextTokenizer;

/// Deepest nesting JSON mode allows (the stack is a `u128` bit set).
const MAX_DEPTH: u8 = 64;
/// Most consecutive whitespace bytes between tokens of the JSON text.
const MAX_WHITESPACE: u8 = 4;

/// Each token id's output bytes; empty for special tokens (skipped in text).
#[derive(Debug)]
pub struct JsonVocab {
    bytes: Vec<Box<[u8]>>,
}

/// GPT-2's byte ↔ printable-char table used by byte-level BPE vocabularies.
fn byte_level_table() -> std::collections::HashMap<char, u8> {
    let mut printable: Vec<u32> = (u32::from(b'!')..=u32::from(b'~'))
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<u32> = printable.clone();
    let mut extra = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + extra);
            extra += 1;
        }
    }
    printable
        .into_iter()
        .zip(chars)
        .filter_map(|(b, c)| Some((char::from_u32(c)?, u8::try_from(b).ok()?)))
        .collect()
}

impl JsonVocab {
    /// Reads every token's bytes from `tokenizer`: byte-level BPE pieces through GPT-2's
    /// table, SentencePiece pieces with `▁` as a space and `<0xNN>` byte tokens.
    pub fn new(tokenizer: &TextTokenizer) -> Self {
        let inner = &tokenizer.inner;
        let byte_level = matches!(
            inner.get_decoder(),
            Some(tokenizers::DecoderWrapper::ByteLevel(_))
        );
        let table = byte_level_table();
        let special: std::collections::HashSet<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| id)
            .collect();
        let size = inner.get_vocab_size(true);
        let bytes = (0..size as u32)
            .map(|id| {
                if special.contains(&id) {
                    return Box::default();
                }
                let Some(piece) = inner.id_to_token(id) else {
                    return Box::default();
                };
                if byte_level {
                    let mapped: Option<Vec<u8>> =
                        piece.chars().map(|c| table.get(&c).copied()).collect();
                    return mapped
                        .unwrap_or_else(|| piece.into_bytes())
                        .into_boxed_slice();
                }
                if let Some(hex) = piece.strip_prefix("<0x").and_then(|p| p.strip_suffix('>'))
                    && let Ok(b) = u8::from_str_radix(hex, 16)
                {
                    return Box::new([b]);
                }
                piece
                    .replace('\u{2581}', " ")
                    .into_bytes()
                    .into_boxed_slice()
            })
            .collect();
        Self { bytes }
    }

    /// A vocabulary from explicit token bytes (tests).
    pub fn from_bytes(bytes: Vec<Vec<u8>>) -> Self {
        Self {
            bytes: bytes.into_iter().map(Vec::into_boxed_slice).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Nothing yet: `{` only.
    Start,
    /// A value (after `:` or `,` in an array).
    Value,
    /// After `[`: a value or `]`.
    ArrayFirst,
    /// After `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closer.
    After,
    /// Inside a string; `escape`: 0 none, 1 after `\`, 2..=5 hex digits left + 1;
    /// `utf8`: continuation bytes still expected.
    Str {
        key: bool,
        escape: u8,
        utf8: u8,
    },
    Num(Num),
    /// Inside `true`/`false`/`null`: which word and how far.
    Lit {
        word: u8,
        pos: u8,
    },
    /// The object is closed.
    Done,
}

const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];

/// The automaton's state: `Copy`, so trying a token costs no allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonState {
    mode: Mode,
    /// Bit i set: the container at depth i is an object (else an array).
    stack: u128,
    depth: u8,
    whitespace: u8,
}

impl Default for JsonState {
    fn default() -> Self {
        Self {
            mode: Mode::Start,
            stack: 0,
            depth: 0,
            whitespace: 0,
        }
    }
}

impl JsonState {
    fn top_is_object(&self) -> bool {
        self.depth > 0 && self.stack & (1 << (self.depth - 1)) != 0
    }

    fn push(&mut self, object: bool) -> Option<()> {
        if self.depth >= MAX_DEPTH {
            return None;
        }
        if object {
            self.stack |= 1 << self.depth;
        } else {
            self.stack &= !(1 << self.depth);
        }
        self.depth += 1;
        self.mode = if object {
            Mode::ObjectFirst
        } else {
            Mode::ArrayFirst
        };
        Some(())
    }

    fn close(&mut self, object: bool) -> Option<()> {
        if self.depth == 0 || self.top_is_object() != object {
            return None;
        }
        self.depth -= 1;
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::After
        };
        Some(())
    }

    fn value_start(&mut self, b: u8) -> Option<()> {
        self.mode = match b {
            b'{' => return self.push(true),
            b'[' => return self.push(false),
            b'"' => Mode::Str {
                key: false,
                escape: 0,
                utf8: 0,
            },
            b'-' => Mode::Num(Num::Minus),
            b'0' => Mode::Num(Num::Zero),
            b'1'..=b'9' => Mode::Num(Num::Int),
            b't' => Mode::Lit { word: 0, pos: 1 },
            b'f' => Mode::Lit { word: 1, pos: 1 },
            b'n' => Mode::Lit { word: 2, pos: 1 },
            _ => return None,
        };
        Some(())
    }

    /// Advances by one byte; `None` when the byte cannot continue a JSON object.
    pub fn feed(mut self, b: u8) -> Option<Self> {
        let whitespace = matches!(b, b' ' | b'\n' | b'\t' | b'\r');
        if whitespace
            && matches!(
                self.mode,
                Mode::Value
                    | Mode::ArrayFirst
                    | Mode::ObjectFirst
                    | Mode::Key
                    | Mode::Colon
                    | Mode::After
            )
        {
            self.whitespace += 1;
            return (self.whitespace <= MAX_WHITESPACE).then_some(self);
        }
        if !matches!(self.mode, Mode::Str { .. }) {
            self.whitespace = 0;
        }
        match self.mode {
            Mode::Start => (b == b'{').then(|| self.push(true)).flatten()?,
            Mode::Value => self.value_start(b)?,
            Mode::ArrayFirst if b == b']' => self.close(false)?,
            Mode::ArrayFirst => self.value_start(b)?,
            Mode::ObjectFirst if b == b'}' => self.close(true)?,
            Mode::ObjectFirst | Mode::Key if b == b'"' => {
                self.mode = Mode::Str {
                    key: true,
                    escape: 0,
                    utf8: 0,
                };
            }
            Mode::ObjectFirst | Mode::Key => return None,
            Mode::Colon if b == b':' => self.mode = Mode::Value,
            Mode::Colon => return None,
            Mode::After => match b {
                b',' => {
                    self.mode = if self.top_is_object() {
                        Mode::Key
                    } else {
                        Mode::Value
                    };
                }
                b'}' => self.close(true)?,
                b']' => self.close(false)?,
                _ => return None,
            },
            Mode::Str { key, escape, utf8 } => {
                self.mode = match (escape, utf8, b) {
                    (0, 0, b'"') => {
                        if key {
                            Mode::Colon
                        } else {
                            Mode::After
                        }
                    }
                    (0, 0, b'\\') => Mode::Str {
                        key,
                        escape: 1,
                        utf8: 0,
                    },
                    (0, 0, 0x20..=0x7F) => self.mode,
                    (0, 0, 0xC2..=0xDF) => Mode::Str {
                        key,
                        escape: 0,
                        utf8: 1,
                    },
                    (0, 0, 0xE0..=0xEF) => Mode::Str {
                        key,
                        escape: 0,
                        utf8: 2,
                    },
                    (0, 0, 0xF0..=0xF4) => Mode::Str {
                        key,
                        escape: 0,
                        utf8: 3,
                    },
                    (0, n, 0x80..=0xBF) if n > 0 => Mode::Str {
                        key,
                        escape: 0,
                        utf8: n - 1,
                    },
                    (1, _, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Mode::Str {
                        key,
                        escape: 0,
                        utf8: 0,
                    },
                    (1, _, b'u') => Mode::Str {
                        key,
                        escape: 5,
                        utf8: 0,
                    },
                    (2..=5, _, h) if h.is_ascii_hexdigit() => Mode::Str {
                        key,
                        escape: if escape == 2 { 0 } else { escape - 1 },
                        utf8: 0,
                    },
                    _ => return None,
                };
            }
            Mode::Num(num) => {
                let next = match (num, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus | Num::Int, b'1'..=b'9') | (Num::Int, b'0') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) => self.mode = Mode::Num(n),
                    // A complete number ends at the first byte that cannot extend it.
                    None if matches!(num, Num::Zero | Num::Int | Num::Frac | Num::Exp) => {
                        self.mode = Mode::After;
                        return self.feed(b);
                    }
                    None => return None,
                }
            }
            Mode::Lit { word, pos } => {
                let w = WORDS[word as usize];
                if w[pos as usize] != b {
                    return None;
                }
                self.mode = if pos as usize + 1 == w.len() {
                    Mode::After
                } else {
                    Mode::Lit { word, pos: pos + 1 }
                };
            }
            Mode::Done => return None,
        }
        Some(self)
    }

    /// Feeds every byte of a token.
    pub fn feed_all(self, bytes: &[u8]) -> Option<Self> {
        bytes.iter().try_fold(self, |s, &b| s.feed(b))
    }

    /// Fewest bytes (each a single-byte token) that close the object from here.
    pub fn bytes_to_close(&self) -> usize {
        let depth = usize::from(self.depth);
        let extra = match self.mode {
            Mode::Start => 2,
            Mode::Value => 1,
            Mode::ArrayFirst | Mode::ObjectFirst | Mode::After | Mode::Done => 0,
            Mode::Key => 4,
            Mode::Colon => 2,
            Mode::Str { key, escape, utf8 } => {
                let escape = match escape {
                    0 => 0,
                    1 => 1,
                    n => usize::from(n - 1),
                };
                escape + usize::from(utf8) + 1 + if key { 2 } else { 0 }
            }
            Mode::Num(Num::Minus | Num::Dot | Num::E | Num::ESign) => 1,
            Mode::Num(_) => 0,
            Mode::Lit { word, pos } => WORDS[word as usize].len() - usize::from(pos),
        };
        extra + depth
    }

    /// Whether the object is complete.
    pub fn is_done(&self) -> bool {
        self.mode == Mode::Done
    }
}

/// One sequence's JSON constraint.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    vocab: Arc<JsonVocab>,
    state: JsonState,
}

impl JsonConstraint {
    pub fn new(vocab: Arc<JsonVocab>) -> Self {
        Self {
            vocab,
            state: JsonState::default(),
        }
    }

    /// Sets the logits of every token that may not come next to −∞. `remaining` counts the
    /// tokens this sequence may still generate, this one included; `stop_ids` end it.
    pub fn mask(&self, row: &mut [f32], remaining: usize, stop_ids: &[u32]) {
        if self.state.is_done() {
            for (id, x) in row.iter_mut().enumerate() {
                if !stop_ids.contains(&(id as u32)) {
                    *x = f32::NEG_INFINITY;
                }
            }
            return;
        }
        let budget = remaining.saturating_sub(1);
        let allowed = |within_budget: bool| -> Vec<bool> {
            (0..row.len())
                .map(|id| {
                    self.vocab
                        .bytes
                        .get(id)
                        .filter(|b| !b.is_empty())
                        .and_then(|b| self.state.feed_all(b))
                        .is_some_and(|s| !within_budget || s.bytes_to_close() <= budget)
                })
                .collect()
        };
        let mut keep = allowed(true);
        // Nothing closes in time (a budget too small from the start, or the model's own
        // masks removed the rest): stay valid at least.
        if !keep
            .iter()
            .zip(row.iter())
            .any(|(k, x)| *k && x.is_finite())
        {
            keep = allowed(false);
        }
        for (x, k) in row.iter_mut().zip(keep) {
            if !k {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// Advances past the sampled token.
    pub fn accept(&mut self, token: u32) {
        if let Some(next) = self
            .vocab
            .bytes
            .get(token as usize)
            .and_then(|b| self.state.feed_all(b))
        {
            self.state = next;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Option<JsonState> {
        JsonState::default().feed_all(text.as_bytes())
    }

    #[test]
    fn accepts_json_objects_and_rejects_the_rest() {
        for ok in [
            "{}",
            r#"{"a": 1, "b": [true, false, null, -0.5e+3, "x\"y\u00e9"], "c": {"d": []}}"#,
            "{\"中文\": \"值\"}",
        ] {
            let s = parse(ok).unwrap_or_else(|| panic!("{ok} refused"));
            assert!(s.is_done(), "{ok} not done");
            assert_eq!(s.bytes_to_close(), 0);
        }
        for bad in [
            "[]",
            " {}",
            "{a:1}",
            "{\"a\" 1}",
            "{\"a\":01}",
            "{\"a\":tru}",
            "{}}",
            "{\"a\":1,}",
            "{\"a\":\"\x01\"}",
        ] {
            assert!(parse(bad).is_none_or(|s| !s.is_done()), "{bad:?} accepted");
        }
        assert!(parse("{\"a\":tru").is_some());
        assert!(parse("{\"a\":1,}").is_none());
    }

    #[test]
    fn bytes_to_close_counts_the_shortest_completion() {
        for (prefix, completion) in [
            ("", "{}"),
            ("{", "}"),
            ("{\"k", "\":0}"),
            ("{\"k\"", ":0}"),
            ("{\"k\":", "0}"),
            ("{\"k\":[1,", "0]}"),
            ("{\"k\":[{\"a\":-", "1}]}"),
            ("{\"k\":\"\\u0", "000\"}"),
            ("{\"k\":nu", "ll}"),
            ("{\"a\":1,", "\"\":0}"),
        ] {
            let s = parse(prefix).expect("valid prefix");
            assert_eq!(s.bytes_to_close(), completion.len(), "{prefix}");
            let done = s.feed_all(completion.as_bytes()).expect("completes");
            assert!(done.is_done(), "{prefix}{completion}");
        }
    }

    #[test]
    fn the_mask_always_finishes_a_valid_object_within_the_budget() {
        // Single bytes plus a few multi-byte pieces, including ones that are never valid.
        let mut pieces: Vec<Vec<u8>> = (0u8..128).map(|b| vec![b]).collect();
        for p in ["{\"", "\":", "true", "\"}", "]]]", "abc", "  "] {
            pieces.push(p.as_bytes().to_vec());
        }
        let eos = pieces.len() as u32;
        pieces.push(Vec::new());
        let vocab = Arc::new(JsonVocab::from_bytes(pieces.clone()));
        // A deterministic "model" that prefers opening things and long strings.
        for (budget, seed) in [(2usize, 1u64), (5, 2), (9, 3), (20, 4), (40, 5)] {
            let mut c = JsonConstraint::new(vocab.clone());
            let mut out = Vec::new();
            let mut rng = seed;
            for step in 0..budget {
                let mut row: Vec<f32> = (0..pieces.len())
                    .map(|_| {
                        rng = rng
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (rng >> 40) as f32 / (1u64 << 24) as f32
                    })
                    .collect();
                c.mask(&mut row, budget - step, &[eos]);
                let (best, _) = row
                    .iter()
                    .enumerate()
                    .filter(|(_, x)| x.is_finite())
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .expect("some token allowed");
                if best as u32 == eos {
                    break;
                }
                c.accept(best as u32);
                out.extend_from_slice(&pieces[best]);
            }
            let text = String::from_utf8(out).expect("utf-8");
            let value: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("budget {budget}: {text:?} is not JSON: {e}"));
            assert!(value.is_object(), "{text}");
        }
    }
}
