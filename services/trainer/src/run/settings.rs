//! The job spec's method and hyperparameters with the defaults of `job.proto` applied and
//! every range checked, so the rest of the run reads plain values.

use candle_core::{DType, Device};
use lmforge_model::lora::LoraConfig;
use lmforge_model::optim::ScheduleKind;
use lmforge_proto::v1 as pb;
use pb::hyperparameters::{TrainingLength, Warmup};

use super::error::RunError;

/// The projections a LoRA adapter can attach to.
pub const LORA_MODULES: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// What is trained.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Every weight except those matching a `frozen` pattern.
    Full { frozen: Vec<String> },
    /// Adapters only; `merge` exports merged full weights instead of the adapter.
    Lora { config: LoraConfig, merge: bool },
}

/// How long to train.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Length {
    Epochs(u64),
    MaxSteps(u64),
}

/// The resolved run settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub method: Method,
    pub learning_rate: f64,
    pub schedule: ScheduleKind,
    pub warmup: Option<Warmup>,
    pub length: Length,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// As given; resolved against the model's context by [`Settings::max_seq_len`].
    pub max_seq_len: Option<u32>,
    pub weight_decay: f64,
    pub dropout: f32,
    /// `None` → no clipping.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// 0 → at the end of each epoch.
    pub eval_every_steps: u64,
    /// 0 → no early stopping.
    pub early_stopping_patience: u32,
    /// 0 → at the end of each epoch.
    pub checkpoint_every_steps: u64,
    pub precision: pb::Precision,
    pub loss_on_assistant_only: bool,
    pub keep_checkpoints: usize,
}

fn check(ok: bool, field: &str, message: &str) -> Result<(), RunError> {
    if ok {
        Ok(())
    } else {
        Err(RunError::invalid(field, message))
    }
}

fn lora_config(l: &pb::LoraConfig) -> Result<LoraConfig, RunError> {
    let rank = l.rank.unwrap_or(8);
    check(
        (1..=256).contains(&rank),
        "method.lora.rank",
        "must be in 1–256",
    )?;
    let alpha = l.alpha.map_or(2.0 * rank as f64, f64::from);
    check(
        alpha > 0.0 && alpha.is_finite(),
        "method.lora.alpha",
        "must be > 0",
    )?;
    let dropout = l.dropout.unwrap_or(0.05);
    check(
        (0.0..1.0).contains(&dropout),
        "method.lora.dropout",
        "must be in [0, 1)",
    )?;
    let mut target_modules = Vec::new();
    let requested: Vec<&str> = if l.target_modules.is_empty() {
        vec!["q_proj", "v_proj"]
    } else {
        l.target_modules.iter().map(String::as_str).collect()
    };
    for m in requested {
        // "By name suffix": `self_attn.q_proj` and `q_proj` name the same projection.
        let suffix = m.rsplit('.').next().unwrap_or(m);
        if !LORA_MODULES.contains(&suffix) {
            return Err(RunError::invalid(
                "method.lora.target_modules",
                format!("unknown module `{m}` (known: {})", LORA_MODULES.join(", ")),
            ));
        }
        if !target_modules.iter().any(|t: &String| t == suffix) {
            target_modules.push(suffix.to_string());
        }
    }
    Ok(LoraConfig {
        rank: rank as usize,
        alpha,
        dropout,
        target_modules,
    })
}

