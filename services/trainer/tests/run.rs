//! The training core of one job run, end to end on tiny models built on the fly (CPU).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use lmforge_model::chat::{CHATML, ChatTemplate};
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Architecture, ModelConfig, hf, weights};
use lmforge_proto::v1 as pb;
use lmforge_trainer::run::data::{Encoder, Record, collate};
use lmforge_trainer::run::{
    BaseModel, CheckpointInfo, Progress, RunError, RunHooks, RunInputs, RunOutcome, RunResult, run,
};
use pb::hyperparameters::TrainingLength;
use serde_json::json;

const SPECIALS: [&str; 5] = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"];

/// Chats where the answer is a fixed function of the question, plus a few raw texts.
fn records(n: usize, answer: &str) -> Vec<String> {
    let words = ["red", "green", "blue", "cyan", "black", "white"];
    (0..n)
        .map(|i| {
            let w = words[i % words.len()];
            if i % 5 == 4 {
                json!({"id": i, "text": format!("the colour {w} is a colour {answer}")}).to_string()
            } else {
                json!({"id": i, "messages": [
                    {"role": "system", "content": "reply briefly"},
                    {"role": "user", "content": format!("what is {w}?")},
                    {"role": "assistant", "content": format!("{w} is {answer}")},
                ]})
                .to_string()
            }
        })
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) -> PathBuf {
    std::fs::write(path, lines.join("\n") + "\n").expect("write dataset");
    path.to_path_buf()
}

fn tokenizer() -> TextTokenizer {
    let template = ChatTemplate {
        source: CHATML.into(),
        bos_token: "<s>".into(),
        eos_token: "</s>".into(),
    };
    let corpus: Vec<String> = records(30, "a colour")
        .iter()
        .chain(&records(30, "omega omega"))
        .map(|l| {
            Record::parse(l)
                .expect("fixture record")
                .render(&template)
                .expect("render")
        })
        .collect();
    TextTokenizer::train_byte_level_bpe(corpus.into_iter(), 400, &SPECIALS).expect("train")
}

fn tiny_config(vocab: usize) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Llama,
        vocab_size: vocab,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        attention_bias: false,
        sliding_window: None,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
    }
}

/// An HF directory with random weights and a tokenizer without a chat template.
fn base_dir(root: &Path) -> PathBuf {
    let dir = root.join("base");
    let tok = tokenizer();
    let cfg = tiny_config(tok.vocab_size());
    let w = weights::init_weights(&cfg, DType::F32, &Device::Cpu, 7).expect("init");
    hf::save_checkpoint(&dir, &cfg, &w, None, None).expect("save base");
    tok.save(&dir).expect("save tokenizer");
    dir
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    base: PathBuf,
    train: PathBuf,
    eval: PathBuf,
}

fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().to_path_buf();
    Fixture {
        base: base_dir(&root),
        train: write_lines(&root.join("train.jsonl"), &records(24, "a colour")),
        eval: write_lines(&root.join("eval.jsonl"), &records(6, "omega omega")),
        root,
        _tmp: tmp,
    }
}

fn spec(method: Option<pb::job_spec::Method>, h: pb::Hyperparameters) -> pb::JobSpec {
    pb::JobSpec {
        base: Some(pb::job_spec::Base::BaseModel("tiny@latest".into())),
        method,
        hyperparameters: Some(h),
        output_model_name: "out".into(),
        ..Default::default()
    }
}

fn hyper(steps: u64) -> pb::Hyperparameters {
    pb::Hyperparameters {
        learning_rate: Some(3e-3),
        training_length: Some(TrainingLength::MaxSteps(steps)),
        batch_size: Some(4),
        max_seq_len: Some(64),
        ..Default::default()
    }
}

fn inputs(f: &Fixture, name: &str, spec: pb::JobSpec) -> RunInputs {
    RunInputs {
        job_id: "job-1".into(),
        attempt: 1,
        spec,
        base: BaseModel::Hf {
            dir: f.base.clone(),
        },
        train_path: f.train.clone(),
        eval_path: None,
        work_dir: f.root.join(name),
        resume_from: None,
        device: Device::Cpu,
    }
}

/// Records everything; cancels once `cancel_after` steps are done.
#[derive(Default)]
struct Hooks {
    progress: Vec<Progress>,
    checkpoints: Vec<(PathBuf, CheckpointInfo)>,
    logs: Vec<String>,
    cancel_after: Option<u64>,
}

