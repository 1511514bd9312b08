//! Run checkpoints: the libs/model [`Trainer`] checkpoint (trainable weights, AdamW moments,
//! step, schedule, RNG) plus `run_state.json` with everything else a resumed run needs to
//! continue bit for bit — data position, eval/early-stopping state, token count, the loss
//! window — and, for a tokenizer trained by the run, that tokenizer.
//!
//! A checkpoint is written under a `.partial` name and renamed when complete, so a
//! directory without the suffix is always whole.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::train::Trainer;
use serde::{Deserialize, Serialize};

use super::error::RunError;
use super::setup::CHECKPOINT_TOKENIZER_DIR;

/// File holding [`RunState`] in a checkpoint directory.
pub const RUN_STATE_FILE: &str = "run_state.json";
const FORMAT_VERSION: u32 = 1;
/// Steps averaged into the reported `train_loss`.
pub const LOSS_WINDOW: usize = 20;

/// The run's own state beside the trainer's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub format_version: u32,
    /// Optimizer steps completed (equals the trainer's step).
    pub step: u64,
    /// Data position of the next step.
    pub epoch: u64,
    pub step_in_epoch: u64,
    /// The plan the run was made with; a resume must see the same one.
    pub total_steps: u64,
    pub steps_per_epoch: u64,
    pub train_examples: u64,
    pub seed: u64,
    pub best_eval_loss: Option<f64>,
    pub last_eval_loss: Option<f64>,
    pub last_eval_step: Option<u64>,
    /// Evaluations since the last improvement.
    pub evals_without_improvement: u32,
    pub trained_tokens: u64,
    pub recent_losses: VecDeque<f64>,
}

impl RunState {
    pub fn new(total_steps: u64, steps_per_epoch: u64, train_examples: u64, seed: u64) -> Self {
        Self {
            format_version: FORMAT_VERSION,
            step: 0,
            epoch: 0,
            step_in_epoch: 0,
            total_steps,
            steps_per_epoch,
            train_examples,
            seed,
            best_eval_loss: None,
            last_eval_loss: None,
            last_eval_step: None,
            evals_without_improvement: 0,
            trained_tokens: 0,
            recent_losses: VecDeque::new(),
        }
    }

    /// Record a finished optimizer step.
    pub fn advance(&mut self, loss: f64, tokens: u64) {
        self.step += 1;
        self.epoch = self.step / self.steps_per_epoch;
        self.step_in_epoch = self.step % self.steps_per_epoch;
        self.trained_tokens += tokens;
        if self.recent_losses.len() == LOSS_WINDOW {
            self.recent_losses.pop_front();
        }
        self.recent_losses.push_back(loss);
    }

    /// Mean loss over the last [`LOSS_WINDOW`] steps.
    pub fn train_loss(&self) -> Option<f64> {
        let n = self.recent_losses.len();
        (n > 0).then(|| self.recent_losses.iter().sum::<f64>() / n as f64)
    }

    /// Fractional epochs completed.
    pub fn epochs(&self) -> f64 {
        self.step as f64 / self.steps_per_epoch as f64
    }

    /// Record an evaluation; true when it is the best so far.
    pub fn record_eval(&mut self, loss: f64) -> bool {
        self.last_eval_loss = Some(loss);
        self.last_eval_step = Some(self.step);
        let best = self.best_eval_loss.is_none_or(|b| loss < b);
        if best {
            self.best_eval_loss = Some(loss);
            self.evals_without_improvement = 0;
        } else {
            self.evals_without_improvement += 1;
        }
        best
    }

    /// Whether the run must resume from a checkpoint with state `saved`.
    fn check_compatible(&self, saved: &RunState, dir: &Path) -> Result<(), RunError> {
        let plan = |s: &RunState| {
            (
                s.format_version,
                s.total_steps,
                s.steps_per_epoch,
                s.train_examples,
                s.seed,
            )
        };
        if plan(self) != plan(saved) {
            return Err(RunError::checkpoint(
                dir,
                format!(
                    "made for another plan (version, total steps, steps per epoch, examples, seed) {:?}, this run has {:?}",
                    plan(saved),
                    plan(self)
                ),
            ));
        }
        Ok(())
    }
}

