//! The batched paged-cache forward equals the training forward while sequences with mixed
//! positions join (prefill chunks) and leave (blocks freed and reused).

mod common;

use candle_core::{DType, Device, Tensor};
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::{BlockTable, PagedKvCache};
use lmforge_model::packed::F32Products;
use lmforge_model::{Architecture, Model, ModelConfig};

struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    fed: usize,
    join: usize,
    table: Option<BlockTable>,
}

/// How far a logit of the AMX serving products may be from the exact forward's: their bf16x3
/// sums carry about 2⁻¹⁶ relative error per product (libs/model `amx`), which the micro
/// models' logits (|logit| up to ~2) show as up to ~1e-4.
fn amx_tolerance(want: &Tensor) -> f64 {
    relative_tolerance(want, 2e-4)
}

/// How far a logit of an f16 forward may be from another's: both round every activation to
/// 11 bits (about 5e-4 relative), and their different operation orders compound that over
/// the layers.
fn half_tolerance(want: &Tensor) -> f64 {
    relative_tolerance(want, 1e-2)
}

/// `rel` of the largest |logit| in `want` (at least 1).
fn relative_tolerance(want: &Tensor, rel: f64) -> f64 {
    let mag = want
        .abs()
        .and_then(|a| a.max_all()?.to_scalar::<f32>())
        .expect("max");
    rel * f64::from(mag.max(1.0))
}

/// The training forward's logits (f32) at the last of `tokens`: what a batched forward that
/// has been fed `tokens` must give for that sequence.
fn last_training_logits(model: &Model, tokens: &[u32]) -> Tensor {
    let ids = Tensor::new(tokens, &Device::Cpu)
        .and_then(|t| t.unsqueeze(0))
        .expect("ids");
    let full = model
        .forward_train(&ids, None, None)
        .expect("training forward");
    full.get(0)
        .and_then(|r| r.get(tokens.len() - 1)?.to_dtype(DType::F32))
        .expect("last position")
}

/// `packed`: the batched forward uses weights packed for serving (the training forward never
/// does), so their products are checked against candle's: exact f32 products within 1e-4,
/// AMX ones within [`amx_tolerance`].
fn run_schedule(cfg: &ModelConfig, packed: Option<F32Products>) {
    run_schedule_in(cfg, packed, DType::F32, (4, 9));
}

/// [`run_schedule`] with the model and its cache in `dtype` (f32 attends with the CPU token
/// kernel, other dtypes with candle ops) and a cache of `(block size, blocks)`, so few that
/// the last sequence can only join on blocks the second one frees.
fn run_schedule_in(
    cfg: &ModelConfig,
    packed: Option<F32Products>,
    dtype: DType,
    (block, blocks): (usize, usize),
) {
    let map = common::random_weights(cfg, dtype, 2, 0.2);
    let model = Model::new(cfg, &map).expect("model");
    let mut serving = model.clone();
    if let Some(products) = packed {
        let bytes = serving.pack_for_serving_with(products).expect("pack");
        assert!(bytes > 0 && serving.lm_head.packed.is_some());
    }
    let on_amx = packed == Some(F32Products::Amx);
    // E.g. block 4, 9 blocks: A, B and C fill 8; D can only join after B's blocks come back.
    let mut cache = PagedKvCache::new(cfg, blocks, block, dtype, &Device::Cpu).expect("cache");
    let spec = [(12, 5, 0), (7, 3, 0), (10, 6, 2), (9, 4, 5)];
    let mut seqs: Vec<Seq> = spec
        .iter()
        .enumerate()
        .map(|(i, &(len, prompt_len, join))| Seq {
            tokens: common::random_tokens(len, cfg.vocab_size, 100 + i as u64),
            prompt_len,
            fed: 0,
            join,
            table: None,
        })
        .collect();
    let mut checked = 0;
    let mut reused = false;
    let mut freed_by_b: Vec<u32> = Vec::new();
    for step in 0..20 {
        let mut idx = Vec::new();
        let mut chunks = Vec::new();
        for (i, s) in seqs.iter_mut().enumerate() {
            if step < s.join || s.fed == s.tokens.len() {
                continue;
            }
            if s.table.is_none() {
                s.table = Some(BlockTable::default());
            }
            // Prompts arrive in chunks of at most 3 tokens, then one token per step.
            let n = if s.fed < s.prompt_len {
                (s.prompt_len - s.fed).min(3)
            } else {
                1
            };
            idx.push(i);
            chunks.push((s.fed, n));
        }
        if idx.is_empty() {
            break;
        }
        let mut tables: Vec<BlockTable> = idx
            .iter()
            .map(|&i| seqs[i].table.take().expect("joined"))
            .collect();
        let mut inputs: Vec<SeqInput<'_>> = tables
            .iter_mut()
            .zip(&idx)
            .zip(&chunks)
            .map(|((table, &i), &(fed, n))| SeqInput {
                tokens: &seqs[i].tokens[fed..fed + n],
                table,
            })
            .collect();
        let logits = serving
            .forward_batch(&mut cache, &mut inputs)
            .expect("batched forward");
        drop(inputs);
        for (row, (&i, &(fed, n))) in idx.iter().zip(&chunks).enumerate() {
            let upto = fed + n;
            let want = last_training_logits(&model, &seqs[i].tokens[..upto]);
            let got = logits.get(row).expect("row");
            let d = common::max_abs_diff(&want, &got);
            let tolerance = if on_amx {
                amx_tolerance(&want)
            } else if dtype == DType::F32 {
                1e-4
            } else {
                half_tolerance(&want)
            };
            assert!(
                d < tolerance,
                "seq {i} at position {}: max diff {d}",
                upto - 1
            );
            checked += 1;
            seqs[i].fed = upto;
        }
        for (&i, table) in idx.iter().zip(tables) {
            assert_eq!(table.len, seqs[i].fed);
            if i == 3 && table.blocks.iter().any(|b| freed_by_b.contains(b)) {
                reused = true;
            }
            if i == 1 && seqs[i].fed == seqs[i].tokens.len() {
                freed_by_b = table.blocks.clone();
            }
            if seqs[i].fed == seqs[i].tokens.len() {
                cache.release(table);
            } else {
                seqs[i].table = Some(table);
            }
        }
    }
    assert!(
        seqs.iter().all(|s| s.fed == s.tokens.len()),
        "schedule did not finish"
    );
    assert!(reused, "sequence D should reuse blocks B freed");
    assert!(checked > 25);
    assert_eq!(cache.num_free_blocks(), blocks);
}