impl RunHooks for Hooks {
    fn progress(&mut self, p: &Progress) {
        self.progress.push(p.clone());
    }
    fn checkpoint(&mut self, dir: &Path, info: &CheckpointInfo) -> anyhow::Result<()> {
        assert!(dir.join("run_state.json").is_file());
        self.checkpoints.push((dir.to_path_buf(), info.clone()));
        Ok(())
    }
    fn log(&mut self, _level: pb::LogLevel, message: String) {
        self.logs.push(message);
    }
    fn cancelled(&self) -> bool {
        let done = self.progress.last().map_or(0, |p| p.step);
        self.cancel_after.is_some_and(|k| done >= k)
    }
}

fn completed(r: Result<RunOutcome, RunError>) -> RunResult {
    match r.expect("run succeeds") {
        RunOutcome::Completed(res) => res,
        RunOutcome::Cancelled { step } => panic!("cancelled at {step}"),
    }
}

/// The loss of each optimizer step (an evaluation repeats its step's report).
fn step_losses(h: &Hooks) -> Vec<f32> {
    let mut out: Vec<(u64, f32)> = Vec::new();
    for p in &h.progress {
        if out.last().is_none_or(|(s, _)| *s != p.step) {
            out.push((p.step, p.loss));
        }
    }
    out.into_iter().map(|(_, l)| l).collect()
}

fn mean(xs: &[f32]) -> f32 {
    xs.iter().sum::<f32>() / xs.len() as f32
}

fn tensors(path: &Path) -> std::collections::HashMap<String, Vec<u8>> {
    let bytes = std::fs::read(path).expect("read safetensors");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parse safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect()
}

#[test]
fn full_fine_tune_lowers_loss_and_writes_a_loadable_hf_dir() {
    let f = fixture();
    let mut hooks = Hooks::default();
    let res = completed(run(inputs(&f, "full", spec(None, hyper(30))), &mut hooks));
    assert_eq!(res.format, pb::ModelFormat::HfSafetensors);
    let losses = step_losses(&hooks);
    assert_eq!(losses.len(), 30);
    assert!(
        mean(&losses[25..]) < 0.7 * mean(&losses[..5]),
        "loss did not fall: {losses:?}"
    );
    let last = hooks.progress.last().expect("progress");
    assert_eq!((last.step, last.total_steps), (30, 30));
    assert!(last.tokens_per_second > 0.0 && last.trained_tokens > 0);
    assert_eq!(res.trained_tokens, last.trained_tokens);
    assert_eq!(res.metrics["steps"], 30.0);
    let out = &res.output_dir;
    let loaded = hf::load_checkpoint(out, DType::F32, &Device::Cpu).expect("output loads");
    assert_eq!(loaded.config.num_hidden_layers, 2);
    for file in ["tokenizer.json", "generation_config.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    let tok = TextTokenizer::from_dir(out).expect("tokenizer loads");
    assert_eq!(tok.chat_template.as_deref(), Some(CHATML));
    // Epoch-end checkpoints (24 examples / batch 4 = 6 steps per epoch).
    let steps: Vec<u64> = hooks.checkpoints.iter().map(|(_, i)| i.step).collect();
    assert_eq!(steps, vec![6, 12, 18, 24, 30]);
    // keep_checkpoints (default 3) prunes older local copies once uploaded.
    let local = std::fs::read_dir(f.root.join("full/checkpoints"))
        .expect("checkpoint dir")
        .count();
    assert_eq!(local, 3);
}

#[test]
fn frozen_modules_stay_unchanged() {
    let f = fixture();
    let method = pb::job_spec::Method::Full(pb::FullFineTune {
        frozen_modules: vec!["embed_tokens".into(), "layers.0".into()],
    });
    let res = completed(run(
        inputs(&f, "frozen", spec(Some(method), hyper(4))),
        &mut Hooks::default(),
    ));
    let before = tensors(&f.base.join("model.safetensors"));
    let after = tensors(&res.output_dir.join("model.safetensors"));
    for (name, data) in &before {
        let frozen = name.contains("embed_tokens") || name.contains("layers.0.");
        assert_eq!(&after[name] == data, frozen, "{name}");
    }
}

fn lora(merge: bool) -> pb::job_spec::Method {
    pb::job_spec::Method::Lora(pb::LoraConfig {
        rank: Some(4),
        merge_adapter: merge,
        ..Default::default()
    })
}

#[test]
fn lora_writes_a_peft_adapter_with_peft_names() {
    let f = fixture();
    let mut hooks = Hooks::default();
    let res = completed(run(
        inputs(&f, "lora", spec(Some(lora(false)), hyper(6))),
        &mut hooks,
    ));
    assert_eq!(res.format, pb::ModelFormat::PeftLora);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(res.output_dir.join("adapter_config.json")).expect("config"),
    )
    .expect("json");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    assert_eq!(cfg["target_modules"], json!(["q_proj", "v_proj"]));
    let t = tensors(&res.output_dir.join("adapter_model.safetensors"));
    let mut names: Vec<&String> = t.keys().collect();
    names.sort();
    assert_eq!(names.len(), 2 * 2 * 2);
    assert_eq!(
        names[0],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    );
    // B starts at zero; training moved it.
    let b = &t["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"];
    assert!(b.iter().any(|&x| x != 0));
    assert!(!res.output_dir.join("model.safetensors").exists());
}

