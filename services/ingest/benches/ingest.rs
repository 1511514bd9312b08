//! Ingest throughput: 1,000,000 generated short conversations (Chinese and English, with
//! exact and near duplicates mixed in) through parse + clean + exact + near dedup on 2
//! threads, records/s and peak RSS; then MinHash near-dedup alone beside Python
//! `datasketch` on the same records (scripts/ingest/bench_datasketch.py), when a Python
//! with datasketch is found (`LMFORGE_BENCH_PYTHON`, else /root/.cache/lmforge-venv, else
//! `python3`). Prints tables.
//!
//! `LMFORGE_INGEST_BENCH_RECORDS` overrides the record count (default 1,000,000);
//! `LMFORGE_INGEST_BENCH_COMPARE` the records of the datasketch comparison (default 20,000).

use std::io::{BufReader, BufWriter, Write};
use std::time::Instant;

use lmforge_ingest::clean::CleanRules;
use lmforge_ingest::dedup::{DedupSettings, Deduper};
use lmforge_ingest::minhash::splitmix64;
use lmforge_ingest::parse::{Format, ParseOptions};
use lmforge_ingest::pipeline::{self, PipelineSettings, SplitSettings, Stage1};

/// The allocator of the `lmforge-ingest` binary (src/main.rs), so the figures are the
/// process's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const ZH_Q: [&str; 8] = [
    "请问孩子发烧怎么办",
    "快递什么时候到",
    "基金定投适合新手吗",
    "高血压要注意什么",
    "怎么申请退货",
    "信用卡年费怎么收",
    "咳嗽三天需要就医吗",
    "理财产品有风险吗",
];
const ZH_A: [&str; 6] = [
    "建议多喝水注意休息",
    "一般两到四天送达",
    "可以长期坚持分散风险",
    "少盐少油规律作息",
    "在订单页面提交申请即可",
    "请咨询客服了解详情",
];
const EN: [&str; 24] = [
    "order", "refund", "fever", "doctor", "fund", "risk", "delivery", "account", "card", "symptom",
    "price", "return", "please", "help", "today", "week", "child", "medicine", "bank", "rate",
    "shipping", "quality", "size", "advice",
];

fn conversation(i: u64) -> String {
    // 5% exact duplicates of an earlier record, 5% near duplicates (one word changed).
    let kind = i % 20;
    let base = match kind {
        0 if i > 100 => i - 37,
        1 if i > 100 => i - 53,
        _ => i,
    };
    let mut s = splitmix64(base);
    let mut pick = |n: usize| {
        s = splitmix64(s);
        (s % n as u64) as usize
    };
    let (q, a) = if base % 2 == 0 {
        (
            format!("{}？订单号{}，{}", ZH_Q[pick(8)], base, ZH_Q[pick(8)]),
            format!("{}，{}。", ZH_A[pick(6)], ZH_A[pick(6)]),
        )
    } else {
        let words: Vec<&str> = (0..10).map(|_| EN[pick(24)]).collect();
        (
            format!("Question {base}: {}?", words.join(" ")),
            format!(
                "Answer: {} {} {}.",
                EN[pick(24)],
                EN[pick(24)],
                EN[pick(24)]
            ),
        )
    };
    // The near duplicate: the same conversation with a few characters added.
    let a = if kind == 1 && i > 100 {
        format!("{a}!!")
    } else {
        a
    };
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| {
                l.split_whitespace()
                    .nth(1)
                    .and_then(|v| v.parse::<f64>().ok())
            })
        })
        .map_or(f64::NAN, |kib| kib / 1024.0)
}

/// User + system CPU seconds of this process so far.
fn cpu_seconds() -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let rest = s.rsplit_once(')')?.1.to_owned();
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks)
        })
        .unwrap_or(f64::NAN)
}