/// Write a checkpoint of `trainer` and `state` to `<root>/step-<step>`; returns the directory.
pub fn save(
    root: &Path,
    trainer: &Trainer,
    state: &RunState,
    tokenizer: Option<&TextTokenizer>,
) -> Result<PathBuf, RunError> {
    let dir = root.join(format!("step-{:08}", state.step));
    let partial = root.join(format!("step-{:08}.partial", state.step));
    for d in [&dir, &partial] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| RunError::io(d, e))?;
        }
    }
    trainer.save_checkpoint(&partial)?;
    let path = partial.join(RUN_STATE_FILE);
    let text = serde_json::to_string_pretty(state)
        .map_err(|e| RunError::Internal(format!("serializing run state: {e}")))?;
    std::fs::write(&path, text).map_err(|e| RunError::io(&path, e))?;
    if let Some(tok) = tokenizer {
        tok.save(&partial.join(CHECKPOINT_TOKENIZER_DIR))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| RunError::io(&dir, e))?;
    Ok(dir)
}

/// Restore `trainer` from the checkpoint in `dir` and return its run state, after checking
/// that it belongs to a run planned like `fresh`.
pub fn load(dir: &Path, trainer: &mut Trainer, fresh: &RunState) -> Result<RunState, RunError> {
    let path = dir.join(RUN_STATE_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| RunError::checkpoint(&path, e))?;
    let saved: RunState =
        serde_json::from_str(&text).map_err(|e| RunError::checkpoint(&path, e))?;
    fresh.check_compatible(&saved, dir)?;
    trainer
        .load_checkpoint(dir)
        .map_err(|e| RunError::checkpoint(dir, e))?;
    if trainer.step as u64 != saved.step {
        return Err(RunError::checkpoint(
            dir,
            format!(
                "trainer state is at step {}, run state at step {}",
                trainer.step, saved.step
            ),
        ));
    }
    Ok(saved)
}

/// Checkpoints this attempt wrote, for local cleanup.
#[derive(Debug, Default)]
pub struct Retention {
    /// `(step, dir, eval loss at that step)`, oldest first.
    written: Vec<(u64, PathBuf, Option<f64>)>,
}

impl Retention {
    /// Note a new checkpoint, then delete local ones beyond the newest `keep`, sparing the
    /// one with the best eval loss.
    pub fn add_and_prune(
        &mut self,
        step: u64,
        dir: PathBuf,
        eval_loss: Option<f64>,
        keep: usize,
    ) -> Result<(), RunError> {
        self.written.push((step, dir, eval_loss));
        let best = self
            .written
            .iter()
            .filter_map(|(s, _, l)| l.map(|l| (*s, l)))
            .min_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(s, _)| s);
        let keep = keep.max(1);
        while self.written.len() > keep {
            let Some(i) = self.written.iter().position(|(s, _, _)| Some(*s) != best) else {
                break;
            };
            if self.written.len() - i <= keep {
                break;
            }
            let (_, dir, _) = self.written.remove(i);
            std::fs::remove_dir_all(&dir).map_err(|e| RunError::io(&dir, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_the_newest_and_the_best() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut r = Retention::default();
        let evals = [Some(1.0), Some(0.5), Some(0.9), None, Some(0.7)];
        for (i, e) in evals.into_iter().enumerate() {
            let dir = tmp.path().join(format!("step-{i}"));
            std::fs::create_dir(&dir).expect("mkdir");
            r.add_and_prune(i as u64, dir, e, 2).expect("prune");
        }
        let mut left: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["step-1", "step-3", "step-4"]);
    }

    #[test]
    fn evaluations_track_best_and_patience() {
        let mut s = RunState::new(10, 5, 20, 42);
        assert!(s.record_eval(2.0));
        assert!(!s.record_eval(2.0));
        assert!(!s.record_eval(3.0));
        assert_eq!(s.evals_without_improvement, 2);
        assert!(s.record_eval(1.5));
        assert_eq!(
            (s.best_eval_loss, s.evals_without_improvement),
            (Some(1.5), 0)
        );
    }
}
