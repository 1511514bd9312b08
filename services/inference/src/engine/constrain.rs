//! Constrained decoding (`response_format`): `json_object` and `json_schema` outputs are
//! grammars that [`llguidance`] compiles and checks token by token over a [`toktrie`] of the
//! model's vocabulary. Before each sampling step every token the grammar does not allow gets
//! logit −∞; once the grammar is complete only the sequence's stop tokens remain.
//!
//! JSON mode also gets a length guard ([`JsonState`]): a token after which the object could
//! no longer be closed within the tokens left (`max_tokens`, context) is masked too, so a
//! `json_object` answer parses even when the budget ends it. A schema's shortest completion
//! depends on the schema, so `json_schema` answers cut by the budget end with `length`, as
//! OpenAI's and vLLM's do.
//!
//! - [`Grammars`]: the model's vocabulary for llguidance, built once per served model.
//! - [`CompiledFormat`]: one request's grammar, compiled before the request is queued, so a
//!   bad schema is the caller's `INVALID_ARGUMENT`.
//! - [`Constraint`]: one sequence's parser state plus the mask.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::{Matcher, ParserFactory, TokenParser};
use lmforge_model::tokenizer::TextTokenizer;
use toktrie::{ApproximateTokEnv, TokEnv, TokRxInfo, TokTrie};

use super::json_mode::{JsonState, MAX_COST_PER_BYTE};

/// What a request's output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputFormat {
    /// One JSON object (OpenAI's JSON mode).
    JsonObject,
    /// A JSON value valid under this JSON schema (OpenAI's structured outputs).
    JsonSchema(serde_json::Value),
}

/// Compact JSON: no free whitespace (a model could otherwise spend its budget on it), the
/// separators JSON mode's length guard counts.
fn compile_options() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ",",
        "key_separator": ":",
    })
}

/// Compiled formats kept per model, by schema text: a service sends the same few schemas.
const COMPILED_CACHE: u64 = 64;

/// The model's vocabulary as llguidance sees it, and the formats compiled for it lately.
pub struct Grammars {
    factory: ParserFactory,
    compiled: moka::sync::Cache<String, Arc<CompiledFormat>>,
    /// Per token: every byte is printable ASCII other than `"` and `\`, so inside a JSON
    /// string it leaves the closing cost unchanged (the length guard's fast path).
    plain: Vec<bool>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.trie().vocab_size())
            .finish()
    }
}

impl Grammars {
    /// Reads every token's bytes from the tokenizer (byte-level BPE or SentencePiece with
    /// byte fallback); ids past the tokenizer's vocabulary up to the model's `vocab_size`
    /// become placeholder special tokens, which no grammar allows. `eos` is the token the
    /// grammar's end maps to; without one, a placeholder past the vocabulary stands in.
    pub fn new(
        tokenizer: &TextTokenizer,
        vocab_size: usize,
        eos: Option<u32>,
    ) -> Result<Self, String> {
        let json = serde_json::to_value(&tokenizer.inner)
            .map_err(|e| format!("tokenizer does not serialize: {e}"))?;
        // The reader asserts on malformed byte-fallback names; a panic there is an error here.
        let words = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| "the tokenizer's vocabulary cannot be read as bytes".to_string())?
            .map_err(|e| format!("the tokenizer's vocabulary cannot be read as bytes: {e}"))?;
        Self::from_words(words, vocab_size, eos)
    }

    /// A vocabulary from explicit token bytes; a special token's bytes start with
    /// [`TokTrie::SPECIAL_TOKEN_MARKER`].
    pub fn from_words(
        mut words: Vec<Vec<u8>>,
        vocab_size: usize,
        eos: Option<u32>,
    ) -> Result<Self, String> {
        let mut size = vocab_size.max(words.len());
        let eos = eos.unwrap_or_else(|| {
            size += 1;
            size as u32 - 1
        });
        for (id, word) in words.iter_mut().enumerate() {
            if word.is_empty() {
                *word = placeholder(id);
            }
        }
        words.extend((words.len()..size).map(placeholder));
        let plain = words
            .iter()
            .map(|w| {
                !w.is_empty()
                    && w.iter()
                        .all(|&b| (0x20..0x7F).contains(&b) && b != b'"' && b != b'\\')
            })
            .collect();
        let info = TokRxInfo::new(size as u32, eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(TokTrie::from(&info, &words)));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Self {
            factory,
            compiled: moka::sync::Cache::new(COMPILED_CACHE),
            plain,
        })
    }

    fn trie(&self) -> &TokTrie {
        self.factory.tok_env().tok_trie()
    }

    /// Compiles `format` (or takes it from the cache); the error says what is wrong with a
    /// schema.
    pub fn compile(self: &Arc<Self>, format: &OutputFormat) -> Result<Arc<CompiledFormat>, String> {
        let (mut schema, guard) = match format {
            OutputFormat::JsonObject => (serde_json::json!({"type": "object"}), true),
            OutputFormat::JsonSchema(schema) => (schema.clone(), false),
        };
        let Some(object) = schema.as_object_mut() else {
            return Err("a JSON schema must be a JSON object".into());
        };
        object.entry("x-guidance").or_insert_with(compile_options);
        let key = format!("{guard}:{schema}");
        if let Some(hit) = self.compiled.get(&key) {
            return Ok(hit);
        }
        let parser = self
            .factory
            .create_parser(TopLevelGrammar::from_json_schema(schema))
            .map_err(|e| e.to_string())?;
        let compiled = Arc::new(CompiledFormat {
            grammars: self.clone(),
            parser,
            guard,
        });
        self.compiled.insert(key, compiled.clone());
        Ok(compiled)
    }
}