impl Settings {
    /// Resolve `spec`; `from_scratch` picks the scratch learning-rate default and forbids LoRA.
    pub fn resolve(spec: &pb::JobSpec, from_scratch: bool) -> Result<Self, RunError> {
        let method = match &spec.method {
            None => Method::Full { frozen: vec![] },
            Some(pb::job_spec::Method::Full(f)) => Method::Full {
                frozen: f.frozen_modules.clone(),
            },
            Some(pb::job_spec::Method::Lora(l)) => {
                if from_scratch {
                    return Err(RunError::invalid(
                        "method.lora",
                        "LoRA is not allowed when training from scratch",
                    ));
                }
                Method::Lora {
                    config: lora_config(l)?,
                    merge: l.merge_adapter,
                }
            }
        };
        let h = spec.hyperparameters.unwrap_or_default();
        let default_lr = match (&method, from_scratch) {
            (_, true) => 3e-4,
            (Method::Lora { .. }, false) => 2e-4,
            (Method::Full { .. }, false) => 2e-5,
        };
        let learning_rate = h.learning_rate.unwrap_or(default_lr);
        check(
            learning_rate > 0.0 && learning_rate.is_finite(),
            "hyperparameters.learning_rate",
            "must be > 0",
        )?;
        let schedule = match pb::LrSchedule::try_from(h.schedule) {
            Ok(pb::LrSchedule::Constant) => ScheduleKind::Constant,
            Ok(pb::LrSchedule::Linear) => ScheduleKind::Linear,
            Ok(pb::LrSchedule::Cosine | pb::LrSchedule::Unspecified) => ScheduleKind::Cosine,
            Err(_) => {
                return Err(RunError::invalid(
                    "hyperparameters.schedule",
                    format!("unknown value {}", h.schedule),
                ));
            }
        };
        if let Some(Warmup::WarmupRatio(r)) = h.warmup {
            check(
                (0.0..1.0).contains(&r),
                "hyperparameters.warmup_ratio",
                "must be in [0, 1)",
            )?;
        }
        let length = match h.training_length {
            None => Length::Epochs(3),
            Some(TrainingLength::Epochs(e)) => {
                check(e > 0, "hyperparameters.epochs", "must be > 0")?;
                Length::Epochs(u64::from(e))
            }
            Some(TrainingLength::MaxSteps(s)) => {
                check(s > 0, "hyperparameters.max_steps", "must be > 0")?;
                Length::MaxSteps(s)
            }
        };
        let batch_size = h.batch_size.unwrap_or(8);
        check(
            (1..=1024).contains(&batch_size),
            "hyperparameters.batch_size",
            "must be in 1–1024",
        )?;
        let grad_accum = h.gradient_accumulation_steps.unwrap_or(1);
        check(
            (1..=1024).contains(&grad_accum),
            "hyperparameters.gradient_accumulation_steps",
            "must be in 1–1024",
        )?;
        let weight_decay = h.weight_decay.unwrap_or(0.0);
        check(
            weight_decay >= 0.0 && weight_decay.is_finite(),
            "hyperparameters.weight_decay",
            "must be ≥ 0",
        )?;
        let dropout = h.dropout.unwrap_or(0.0);
        check(
            (0.0..1.0).contains(&dropout),
            "hyperparameters.dropout",
            "must be in [0, 1)",
        )?;
        let max_grad_norm = h.max_grad_norm.unwrap_or(1.0);
        check(
            max_grad_norm >= 0.0 && max_grad_norm.is_finite(),
            "hyperparameters.max_grad_norm",
            "must be ≥ 0",
        )?;
        let precision = pb::Precision::try_from(h.precision).map_err(|_| {
            RunError::invalid(
                "hyperparameters.precision",
                format!("unknown value {}", h.precision),
            )
        })?;
        if let Some(n) = h.max_seq_len {
            check(
                n >= 16,
                "hyperparameters.max_seq_len",
                &format!("{n} is below the minimum of 16"),
            )?;
        }
        Ok(Self {
            method,
            learning_rate,
            schedule,
            warmup: h.warmup,
            length,
            batch_size: batch_size as usize,
            grad_accum: grad_accum as usize,
            max_seq_len: h.max_seq_len,
            weight_decay,
            dropout,
            max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            seed: h.seed.unwrap_or(42),
            eval_every_steps: u64::from(h.eval_every_steps),
            early_stopping_patience: h.early_stopping_patience,
            checkpoint_every_steps: u64::from(h.checkpoint_every_steps),
            precision,
            loss_on_assistant_only: h.loss_on_assistant_only.unwrap_or(true),
            keep_checkpoints: h.keep_checkpoints.unwrap_or(3) as usize,
        })
    }

    /// The sequence length cap for a model with `context` positions.
    pub fn max_seq_len(&self, context: usize) -> Result<usize, RunError> {
        match self.max_seq_len {
            None => Ok(context.min(2048)),
            Some(n) if n as usize > context => Err(RunError::invalid(
                "hyperparameters.max_seq_len",
                format!("{n} exceeds the model's context of {context} tokens"),
            )),
            Some(n) => Ok(n as usize),
        }
    }

    /// Warmup steps for a run of `total_steps`.
    pub fn warmup_steps(&self, total_steps: usize) -> usize {
        match self.warmup {
            None => 0,
            Some(Warmup::WarmupSteps(n)) => (n as usize).min(total_steps),
            Some(Warmup::WarmupRatio(r)) => (r * total_steps as f64).ceil() as usize,
        }
    }

    /// The weight dtype on `device`: f32 on the CPU, bf16 by default on accelerators.
    pub fn dtype(&self, device: &Device) -> Result<DType, RunError> {
        let cpu = device.is_cpu();
        match self.precision {
            pb::Precision::F32 => Ok(DType::F32),
            pb::Precision::Unspecified if cpu => Ok(DType::F32),
            pb::Precision::Unspecified | pb::Precision::Bf16 if !cpu => Ok(DType::BF16),
            pb::Precision::F16 if !cpu => Ok(DType::F16),
            p => Err(RunError::invalid(
                "hyperparameters.precision",
                format!(
                    "{} is not supported on the CPU (use PRECISION_F32)",
                    p.as_str_name()
                ),
            )),
        }
    }
}
