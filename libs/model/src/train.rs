//! One training step over micro-batches, and training checkpoints that resume exactly.
//!
//! [`Trainer::train_step`] runs forward/backward on each micro-batch with the loss normalised
//! by the unmasked-token count of *all* of them, so accumulated gradients equal those of the
//! one large batch; then clips, looks up the scheduled learning rate and applies AdamW.
//! [`Trainer::save_checkpoint`] writes the trainable weights, the optimizer moments, the step
//! and the RNG state; [`Trainer::load_checkpoint`] restores all of them, so a resumed run
//! repeats the uninterrupted loss curve bit for bit.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, TensorId, Var};
use serde::{Deserialize, Serialize};

use crate::backprop;
use crate::error::{ModelError, Result};
use crate::loss;
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig, LrSchedule, clip_scale, grad_norm};
use crate::rng::Rng;
use crate::weights::{read_safetensors, write_safetensors};

/// A batch of token sequences with their masks, all `[b, t]`.
#[derive(Debug, Clone)]
pub struct Batch {
    /// Token ids (u32).
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// 1 where the token is a training target (e.g. assistant tokens), 0 elsewhere.
    pub label_mask: Tensor,
}

/// Hyper-parameters of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub schedule: LrSchedule,
    pub adamw: AdamWConfig,
    pub max_grad_norm: Option<f64>,
    /// Dropout on each sublayer's output before the residual add (LoRA adapters use their own).
    pub dropout: f32,
    pub seed: u64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over all unmasked targets of the step.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    /// Unmasked targets seen.
    pub tokens: usize,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    adam_t: usize,
    rng_state: [u64; 4],
    config: TrainConfig,
}

/// Owns the model, the optimizer over its trainable vars, and the run's RNG.
#[derive(Debug)]
pub struct Trainer {
    pub model: Model,
    pub optimizer: AdamW,
    pub config: TrainConfig,
    pub rng: Rng,
    /// Optimizer steps taken.
    pub step: usize,
    /// Run every step through candle's autograd even where the hand-written backward
    /// ([`crate::backprop`]) applies; set from `LMFORGE_TRAIN_AUTOGRAD=1` (A/B runs).
    pub autograd: bool,
}

impl Trainer {
    /// `trainable` lists the vars to update (all weights, or only LoRA adapters).
    pub fn new(model: Model, trainable: Vec<(String, Var)>, config: TrainConfig) -> Result<Self> {
        Ok(Self {
            model,
            optimizer: AdamW::new(trainable, config.adamw.clone())?,
            rng: Rng::new(config.seed),
            config,
            step: 0,
            autograd: std::env::var("LMFORGE_TRAIN_AUTOGRAD").is_ok_and(|v| v.trim() == "1"),
        })
    }

