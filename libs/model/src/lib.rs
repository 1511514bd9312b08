//! lmforge ML core: llama-family models (Llama, Mistral, Qwen2) on candle, used by both the
//! trainer and the inference engine so a model trains and serves with the same weights.
//!
//! - [`config`]: HF `config.json` ⇄ [`ModelConfig`], benchmark shapes.
//! - [`weights`], [`hf`]: HF-named weights in a `VarMap`; checkpoint directory load/save.
//! - [`model`], [`linear`], [`train_ops`]: the transformer and its differentiable training
//!   forward (fused softmax/rope with hand-written backward).
//! - [`loss`]: masked causal-LM cross-entropy.
//! - [`optim`], [`train`]: AdamW, schedules, clipping, accumulation, resumable checkpoints.
//! - [`kv_cache`], [`infer`], [`packed`]: paged KV cache, the continuous-batching forward, and
//!   the packed weights of its decode-step products.
//! - [`sampling`], [`stopping`]: per-request samplers; stop checks and streaming detokenizer.
//! - [`tokenizer`], [`chat`]: HF tokenizers, BPE training, chat templates, label masks.
//! - [`lora`]: PEFT-compatible LoRA adapters; [`quant`], [`packed_q8`]: q8_0 serving weights.
//! - [`alloc_tuning`]: glibc malloc settings that spare every step its page faults.
//! - [`rng`]: the seeded, checkpointable random generator everything draws from.

pub mod alloc_tuning;
pub mod amx;
pub mod backprop;
pub mod chat;
pub mod config;
pub mod error;
pub mod hf;
pub mod infer;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod loss;
mod mmap;
pub mod model;
pub mod optim;
pub mod packed;
pub mod packed_q8;
pub mod quant;
pub mod rng;
pub mod sampling;
pub mod stopping;
pub mod tokenizer;
pub mod train;
pub mod train_ops;
pub mod weights;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use error::{ModelError, Result};
pub use model::Model;
pub use rng::Rng;
