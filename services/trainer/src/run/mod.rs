//! The training run of one job attempt: a synchronous library call the worker makes on a
//! blocking thread.
//!
//! [`run`] resolves the spec ([`settings`]), loads or creates the base and tokenizer and
//! builds the libs/model trainer ([`setup`]), turns the dataset into padded micro-batches
//! ([`data`]), trains ([`train_loop`]) with evaluation, early stopping, cancellation and
//! checkpoints ([`checkpoint`]) reported through [`RunHooks`], and writes the result
//! ([`output`]). A run resumed from any checkpoint ends with weights bitwise equal to an
//! uninterrupted run: the data order depends only on the seed and epoch, and everything else
//! that changes during training is in the checkpoint.

pub mod checkpoint;
pub mod data;
pub mod error;
pub mod output;
pub mod settings;
pub mod setup;
mod train_loop;

use std::collections::BTreeMap;
use std::path::PathBuf;

use lmforge_model::optim::{AdamWConfig, LrSchedule};
use lmforge_model::train::TrainConfig;
use lmforge_proto::v1 as pb;

pub use error::RunError;

use checkpoint::RunState;
use data::{Encoder, EpochPlan};
use settings::{Length, Method, Settings};

/// Everything one attempt of a job needs.
pub struct RunInputs {
    pub job_id: String,
    pub attempt: u32,
    /// The job's spec with defaults filled in by the jobs service; still treat unset optional
    /// fields with the defaults documented in proto/lmforge/v1/job.proto (Hyperparameters etc.).
    pub spec: pb::JobSpec,
    pub base: BaseModel,
    /// Canonical dataset records, one JSON object per line (train split).
    pub train_path: PathBuf,
    /// Eval split in the same format; None or an empty file → no evaluation.
    pub eval_path: Option<PathBuf>,
    /// Scratch directory owned by this run (checkpoints and the output are written under it).
    pub work_dir: PathBuf,
    /// A checkpoint directory previously handed to `RunHooks::checkpoint` by an earlier attempt
    /// of the same job: resume from it exactly.
    pub resume_from: Option<PathBuf>,
    pub device: candle_core::Device,
}

/// Where the weights start.
pub enum BaseModel {
    /// A Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer.json, tokenizer_config.json…).
    Hf { dir: PathBuf },
    /// A PEFT LoRA version and its parent's HF directory: merge the adapter into the base, then train.
    Adapter {
        base_dir: PathBuf,
        adapter_dir: PathBuf,
    },
    /// Train from random init (spec.base = from_scratch); tokenizer trained on the train split or
    /// taken from `tokenizer_dir` when the spec says `from_model`.
    FromScratch {
        config: pb::FromScratch,
        tokenizer_dir: Option<PathBuf>,
    },
}

/// A progress report.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    pub step: u64,
    pub total_steps: u64,
    pub epoch: f64,
    pub loss: f32,
    pub learning_rate: f64,
    pub tokens_per_second: f64,
    pub eval_loss: Option<f32>,
    pub eta: Option<std::time::Duration>,
    pub grad_norm: f32,
    pub trained_tokens: u64,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    pub step: u64,
    pub epoch: f64,
    pub loss: f32,
    pub eval_loss: Option<f32>,
    pub best: bool,
}

/// The worker's side of a run.
pub trait RunHooks: Send {
    /// After every optimizer step (and after each evaluation, with eval_loss set).
    fn progress(&mut self, p: &Progress);
    /// A complete checkpoint directory exists at `dir` (the worker uploads it synchronously
    /// before this returns). An Err is fatal for the run (→ RunError::Internal).
    fn checkpoint(&mut self, dir: &std::path::Path, info: &CheckpointInfo) -> anyhow::Result<()>;
    /// A line for the job's log.
    fn log(&mut self, level: pb::LogLevel, message: String);
    /// Checked before every optimizer step; true → stop and return RunOutcome::Cancelled.
    fn cancelled(&self) -> bool;
}

/// How a run ended.
#[derive(Debug)]
pub enum RunOutcome {
    Completed(RunResult),
    Cancelled { step: u64 },
}

/// A finished run's output.
#[derive(Debug)]
pub struct RunResult {
    /// HF layout or, for LoRA without merge_adapter, the PEFT layout.
    pub output_dir: PathBuf,
    pub format: pb::ModelFormat,
    /// train_loss, eval_loss, best_eval_loss, steps, epochs, trained_tokens, tokens_per_second.
    pub metrics: BTreeMap<String, f64>,
    pub trained_tokens: u64,
    pub best_eval_loss: Option<f64>,
}

