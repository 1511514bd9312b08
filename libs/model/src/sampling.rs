//! Choosing the next token from logits, one [`Sampler`] per request.
//!
//! Order of operations: penalties (repetition over prompt + output, frequency and presence
//! over output) → greedy when `temperature == 0` → temperature → top-k → top-p → min-p →
//! draw from the request's own seeded [`Rng`], so the same seed gives the same tokens
//! whatever else shares the batch. Log-probabilities, when asked for
//! ([`SamplingParams::logprobs`]), are the model's (log-softmax of the raw logits), for the
//! chosen token and the `top_logprobs` most likely ones.

use std::collections::HashMap;

use crate::error::{ModelError, Result};
use crate::rng::Rng;

/// Per-request sampling settings (OpenAI/vLLM semantics).
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// > 1 discourages any token already in prompt or output.
    pub repetition_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    pub seed: u64,
    /// Report the chosen token's log-probability ([`Sampled::logprob`]); it costs a pass
    /// over the vocabulary per token, so it is only computed when asked for (as in vLLM).
    pub logprobs: bool,
    /// How many most-likely alternatives to report with each token (implies `logprobs`).
    pub top_logprobs: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            seed: 0,
            logprobs: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Reject settings that have no meaning, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field, reason: &str| Err(ModelError::input(field, reason));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", "must be finite and >= 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", "must be in (0, 1]");
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", "must be in [0, 1]");
        }
        if self.repetition_penalty <= 0.0 || !self.repetition_penalty.is_finite() {
            return bad("repetition_penalty", "must be > 0");
        }
        Ok(())
    }
}

/// The chosen token and its log-probabilities.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// With [`SamplingParams::logprobs`] (or `top_logprobs`).
    pub logprob: Option<f32>,
    /// The `top_logprobs` most likely tokens, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// A request's sampler: its settings and its own random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    pub params: SamplingParams,
    rng: Rng,
}

/// Apply repetition, frequency and presence penalties in place.
pub fn apply_penalties(
    logits: &mut [f32],
    params: &SamplingParams,
    prompt: &[u32],
    output: &[u32],
) {
    if params.repetition_penalty != 1.0 {
        let mut seen: Vec<u32> = prompt.iter().chain(output).copied().collect();
        seen.sort_unstable();
        seen.dedup();
        for t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = if *l > 0.0 {
                    *l / params.repetition_penalty
                } else {
                    *l * params.repetition_penalty
                };
            }
        }
    }
    if params.frequency_penalty != 0.0 || params.presence_penalty != 0.0 {
        let mut counts: HashMap<u32, usize> = HashMap::new();
        for &t in output {
            *counts.entry(t).or_default() += 1;
        }
        for (t, c) in counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= params.frequency_penalty * c as f32 + params.presence_penalty;
            }
        }
    }
}

/// `e^x` for `x <= 0` in f32 (relative error under 3e-7 down to −86, close to libm's `expf`;
/// below −87.3, and for −∞ or NaN, about 2⁻¹²⁶, harmless in a sum of at least 1), written so
/// the compiler vectorises a loop of it: `x = n·ln 2 + g` with `n` rounded by the 1.5·2²³
/// trick and `g` reduced with a two-part ln 2 (Cody–Waite), `e^g` by its degree-7 Taylor
/// series (|g| ≤ 0.35), `2^n` built in the exponent bits.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-126.0 * std::f32::consts::LN_2);
    let shifted = x * std::f32::consts::LOG2_E + MAGIC;
    let n = shifted.to_bits() as i32 - MAGIC.to_bits() as i32;
    let nf = shifted - MAGIC;
    let g = (x - nf * LN2_HI) - nf * LN2_LO;
    let mut p = 1.0 / 5040.0;
    for c in [
        1.0 / 720.0,
        1.0 / 120.0,
        1.0 / 24.0,
        1.0 / 6.0,
        0.5,
        1.0,
        1.0,
    ] {
        p = p * g + c;
    }
    p * f32::from_bits(((n + 127) << 23) as u32)
}

/// `ln Σ e^logits` (f64 sum of f32 terms), vectorised for the CPU at hand: one pass over a
/// 150k vocabulary per sampled token was a libm `exp` call per entry before.
fn log_sum_exp(logits: &[f32]) -> f32 {
    pulp::Arch::new().dispatch(LogSumExp(logits))
}