#[test]
fn merged_lora_writes_hf_weights_where_only_adapted_projections_change() {
    let f = fixture();
    let res = completed(run(
        inputs(&f, "merged", spec(Some(lora(true)), hyper(6))),
        &mut Hooks::default(),
    ));
    assert_eq!(res.format, pb::ModelFormat::HfSafetensors);
    hf::load_checkpoint(&res.output_dir, DType::F32, &Device::Cpu).expect("loads");
    let before = tensors(&f.base.join("model.safetensors"));
    let after = tensors(&res.output_dir.join("model.safetensors"));
    assert_eq!(before.len(), after.len());
    for (name, data) in &before {
        let adapted = name.contains("q_proj") || name.contains("v_proj");
        assert_eq!(&after[name] != data, adapted, "{name}");
    }
}

#[test]
fn from_scratch_trains_a_tokenizer_and_a_model() {
    let f = fixture();
    let scratch = pb::FromScratch {
        architecture: Some(pb::ArchitectureConfig {
            architecture: "qwen2".into(),
            vocab_size: 0,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 128,
            ..Default::default()
        }),
        tokenizer: Some(pb::TokenizerSpec {
            source: Some(pb::tokenizer_spec::Source::Train(pb::TokenizerTraining {
                vocab_size: Some(300),
                ..Default::default()
            })),
        }),
    };
    let mut s = spec(None, hyper(20));
    s.base = Some(pb::job_spec::Base::FromScratch(scratch.clone()));
    let mut inp = inputs(&f, "scratch", s);
    inp.base = BaseModel::FromScratch {
        config: scratch,
        tokenizer_dir: None,
    };
    let mut hooks = Hooks::default();
    let res = completed(run(inp, &mut hooks));
    let losses = step_losses(&hooks);
    assert!(mean(&losses[16..]) < mean(&losses[..4]), "{losses:?}");
    let out = &res.output_dir;
    let loaded = hf::load_checkpoint(out, DType::F32, &Device::Cpu).expect("loads");
    let tok = TextTokenizer::from_dir(out).expect("tokenizer");
    assert_eq!(loaded.config.vocab_size, tok.vocab_size());
    assert!(tok.vocab_size() <= 300 && tok.vocab_size() > 256);
    assert_eq!(tok.token_id("<|im_start|>"), Some(3));
    assert_eq!(tok.chat_template.as_deref(), Some(CHATML));
    assert!(
        loaded.config.eos_token_ids.contains(&4),
        "<|im_end|> stops generation"
    );
    // The trained tokenizer travels with checkpoints so a resumed attempt reuses it.
    let (dir, _) = hooks.checkpoints.last().expect("a checkpoint");
    assert!(dir.join("tokenizer/tokenizer.json").is_file());
}