fn placeholder(id: usize) -> Vec<u8> {
    let mut word = vec![TokTrie::SPECIAL_TOKEN_MARKER];
    word.extend_from_slice(format!("<|lmforge_unused_{id}|>").as_bytes());
    word
}

/// One request's compiled grammar; [`CompiledFormat::start`] gives each choice its own
/// parser.
pub struct CompiledFormat {
    grammars: Arc<Grammars>,
    parser: TokenParser,
    guard: bool,
}

impl std::fmt::Debug for CompiledFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledFormat")
            .field("length_guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl CompiledFormat {
    pub fn start(&self) -> Constraint {
        Constraint {
            grammars: self.grammars.clone(),
            matcher: Matcher::new(Ok(self.parser.deep_clone())),
            guard: self.guard.then(JsonState::default),
        }
    }
}

/// One sequence's constraint.
pub struct Constraint {
    grammars: Arc<Grammars>,
    matcher: Matcher,
    /// JSON mode's length guard.
    guard: Option<JsonState>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint")
            .field("stopped", &self.matcher.is_stopped())
            .field("guard", &self.guard)
            .finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logits of every token that may not come next to −∞. `remaining` counts the
    /// tokens this sequence may still generate, this one included; `stop_ids` end it and are
    /// allowed exactly when the grammar is complete.
    pub fn mask(&mut self, row: &mut [f32], remaining: usize, stop_ids: &[u32]) {
        let allowed = match self.matcher.compute_mask_or_eos() {
            Ok(mask) => mask,
            Err(e) => {
                // A parser error ends the sequence rather than letting it run unconstrained.
                tracing::warn!(error = %e, "constrained decoding failed; ending the sequence");
                for (id, x) in row.iter_mut().enumerate() {
                    if !stop_ids.contains(&(id as u32)) {
                        *x = f32::NEG_INFINITY;
                    }
                }
                return;
            }
        };
        let trie = self.grammars.trie();
        let complete = allowed.is_allowed(trie.eos_token());
        let budget = remaining.saturating_sub(1);
        let cost = self.guard.map(|s| s.bytes_to_close());
        let plain_string = self.guard.is_some_and(|s| s.in_plain_string());
        let keep = |id: usize, within_budget: bool| -> bool {
            let id32 = id as u32;
            if stop_ids.contains(&id32) {
                return complete;
            }
            if id32 == trie.eos_token() || id >= trie.vocab_size() || !allowed.is_allowed(id32) {
                return false;
            }
            let (Some(state), Some(cost), true) = (&self.guard, cost, within_budget) else {
                return true;
            };
            let bytes = trie.token(id32);
            // One byte raises the closing cost by at most MAX_COST_PER_BYTE, and plain text
            // inside a string not at all: most tokens pass without running the automaton.
            if cost + MAX_COST_PER_BYTE * bytes.len() <= budget
                || (plain_string && self.grammars.plain[id] && cost <= budget)
            {
                return true;
            }
            state
                .feed_all(bytes)
                .is_some_and(|s| s.bytes_to_close() <= budget)
        };
        let mut within_budget = true;
        // Nothing closes in time (a budget too small from the start, or other masks removed
        // the rest): stay valid at least.
        if !row
            .iter()
            .enumerate()
            .any(|(id, x)| x.is_finite() && keep(id, true))
        {
            within_budget = false;
        }
        for (id, x) in row.iter_mut().enumerate() {
            if !keep(id, within_budget) {
                *x = f32::NEG_INFINITY;
            }
        }
    }

    /// Whether the output is complete and nothing may follow it (the sequence ends here).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }

