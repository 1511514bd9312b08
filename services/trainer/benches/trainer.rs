//! `make bench` for the trainer: training tokens/s through `run::run` beside the raw
//! libs/model `Trainer::train_step` loop on the identical batches, and the overhead of the
//! run machinery (data order, collation, bookkeeping, hooks). Target: ≤ 5 %.
//!
//! The raw step on batch k runs inside `run`'s progress report for step k, so the two
//! alternate step by step under the same machine load; each side's figure is the median
//! step after its warm-up step. Loading the base and writing the output are not timed.
//! Environment: `LMFORGE_BENCH_SHAPES` (default `tiny,small`).

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lmforge_model::alloc_tuning;
use lmforge_model::chat::{CHATML, ChatTemplate};
use lmforge_model::optim::{AdamWConfig, LrSchedule};
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::train::{Batch, TrainConfig, Trainer};
use lmforge_model::{Model, ModelConfig, Rng, hf, weights};
use lmforge_proto::v1 as pb;
use lmforge_trainer::run::data::{self, EpochPlan, Record};
use lmforge_trainer::run::{
    BaseModel, CheckpointInfo, Progress, RunHooks, RunInputs, RunOutcome, run,
};

const WORDS: [&str; 16] = [
    "model", "train", "token", "layer", "weight", "batch", "loss", "step", "adapter", "data",
    "serve", "cache", "query", "value", "key", "norm",
];

struct Shape {
    name: &'static str,
    config: ModelConfig,
    batch: usize,
    seq: usize,
    steps: usize,
}

fn shapes() -> Vec<Shape> {
    let wanted = std::env::var("LMFORGE_BENCH_SHAPES").unwrap_or_else(|_| "tiny,small".into());
    let all = [
        Shape {
            name: "tiny",
            config: ModelConfig::tiny(),
            batch: 8,
            seq: 64,
            steps: 6,
        },
        Shape {
            name: "small",
            config: ModelConfig::small(),
            batch: 1,
            seq: 64,
            steps: 4,
        },
    ];
    all.into_iter()
        .filter(|s| wanted.split(',').any(|w| w.trim() == s.name))
        .collect()
}

/// Raw-text records long enough that every one truncates to `seq` tokens.
fn records(n: usize, seq: usize) -> Vec<String> {
    let mut rng = Rng::new(3);
    (0..n)
        .map(|_| {
            let text: Vec<&str> = (0..seq * 2)
                .map(|_| WORDS[rng.below(WORDS.len())])
                .collect();
            serde_json::json!({ "text": text.join(" ") }).to_string()
        })
        .collect()
}

fn median(mut xs: Vec<Duration>) -> Duration {
    xs.sort();
    xs[xs.len() / 2]
}

/// Times `run`'s steps and, between them, runs the raw loop's step on the same batch, so
/// both see the same machine load.
struct InterleavedHooks {
    raw: Trainer,
    batches: Vec<Batch>,
    /// When `run` got control back after the previous step's report.
    resumed: Option<Instant>,
    run_steps: Vec<Duration>,
    raw_steps: Vec<Duration>,
}

impl RunHooks for InterleavedHooks {
    fn progress(&mut self, p: &Progress) {
        let now = Instant::now();
        if let Some(r) = self.resumed {
            self.run_steps.push(now - r);
        }
        let batch = &self.batches[p.step as usize - 1];
        let t0 = Instant::now();
        self.raw
            .train_step(std::slice::from_ref(batch))
            .expect("raw step");
        self.raw_steps.push(t0.elapsed());
        self.resumed = Some(Instant::now());
    }
    fn checkpoint(&mut self, _dir: &Path, _info: &CheckpointInfo) -> anyhow::Result<()> {
        Ok(())
    }
    fn log(&mut self, _level: pb::LogLevel, _message: String) {}
    fn cancelled(&self) -> bool {
        false
    }
}

struct Figures {
    raw: f64,
    run: f64,
}