/// [`log_sum_exp`]'s loop as a `pulp` operation: its `#[inline(always)]` body is compiled
/// inside the dispatched function, for that instruction set (a closure passed to `dispatch`
/// may stay a separate function, compiled for the baseline SSE2 only).
struct LogSumExp<'a>(&'a [f32]);

impl pulp::WithSimd for LogSumExp<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> f32 {
        let logits = self.0;
        let max = max_of(logits);
        let mut lanes = [0f64; 16];
        let mut chunks = logits.chunks_exact(16);
        for c in &mut chunks {
            for (acc, &l) in lanes.iter_mut().zip(c) {
                *acc += exp_nonpositive(l - max) as f64;
            }
        }
        let tail: f64 = chunks
            .remainder()
            .iter()
            .map(|&l| exp_nonpositive(l - max) as f64)
            .sum();
        (lanes.iter().sum::<f64>() + tail).ln() as f32 + max
    }
}

/// The largest entry (NaNs ignored; −∞ when there is none), over 16 independent lanes so
/// it vectorises (a plain `fold(f32::max)` is one long dependency chain).
#[inline(always)]
pub(crate) fn max_of(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = xs.chunks_exact(16);
    for c in &mut chunks {
        for (m, &x) in lanes.iter_mut().zip(c) {
            *m = if x > *m { x } else { *m };
        }
    }
    let rest = chunks.remainder().iter().copied();
    lanes
        .into_iter()
        .chain(rest)
        .fold(f32::NEG_INFINITY, f32::max)
}

/// The first index of the largest entry (NaNs ignored; 0 when every entry is NaN).
fn argmax(xs: &[f32]) -> usize {
    pulp::Arch::new().dispatch(Argmax(xs))
}

/// [`argmax`] for the CPU at hand: the maximum over lanes, then the first chunk holding it.
struct Argmax<'a>(&'a [f32]);

impl pulp::WithSimd for Argmax<'_> {
    type Output = usize;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) -> usize {
        let xs = self.0;
        let max = max_of(xs);
        for (k, c) in xs.chunks(16).enumerate() {
            if c.iter().fold(false, |hit, &x| hit | (x == max)) {
                let at = c
                    .iter()
                    .position(|&x| x == max)
                    .expect("the chunk holds it");
                return k * 16 + at;
            }
        }
        0
    }
}