    /// One optimizer step over `micro_batches` (gradient accumulation when more than one).
    pub fn train_step(&mut self, micro_batches: &[Batch]) -> Result<StepStats> {
        let mut total = 0.0;
        for mb in micro_batches {
            total += loss::target_count(&mb.label_mask)?;
        }
        if total <= 0.0 {
            return Err(ModelError::input(
                "label_mask",
                "no unmasked target tokens in the step",
            ));
        }
        let n = self.optimizer.vars.len();
        let mut grads: Vec<Option<Tensor>> = vec![None; n];
        let mut loss_sum = 0.0;
        let hand_written = !self.autograd && backprop::supported(&self.model);
        for mb in micro_batches {
            // Always in training mode, even at dropout 0: LoRA adapters have their own dropout.
            let train = Some((self.config.dropout, &mut self.rng));
            let (value, found) = if hand_written {
                let g = backprop::loss_and_grads(
                    &self.model,
                    &mb.input_ids,
                    &mb.attention_mask,
                    &mb.label_mask,
                    Some(total),
                    train,
                )?;
                (g.loss, g.grads)
            } else {
                autograd_loss_and_grads(&self.model, &self.optimizer.vars, mb, total, train)?
            };
            loss_sum += value;
            for (i, (_, var)) in self.optimizer.vars.iter().enumerate() {
                if let Some(g) = found.get(&var.as_tensor().id()) {
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
        }
        let grad_norm = grad_norm(&grads)?;
        let scale = clip_scale(
            grad_norm,
            self.config.max_grad_norm.unwrap_or(f64::INFINITY),
        );
        let lr = self.config.schedule.lr(self.step);
        self.optimizer.step_scaled(&grads, lr, scale)?;
        self.step += 1;
        Ok(StepStats {
            loss: loss_sum,
            grad_norm,
            lr,
            tokens: total as usize,
        })
    }

    /// Write `trainable.safetensors`, `optimizer.safetensors` and `trainer_state.json`.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let vars = &self.optimizer.vars;
        let weights: Vec<(String, Tensor)> = vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        write_safetensors(&weights, &dir.join("trainable.safetensors"))?;
        let mut moments = Vec::with_capacity(2 * vars.len());
        for (i, (n, _)) in vars.iter().enumerate() {
            moments.push((format!("exp_avg.{n}"), self.optimizer.m[i].clone()));
            moments.push((format!("exp_avg_sq.{n}"), self.optimizer.v[i].clone()));
        }
        write_safetensors(&moments, &dir.join("optimizer.safetensors"))?;
        let state = TrainerState {
            step: self.step,
            adam_t: self.optimizer.t,
            rng_state: self.rng.state(),
            config: self.config.clone(),
        };
        let path = dir.join("trainer_state.json");
        let text = serde_json::to_string_pretty(&state).map_err(|e| ModelError::json(&path, e))?;
        std::fs::write(&path, text).map_err(|e| ModelError::io(&path, e))
    }

    /// Restore weights, optimizer moments, step, schedule and RNG from `save_checkpoint`.
    pub fn load_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&path).map_err(|e| ModelError::io(&path, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| ModelError::json(&path, e))?;
        let mut weights = read_safetensors(&dir.join("trainable.safetensors"))?;
        let mut moments = read_safetensors(&dir.join("optimizer.safetensors"))?;
        let take =
            |map: &mut HashMap<String, Tensor>, name: String, like: &Tensor| -> Result<Tensor> {
                let t = map
                    .remove(&name)
                    .ok_or_else(|| ModelError::MissingTensor(name.clone()))?;
                if t.dims() != like.dims() {
                    return Err(ModelError::WrongShape {
                        name,
                        expected: like.dims().to_vec(),
                        actual: t.dims().to_vec(),
                    });
                }
                Ok(t.to_dtype(like.dtype())?.to_device(like.device())?)
            };
        for (i, (n, var)) in self.optimizer.vars.iter().enumerate() {
            var.set(&take(&mut weights, n.clone(), var.as_tensor())?)?;
            self.optimizer.m[i] = take(&mut moments, format!("exp_avg.{n}"), &self.optimizer.m[i])?;
            self.optimizer.v[i] = take(
                &mut moments,
                format!("exp_avg_sq.{n}"),
                &self.optimizer.v[i],
            )?;
        }
        self.optimizer.t = state.adam_t;
        self.step = state.step;
        self.rng = Rng::from_state(state.rng_state);
        self.config = state.config;
        self.optimizer.config = self.config.adamw.clone();
        Ok(())
    }
}

/// One micro-batch's loss and the trainable vars' gradients (by tensor id) through
/// candle's autograd.
fn autograd_loss_and_grads(
    model: &Model,
    vars: &[(String, Var)],
    mb: &Batch,
    total: f64,
    train: Option<(f32, &mut Rng)>,
) -> Result<(f64, HashMap<TensorId, Tensor>)> {
    let head = &model.lm_head;
    let (value, objective) = if head.lora.is_none() && head.bias.is_none() {
        // The LM head and loss without materialising the logits (see lm_head_loss).
        let hidden = model.forward_train_hidden(&mb.input_ids, Some(&mb.attention_mask), train)?;
        loss::lm_head_loss(
            &hidden,
            &head.weight,
            &mb.input_ids,
            &mb.label_mask,
            Some(total),
        )?
    } else {
        let logits = model.forward_train(&mb.input_ids, Some(&mb.attention_mask), train)?;
        let l = loss::causal_lm_loss(&logits, &mb.input_ids, &mb.label_mask, Some(total))?;
        (l.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?, l)
    };
    let store = objective.backward()?;
    let found = vars
        .iter()
        .filter_map(|(_, v)| Some((v.as_tensor().id(), store.get(v.as_tensor())?.clone())))
        .collect();
    Ok((value, found))
}