#[test]
fn batched_paged_decode_matches_training_forward_llama() {
    run_schedule(&common::micro_config(Architecture::Llama, false), None);
}

#[test]
fn batched_paged_decode_with_packed_weights_matches_training_forward() {
    for (arch, tied) in [(Architecture::Llama, false), (Architecture::Qwen2, true)] {
        run_schedule(&common::micro_config(arch, tied), Some(F32Products::Exact));
    }
}

#[test]
fn batched_paged_decode_on_amx_matches_training_forward_within_its_error() {
    if !lmforge_model::amx::available() {
        eprintln!("skipped: no AMX here");
        return;
    }
    for (arch, tied) in [(Architecture::Llama, false), (Architecture::Qwen2, true)] {
        run_schedule(&common::micro_config(arch, tied), Some(F32Products::Amx));
    }
    let mut cfg = common::micro_config(Architecture::Llama, false);
    (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    ) = (3, 1, 64);
    cfg.hidden_size = 64;
    run_schedule(&cfg, Some(F32Products::Amx));
}

/// The micro Llama config with `heads` query heads and `kv_heads` kv heads of `head_dim`
/// (hidden size `heads · head_dim`).
fn llama_with_heads(heads: usize, kv_heads: usize, head_dim: usize) -> ModelConfig {
    let mut cfg = common::micro_config(Architecture::Llama, false);
    (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    ) = (heads, kv_heads, head_dim);
    cfg.hidden_size = heads * head_dim;
    cfg
}

#[test]
fn batched_paged_decode_with_vector_wide_blocks_matches_training_forward() {
    // Blocks of 8, 16 and 32 positions: a block's keys are one or more AVX2 or AVX-512
    // vectors a dimension, the token attention kernel's vector path (the services' block
    // size is 16).
    for (heads, kv_heads, head_dim) in [(4, 2, 4), (4, 2, 32), (3, 1, 64)] {
        let cfg = llama_with_heads(heads, kv_heads, head_dim);
        for cache in [(8, 6), (16, 3), (32, 3)] {
            run_schedule_in(&cfg, Some(F32Products::Exact), DType::F32, cache);
        }
    }
    let mut cfg = common::micro_config(Architecture::Mistral, false);
    cfg.sliding_window = Some(3);
    run_schedule_in(&cfg, None, DType::F32, (16, 3));
}

#[test]
fn batched_paged_decode_with_candle_attention_matches_training_forward() {
    // An f16 model attends with candle ops (the path of GPUs and half precision): prefill
    // chunks one by one with their masks, decode tokens as one padded group.
    for (arch, window) in [
        (Architecture::Llama, None),
        (Architecture::Mistral, Some(3)),
    ] {
        let mut cfg = common::micro_config(arch, false);
        cfg.sliding_window = window;
        run_schedule_in(&cfg, None, DType::F16, (4, 9));
    }
}

