//! Dataset records → token sequences with label masks → padded micro-batches.
//!
//! A record (one JSONL line) is a chat (`messages`, rendered with the model's chat template;
//! with `loss_on_assistant_only` only the assistant replies are targets) or raw `text` (every
//! token is a target, EOS appended so the model learns where documents end). Sequences are
//! truncated to `max_seq_len` and padded on the right to the longest one of their
//! micro-batch; padding is hidden from attention and from the loss, and attention is causal,
//! so no sequence sees another. Each epoch visits the examples in an order drawn from the
//! seed and the epoch number alone, so a resumed run needs only the epoch to repeat it.

use std::io::BufRead;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lmforge_model::Rng;
use lmforge_model::chat::{ChatTemplate, Message, encode_chat};
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::train::Batch;
use serde::Deserialize;

use super::error::RunError;

/// The fields of a canonical record the trainer uses (the rest are ignored).
#[derive(Debug, Clone, Deserialize)]
pub struct Record {
    #[serde(default)]
    pub messages: Vec<Message>,
    #[serde(default)]
    pub text: Option<String>,
}

/// One tokenized training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    /// 1 where the token is a training target.
    pub label_mask: Vec<u8>,
}

impl Example {
    /// Targets the loss counts (the first position predicts nothing).
    pub fn targets(&self) -> usize {
        self.label_mask.iter().skip(1).filter(|&&m| m == 1).count()
    }
}

/// Turns records into [`Example`]s for one model and tokenizer.
#[derive(Debug, Clone)]
pub struct Encoder {
    pub tokenizer: TextTokenizer,
    pub template: ChatTemplate,
    pub max_seq_len: usize,
    pub assistant_only: bool,
}

impl Record {
    /// Parse one JSONL line.
    pub fn parse(line: &str) -> Result<Self, String> {
        let r: Record = serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
        if r.messages.is_empty() && r.text.as_deref().is_none_or(str::is_empty) {
            return Err("record has neither `messages` nor `text`".into());
        }
        Ok(r)
    }

    /// The text the model sees (for tokenizer training).
    pub fn render(&self, template: &ChatTemplate) -> Result<String, String> {
        if self.messages.is_empty() {
            Ok(self.text.clone().unwrap_or_default())
        } else {
            template
                .render(&self.messages, false)
                .map_err(|e| e.to_string())
        }
    }
}

impl Encoder {
    /// Tokenize one record, truncated to `max_seq_len`.
    pub fn encode(&self, record: &Record) -> Result<Example, String> {
        let (mut input_ids, mut label_mask) = if record.messages.is_empty() {
            let text = record.text.as_deref().unwrap_or_default();
            let mut ids = self
                .tokenizer
                .encode(text, true)
                .map_err(|e| e.to_string())?;
            if let Some(eos) = self.tokenizer.eos_token_id()
                && ids.last() != Some(&eos)
            {
                ids.push(eos);
            }
            let mask = vec![1u8; ids.len()];
            (ids, mask)
        } else {
            let ex = encode_chat(&self.tokenizer, &self.template, &record.messages)
                .map_err(|e| e.to_string())?;
            let mask = if self.assistant_only {
                ex.label_mask
            } else {
                vec![1u8; ex.input_ids.len()]
            };
            (ex.input_ids, mask)
        };
        input_ids.truncate(self.max_seq_len);
        label_mask.truncate(self.max_seq_len);
        Ok(Example {
            input_ids,
            label_mask,
        })
    }

    /// Parse and tokenize one JSONL line.
    pub fn encode_line(&self, line: &str) -> Result<Example, String> {
        self.encode(&Record::parse(line)?)
    }
}

/// The non-blank lines of a JSONL file as records, with their 1-based line numbers.
pub fn read_records(path: &Path) -> Result<Vec<(usize, Record)>, RunError> {
    let not_found = |e: std::io::Error| RunError::DatasetNotFound {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let file = std::fs::File::open(path).map_err(not_found)?;
    let mut out = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| RunError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let record = Record::parse(&line).map_err(|message| RunError::Data {
            path: path.to_path_buf(),
            line: i + 1,
            message,
        })?;
        out.push((i + 1, record));
    }
    Ok(out)
}

