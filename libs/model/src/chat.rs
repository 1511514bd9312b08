//! Chat templates rendered with `minijinja`, and assistant-only label masks for chat data.
//!
//! A [`ChatTemplate`] is the Jinja source from `tokenizer_config.json`'s `chat_template`
//! (saved with the model, so training and serving format conversations identically) or one
//! of the built-ins: [`CHATML`] and [`ZH_PLAIN`] (`用户：…\n助手：…`). Python-style string
//! methods used by HF templates (`.strip()`, `.startswith()`, …) come from
//! `minijinja-contrib`'s pycompat layer. [`encode_chat`] tokenizes a conversation and marks
//! exactly the tokens of assistant replies as training targets.

use minijinja::{Environment, ErrorKind, context};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::tokenizer::TextTokenizer;

/// ChatML (`<|im_start|>role\n…<|im_end|>`), used by Qwen and many fine-tunes.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Plain Chinese dialogue: `用户：…\n助手：…`; each reply ends with the EOS token so the model
/// learns to stop.
pub const ZH_PLAIN: &str = "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n' }}{% elif message['role'] == 'user' %}{{ '用户：' + message['content'] + '\\n' }}{% else %}{{ '助手：' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '助手：' }}{% endif %}";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A Jinja chat template plus the special tokens it may reference.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatTemplate {
    pub source: String,
    pub bos_token: String,
    pub eos_token: String,
}

/// A tokenized conversation with its training targets.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatExample {
    pub input_ids: Vec<u32>,
    /// 1 on tokens of assistant replies, 0 elsewhere.
    pub label_mask: Vec<u8>,
}

impl ChatTemplate {
    /// A built-in template by name (`chatml`, `zh-plain`).
    pub fn builtin(name: &str, tok: &TextTokenizer) -> Result<Self> {
        let source = match name {
            "chatml" => CHATML,
            "zh-plain" => ZH_PLAIN,
            other => {
                return Err(ModelError::ChatTemplate(format!(
                    "no built-in template `{other}` (chatml, zh-plain)"
                )));
            }
        };
        Ok(Self::new(source, tok))
    }

    /// The tokenizer's own `chat_template`, if it has one.
    pub fn from_tokenizer(tok: &TextTokenizer) -> Option<Self> {
        tok.chat_template.as_deref().map(|s| Self::new(s, tok))
    }

    pub fn new(source: &str, tok: &TextTokenizer) -> Self {
        Self {
            source: source.to_string(),
            bos_token: tok.bos_token.clone().unwrap_or_default(),
            eos_token: tok.eos_token.clone().unwrap_or_default(),
        }
    }

    /// Render `messages`; `add_generation_prompt` appends the assistant turn's opening.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        let err = |e: minijinja::Error| ModelError::ChatTemplate(e.to_string());
        let tmpl = env.template_from_str(&self.source).map_err(err)?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        })
        .map_err(err)
    }
}

/// Tokenize a conversation and mark assistant replies as targets.
///
/// The reply spans are found by rendering the conversation up to each assistant message with
/// and without it: the difference is what the model must learn to write (including any
/// end-of-turn token the template adds). This needs the template to render prefixes of a
/// conversation as prefixes of its text, which chat templates do so that serving works.
pub fn encode_chat(
    tok: &TextTokenizer,
    template: &ChatTemplate,
    messages: &[Message],
) -> Result<ChatExample> {
    let text = template.render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = template.render(&messages[..i], true)?;
        let upto = template.render(&messages[..=i], false)?;
        if !text.starts_with(&upto) || !upto.starts_with(&before) {
            return Err(ModelError::ChatTemplate(format!(
                "template does not render message {i} as an extension of the ones before it"
            )));
        }
        spans.push((before.len(), upto.len()));
    }
    let (input_ids, offsets) = tok.encode_with_offsets(&text)?;
    let label_mask = offsets
        .iter()
        .map(|&(s, e)| u8::from(e > s && spans.iter().any(|&(a, b)| s >= a && e <= b)))
        .collect();
    Ok(ChatExample {
        input_ids,
        label_mask,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokenizer() -> TextTokenizer {
        let corpus = ["用户：你好\n助手：你好！有什么可以帮你？</s>\n"; 10];
        let mut t = TextTokenizer::train_byte_level_bpe(
            corpus.into_iter(),
            300,
            &["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        )
        .expect("train");
        t.chat_template = Some("{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}".into());
        t
    }

    fn convo() -> Vec<Message> {
        vec![
            Message::new("system", "简短回答"),
            Message::new("user", "你好"),
            Message::new("assistant", "你好！有什么可以帮你？"),
            Message::new("user", "再见"),
            Message::new("assistant", "再见！"),
        ]
    }

    #[test]
    fn builtins_render_expected_text() {
        let tok = tokenizer();
        let zh = ChatTemplate::builtin("zh-plain", &tok).expect("builtin");
        assert_eq!(
            zh.render(&convo()[..3], false).expect("render"),
            "简短回答\n用户：你好\n助手：你好！有什么可以帮你？</s>\n"
        );
        assert_eq!(
            zh.render(&convo()[1..2], true).expect("render"),
            "用户：你好\n助手："
        );
        let chatml = ChatTemplate::builtin("chatml", &tok).expect("builtin");
        assert_eq!(
            chatml.render(&convo()[1..2], true).expect("render"),
            "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
        );
        assert!(
            ChatTemplate::builtin("vicuna", &tok)
                .unwrap_err()
                .to_string()
                .contains("vicuna")
        );
    }

    #[test]
    fn tokenizer_config_template_with_python_methods_renders() {
        let tok = tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).expect("has a template");
        let out = t
            .render(&[Message::new("user", "  hi  ")], true)
            .expect("render");
        assert_eq!(out, "<s>[USER] hi\n[ASSISTANT] ");
        let raising = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", &tok);
        assert!(
            raising
                .render(&[], false)
                .unwrap_err()
                .to_string()
                .contains("roles must alternate")
        );
    }

    #[test]
    fn label_mask_covers_exactly_the_assistant_replies() {
        let tok = tokenizer();
        for name in ["zh-plain", "chatml"] {
            let t = ChatTemplate::builtin(name, &tok).expect("builtin");
            let ex = encode_chat(&tok, &t, &convo()).expect("encode");
            assert_eq!(ex.input_ids.len(), ex.label_mask.len());
            let labelled: Vec<u32> = ex
                .input_ids
                .iter()
                .zip(&ex.label_mask)
                .filter(|(_, m)| **m == 1)
                .map(|(i, _)| *i)
                .collect();
            let text = tok.inner.decode(&labelled, false).expect("decode");
            let want = if name == "zh-plain" {
                "你好！有什么可以帮你？</s>\n再见！</s>\n"
            } else {
                "你好！有什么可以帮你？<|im_end|>\n再见！<|im_end|>\n"
            };
            assert_eq!(text, want, "{name}");
        }
    }
}