    /// Advances past the sampled token (a stop token ends the sequence instead).
    pub fn accept(&mut self, token: u32, stop_ids: &[u32]) {
        if stop_ids.contains(&token) {
            return;
        }
        if let Err(e) = self.matcher.consume_token(token) {
            tracing::warn!(token, error = %e, "the grammar refused a sampled token");
        }
        if let Some(state) = self.guard {
            // A token the guard cannot follow (only when it had to let one through) ends
            // the guard rather than leave it counting from a stale state.
            self.guard = state.feed_all(self.grammars.trie().token(token));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Single bytes, a few multi-byte pieces (some never valid), then EOS.
    fn vocab() -> (Arc<Grammars>, Vec<Vec<u8>>, u32) {
        let mut pieces: Vec<Vec<u8>> = (0u8..128).map(|b| vec![b]).collect();
        for p in [
            "{\"", "\":", "true", "\"}", "]]]", "abc", "  ", "\"name\"", "42",
        ] {
            pieces.push(p.as_bytes().to_vec());
        }
        let eos = pieces.len() as u32;
        let mut words = pieces.clone();
        words.push(b"\xFF</s>".to_vec());
        // Two ids past the tokenizer, as a model with a padded embedding has.
        let grammars =
            Grammars::from_words(words, eos as usize + 3, Some(eos)).expect("vocabulary");
        (Arc::new(grammars), pieces, eos)
    }

    /// Greedy decoding under the constraint with a deterministic pseudo-random "model".
    fn decode(
        c: &mut Constraint,
        pieces: &[Vec<u8>],
        eos: u32,
        budget: usize,
        seed: u64,
    ) -> String {
        let mut out = Vec::new();
        let mut rng = seed;
        for step in 0..budget {
            let mut row: Vec<f32> = (0..=eos as usize + 2)
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
            assert!(best < pieces.len(), "placeholder token {best} allowed");
            c.accept(best as u32, &[eos]);
            out.extend_from_slice(&pieces[best]);
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn json_mode_always_finishes_a_valid_object_within_the_budget() {
        let (grammars, pieces, eos) = vocab();
        let format = grammars
            .compile(&OutputFormat::JsonObject)
            .expect("compiles");
        for (budget, seed) in [(2usize, 1u64), (5, 2), (9, 3), (20, 4), (40, 5), (80, 6)] {
            let text = decode(&mut format.start(), &pieces, eos, budget, seed);
            let value: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("budget {budget}: {text:?} is not JSON: {e}"));
            assert!(value.is_object(), "{text}");
        }
    }

    #[test]
    fn json_schema_outputs_match_the_schema() {
        let (grammars, pieces, eos) = vocab();
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "age": {"type": "integer", "minimum": 0, "maximum": 150},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
            },
            "required": ["name", "age", "tags"],
            "additionalProperties": false,
        });
        let format = grammars
            .compile(&OutputFormat::JsonSchema(schema))
            .expect("compiles");
        for seed in 1..=8 {
            let text = decode(&mut format.start(), &pieces, eos, 200, seed);
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let object = value.as_object().expect("an object");
            assert_eq!(object.len(), 3, "{text}");
            assert!(
                object["name"]
                    .as_str()
                    .is_some_and(|s| s.chars().count() <= 6),
                "{text}"
            );
            assert!(object["age"].as_u64().is_some_and(|a| a <= 150), "{text}");
            let tags = object["tags"].as_array().expect("tags");
            assert!(
                tags.len() <= 3 && tags.iter().all(|t| t == "a" || t == "b"),
                "{text}"
            );
        }
    }

    #[test]
    fn choices_of_one_request_keep_their_own_state() {
        let (grammars, pieces, eos) = vocab();
        let format = grammars
            .compile(&OutputFormat::JsonObject)
            .expect("compiles");
        let mut a = format.start();
        let mut b = format.start();
        a.accept(b'{' as u32, &[eos]);
        // `b` has seen nothing: `{` is still its only start, `}` is not.
        let mut row = vec![0.0; eos as usize + 3];
        b.mask(&mut row, 10, &[eos]);
        assert!(row[b'{' as usize].is_finite() && row[b'}' as usize].is_infinite());
        let text = decode(&mut a, &pieces, eos, 10, 7);
        assert!(serde_json::from_str::<serde_json::Value>(&format!("{{{text}")).is_ok());
    }

    #[test]
    fn bad_schemas_are_refused_with_the_reason() {
        let (grammars, _, _) = vocab();
        let err = grammars
            .compile(&OutputFormat::JsonSchema(serde_json::json!([
                "not", "a", "schema"
            ])))
            .unwrap_err();
        assert!(err.contains("JSON object"), "{err}");
        let err = grammars
            .compile(&OutputFormat::JsonSchema(serde_json::json!({
                "type": "object",
                "properties": {"a": {"type": "integer", "minimum": 5, "maximum": 1}},
                "required": ["a"],
            })))
            .unwrap_err();
        assert!(!err.is_empty());
    }
}
