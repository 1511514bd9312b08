//! The optimizer-step loop: cancellation check, micro-batches of the step, train step,
//! progress, evaluation and early stopping, checkpoints.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lmforge_model::loss;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::train::Trainer;
use lmforge_proto::v1 as pb;

use super::checkpoint::{self, Retention, RunState};
use super::data::{self, EpochPlan, Example};
use super::error::RunError;
use super::settings::Settings;
use super::{CheckpointInfo, Progress, RunHooks};

/// What the loop works on.
pub(super) struct Loop<'a> {
    pub settings: &'a Settings,
    pub plan: EpochPlan,
    pub train: &'a [Example],
    pub eval: &'a [Example],
    pub pad_id: u32,
    pub device: &'a Device,
    pub checkpoint_root: PathBuf,
    /// A tokenizer trained by the run, saved into every checkpoint.
    pub tokenizer_to_save: Option<&'a TextTokenizer>,
}

/// How a completed loop went.
pub(super) struct LoopStats {
    pub tokens_per_second: f64,
    pub early_stopped: bool,
}

/// Throughput of this attempt (time in train steps only; evals and checkpoints excluded).
#[derive(Default)]
struct Throughput {
    tokens: u64,
    step_time: Duration,
    steps: u64,
    started: Option<Instant>,
}

impl Throughput {
    fn tokens_per_second(&self) -> f64 {
        let s = self.step_time.as_secs_f64();
        if s > 0.0 { self.tokens as f64 / s } else { 0.0 }
    }

    /// Remaining steps at this attempt's wall-clock pace (evals and checkpoints included).
    fn eta(&self, remaining: u64) -> Option<Duration> {
        let started = self.started?;
        (self.steps > 0).then(|| {
            started
                .elapsed()
                .mul_f64(remaining as f64 / self.steps as f64)
        })
    }
}

fn f32_opt(x: Option<f64>) -> Option<f32> {
    x.map(|v| v as f32)
}

impl Loop<'_> {
    fn due(&self, every: u64, state: &RunState) -> bool {
        if every > 0 {
            state.step.is_multiple_of(every)
        } else {
            state.step_in_epoch == 0
        }
    }

    fn patience_exhausted(&self, state: &RunState) -> bool {
        let p = self.settings.early_stopping_patience;
        p > 0 && state.evals_without_improvement >= p
    }

    /// Train until the planned step count, early stopping or cancellation (`Ok(None)`).
    pub fn train(
        &self,
        trainer: &mut Trainer,
        state: &mut RunState,
        hooks: &mut dyn RunHooks,
    ) -> Result<Option<LoopStats>, RunError> {
        let mut order: Option<(u64, Vec<usize>)> = None;
        let mut speed = Throughput::default();
        let mut retention = Retention::default();
        let mut early_stopped = self.patience_exhausted(state);
        while state.step < state.total_steps && !early_stopped {
            if hooks.cancelled() {
                return Ok(None);
            }
            let started = Instant::now();
            speed.started.get_or_insert(started);
            if order.as_ref().is_none_or(|(e, _)| *e != state.epoch) {
                let o = data::epoch_order(self.train.len(), state.seed, state.epoch);
                order = Some((state.epoch, o));
            }
            let (_, o) = order.as_ref().expect("set just above");
            let mut batches = Vec::with_capacity(self.plan.grad_accum);
            let mut tokens = 0;
            for idx in self.plan.step_batches(o, state.step_in_epoch as usize) {
                let examples: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
                tokens += data::batch_tokens(&examples);
                batches.push(data::collate(&examples, self.pad_id, self.device)?);
            }
            let stats = trainer.train_step(&batches)?;
            if !stats.loss.is_finite() || !stats.grad_norm.is_finite() {
                return Err(RunError::NonFiniteLoss {
                    step: state.step + 1,
                });
            }
            state.advance(stats.loss, tokens);
            speed.tokens += tokens;
            speed.steps += 1;
            speed.step_time += started.elapsed();
            let progress = Progress {
                step: state.step,
                total_steps: state.total_steps,
                epoch: state.epochs(),
                loss: stats.loss as f32,
                learning_rate: stats.lr,
                tokens_per_second: speed.tokens_per_second(),
                eval_loss: f32_opt(state.last_eval_loss),
                eta: speed.eta(state.total_steps - state.step),
                grad_norm: stats.grad_norm as f32,
                trained_tokens: state.trained_tokens,
            };
            hooks.progress(&progress);
            let last = state.step == state.total_steps;
            let mut best = false;
            let eval_due = self.due(self.settings.eval_every_steps, state)
                || (last && state.last_eval_step != Some(state.step));
            if !self.eval.is_empty() && eval_due {
                let loss = self.evaluate(trainer)?;
                if !loss.is_finite() {
                    return Err(RunError::NonFiniteLoss { step: state.step });
                }
                best = state.record_eval(loss);
                hooks.progress(&Progress {
                    eval_loss: Some(loss as f32),
                    ..progress.clone()
                });
                hooks.log(
                    pb::LogLevel::Info,
                    format!(
                        "step {}: eval loss {loss:.4}{}",
                        state.step,
                        if best { " (best)" } else { "" }
                    ),
                );
                early_stopped = self.patience_exhausted(state);
            }
            if self.due(self.settings.checkpoint_every_steps, state) {
                let dir = checkpoint::save(
                    &self.checkpoint_root,
                    trainer,
                    state,
                    self.tokenizer_to_save,
                )?;
                let evaluated_now = state.last_eval_step == Some(state.step);
                let info = CheckpointInfo {
                    step: state.step,
                    epoch: state.epochs(),
                    loss: stats.loss as f32,
                    eval_loss: f32_opt(state.last_eval_loss.filter(|_| evaluated_now)),
                    best,
                };
                hooks
                    .checkpoint(&dir, &info)
                    .map_err(|e| RunError::Internal(format!("checkpoint hook: {e:#}")))?;
                retention.add_and_prune(
                    state.step,
                    dir,
                    info.eval_loss.map(f64::from),
                    self.settings.keep_checkpoints,
                )?;
            }
            if early_stopped {
                hooks.log(
                    pb::LogLevel::Info,
                    format!(
                        "early stopping at step {}: no eval improvement in {} evaluations",
                        state.step, state.evals_without_improvement
                    ),
                );
            }
        }
        Ok(Some(LoopStats {
            tokens_per_second: speed.tokens_per_second(),
            early_stopped,
        }))
    }

    /// Mean loss over every target of the eval split (no dropout).
    fn evaluate(&self, trainer: &Trainer) -> Result<f64, RunError> {
        let mut nll = 0.0;
        let mut targets = 0.0;
        for chunk in self.eval.chunks(self.settings.batch_size) {
            let examples: Vec<&Example> = chunk.iter().collect();
            let batch = data::collate(&examples, self.pad_id, self.device)?;
            let logits =
                trainer
                    .model
                    .forward_train(&batch.input_ids, Some(&batch.attention_mask), None)?;
            let sum =
                loss::causal_lm_loss(&logits, &batch.input_ids, &batch.label_mask, Some(1.0))?;
            nll += sum.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            targets += loss::target_count(&batch.label_mask)?;
        }
        Ok(nll / targets)
    }
}