#[test]
fn batched_paged_decode_matches_training_forward_qwen2_tied() {
    run_schedule(&common::micro_config(Architecture::Qwen2, true), None);
}

#[test]
fn sliding_window_is_applied_in_both_forwards() {
    let mut cfg = common::micro_config(Architecture::Mistral, false);
    cfg.sliding_window = Some(3);
    run_schedule(&cfg, Some(F32Products::Exact));
}

#[test]
fn batched_paged_decode_with_wide_heads_matches_training_forward() {
    // Head widths of real models (64 and 32) take the decode attention's register-resident
    // paths with AVX-512 (groups of 3 and 2 query heads a kv head; with AVX2 the 32-wide
    // one); the micro config's 4-wide heads the general one.
    for (heads, kv_heads, head_dim) in [(3, 1, 64), (4, 2, 32)] {
        let mut cfg = common::micro_config(Architecture::Llama, false);
        cfg.num_attention_heads = heads;
        cfg.num_key_value_heads = kv_heads;
        cfg.head_dim = head_dim;
        cfg.hidden_size = 64;
        run_schedule(&cfg, Some(F32Products::Exact));
    }
}

#[test]
fn long_prefill_on_a_packed_model_matches_the_unpacked_one() {
    // More rows than the packed FMA products take: candle's gemm on the re-laid-out weights;
    // with AMX tiles, the packed copies for every row.
    for tied in [false, true] {
        let mut cfg = common::micro_config(Architecture::Llama, tied);
        cfg.max_position_embeddings = 256;
        let map = common::random_weights(&cfg, DType::F32, 5, 0.2);
        let plain = Model::new(&cfg, &map).expect("model");
        let tokens: Vec<u32> = common::random_tokens(150, cfg.vocab_size, 9);
        let want = common::prefill_logits(&plain, &tokens);
        let mut exact = plain.clone();
        exact
            .pack_for_serving_with(F32Products::Exact)
            .expect("pack");
        // Projections are stored transposed for the gemm; a tied LM head stays the embedding.
        let q = &exact.layers[0].q.weight;
        assert!(q.t().expect("t").is_contiguous() && !q.is_contiguous());
        assert_eq!(exact.lm_head.weight.is_contiguous(), tied);
        let d = common::max_abs_diff(&want, &common::prefill_logits(&exact, &tokens));
        assert!(d < 1e-4, "tied {tied}: {d}");
        // Serving keeps the float weights the gemm multiplies.
        let mut lean = exact.clone();
        lmforge_model::quant::release_float_weights(&mut lean).expect("release");
        assert!(lean.layers[0].q.weight.elem_count() > 0);
        if !lmforge_model::amx::available() {
            continue;
        }
        let mut amx = plain.clone();
        amx.pack_for_serving_with(F32Products::Amx).expect("pack");
        let served = common::prefill_logits(&amx, &tokens);
        let d = common::max_abs_diff(&want, &served);
        assert!(d < amx_tolerance(&want), "AMX, tied {tied}: {d}");
        // AMX tiles take every row: serving drops the float weights and answers the same.
        let mut lean = amx.clone();
        lmforge_model::quant::release_float_weights(&mut lean).expect("release");
        assert_eq!(lean.layers[0].q.weight.elem_count(), 0);
        assert_eq!(
            common::prefill_logits(&lean, &tokens)
                .to_vec2::<f32>()
                .expect("logits"),
            served.to_vec2::<f32>().expect("logits")
        );
        // The training forward (3-D activations) still runs on the packed copies.
        let ids = Tensor::new(&tokens[..40], &Device::Cpu)
            .expect("ids")
            .unsqueeze(0)
            .expect("batch");
        let full = plain.forward_train(&ids, None, None).expect("forward");
        let lean_full = lean
            .forward_train(&ids, None, None)
            .expect("released forward");
        assert_eq!(lean_full.dims(), full.dims());
        let d = common::max_abs_diff(&full, &lean_full);
        assert!(
            d < amx_tolerance(&full),
            "released training forward, tied {tied}: {d}"
        );
    }
}

