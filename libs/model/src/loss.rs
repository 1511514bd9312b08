//! Causal-LM cross-entropy with a label mask, normalised by the number of unmasked tokens.
//!
//! candle's `cross_entropy` has no ignore-index, so masked positions are weighted by zero
//! here. Position `i`'s logits predict token `i + 1`; `label_mask[i + 1]` says whether that
//! target counts (prompt, padding and non-assistant chat turns are 0).

use candle_core::{DType, Tensor};

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
