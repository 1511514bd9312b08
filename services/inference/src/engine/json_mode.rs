//! JSON mode's length guard: a byte-level pushdown automaton over the JSON-object language
//! whose state is `Copy` (the container stack is a bit set) and knows the fewest bytes that
//! close the object from where it is ([`JsonState::bytes_to_close`]). The grammar itself is
//! llguidance's ([`super::constrain`]); this guard only keeps a `json_object` answer closable
//! within the tokens it has left.

/// Deepest nesting JSON mode allows (the stack is a `u128` bit set).
const MAX_DEPTH: u8 = 64;
/// Most consecutive whitespace bytes between tokens of the JSON text.
const MAX_WHITESPACE: u8 = 4;
/// The most one byte can raise [`JsonState::bytes_to_close`] (after `,` in an object, a key
/// `"":0` is owed; `f` owes `alse`).
pub const MAX_COST_PER_BYTE: usize = 4;

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

    /// Inside a string, not in an escape or a multi-byte character: printable ASCII other
    /// than `"` and `\` leaves the closing cost unchanged.
    pub fn in_plain_string(&self) -> bool {
        matches!(
            self.mode,
            Mode::Str {
                escape: 0,
                utf8: 0,
                ..
            }
        )
    }

    /// Whether the object is complete.
    pub fn is_done(&self) -> bool {
        self.mode == Mode::Done
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
    fn one_byte_raises_the_closing_cost_by_at_most_the_bound() {
        let prefixes = [
            "",
            "{",
            "{\"",
            "{\"k\"",
            "{\"k\":",
            "{\"k\":[",
            "{\"k\":[1",
            "{\"k\":1,",
            "{\"k\":\"a",
            "{\"k\":\"\\",
            "{\"k\":\"\\u0",
            "{\"k\":-",
            "{\"k\":1.",
            "{\"k\":t",
            "{\"k\":[{}",
            "{\"k\":[1,",
        ];
        for prefix in prefixes {
            let state = parse(prefix).expect("valid prefix");
            for b in 0..=255u8 {
                if let Some(next) = state.feed(b) {
                    assert!(
                        next.bytes_to_close() <= state.bytes_to_close() + MAX_COST_PER_BYTE,
                        "{prefix:?} + {b}"
                    );
                    if state.in_plain_string()
                        && (0x20..0x7F).contains(&b)
                        && b != b'"'
                        && b != b'\\'
                    {
                        assert_eq!(next.bytes_to_close(), state.bytes_to_close(), "{prefix:?}");
                    }
                }
            }
        }
    }
}