#[test]
fn concurrent_forwards_from_several_threads_agree_with_one_at_a_time() {
    // Engines of several models call the forward at once, all on the global rayon pool: the
    // workers one forward keeps awake must not hold up or deadlock the others.
    let mut cfg = common::micro_config(Architecture::Llama, false);
    cfg.head_dim = 32;
    cfg.hidden_size = 64;
    let map = common::random_weights(&cfg, DType::F32, 11, 0.2);
    let mut model = Model::new(&cfg, &map).expect("model");
    model.pack_for_serving().expect("pack");
    let model = std::sync::Arc::new(model);
    let alone: Vec<Vec<Vec<f32>>> = (0..4).map(|t| greedy_decode(&model, 100 * t)).collect();
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..4u64 {
        let (tx, model) = (tx.clone(), model.clone());
        // Detached: a hang fails the test below instead of blocking it forever.
        std::thread::spawn(move || {
            for _ in 0..5 {
                if tx.send((t, greedy_decode(&model, 100 * t))).is_err() {
                    return;
                }
            }
        });
    }
    for _ in 0..20 {
        let (t, got) = rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a forward hung");
        assert_eq!(got, alone[t as usize], "thread {t}");
    }
}

/// Logits of 8 greedy steps of 3 sequences with prompts seeded by `seed`.
fn greedy_decode(model: &Model, seed: u64) -> Vec<Vec<f32>> {
    let cfg = &model.config;
    let mut cache = PagedKvCache::new(cfg, 16, 4, DType::F32, &Device::Cpu).expect("cache");
    let mut tables = vec![BlockTable::default(); 3];
    let mut next: Vec<Vec<u32>> = (0..3)
        .map(|i| common::random_tokens(6, cfg.vocab_size, seed + i))
        .collect();
    let mut out = Vec::new();
    for _ in 0..8 {
        let mut inputs: Vec<SeqInput<'_>> = tables
            .iter_mut()
            .zip(&next)
            .map(|(table, t)| SeqInput { tokens: t, table })
            .collect();
        let logits = model
            .forward_batch(&mut cache, &mut inputs)
            .expect("forward")
            .to_vec2::<f32>()
            .expect("logits");
        next = logits
            .iter()
            .map(|row| {
                let best = row
                    .iter()
                    .enumerate()
                    .fold((0, f32::MIN), |b, (i, &x)| if x > b.1 { (i, x) } else { b });
                vec![best.0 as u32]
            })
            .collect();
        out.extend(logits);
    }
    out
}

#[test]
fn long_contexts_attend_over_many_key_vectors() {
    // Contexts of 5 to 7 vectors of positions, in blocks of 16 and 32: the token attention
    // kernel scores four vectors of a head at a time, then the rest one by one; a block of 32
    // holds two vectors, so a group of four spans blocks at both offsets.
    for (heads, kv_heads, head_dim) in [(4, 2, 32), (3, 1, 64)] {
        let mut cfg = llama_with_heads(heads, kv_heads, head_dim);
        cfg.max_position_embeddings = 128;
        let map = common::random_weights(&cfg, DType::F32, 5, 0.2);
        let model = Model::new(&cfg, &map).expect("model");
        let mut serving = model.clone();
        serving
            .pack_for_serving_with(F32Products::Exact)
            .expect("pack");
        for block in [16, 32] {
            let mut cache =
                PagedKvCache::new(&cfg, 24, block, DType::F32, &Device::Cpu).expect("cache");
            let lens = [70usize, 99, 83];
            let tokens: Vec<Vec<u32>> = lens
                .iter()
                .enumerate()
                .map(|(i, &len)| common::random_tokens(len, cfg.vocab_size, 40 + i as u64))
                .collect();
            let mut tables = vec![BlockTable::default(); lens.len()];
            let mut fed = vec![0usize; lens.len()];
            // The prompts but their last two tokens as one chunk each, then two decode steps.
            for step in 0..3 {
                let chunk = |len: usize| if step == 0 { len - 2 } else { 1 };
                let mut inputs: Vec<SeqInput<'_>> = tables
                    .iter_mut()
                    .enumerate()
                    .map(|(i, table)| SeqInput {
                        tokens: &tokens[i][fed[i]..fed[i] + chunk(lens[i])],
                        table,
                    })
                    .collect();
                let logits = serving
                    .forward_batch(&mut cache, &mut inputs)
                    .expect("batched forward");
                drop(inputs);
                for (i, &len) in lens.iter().enumerate() {
                    fed[i] += chunk(len);
                    let want = last_training_logits(&model, &tokens[i][..fed[i]]);
                    let got = logits.get(i).expect("row");
                    let d = common::max_abs_diff(&want, &got);
                    assert!(
                        d < 1e-4,
                        "heads {heads}/{kv_heads}×{head_dim}, blocks of {block}: sequence {i} \
                         at position {}: max diff {d}",
                        fed[i] - 1
                    );
                }
            }
        }
    }
}