fn env_count(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn python() -> Option<String> {
    let candidates = [
        std::env::var("LMFORGE_BENCH_PYTHON").ok(),
        Some("/root/.cache/lmforge-venv/bin/python".to_owned()),
        Some("python3".to_owned()),
    ];
    candidates.into_iter().flatten().find(|p| {
        std::process::Command::new(p)
            .args(["-c", "import datasketch"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

fn main() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build_global()
        .expect("the global pool is built once");
    let n = env_count("LMFORGE_INGEST_BENCH_RECORDS", 1_000_000);
    let compare_n = env_count("LMFORGE_INGEST_BENCH_COMPARE", 20_000).min(n);
    let dir = tempfile::tempdir().expect("temp dir");
    let input = dir.path().join("conversations.jsonl");
    {
        let mut out = BufWriter::new(std::fs::File::create(&input).expect("create input"));
        for i in 0..n {
            writeln!(out, "{}", conversation(i)).expect("write input");
        }
        out.flush().expect("flush input");
    }
    let input_bytes = std::fs::metadata(&input).map(|m| m.len()).unwrap_or(0);
    let settings = PipelineSettings {
        format: Format::OpenAiMessages,
        parse: ParseOptions::default(),
        max_parse_error_fraction: 0.1,
        clean: CleanRules::default(),
        dedup: DedupSettings::default(),
        split: SplitSettings::default(),
        balance: None,
        synonym: None,
        rewrite: None,
        notes: Vec::new(),
        shard_records: 100_000,
        shard_bytes: 64 << 20,
        source_name: "bench.jsonl".into(),
    };

    // Parse + clean + exact + near dedup, streaming, 2 threads.
    let started = Instant::now();
    let cpu_before = cpu_seconds();
    let mut stage = Stage1::new(&settings);
    let mut kept = 0u64;
    let reader =
        BufReader::with_capacity(1 << 20, std::fs::File::open(&input).expect("open input"));
    pipeline::for_each_batch(reader, &settings, |units| {
        kept += stage.batch(units).len() as u64;
        Ok(())
    })
    .expect("pipeline");
    kept += stage.finish().len() as u64;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let exact = stage
        .report()
        .rule_report(lmforge_ingest::rules::Rule::DedupExact)
        .removed;
    let near = stage
        .report()
        .rule_report(lmforge_ingest::rules::Rule::DedupMinhash)
        .removed;
    let rss = peak_rss_mib();
    println!(
        "ingest pipeline: parse + clean + exact + near dedup, 2 threads, {} MiB of JSONL",
        input_bytes >> 20
    );
    println!(
        "| records | kept | exact dups | near dups | seconds | records/s | CPU s | records/s per 2 CPU-s | peak RSS MiB | target |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    println!(
        "| {n} | {kept} | {exact} | {near} | {elapsed:.2} | {:.0} | {cpu:.2} | {:.0} | {rss:.0} | ≥100,000 rec/s, <1024 MiB: {} |",
        n as f64 / elapsed,
        2.0 * n as f64 / cpu,
        if n as f64 / elapsed >= 100_000.0 && rss < 1024.0 {
            "met"
        } else {
            "NOT met"
        }
    );
    println!(
        "(records/s per 2 CPU-s: the rate two fully available cores would give; differs from wall-clock records/s when the machine is shared)"
    );

    // MinHash near-dedup alone on the first `compare_n` records, lmforge vs datasketch.
    let texts: Vec<String> = (0..compare_n)
        .map(|i| {
            let v: serde_json::Value =
                serde_json::from_str(&conversation(i)).expect("generated JSON");
            v["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| m["content"].as_str().unwrap_or("").to_owned())
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let minhash_only = DedupSettings {
        exact: false,
        ..DedupSettings::default()
    };
    let time_rust = |threads: usize| -> (f64, u64) {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("pool");
        let mut deduper = Deduper::new(minhash_only.clone());
        let started = Instant::now();
        let records: Vec<lmforge_ingest::record::Record> = texts
            .iter()
            .map(|t| lmforge_ingest::record::Record::new(Vec::new(), t.clone(), "b", 0))
            .collect();
        let features: Vec<_> = pool.install(|| {
            use rayon::prelude::*;
            records
                .par_iter()
                .map_init(Vec::new, |scratch, r| deduper.features(r, scratch))
                .collect()
        });
        let mut dups = 0;
        for (r, f) in records.iter().zip(&features) {
            if !matches!(
                deduper.check(r, f),
                lmforge_ingest::dedup::Verdict::Unique(_)
            ) {
                dups += 1;
            }
        }
        (started.elapsed().as_secs_f64(), dups)
    };
    let (rust_1, dups_1) = time_rust(1);
    let (rust_2, _) = time_rust(2);
    println!();
    println!(
        "MinHash near-dedup (128 permutations, 5-char shingles, threshold 0.8) on the same {compare_n} records"
    );
    println!(
        "| implementation | threads | seconds | records/s | near dups | speed-up vs datasketch |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    let texts_path = dir.path().join("texts.jsonl");
    {
        let mut out = BufWriter::new(std::fs::File::create(&texts_path).expect("create texts"));
        for t in &texts {
            writeln!(out, "{}", serde_json::Value::String(t.clone())).expect("write texts");
        }
        out.flush().expect("flush texts");
    }
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../scripts/ingest/bench_datasketch.py"
    );
    let reference = python().and_then(|py| {
        let out = std::process::Command::new(py)
            .arg(script)
            .arg(&texts_path)
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        Some((v["seconds"].as_f64()?, v["duplicates"].as_u64()?))
    });
    let per_sec = |s: f64| compare_n as f64 / s;
    match reference {
        Some((py_s, py_dups)) => {
            println!(
                "| datasketch (Python) | 1 | {py_s:.2} | {:.0} | {py_dups} | 1.0× |",
                per_sec(py_s)
            );
            println!(
                "| lmforge | 1 | {rust_1:.3} | {:.0} | {dups_1} | {:.1}× |",
                per_sec(rust_1),
                py_s / rust_1
            );
            println!(
                "| lmforge | 2 | {rust_2:.3} | {:.0} | {dups_1} | {:.1}× |",
                per_sec(rust_2),
                py_s / rust_2
            );
        }
        None => {
            println!(
                "| lmforge | 1 | {rust_1:.3} | {:.0} | {dups_1} | - |",
                per_sec(rust_1)
            );
            println!(
                "| lmforge | 2 | {rust_2:.3} | {:.0} | {dups_1} | - |",
                per_sec(rust_2)
            );
            println!(
                "note: datasketch comparison skipped: no Python with `datasketch` (pip install datasketch, or set LMFORGE_BENCH_PYTHON)"
            );
        }
    }
}
