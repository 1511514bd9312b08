//! Stopping and streaming text out token by token.
//!
//! [`StreamState::push`] takes each generated token and returns the text that is safe to send
//! now. Two things are held back: bytes of an incomplete UTF-8 character (a byte-level
//! tokenizer can split one Chinese character over several tokens; the decoder shows those as
//! U+FFFD until the character is complete), and any tail that could be the start of a stop
//! string, since the next token might complete it. Generation stops on EOS ids, stop token
//! ids, a stop string (matched across token boundaries, and never sent), or `max_tokens`.

use crate::error::Result;

/// Turns token ids into text (implemented for `tokenizers::Tokenizer` in `tokenizer.rs`).
pub trait Detokenize {
    fn decode(&self, ids: &[u32]) -> Result<String>;
}

/// When to stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StopConfig {
    pub eos_token_ids: Vec<u32>,
    pub stop_token_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub max_tokens: Option<usize>,
}

/// Why generation ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FinishReason {
    Eos,
    StopToken(u32),
    StopString(String),
    Length,
}

/// What one token produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StreamStep {
    /// Text safe to send now (may be empty while something is held back).
    pub text: String,
    pub finished: Option<FinishReason>,
}

/// Incremental detokenizer plus stop checks for one sequence.
#[derive(Debug, Clone, Default)]
pub struct StreamState {
    pub config: StopConfig,
    ids: Vec<u32>,
    /// Start of the token window re-decoded each step (TGI's `prefix_offset`).
    prefix_offset: usize,
    /// Tokens up to here have had their text released from the decoder.
    read_offset: usize,
    /// Decoded text not yet sent because it may begin a stop string.
    pending: String,
    generated: usize,
    done: bool,
}

impl StreamState {
    pub fn new(config: StopConfig) -> Self {
        Self {
            config,
            ..Self::default()
        }
    }

    /// Feed one generated token.
    pub fn push(&mut self, token: u32, tok: &impl Detokenize) -> Result<StreamStep> {
        if self.done {
            return Ok(StreamStep::default());
        }
        self.generated += 1;
        if self.config.eos_token_ids.contains(&token) {
            return Ok(self.finish(FinishReason::Eos));
        }
        if self.config.stop_token_ids.contains(&token) {
            return Ok(self.finish(FinishReason::StopToken(token)));
        }
        self.ids.push(token);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = tok.decode(&self.ids[self.prefix_offset..])?;
        // A trailing U+FFFD means the last token ended mid-character: wait for the rest.
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            self.pending.push_str(&full[prefix.len()..]);
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
        }
        if let Some((at, stop)) = self.find_stop() {
            self.pending.truncate(at);
            return Ok(self.finish(FinishReason::StopString(stop)));
        }
        if self.config.max_tokens.is_some_and(|m| self.generated >= m) {
            return Ok(self.finish(FinishReason::Length));
        }
        let keep = self.held_suffix_len();
        let cut = self.pending.len() - keep;
        let text = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        Ok(StreamStep {
            text,
            finished: None,
        })
    }

    /// End the stream without another token (a grammar that is complete): release what was
    /// held and report `reason`.
    pub fn end(&mut self, reason: FinishReason) -> StreamStep {
        if self.done {
            return StreamStep::default();
        }
        self.finish(reason)
    }

    /// End the stream: release what was held and report `reason`.
    fn finish(&mut self, reason: FinishReason) -> StreamStep {
        self.done = true;
        StreamStep {
            text: std::mem::take(&mut self.pending),
            finished: Some(reason),
        }
    }

    /// Earliest stop string in `pending`.
    fn find_stop(&self) -> Option<(usize, String)> {
        self.config
            .stop_strings
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.pending.find(s.as_str()).map(|i| (i, s.clone())))
            .min_by_key(|(i, _)| *i)
    }

    /// Length of the longest tail of `pending` that is a proper prefix of a stop string.
    fn held_suffix_len(&self) -> usize {
        let p = &self.pending;
        let mut best = 0;
        for stop in &self.config.stop_strings {
            for (start, _) in p.char_indices() {
                let tail = &p[start..];
                if tail.len() < stop.len() && stop.starts_with(tail) {
                    best = best.max(tail.len());
                    break; // char_indices runs from the longest tail down
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One token per byte: the harshest case for splitting UTF-8 characters.
    struct Bytes;
    impl Detokenize for Bytes {
        fn decode(&self, ids: &[u32]) -> Result<String> {
            let b: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
            Ok(String::from_utf8_lossy(&b).into_owned())
        }
    }

    fn stream(text: &str, config: StopConfig) -> (Vec<String>, Option<FinishReason>) {
        let mut s = StreamState::new(config);
        let mut out = vec![];
        for b in text.bytes() {
            let step = s.push(b as u32, &Bytes).expect("push");
            out.push(step.text);
            if step.finished.is_some() {
                return (out, step.finished);
            }
        }
        (out, None)
    }

    #[test]
    fn chinese_streams_without_split_characters() {
        let (parts, fin) = stream("你好，世界！", StopConfig::default());
        assert_eq!(fin, None);
        assert!(parts.iter().all(|p| !p.contains('\u{FFFD}')), "{parts:?}");
        assert_eq!(parts.concat(), "你好，世界！");
        // Three bytes per character: two empty steps, then the character.
        assert_eq!(&parts[..3], &["", "", "你"]);
    }

    #[test]
    fn stop_string_across_tokens_is_held_back_and_not_sent() {
        let cfg = StopConfig {
            stop_strings: vec!["用户：".into()],
            ..Default::default()
        };
        let (parts, fin) = stream("好的。\n用户：再见", cfg);
        assert_eq!(fin, Some(FinishReason::StopString("用户：".into())));
        assert_eq!(parts.concat(), "好的。\n");
        assert!(parts.iter().all(|p| !p.contains('用')));
    }

    #[test]
    fn held_prefix_is_released_when_the_stop_string_does_not_complete() {
        let cfg = StopConfig {
            stop_strings: vec!["END".into()],
            ..Default::default()
        };
        let (parts, _) = stream("the ENd", cfg.clone());
        // "EN" is held while it could still become "END", then released with "d".
        assert_eq!(parts[5], "");
        assert_eq!(parts[6], "ENd");
        assert_eq!(parts.concat(), "the ENd");
        let mut s = StreamState::new(StopConfig {
            max_tokens: Some(3),
            ..cfg
        });
        let steps: Vec<StreamStep> = b"xEN"
            .iter()
            .map(|&b| s.push(b as u32, &Bytes).expect("push"))
            .collect();
        assert_eq!(
            steps[2],
            StreamStep {
                text: "EN".into(),
                finished: Some(FinishReason::Length)
            }
        );
    }

    #[test]
    fn eos_and_stop_tokens_end_without_their_text() {
        let cfg = StopConfig {
            eos_token_ids: vec![0],
            stop_token_ids: vec![b'#' as u32],
            ..Default::default()
        };
        let mut s = StreamState::new(cfg.clone());
        assert_eq!(s.push(b'a' as u32, &Bytes).expect("push").text, "a");
        assert_eq!(
            s.push(0, &Bytes).expect("push").finished,
            Some(FinishReason::Eos)
        );
        let (parts, fin) = stream("ab#c", cfg);
        assert_eq!(
            (parts.concat(), fin),
            ("ab".to_string(), Some(FinishReason::StopToken(b'#' as u32)))
        );
    }
}