/// Token ids that survive temperature, top-k, top-p and min-p, with their renormalised
/// probabilities, most likely first.
pub fn filtered_distribution(logits: &[f32], params: &SamplingParams) -> Vec<(u32, f64)> {
    let t = params.temperature.max(1e-6) as f64;
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let mut probs: Vec<(u32, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, ((l as f64 - max) / t).exp()))
        .collect();
    // Ties broken by token id so the order, and thus the draw, never depends on sort internals.
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= total;
    }
    if params.top_k > 0 {
        probs.truncate(params.top_k);
    }
    if params.top_p < 1.0 {
        let mut cum = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            cum += p.1;
            if cum >= params.top_p as f64 {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
    }
    if params.min_p > 0.0 {
        let floor = probs[0].1 * params.min_p as f64;
        probs.retain(|p| p.1 >= floor);
    }
    let total: f64 = probs.iter().map(|p| p.1).sum();
    for p in &mut probs {
        p.1 /= total;
    }
    probs
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = Rng::new(params.seed);
        Self { params, rng }
    }

    /// Pick the next token from `logits` (one row, f32) given the request's history.
    pub fn sample(&mut self, logits: &[f32], prompt: &[u32], output: &[u32]) -> Result<Sampled> {
        if logits.is_empty() {
            return Err(ModelError::input("logits", "empty row"));
        }
        if !logits.iter().any(|x| x.is_finite()) {
            return Err(ModelError::input(
                "logits",
                "every token is masked (the output constraint, stop tokens and min_tokens \
                 leave nothing to sample)",
            ));
        }
        let p = &self.params;
        let lse = (p.logprobs || p.top_logprobs > 0).then(|| log_sum_exp(logits));
        let adjusted = if p.repetition_penalty != 1.0
            || p.frequency_penalty != 0.0
            || p.presence_penalty != 0.0
        {
            let mut adjusted = logits.to_vec();
            apply_penalties(&mut adjusted, p, prompt, output);
            std::borrow::Cow::Owned(adjusted)
        } else {
            std::borrow::Cow::Borrowed(logits)
        };
        let token = if self.params.temperature == 0.0 {
            argmax(&adjusted) as u32
        } else {
            let dist = filtered_distribution(&adjusted, &self.params);
            let u = self.rng.uniform();
            let mut cum = 0.0;
            let mut pick = dist
                .last()
                .expect("at least the most likely token survives")
                .0;
            for (tok, p) in &dist {
                cum += p;
                if u < cum {
                    pick = *tok;
                    break;
                }
            }
            pick
        };
        let top = if let Some(lse) = lse
            && self.params.top_logprobs > 0
        {
            let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
            idx.sort_by(|&a, &b| {
                logits[b as usize]
                    .total_cmp(&logits[a as usize])
                    .then(a.cmp(&b))
            });
            idx.into_iter()
                .take(self.params.top_logprobs)
                .map(|i| (i, logits[i as usize] - lse))
                .collect()
        } else {
            vec![]
        };
        Ok(Sampled {
            token,
            logprob: lse.map(|lse| logits[token as usize] - lse),
            top,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_and_log_sum_exp_match_f64() {
        for i in 0..=200_000 {
            let x = -(i as f32) * 4.3e-4; // 0 down to -86
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            assert!(
                ((got - want) / want).abs() < 3e-7,
                "exp({x}): {got} vs {want}"
            );
        }
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
        // A vocabulary-sized row with a masked entry and a tail past the 16-wide chunks.
        let mut row: Vec<f32> = (0..49_157)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0 - 9.0)
            .collect();
        row[5] = f32::NEG_INFINITY;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let want = row
            .iter()
            .map(|&l| (l as f64 - max).exp())
            .sum::<f64>()
            .ln()
            + max;
        assert!((log_sum_exp(&row) as f64 - want).abs() < 1e-5);
    }

    fn logits_for(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|p| p.ln() as f32).collect()
    }

    fn histogram(params: SamplingParams, logits: &[f32], n: usize) -> Vec<usize> {
        let mut s = Sampler::new(params);
        let mut h = vec![0; logits.len()];
        for _ in 0..n {
            h[s.sample(logits, &[], &[]).expect("sample").token as usize] += 1;
        }
        h
    }

    #[test]
    fn argmax_takes_the_first_largest_entry_and_ignores_nans() {
        let plain = |xs: &[f32]| {
            let mut best = None;
            for (i, &x) in xs.iter().enumerate() {
                if !x.is_nan() && best.is_none_or(|b: usize| x > xs[b]) {
                    best = Some(i);
                }
            }
            best.unwrap_or(0)
        };
        let mut row: Vec<f32> = (0..4099)
            .map(|i| ((i * 7919) % 1000) as f32 / 37.0)
            .collect();
        assert_eq!(argmax(&row), plain(&row));
        // Ties keep the first; NaNs (first entry included) never win; the tail counts.
        row[0] = f32::NAN;
        row[17] = 100.0;
        row[300] = 100.0;
        row[301] = f32::NAN;
        assert_eq!(argmax(&row), 17);
        row[4098] = 101.0;
        assert_eq!(argmax(&row), 4098);
        assert_eq!(argmax(&[f32::NEG_INFINITY, -1.0, f32::NEG_INFINITY]), 1);
        assert_eq!(argmax(&[f32::NAN, f32::NAN]), 0);
        assert_eq!(max_of(&row[..4098]), 100.0);
    }

    #[test]
    fn greedy_takes_argmax_and_reports_logprobs() {
        let logits = [0.1f32, 2.0, -1.0, 1.5];
        let mut s = Sampler::new(SamplingParams {
            top_logprobs: 2,
            ..SamplingParams::greedy()
        });
        let out = s.sample(&logits, &[], &[]).expect("sample");
        assert_eq!(out.token, 1);
        let lse = logits.iter().map(|l| (*l as f64).exp()).sum::<f64>().ln();
        let logprob = out.logprob.expect("asked for");
        assert!((logprob as f64 - (2.0 - lse)).abs() < 1e-5);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3]);
        // Only when asked for: the same pick, no log-probabilities.
        let plain = Sampler::new(SamplingParams::greedy())
            .sample(&logits, &[], &[])
            .expect("sample");
        assert_eq!((plain.token, plain.logprob, plain.top.len()), (1, None, 0));
        let asked = Sampler::new(SamplingParams {
            logprobs: true,
            ..SamplingParams::greedy()
        })
        .sample(&logits, &[], &[])
        .expect("sample");
        assert_eq!(asked.logprob, Some(logprob));
    }

    #[test]
    fn temperature_sampling_follows_the_distribution() {
        let h = histogram(
            SamplingParams::default(),
            &logits_for(&[0.5, 0.3, 0.2]),
            20_000,
        );
        for (got, want) in h.iter().zip([0.5, 0.3, 0.2]) {
            assert!((*got as f64 / 20_000.0 - want).abs() < 0.02, "{h:?}");
        }
        // Low temperature sharpens towards the mode.
        let h = histogram(
            SamplingParams {
                temperature: 0.2,
                ..Default::default()
            },
            &logits_for(&[0.5, 0.3, 0.2]),
            2_000,
        );
        assert!(h[0] > 1_800, "{h:?}");
    }

    #[test]
    fn top_k_top_p_and_min_p_cut_the_tail() {
        let l = logits_for(&[0.5, 0.3, 0.15, 0.05]);
        let h = histogram(
            SamplingParams {
                top_k: 2,
                ..Default::default()
            },
            &l,
            3_000,
        );
        assert_eq!(h[2] + h[3], 0, "{h:?}");
        assert!(h[1] > 0);
        let h = histogram(
            SamplingParams {
                top_p: 0.7,
                ..Default::default()
            },
            &l,
            3_000,
        );
        assert_eq!(h[2] + h[3], 0, "{h:?}");
        assert!(h[1] > 0);
        let h = histogram(
            SamplingParams {
                top_p: 0.9,
                ..Default::default()
            },
            &l,
            3_000,
        );
        assert!(h[2] > 0 && h[3] == 0, "{h:?}");
        // min_p 0.25: floor 0.125 keeps 0.5, 0.3 and 0.15.
        let h = histogram(
            SamplingParams {
                min_p: 0.25,
                ..Default::default()
            },
            &l,
            3_000,
        );
        assert!(h[2] > 0 && h[3] == 0, "{h:?}");
    }

    #[test]
    fn penalties_shift_logits_as_specified() {
        let p = SamplingParams {
            repetition_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..Default::default()
        };
        let mut l = vec![1.0f32, -1.0, 1.0, 1.0];
        apply_penalties(&mut l, &p, &[0, 1], &[2, 2]);
        assert_eq!(l, vec![0.5, -2.0, 0.5 - 1.0 - 0.25, 1.0]);
        // Greedy would repeat token 0; the penalty moves it to token 1.
        let mut s = Sampler::new(SamplingParams {
            presence_penalty: 1.0,
            ..SamplingParams::greedy()
        });
        assert_eq!(s.sample(&[2.0, 1.5], &[], &[0]).expect("sample").token, 1);
    }

    #[test]
    fn same_seed_same_tokens_regardless_of_batch_neighbours() {
        let l = logits_for(&[0.25, 0.25, 0.25, 0.25]);
        let p = SamplingParams {
            seed: 7,
            ..Default::default()
        };
        let mut alone = Sampler::new(p.clone());
        let solo: Vec<u32> = (0..50)
            .map(|_| alone.sample(&l, &[], &[]).expect("s").token)
            .collect();
        let mut a = Sampler::new(p);
        let mut other = Sampler::new(SamplingParams {
            seed: 8,
            ..Default::default()
        });
        let mixed: Vec<u32> = (0..50)
            .map(|_| {
                other.sample(&l, &[], &[]).expect("s");
                a.sample(&l, &[], &[]).expect("s").token
            })
            .collect();
        assert_eq!(solo, mixed);
        let mut b = Sampler::new(SamplingParams {
            seed: 8,
            ..Default::default()
        });
        let diff: Vec<u32> = (0..50)
            .map(|_| b.sample(&l, &[], &[]).expect("s").token)
            .collect();
        assert_ne!(solo, diff);
    }

    #[test]
    fn invalid_params_name_the_field() {
        let e = SamplingParams {
            top_p: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("top_p"));
    }
}