/// Train one attempt of a job.
pub fn run(inputs: RunInputs, hooks: &mut dyn RunHooks) -> Result<RunOutcome, RunError> {
    let from_scratch = matches!(inputs.base, BaseModel::FromScratch { .. });
    let settings = Settings::resolve(&inputs.spec, from_scratch)?;
    let dtype = settings.dtype(&inputs.device)?;
    let train_records = data::read_records(&inputs.train_path)?;
    if train_records.is_empty() {
        return Err(RunError::invalid(
            "dataset_version",
            "the train split has no records",
        ));
    }
    let eval_records = match &inputs.eval_path {
        Some(p) => data::read_records(p)?,
        None => vec![],
    };
    let prepared = setup::prepare(
        &inputs.base,
        dtype,
        &inputs.device,
        settings.seed,
        &train_records,
        inputs.resume_from.as_deref(),
    )?;
    let encoder = Encoder {
        tokenizer: prepared.tokenizer.clone(),
        template: prepared.template.clone(),
        max_seq_len: settings.max_seq_len(prepared.config.max_position_embeddings)?,
        assistant_only: settings.loss_on_assistant_only,
    };
    let (train, dropped) = data::encode_all(&encoder, &inputs.train_path, &train_records)?;
    if dropped > 0 {
        hooks.log(
            pb::LogLevel::Warn,
            format!(
                "{dropped} train records have no target token within {} tokens and are skipped",
                encoder.max_seq_len
            ),
        );
    }
    if train.is_empty() {
        return Err(RunError::invalid(
            "hyperparameters.max_seq_len",
            "no train record has a target token within max_seq_len",
        ));
    }
    let eval = match &inputs.eval_path {
        Some(p) => data::encode_all(&encoder, p, &eval_records)?.0,
        None => vec![],
    };
    let plan = EpochPlan {
        examples: train.len(),
        batch_size: settings.batch_size,
        grad_accum: settings.grad_accum,
    };
    let steps_per_epoch = plan.steps() as u64;
    let total_steps = match settings.length {
        Length::Epochs(e) => e * steps_per_epoch,
        Length::MaxSteps(s) => s,
    };
    let train_config = TrainConfig {
        schedule: LrSchedule {
            kind: settings.schedule,
            peak_lr: settings.learning_rate,
            min_lr: 0.0,
            warmup_steps: settings.warmup_steps(total_steps as usize),
            total_steps: total_steps as usize,
        },
        adamw: AdamWConfig {
            weight_decay: settings.weight_decay,
            ..AdamWConfig::default()
        },
        max_grad_norm: settings.max_grad_norm,
        dropout: settings.dropout,
        seed: settings.seed,
    };
    let (mut trainer, lora) = setup::build_trainer(&prepared, &settings, train_config)?;
    let mut state = RunState::new(
        total_steps,
        steps_per_epoch,
        train.len() as u64,
        settings.seed,
    );
    if let Some(dir) = &inputs.resume_from {
        state = checkpoint::load(dir, &mut trainer, &state)?;
        hooks.log(
            pb::LogLevel::Info,
            format!(
                "attempt {} resumed from step {} of {total_steps} ({})",
                inputs.attempt,
                state.step,
                dir.display()
            ),
        );
    } else {
        hooks.log(
            pb::LogLevel::Info,
            format!(
                "attempt {}: {} train / {} eval examples, {steps_per_epoch} steps per epoch, {total_steps} steps, {} trainable parameters",
                inputs.attempt,
                train.len(),
                eval.len(),
                trainer
                    .optimizer
                    .vars
                    .iter()
                    .map(|(_, v)| v.elem_count())
                    .sum::<usize>()
            ),
        );
    }
    let ctx = train_loop::Loop {
        settings: &settings,
        plan,
        train: &train,
        eval: &eval,
        pad_id: pad_id(&prepared.tokenizer),
        device: &inputs.device,
        checkpoint_root: inputs.work_dir.join("checkpoints"),
        tokenizer_to_save: prepared.trained_tokenizer.then_some(&prepared.tokenizer),
    };
    let Some(stats) = ctx.train(&mut trainer, &mut state, hooks)? else {
        hooks.log(
            pb::LogLevel::Info,
            format!("cancelled before step {}", state.step + 1),
        );
        return Ok(RunOutcome::Cancelled { step: state.step });
    };
    let output_dir = inputs.work_dir.join("output");
    let merge = matches!(settings.method, Method::Lora { merge: true, .. });
    let format = output::write(&output_dir, &prepared, lora.as_ref(), merge)?;
    let mut metrics = BTreeMap::new();
    if let Some(l) = state.train_loss() {
        metrics.insert("train_loss".into(), l);
    }
    if let Some(l) = state.last_eval_loss {
        metrics.insert("eval_loss".into(), l);
    }
    if let Some(l) = state.best_eval_loss {
        metrics.insert("best_eval_loss".into(), l);
    }
    metrics.insert("steps".into(), state.step as f64);
    metrics.insert("epochs".into(), state.epochs());
    metrics.insert("trained_tokens".into(), state.trained_tokens as f64);
    metrics.insert("tokens_per_second".into(), stats.tokens_per_second);
    metrics.insert(
        "early_stopped".into(),
        f64::from(u8::from(stats.early_stopped)),
    );
    hooks.log(
        pb::LogLevel::Info,
        format!(
            "finished at step {} ({:.2} epochs); output in {}",
            state.step,
            state.epochs(),
            output_dir.display()
        ),
    );
    Ok(RunOutcome::Completed(RunResult {
        output_dir,
        format,
        metrics,
        trained_tokens: state.trained_tokens,
        best_eval_loss: state.best_eval_loss,
    }))
}

/// The id padding is written with (hidden by the masks, so any valid id works).
fn pad_id(tok: &lmforge_model::tokenizer::TextTokenizer) -> u32 {
    tok.pad_token
        .as_deref()
        .and_then(|t| tok.token_id(t))
        .or_else(|| tok.eos_token_id())
        .unwrap_or(0)
}