/// Tokenize `records`; examples without a single target (e.g. a prompt longer than
/// `max_seq_len`) are dropped and counted in the second value.
pub fn encode_all(
    encoder: &Encoder,
    path: &Path,
    records: &[(usize, Record)],
) -> Result<(Vec<Example>, usize), RunError> {
    let mut out = Vec::with_capacity(records.len());
    let mut dropped = 0;
    for (line, r) in records {
        let ex = encoder.encode(r).map_err(|message| RunError::Data {
            path: path.to_path_buf(),
            line: *line,
            message,
        })?;
        if ex.targets() == 0 {
            dropped += 1;
        } else {
            out.push(ex);
        }
    }
    Ok((out, dropped))
}

/// Right-pad `examples` to the longest into one batch (`pad_id` under a zero attention and
/// label mask).
pub fn collate(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Batch, RunError> {
    let b = examples.len();
    let t = examples
        .iter()
        .map(|e| e.input_ids.len())
        .max()
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(b * t);
    let mut attn = Vec::with_capacity(b * t);
    let mut labels = Vec::with_capacity(b * t);
    for e in examples {
        let n = e.input_ids.len();
        ids.extend_from_slice(&e.input_ids);
        ids.extend(std::iter::repeat_n(pad_id, t - n));
        attn.extend(std::iter::repeat_n(1u32, n));
        attn.extend(std::iter::repeat_n(0u32, t - n));
        labels.extend(e.label_mask.iter().map(|&m| f32::from(m)));
        labels.extend(std::iter::repeat_n(0f32, t - n));
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (b, t), device)?,
        attention_mask: Tensor::from_vec(attn, (b, t), device)?,
        label_mask: Tensor::from_vec(labels, (b, t), device)?.to_dtype(DType::F32)?,
    })
}

/// Non-padding tokens of a batch.
pub fn batch_tokens(examples: &[&Example]) -> u64 {
    examples.iter().map(|e| e.input_ids.len() as u64).sum()
}

/// The order epoch `epoch` visits `n` examples in: a Fisher–Yates shuffle seeded from `seed`
/// and `epoch` only.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut rng =
        Rng::new(seed ^ 0x5348_5546_u64.wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = rng.below(i + 1);
        order.swap(i, j);
    }
    order
}

/// How an epoch splits into micro-batches and optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EpochPlan {
    pub examples: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
}

impl EpochPlan {
    pub fn micro_batches(&self) -> usize {
        self.examples.div_ceil(self.batch_size)
    }

    /// Optimizer steps per epoch (the last may accumulate fewer micro-batches).
    pub fn steps(&self) -> usize {
        self.micro_batches().div_ceil(self.grad_accum)
    }

    /// The example indices of each micro-batch of step `step_in_epoch`, given the epoch's
    /// `order`.
    pub fn step_batches<'o>(&self, order: &'o [usize], step_in_epoch: usize) -> Vec<&'o [usize]> {
        let first = step_in_epoch * self.grad_accum;
        let last = (first + self.grad_accum).min(self.micro_batches());
        (first..last)
            .map(|mb| {
                let start = mb * self.batch_size;
                &order[start..(start + self.batch_size).min(order.len())]
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_differ_by_epoch_and_repeat_by_seed() {
        let a = epoch_order(50, 42, 0);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..50).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(50, 42, 0));
        assert_ne!(a, epoch_order(50, 42, 1));
        assert_ne!(a, epoch_order(50, 43, 0));
    }

    #[test]
    fn plan_splits_steps_with_a_short_tail() {
        let plan = EpochPlan {
            examples: 10,
            batch_size: 3,
            grad_accum: 2,
        };
        assert_eq!(plan.micro_batches(), 4);
        assert_eq!(plan.steps(), 2);
        let order: Vec<usize> = (0..10).collect();
        let last = plan.step_batches(&order, 1);
        assert_eq!(last, vec![&[6, 7, 8][..], &[9][..]]);
    }
}
