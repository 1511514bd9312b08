//! Every trainable tensor gets a gradient, and it matches central finite differences.

mod common;

use candle_core::{DType, Device, Tensor};
use lmforge_model::{Architecture, Model, Rng, backprop, loss, weights};

/// Check every weight's gradient against central finite differences: from candle's autograd
/// over `forward_train` + `causal_lm_loss`, or (`hand_written`) from `backprop`.
fn check_gradients(arch: Architecture, tied: bool, hand_written: bool) {
    let cfg = common::micro_config(arch, tied);
    let map = common::random_weights(&cfg, DType::F64, 3, 0.3);
    let model = Model::new(&cfg, &map).expect("model");
    let ids = common::random_ids(2, 6, cfg.vocab_size, 5);
    // Second row is left-padded by two tokens; the first row's prompt (2 tokens) is masked.
    let attn =
        Tensor::new(&[[1u32, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]], &Device::Cpu).expect("mask");
    let labels = Tensor::new(
        &[[0f64, 0., 1., 1., 1., 1.], [0., 0., 0., 1., 1., 1.]],
        &Device::Cpu,
    )
    .expect("labels");
    let loss_of = |m: &Model| -> f64 {
        let logits = m.forward_train(&ids, Some(&attn), None).expect("forward");
        loss::causal_lm_loss(&logits, &ids, &labels, None)
            .expect("loss")
            .to_scalar::<f64>()
            .expect("scalar")
    };
    let grads = if hand_written {
        backprop::loss_and_grads(&model, &ids, &attn, &labels, None, None)
            .expect("hand-written backward")
            .grads
    } else {
        let logits = model
            .forward_train(&ids, Some(&attn), None)
            .expect("forward");
        let l = loss::causal_lm_loss(&logits, &ids, &labels, None).expect("loss");
        let store = l.backward().expect("backward");
        weights::sorted_vars(&map)
            .into_iter()
            .filter_map(|(_, v)| Some((v.as_tensor().id(), store.get(v.as_tensor())?.clone())))
            .collect()
    };
    let mut rng = Rng::new(11);
    let vars = weights::sorted_vars(&map);
    assert_eq!(vars.len(), weights::param_specs(&cfg).len());
    for (name, var) in vars {
        let g = grads
            .get(&var.as_tensor().id())
            .unwrap_or_else(|| panic!("no gradient for {name}"))
            .flatten_all()
            .expect("flatten")
            .to_vec1::<f64>()
            .expect("vec");
        assert!(
            g.iter().any(|x| x.abs() > 1e-9),
            "all-zero gradient for {name}"
        );
        let orig = var
            .as_tensor()
            .flatten_all()
            .expect("flatten")
            .to_vec1::<f64>()
            .expect("vec");
        for _ in 0..4 {
            // Embedding rows of unseen tokens have zero gradient; probe where it is non-zero
            // half the time so the comparison is not vacuous.
            let i = if rng.below(2) == 0 {
                g.iter()
                    .position(|x| x.abs() > 1e-9)
                    .expect("checked above")
                    + rng.below(3)
            } else {
                rng.below(g.len())
            }
            .min(g.len() - 1);
            let eps = 1e-6;
            let eval = |delta: f64| {
                let mut w = orig.clone();
                w[i] += delta;
                var.set(&Tensor::from_vec(w, var.shape(), &Device::Cpu).expect("shape"))
                    .expect("set");
                loss_of(&model)
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            var.set(&Tensor::from_vec(orig.clone(), var.shape(), &Device::Cpu).expect("shape"))
                .expect("restore");
            let tol = 1e-6 + 1e-4 * fd.abs().max(g[i].abs());
            assert!(
                (fd - g[i]).abs() < tol,
                "{name}[{i}]: analytic {} vs finite-difference {fd}",
                g[i]
            );
        }
    }
}

#[test]
fn qwen2_untied_gradients_match_finite_differences() {
    check_gradients(Architecture::Qwen2, false, false);
}

#[test]
fn hand_written_qwen2_untied_gradients_match_finite_differences() {
    check_gradients(Architecture::Qwen2, false, true);
}

#[test]
fn hand_written_llama_tied_gradients_match_finite_differences() {
    check_gradients(Architecture::Llama, true, true);
}

#[test]
fn llama_tied_gradients_match_finite_differences() {
    check_gradients(Architecture::Llama, true, false);
}

/// The hand-written backward against autograd on the same batch: loss and every gradient,
/// with dropout drawn from the same seed, a sliding window, padding and a label mask.
fn hand_written_equals_autograd(dtype: DType, tol: f64) {
    let mut cfg = common::micro_config(Architecture::Mistral, false);
    cfg.sliding_window = Some(3);
    cfg.attention_bias = true;
    let map = common::random_weights(&cfg, dtype, 7, 0.3);
    let ids = common::random_ids(3, 7, cfg.vocab_size, 8);
    // Row 2 is all padding but its last token: its first queries see no key at all.
    let attn = Tensor::new(
        &[
            [1u32, 1, 1, 1, 1, 1, 1],
            [0, 0, 1, 1, 1, 1, 1],
            [0, 0, 0, 0, 0, 0, 1],
        ],
        &Device::Cpu,
    )
    .expect("mask");
    // Row 2's only target is predicted from a padding query that sees no key: in f32 the
    // `-1e9` mask absorbs the scores and that query attends uniformly, as here; f64 keeps
    // the scores under the mask, so the case is compared in f32 only.
    let last = if dtype == DType::F32 { 1f32 } else { 0. };
    let labels = Tensor::new(
        &[
            [0f32, 1., 1., 0., 1., 1., 1.],
            [0., 0., 0., 1., 1., 1., 1.],
            [0., 0., 0., 0., 0., 0., last],
        ],
        &Device::Cpu,
    )
    .expect("labels")
    .to_dtype(dtype)
    .expect("dtype");
    compare_with_autograd(&cfg, &map, &ids, &attn, &labels, tol);
}

/// Loss and every gradient of `backprop` against autograd's on one batch, with dropout.
fn compare_with_autograd(
    cfg: &lmforge_model::ModelConfig,
    map: &candle_nn::VarMap,
    ids: &Tensor,
    attn: &Tensor,
    labels: &Tensor,
    tol: f64,
) {
    let model = Model::new(cfg, map).expect("model");
    let (ids, attn, labels) = (ids.clone(), attn.clone(), labels.clone());
    let (p, seed) = (0.25, 99);
    let mut rng = Rng::new(seed);
    let hidden = model
        .forward_train_hidden(&ids, Some(&attn), Some((p, &mut rng)))
        .expect("forward");
    let (want_loss, objective) =
        loss::lm_head_loss(&hidden, &model.lm_head.weight, &ids, &labels, Some(9.0)).expect("loss");
    let store = objective.backward().expect("backward");
    let mut rng = Rng::new(seed);
    let got =
        backprop::loss_and_grads(&model, &ids, &attn, &labels, Some(9.0), Some((p, &mut rng)))
            .expect("hand-written");
    assert!(
        (got.loss - want_loss).abs() < tol * want_loss.abs(),
        "loss {} vs {want_loss}",
        got.loss
    );
    for (name, var) in weights::sorted_vars(map) {
        let want = store.get(var.as_tensor()).expect("autograd gradient");
        let have = got
            .grads
            .get(&var.as_tensor().id())
            .expect("hand-written gradient");
        let scale = common::max_abs_diff(want, &want.zeros_like().expect("zeros"));
        let diff = common::max_abs_diff(want, have);
        assert!(scale > 0.0, "{name}: zero gradient");
        assert!(
            diff <= tol * scale,
            "{name}: differs by {diff} (largest {scale})"
        );
    }
}

#[test]
fn hand_written_backward_equals_autograd_in_f64() {
    hand_written_equals_autograd(DType::F64, 1e-10);
}

#[test]
fn hand_written_backward_equals_autograd_in_f32() {
    hand_written_equals_autograd(DType::F32, 1e-4);
}

#[test]
fn hand_written_backward_names_the_bad_input() {
    let cfg = common::micro_config(Architecture::Llama, false);
    let map = common::random_weights(&cfg, DType::F32, 2, 0.3);
    let model = Model::new(&cfg, &map).expect("model");
    let ids = common::random_ids(2, 5, cfg.vocab_size, 3);
    let ones =
        |b: usize, t: usize, dtype: DType| Tensor::ones((b, t), dtype, &Device::Cpu).expect("ones");
    let field = |r: lmforge_model::Result<backprop::Gradients>| match r {
        Err(lmforge_model::ModelError::InvalidInput { field, .. }) => field,
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("bad input accepted"),
    };
    let run = |ids: &Tensor, attn: &Tensor, labels: &Tensor| {
        backprop::loss_and_grads(&model, ids, attn, labels, None, None)
    };
    let (attn, labels) = (ones(2, 5, DType::U32), ones(2, 5, DType::F32));
    assert_eq!(
        field(run(&ids, &ones(2, 4, DType::U32), &labels)),
        "attention_mask"
    );
    assert_eq!(
        field(run(&ids, &attn, &ones(1, 5, DType::F32))),
        "label_mask"
    );
    assert_eq!(
        field(run(
            &ids,
            &attn,
            &ones(2, 5, DType::F32).zeros_like().expect("zeros")
        )),
        "label_mask"
    );
    let big = Tensor::new(&[[1u32, 2, 3, 4, 99], [1, 2, 3, 4, 5]], &Device::Cpu).expect("ids");
    assert_eq!(field(run(&big, &attn, &labels)), "input_ids");
    // The same model trains fine on good input.
    assert!(run(&ids, &attn, &labels).expect("good input").loss > 0.0);
}

#[test]
fn hand_written_backward_equals_autograd_over_several_attention_blocks() {
    several_attention_blocks(DType::F64, 1e-9);
    several_attention_blocks(DType::F32, 1e-4);
}

fn several_attention_blocks(dtype: DType, tol: f64) {
    // 150 positions span three of the products' 64-query blocks; row 1's 70 padding
    // positions make its first two blocks hold queries that see no key; a window of 100.
    let mut cfg = common::micro_config(Architecture::Mistral, false);
    cfg.max_position_embeddings = 256;
    cfg.sliding_window = Some(100);
    let (b, t, pad) = (2, 150, 70);
    let map = common::random_weights(&cfg, dtype, 12, 0.3);
    let ids = common::random_ids(b, t, cfg.vocab_size, 13);
    let mut attn = vec![1u32; b * t];
    attn[t..t + pad].fill(0);
    // f64 keeps the scores of key-less queries (see above), so there none of them predicts
    // a target; in f32 the last of them (uniform over all 150 keys) does.
    let mut labels = vec![1f64; b * t];
    labels[t..t + pad].fill(0.0);
    if dtype == DType::F64 {
        labels[t + pad] = 0.0;
    }
    let attn = Tensor::from_vec(attn, (b, t), &Device::Cpu).expect("mask");
    let labels = Tensor::from_vec(labels, (b, t), &Device::Cpu)
        .expect("labels")
        .to_dtype(dtype)
        .expect("dtype");
    compare_with_autograd(&cfg, &map, &ids, &attn, &labels, tol);
}
