//! Every trainable tensor gets a gradient, and it matches central finite differences.

mod common;

use candle_core::{DType, Device, Tensor};
use lmforge_model::{Architecture, Model, Rng, loss, weights};

fn check_gradients(arch: Architecture, tied: bool) {
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
    let logits = model
        .forward_train(&ids, Some(&attn), None)
        .expect("forward");
    let l = loss::causal_lm_loss(&logits, &ids, &labels, None).expect("loss");
    let grads = l.backward().expect("backward");
    let mut rng = Rng::new(11);
    let vars = weights::sorted_vars(&map);
    assert_eq!(vars.len(), weights::param_specs(&cfg).len());
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
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
    check_gradients(Architecture::Qwen2, false);
}

#[test]
fn llama_tied_gradients_match_finite_differences() {
    check_gradients(Architecture::Llama, true);
}