fn bench(shape: &Shape, root: &Path) -> Figures {
    let n_examples = shape.batch * (shape.steps + 2);
    let lines = records(n_examples, shape.seq);
    let train_path = root.join("train.jsonl");
    std::fs::write(&train_path, lines.join("\n")).expect("write dataset");
    let tok = TextTokenizer::train_byte_level_bpe(
        lines.iter().map(|l| {
            Record::parse(l)
                .expect("bench record")
                .text
                .unwrap_or_default()
        }),
        512,
        &["<unk>", "<s>", "</s>"],
    )
    .expect("train tokenizer");
    let cfg = &shape.config;
    let base = root.join("base");
    let map = weights::init_weights(cfg, DType::F32, &Device::Cpu, 0).expect("init");
    hf::save_checkpoint(&base, cfg, &map, None, None).expect("save base");
    tok.save(&base).expect("save tokenizer");

    // The raw loop on the batches `run` will build: same encoder, order and plan.
    let seed = 42;
    let encoder = data::Encoder {
        template: ChatTemplate::new(CHATML, &tok),
        tokenizer: tok.clone(),
        max_seq_len: shape.seq,
        assistant_only: true,
    };
    let recs = data::read_records(&train_path).expect("records");
    let (examples, _) = data::encode_all(&encoder, &train_path, &recs).expect("encode");
    assert!(examples.iter().all(|e| e.input_ids.len() == shape.seq));
    let plan = EpochPlan {
        examples: examples.len(),
        batch_size: shape.batch,
        grad_accum: 1,
    };
    let order = data::epoch_order(examples.len(), seed, 0);
    let pad = tok.token_id("<unk>").expect("pad token");
    let batches: Vec<_> = (0..shape.steps)
        .map(|s| {
            let idx = plan.step_batches(&order, s)[0];
            let ex: Vec<_> = idx.iter().map(|&i| &examples[i]).collect();
            data::collate(&ex, pad, &Device::Cpu).expect("collate")
        })
        .collect();
    let lr = 1e-4;
    let tc = TrainConfig {
        schedule: LrSchedule::constant(lr),
        adamw: AdamWConfig::default(),
        max_grad_norm: Some(1.0),
        dropout: 0.0,
        seed,
    };
    let model = Model::new(cfg, &map).expect("model");
    let raw = Trainer::new(model, weights::sorted_vars(&map), tc).expect("trainer");
    let mut hooks = InterleavedHooks {
        raw,
        batches,
        resumed: None,
        run_steps: vec![],
        raw_steps: vec![],
    };

    let spec = pb::JobSpec {
        base: Some(pb::job_spec::Base::BaseModel("bench".into())),
        hyperparameters: Some(pb::Hyperparameters {
            learning_rate: Some(lr),
            schedule: pb::LrSchedule::Constant as i32,
            training_length: Some(pb::hyperparameters::TrainingLength::MaxSteps(
                shape.steps as u64,
            )),
            batch_size: Some(shape.batch as u32),
            max_seq_len: Some(shape.seq as u32),
            seed: Some(seed),
            checkpoint_every_steps: 1_000_000,
            ..Default::default()
        }),
        ..Default::default()
    };
    let out = run(
        RunInputs {
            job_id: "bench".into(),
            attempt: 1,
            spec,
            base: BaseModel::Hf { dir: base },
            train_path,
            eval_path: None,
            work_dir: root.join("work"),
            resume_from: None,
            device: Device::Cpu,
        },
        &mut hooks,
    )
    .expect("run");
    assert!(matches!(out, RunOutcome::Completed(_)));
    let tokens = (shape.batch * shape.seq) as f64;
    // The first step of each side warms caches and the allocator.
    Figures {
        raw: tokens / median(hooks.raw_steps[1..].to_vec()).as_secs_f64(),
        run: tokens / median(hooks.run_steps).as_secs_f64(),
    }
}

fn main() {
    if let Some(code) = alloc_tuning::reexec_with_tuned_malloc() {
        std::process::exit(code);
    }
    let mut rows = Vec::new();
    for shape in shapes() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = bench(&shape, tmp.path());
        eprintln!("{} done", shape.name);
        rows.push((shape, f));
    }
    println!(
        "\n{:<7} {:>9} {:>20} {:>16} {:>10}",
        "shape", "batch", "raw train_step tok/s", "run() tok/s", "overhead"
    );
    for (s, f) in &rows {
        println!(
            "{:<7} {:>9} {:>20.1} {:>16.1} {:>9.1}%",
            s.name,
            format!("{}x{}", s.batch, s.seq),
            f.raw,
            f.run,
            (f.raw / f.run - 1.0) * 100.0,
        );
    }
}
