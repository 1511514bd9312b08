//! Causal-LM cross-entropy with a label mask, normalised by the number of unmasked tokens.
//!
//! candle's `cross_entropy` has no ignore-index, so masked positions are weighted by zero
//! here. Position `i`'s logits predict token `i + 1`; `label_mask[i + 1]` says whether that
//! target counts (prompt, padding and non-assistant chat turns are 0).

use candle_core::{D, DType, Tensor};

use crate::error::{ModelError, Result};

/// Number of targets `causal_lm_loss` counts for this `label_mask` (`[b, t]`).
pub fn target_count(label_mask: &Tensor) -> Result<f64> {
    let t = label_mask.dim(1)?;
    if t < 2 {
        return Ok(0.0);
    }
    Ok(label_mask
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// The targets' normaliser (`normalizer`, or this batch's unmasked count), after checking
/// that `input_ids` and `label_mask` are `[b, t]` and some target counts.
pub(crate) fn checked_count(
    b: usize,
    t: usize,
    input_ids: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
) -> Result<f64> {
    if input_ids.dims() != [b, t] || label_mask.dims() != [b, t] {
        return Err(ModelError::input(
            "label_mask",
            format!(
                "input_ids {:?} and label_mask {:?} must both be [{b}, {t}]",
                input_ids.dims(),
                label_mask.dims()
            ),
        ));
    }
    let count = normalizer.unwrap_or(target_count(label_mask)?);
    if count <= 0.0 || t < 2 {
        return Err(ModelError::input("label_mask", "no unmasked target tokens"));
    }
    Ok(count)
}

/// Summed negative log-likelihood of the unmasked next-token targets, divided by
/// `normalizer` (the unmasked count of this batch when `None`; pass the count over all
/// micro-batches when accumulating gradients so the sum equals the large-batch loss).
pub fn causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    let count = checked_count(b, t, input_ids, label_mask, normalizer)?;
    let n = b * (t - 1);
    let logp =
        crate::train_ops::log_softmax_last_dim(&logits.narrow(1, 0, t - 1)?.reshape((n, v))?)?;
    let targets = input_ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .reshape((n, 1))?;
    let picked = logp.gather(&targets.contiguous()?, 1)?.reshape(n)?;
    let w = label_mask
        .narrow(1, 1, t - 1)?
        .to_dtype(logits.dtype())?
        .reshape(n)?;
    Ok(((picked * w)?.sum_all()?.neg()? / count)?)
}

/// Vocabulary rows per chunk of [`lm_head_loss`]: a `[positions, chunk]` block of logits for
/// 2,040 positions is 16 MB, under glibc's largest mmap threshold, so the blocks come from
/// (and go back to) the heap instead of fresh zeroed pages every step.
pub(crate) const VOCAB_CHUNK: usize = 2048;

/// The loss of [`causal_lm_loss`] over `logits = hidden · weightᵀ`, without the autograd
/// path's full-size `[b, t, vocab]` tensors (logits, their narrowed copy, log-probabilities,
/// and as many gradients: with the `small` shape at 8 × 256 tokens each is 400 MB of fresh,
/// zeroed pages every step). The logits are held once, as heap-sized vocabulary chunks.
///
/// The gradients are computed here, vocabulary chunk by chunk: `dlogits = softmax −
/// one-hot`, weighted by the label mask over `normalizer`; `dhidden = dlogits · weight`,
/// `dweight = dlogitsᵀ · hidden`. Returns the loss value and a surrogate scalar
/// `Σ hidden ⊙ dhidden + Σ weight ⊙ dweight` (both factors detached) whose `backward()`
/// hands exactly those gradients to `hidden`'s graph and to `weight`.
pub fn lm_head_loss(
    hidden: &Tensor,
    weight: &Tensor,
    input_ids: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
) -> Result<(f64, Tensor)> {
    let dtype = hidden.dtype();
    let (loss, d_hidden, d_weight) =
        lm_head_loss_grads(hidden, weight, input_ids, label_mask, normalizer)?;
    let mut surrogate = (hidden * d_hidden.to_dtype(dtype)?)?.sum_all()?;
    // A frozen weight (LoRA training) needs no gradient.
    if weight.is_variable() {
        surrogate = (surrogate + (weight * d_weight.to_dtype(weight.dtype())?)?.sum_all()?)?;
    }
    Ok((loss, surrogate))
}

/// [`lm_head_loss`]'s value and its gradients themselves: `d_hidden` `[b, t, hidden]` and
/// `d_weight` `[vocab, hidden]`, in f32 (f64 for f64 models).
pub fn lm_head_loss_grads(
    hidden: &Tensor,
    weight: &Tensor,
    input_ids: &Tensor,
    label_mask: &Tensor,
    normalizer: Option<f64>,
) -> Result<(f64, Tensor, Tensor)> {
    let (b, t, h) = hidden.dims3()?;
    let (v, h2) = weight.dims2()?;
    if h != h2 {
        return Err(ModelError::input(
            "weight",
            format!("weight {:?} must be [vocab, {h}]", weight.dims()),
        ));
    }
    let count = checked_count(b, t, input_ids, label_mask, normalizer)?;
    let n = b * (t - 1);
    let dtype = hidden.dtype();
    // Half-precision models get f32 logits; f32 and f64 keep their own.
    let cd = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let hs = hidden
        .narrow(1, 0, t - 1)?
        .reshape((n, h))?
        .detach()
        .to_dtype(cd)?;
    let w = weight.detach().to_dtype(cd)?;
    let targets = input_ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .flatten_all()?;
    // Each target's weight in the loss: its mask over the normaliser, `[n, 1]`.
    let scale = (label_mask
        .narrow(1, 1, t - 1)?
        .to_dtype(cd)?
        .reshape((n, 1))?
        / count)?;
    let chunks: Vec<Tensor> = (0..v)
        .step_by(VOCAB_CHUNK)
        .map(|c0| hs.matmul(&w.narrow(0, c0, VOCAB_CHUNK.min(v - c0))?.t()?))
        .collect::<candle_core::Result<_>>()?;
    let mut max = chunks[0].max_keepdim(D::Minus1)?;
    for c in &chunks[1..] {
        max = max.maximum(&c.max_keepdim(D::Minus1)?)?;
    }
    let mut sum = max.zeros_like()?;
    for c in &chunks {
        sum = (sum + c.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?)?;
    }
    let lse = (max + sum.log()?)?;
    let target_rows = w.index_select(&targets, 0)?;
    let target_logit = (&hs * &target_rows)?.sum_keepdim(D::Minus1)?;
    let loss = ((lse.broadcast_sub(&target_logit))? * &scale)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    // The softmax part of dlogits, chunk by chunk; the one-hot part is a gather/scatter.
    let mut d_hidden = (target_rows.broadcast_mul(&scale)?).neg()?;
    let mut d_weight = Vec::with_capacity(chunks.len());
    for (i, c) in chunks.into_iter().enumerate() {
        let p = c.broadcast_sub(&lse)?.exp()?.broadcast_mul(&scale)?;
        let wc = w.narrow(0, i * VOCAB_CHUNK, p.dim(1)?)?;
        d_hidden = (d_hidden + p.matmul(&wc)?)?;
        d_weight.push(p.t()?.matmul(&hs)?);
    }
    let d_weight =
        Tensor::cat(&d_weight, 0)?.index_add(&targets, &hs.broadcast_mul(&scale)?.neg()?, 0)?;
    // The last position predicts nothing.
    let d_hidden = Tensor::cat(
        &[
            d_hidden.reshape((b, t - 1, h))?,
            Tensor::zeros((b, 1, h), cd, hidden.device())?,
        ],
        1,
    )?;
    Ok((loss, d_hidden, d_weight))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .expect("sub")
            .abs()
            .expect("abs")
            .max_all()
            .expect("max")
            .to_scalar::<f32>()
            .expect("scalar")
    }

    #[test]
    fn lm_head_loss_matches_the_logits_path_in_value_and_gradients() {
        // A vocabulary over two chunks and a partial third; masked targets; a normaliser
        // from outside (gradient accumulation).
        let (b, t, h, v) = (2, 6, 8, 2 * VOCAB_CHUNK + 37);
        let dev = Device::Cpu;
        let hidden = Var::randn(0f32, 1.0, (b, t, h), &dev).expect("hidden");
        let weight = Var::randn(0f32, 0.5, (v, h), &dev).expect("weight");
        let ids: Vec<u32> = (0..(b * t) as u32)
            .map(|i| (i * 977 + 5) % v as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (b, t), &dev).expect("ids");
        let mask = Tensor::new(
            &[[0f32, 0., 1., 1., 1., 0.], [0., 1., 1., 0., 1., 1.]],
            &dev,
        )
        .expect("mask");
        let normalizer = Some(11.0);

        let logits = hidden
            .broadcast_matmul(&weight.t().expect("t"))
            .expect("logits");
        let want = causal_lm_loss(&logits, &ids, &mask, normalizer).expect("loss");
        let want_grads = want.backward().expect("backward");
        let (got, objective) =
            lm_head_loss(&hidden, &weight, &ids, &mask, normalizer).expect("fused");
        let got_grads = objective.backward().expect("backward");

        let want = want.to_scalar::<f32>().expect("scalar") as f64;
        assert!((got - want).abs() < 1e-5, "loss {got} vs {want}");
        for var in [&hidden, &weight] {
            let a = want_grads.get(var.as_tensor()).expect("autograd gradient");
            let g = got_grads.get(var.as_tensor()).expect("fused gradient");
            assert!(
                max_diff(a, g) < 1e-6,
                "gradient differs by {}",
                max_diff(a, g)
            );
        }
    }
}