#[test]
fn assistant_only_masking_excludes_prompt_tokens() {
    let tok = tokenizer();
    let mut encoder = Encoder {
        template: ChatTemplate::new(CHATML, &tok),
        tokenizer: tok.clone(),
        max_seq_len: 64,
        assistant_only: true,
    };
    let line = &records(1, "a colour")[0];
    let ex = encoder.encode_line(line).expect("encode");
    let labelled: Vec<u32> = ex
        .input_ids
        .iter()
        .zip(&ex.label_mask)
        .filter(|(_, m)| **m == 1)
        .map(|(i, _)| *i)
        .collect();
    assert_eq!(
        tok.inner.decode(&labelled, false).expect("decode"),
        "red is a colour<|im_end|>\n"
    );
    let prompt_len = ex.label_mask.iter().position(|&m| m == 1).expect("targets");
    assert!(prompt_len > 5, "system and user turns are masked");
    // Raw text: every token is a target, EOS appended.
    let text = encoder
        .encode_line(r#"{"text": "the colour red"}"#)
        .expect("encode");
    assert!(text.label_mask.iter().all(|&m| m == 1));
    assert_eq!(text.input_ids.last(), tok.eos_token_id().as_ref());
    // Off: the whole conversation counts; truncation applies to both.
    encoder.assistant_only = false;
    encoder.max_seq_len = 16;
    let all = encoder.encode_line(line).expect("encode");
    assert_eq!(all.input_ids.len(), 16);
    assert!(all.label_mask.iter().all(|&m| m == 1));
    // Padding: right-padded, hidden from attention and loss.
    let batch = collate(&[&ex, &text], 0, &Device::Cpu).expect("collate");
    let (b, t) = batch.input_ids.dims2().expect("2-d");
    assert_eq!((b, t), (2, ex.input_ids.len()));
    let attn = batch.attention_mask.to_vec2::<u32>().expect("attn");
    let labels = batch.label_mask.to_vec2::<f32>().expect("labels");
    let n = text.input_ids.len();
    assert!(attn[1][..n].iter().all(|&a| a == 1) && attn[1][n..].iter().all(|&a| a == 0));
    assert!(labels[1][n..].iter().all(|&l| l == 0.0));
    let masked: Vec<f32> = ex.label_mask.iter().map(|&m| f32::from(m)).collect();
    assert_eq!(labels[0], masked);
}

#[test]
fn cancel_returns_cancelled_before_the_next_step() {
    let f = fixture();
    let mut hooks = Hooks {
        cancel_after: Some(2),
        ..Default::default()
    };
    let out = run(inputs(&f, "cancel", spec(None, hyper(10))), &mut hooks).expect("run");
    assert!(matches!(out, RunOutcome::Cancelled { step: 2 }), "{out:?}");
    assert_eq!(hooks.progress.last().map(|p| p.step), Some(2));
}

/// A (uninterrupted) vs B (cancelled after step 5) then C (resumed from B's last
/// checkpoint): C's output is byte-identical to A's.
fn assert_resume_is_exact(method: Option<pb::job_spec::Method>, output_file: &str) {
    let f = fixture();
    let h = pb::Hyperparameters {
        training_length: Some(TrainingLength::Epochs(2)),
        gradient_accumulation_steps: Some(2),
        batch_size: Some(3),
        dropout: Some(0.1),
        checkpoint_every_steps: 2,
        eval_every_steps: 3,
        warmup: Some(pb::hyperparameters::Warmup::WarmupSteps(2)),
        ..hyper(0)
    };
    let s = spec(method, h);
    let with_eval = |name: &str| RunInputs {
        eval_path: Some(f.eval.clone()),
        ..inputs(&f, name, s.clone())
    };
    let mut ha = Hooks::default();
    let a = completed(run(with_eval("a"), &mut ha));
    // 24 examples, 8 micro-batches of 3, 2 per step: 4 steps per epoch.
    assert_eq!(ha.progress.last().map(|p| p.total_steps), Some(8));
    let mut hb = Hooks {
        cancel_after: Some(5),
        ..Default::default()
    };
    let b = run(with_eval("b"), &mut hb).expect("run b");
    assert!(matches!(b, RunOutcome::Cancelled { step: 5 }));
    let (dir, info) = hb.checkpoints.last().expect("b checkpointed").clone();
    assert_eq!(info.step, 4);
    let mut hc = Hooks::default();
    let c = completed(run(
        RunInputs {
            resume_from: Some(dir),
            attempt: 2,
            ..with_eval("c")
        },
        &mut hc,
    ));
    assert_eq!(hc.progress.first().map(|p| p.step), Some(5));
    let read = |r: &RunResult| std::fs::read(r.output_dir.join(output_file)).expect("output");
    assert!(read(&a) == read(&c), "resumed weights differ");
    assert_eq!(a.trained_tokens, c.trained_tokens);
    assert!(a.best_eval_loss.is_some());
    assert_eq!(a.best_eval_loss, c.best_eval_loss);
    assert_eq!(a.metrics["train_loss"], c.metrics["train_loss"]);
    let la: Vec<f32> = ha
        .progress
        .iter()
        .filter(|p| p.step > 4)
        .map(|p| p.loss)
        .collect();
    let lc: Vec<f32> = hc.progress.iter().map(|p| p.loss).collect();
    assert_eq!(la, lc);
}

#[test]
fn resumed_full_run_matches_uninterrupted_run_bitwise() {
    assert_resume_is_exact(None, "model.safetensors");
}

#[test]
fn resumed_lora_run_matches_uninterrupted_run_bitwise() {
    assert_resume_is_exact(Some(lora(false)), "adapter_model.safetensors");
}

#[test]
fn eval_and_early_stopping_stop_early() {
    let f = fixture();
    let h = pb::Hyperparameters {
        learning_rate: Some(1e-2),
        eval_every_steps: 2,
        early_stopping_patience: 2,
        ..hyper(60)
    };
    let mut hooks = Hooks::default();
    let res = completed(run(
        RunInputs {
            eval_path: Some(f.eval.clone()),
            ..inputs(&f, "early", spec(None, h))
        },
        &mut hooks,
    ));
    let steps = res.metrics["steps"];
    assert!(steps < 60.0, "ran all {steps} steps");
    assert_eq!(res.metrics["early_stopped"], 1.0);
    let evals: Vec<f32> = hooks.progress.iter().filter_map(|p| p.eval_loss).collect();
    assert!(!evals.is_empty());
    let best = res.best_eval_loss.expect("best eval loss");
    assert!(res.metrics["eval_loss"] > best);
    assert!(hooks.logs.iter().any(|l| l.contains("early stopping")));
}

fn error(f: &Fixture, name: &str, s: pb::JobSpec) -> RunError {
    match run(inputs(f, name, s), &mut Hooks::default()) {
        Err(e) => e,
        Ok(o) => panic!("expected an error, got {o:?}"),
    }
}

#[test]
fn invalid_inputs_name_the_field_or_line() {
    let f = fixture();
    let e = error(
        &f,
        "short",
        spec(
            None,
            pb::Hyperparameters {
                max_seq_len: Some(8),
                ..hyper(2)
            },
        ),
    );
    assert!(
        matches!(&e, RunError::Invalid { field, .. } if field == "hyperparameters.max_seq_len"),
        "{e}"
    );
    assert_eq!((e.code(), e.retryable()), ("INVALID_SPEC", false));
    let e = error(
        &f,
        "long",
        spec(
            None,
            pb::Hyperparameters {
                max_seq_len: Some(4096),
                ..hyper(2)
            },
        ),
    );
    assert!(e.to_string().contains("hyperparameters.max_seq_len"), "{e}");
    let bad_module = pb::job_spec::Method::Lora(pb::LoraConfig {
        target_modules: vec!["q_proj".into(), "qkv_proj".into()],
        ..Default::default()
    });
    let e = error(&f, "module", spec(Some(bad_module), hyper(2)));
    assert!(
        matches!(&e, RunError::Invalid { field, message } if field == "method.lora.target_modules" && message.contains("qkv_proj")),
        "{e}"
    );
    let on_cpu = pb::Hyperparameters {
        precision: pb::Precision::Bf16 as i32,
        ..hyper(2)
    };
    let e = error(&f, "bf16", spec(None, on_cpu));
    assert!(e.to_string().contains("hyperparameters.precision"), "{e}");

    let mut lines = records(5, "a colour");
    lines[2] = r#"{"messages": [{"role": "user""#.into();
    let bad = write_lines(&f.root.join("bad.jsonl"), &lines);
    let e = match run(
        RunInputs {
            train_path: bad.clone(),
            ..inputs(&f, "bad", spec(None, hyper(2)))
        },
        &mut Hooks::default(),
    ) {
        Err(e) => e,
        Ok(o) => panic!("expected an error, got {o:?}"),
    };
    assert!(
        matches!(&e, RunError::Data { line: 3, path, .. } if path == &bad),
        "{e}"
    );
    assert!(e.to_string().contains("bad.jsonl") && e.to_string().contains("line 3"));

    let e = match run(
        RunInputs {
            train_path: f.root.join("missing.jsonl"),
            ..inputs(&f, "missing", spec(None, hyper(2)))
        },
        &mut Hooks::default(),
    ) {
        Err(e) => e,
        Ok(o) => panic!("expected an error, got {o:?}"),
    };
    assert_eq!(e.code(), "DATASET_NOT_FOUND");
}

#[test]
fn diverging_training_fails_with_non_finite_loss() {
    let f = fixture();
    let h = pb::Hyperparameters {
        learning_rate: Some(1e30),
        max_grad_norm: Some(0.0),
        schedule: pb::LrSchedule::Constant as i32,
        ..hyper(10)
    };
    let e = error(&f, "nan", spec(None, h));
    assert!(
        matches!(e, RunError::NonFiniteLoss { step } if step >= 2),
        "{e}"
    );
    assert_eq!((e.code(), e.retryable()), ("NON_FINITE_LOSS", false));
}

#[test]
fn an_adapter_base_is_merged_before_training() {
    let f = fixture();
    let adapter = completed(run(
        inputs(&f, "adapter", spec(Some(lora(false)), hyper(3))),
        &mut Hooks::default(),
    ));
    let mut hooks = Hooks::default();
    let res = completed(run(
        RunInputs {
            base: BaseModel::Adapter {
                base_dir: f.base.clone(),
                adapter_dir: adapter.output_dir.clone(),
            },
            ..inputs(&f, "on-adapter", spec(None, hyper(2)))
        },
        &mut hooks,
    ));
    assert_eq!(res.format, pb::ModelFormat::HfSafetensors);
    // The starting point is base + adapter: the first loss equals the merged model's, which
    // differs from the bare base's first loss.
    let mut bare = Hooks::default();
    completed(run(inputs(&f, "bare", spec(None, hyper(1))), &mut bare));
    assert_ne!(hooks.progress[0].loss, bare.progress[0].loss);
    let e = match run(
        RunInputs {
            base: BaseModel::Adapter {
                base_dir: f.base.clone(),
                adapter_dir: f.root.join("nowhere"),
            },
            ..inputs(&f, "no-adapter", spec(None, hyper(2)))
        },
        &mut Hooks::default(),
    ) {
        Err(e) => e,
        Ok(o) => panic!("expected an error, got {o:?}"),
    };
    assert_eq!(e.code(), "BASE_MODEL_NOT_FOUND", "{e}");
    // A new unmerged adapter on an adapter base is stacked with the old one into one adapter
    // of the base: ranks concatenated, the old block first, scales folded into B.
    let stacked = completed(run(
        RunInputs {
            base: BaseModel::Adapter {
                base_dir: f.base.clone(),
                adapter_dir: adapter.output_dir.clone(),
            },
            ..inputs(&f, "stacked", spec(Some(lora(false)), hyper(2)))
        },
        &mut Hooks::default(),
    ));
    assert_eq!(stacked.format, pb::ModelFormat::PeftLora);
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stacked.output_dir.join("adapter_config.json")).expect("cfg"),
    )
    .expect("json");
    assert_eq!(
        (cfg["r"].clone(), cfg["lora_alpha"].clone()),
        (json!(8), json!(8.0))
    );
    let read = |dir: &Path, name: &str| {
        let all =
            candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)
                .expect("load adapter");
        all[name].to_dtype(DType::F32).expect("f32")
    };
    let a = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
    let b = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight";
    let old_a = read(&adapter.output_dir, a).to_vec2::<f32>().expect("a");
    let new_a = read(&stacked.output_dir, a).to_vec2::<f32>().expect("a");
    assert_eq!(new_a.len(), 8);
    assert_eq!(&new_a[..4], &old_a[..]);
    // Old scale: alpha 8 / rank 4.
    let old_b = (read(&adapter.output_dir, b) * 2.0)
        .expect("scale")
        .to_vec2::<f32>()
        .expect("b");
    let new_b = read(&stacked.output_dir, b).to_vec2::<f32>().expect("b");
    for (o, n) in old_b.iter().zip(&new_b) {
        assert_eq!(&n[..4], &o[..]);
    }
}
