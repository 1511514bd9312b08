//! The pipeline end to end on local files (no services): near-duplicates at the threshold
//! and not below, split stability, augmented twins never crossing the split, balancing,
//! malformed-input limits and the empty-result error.

use std::collections::{HashMap, HashSet};
use std::io::Write;

use lmforge_ingest::augment::{SynonymDict, SynonymSettings};
use lmforge_ingest::clean::CleanRules;
use lmforge_ingest::dedup::{DedupSettings, NearSettings};
use lmforge_ingest::parse::{Format, ParseOptions};
use lmforge_ingest::pipeline::{
    self, BalanceSettings, PipelineError, PipelineOutput, PipelineSettings, SplitSettings,
};
use lmforge_ingest::record::Record;

fn settings(format: Format) -> PipelineSettings {
    PipelineSettings {
        format,
        parse: ParseOptions::default(),
        max_parse_error_fraction: 0.1,
        clean: CleanRules::default(),
        dedup: DedupSettings::default(),
        split: SplitSettings::default(),
        balance: None,
        synonym: None,
        rewrite: None,
        notes: Vec::new(),
        shard_records: 1000,
        shard_bytes: 1 << 20,
        source_name: "t.jsonl".into(),
    }
}

fn qa_line(q: &str, a: &str, labels: &[(&str, &str)]) -> String {
    let labels: HashMap<&str, &str> = labels.iter().copied().collect();
    serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "labels": labels}).to_string()
}

/// A pipeline output with the directory holding its shards.
#[derive(Debug)]
struct Out {
    output: PipelineOutput,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Out {
    type Target = PipelineOutput;
    fn deref(&self) -> &PipelineOutput {
        &self.output
    }
}

fn run(lines: &[String], settings: &PipelineSettings) -> Result<Out, PipelineError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("in.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
    drop(f);
    let output = pipeline::run(&path, settings, dir.path())?;
    Ok(Out { output, _dir: dir })
}

fn records(output: &PipelineOutput) -> Vec<(i32, Record)> {
    let mut out = Vec::new();
    for split in &output.splits {
        for shard in &split.shards {
            let data = zstd::decode_all(std::fs::File::open(&shard.path).unwrap()).unwrap();
            for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                out.push((split.split as i32, serde_json::from_slice(line).unwrap()));
            }
        }
    }
    out
}

fn rule<'a>(output: &'a PipelineOutput, id: &str) -> &'a lmforge_proto::v1::RuleReport {
    output.report.rules.iter().find(|r| r.rule == id).unwrap()
}

/// Words of a deterministic pseudo-random text.
fn words(seed: u64, n: usize) -> Vec<String> {
    let vocab = [
        "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
        "juliet", "kilo", "lima", "mike", "november", "oscar", "papa",
    ];
    let mut s = seed;
    (0..n)
        .map(|i| {
            s = lmforge_ingest::minhash::splitmix64(s);
            format!("{}{}", vocab[(s % 16) as usize], i % 7)
        })
        .collect()
}

fn shingle_jaccard(a: &str, b: &str) -> f64 {
    let sh = |t: &str| -> HashSet<Vec<char>> {
        t.chars()
            .collect::<Vec<_>>()
            .windows(5)
            .map(|w| w.to_vec())
            .collect()
    };
    let (x, y) = (sh(a), sh(b));
    x.intersection(&y).count() as f64 / x.union(&y).count() as f64
}

#[test]
fn near_duplicates_are_found_at_the_threshold_and_not_below() {
    let base = words(1, 80);
    let text = |ws: &[String]| ws.join(" ");
    // Replace a growing number of words at the end to lower the similarity.
    let variant = |k: usize| {
        let mut v = base.clone();
        let fresh = words(99, k);
        let n = v.len();
        v[n - k..].clone_from_slice(&fresh);
        text(&v)
    };
    let original = text(&base);
    let close = variant(3);
    let far = variant(25);
    let j_close = shingle_jaccard(&format!("{original}\nok"), &format!("{close}\nok"));
    let j_far = shingle_jaccard(&format!("{original}\nok"), &format!("{far}\nok"));
    assert!(j_close > 0.88, "close pair Jaccard {j_close}");
    assert!((0.45..0.72).contains(&j_far), "far pair Jaccard {j_far}");
    let lines = vec![
        qa_line(&original, "ok", &[]),
        qa_line(&close, "ok", &[]),
        qa_line(&far, "ok", &[]),
    ];

    let at = |threshold: f64| {
        let mut s = settings(Format::OpenAiMessages);
        s.dedup = DedupSettings {
            exact: true,
            near: Some(NearSettings {
                threshold,
                ..NearSettings::default()
            }),
        };
        run(&lines, &s).unwrap()
    };
    let out = at(0.8);
    assert_eq!(out.records, 2, "the close variant goes, the far one stays");
    assert_eq!(rule(&out, "dedup.minhash").removed, 1);
    let cluster = &out.report.dedup_clusters[0];
    assert_eq!(
        (cluster.kept_line, cluster.removed_lines.clone()),
        (1, vec![2])
    );
    assert!(cluster.min_similarity >= 0.8);
    // Below the threshold a pair is never removed, above it always.
    let low = at(j_far - 0.15);
    assert_eq!(
        low.records, 1,
        "at a threshold under the far pair's similarity both go"
    );
    let high = at((j_close + 0.05).min(1.0));
    assert_eq!(
        high.records, 3,
        "above the close pair's similarity nothing goes"
    );
}

#[test]
fn exact_duplicates_after_normalization_keep_the_first() {
    let lines = vec![
        qa_line("Where is my parcel?", "It is on its way.", &[]),
        qa_line("Where  is my parcel? ", "It is on its way.", &[]),
        qa_line("Ｗhere is my parcel?", "It is on its way.", &[]),
    ];
    let mut s = settings(Format::OpenAiMessages);
    s.dedup.near = None;
    let out = run(&lines, &s).unwrap();
    assert_eq!(out.records, 1);
    assert_eq!(rule(&out, "dedup.exact").removed, 2);
    assert_eq!(out.report.dedup_clusters[0].removed_lines, vec![2, 3]);
}

#[test]
fn split_is_stable_across_runs_and_input_order() {
    let lines: Vec<String> = (0..400)
        .map(|i| {
            qa_line(
                &format!("问题 {i}: 我该如何{}", words(i, 3).join(" ")),
                &format!("answer {i}"),
                &[],
            )
        })
        .collect();
    let s = settings(Format::OpenAiMessages);
    let assign = |out: &PipelineOutput| -> HashMap<String, i32> {
        records(out)
            .into_iter()
            .map(|(split, r)| (r.id, split))
            .collect()
    };
    let first = assign(&run(&lines, &s).unwrap());
    let again = assign(&run(&lines, &s).unwrap());
    assert_eq!(first, again);
    let mut reversed = lines.clone();
    reversed.reverse();
    assert_eq!(first, assign(&run(&reversed, &s).unwrap()));
    let eval = first.values().filter(|s| **s == 2).count();
    assert!((20..=60).contains(&eval), "about 10% in eval: {eval}");
    let mut other_seed = s.clone();
    other_seed.split.seed = 7;
    assert_ne!(first, assign(&run(&lines, &other_seed).unwrap()));
}

#[test]
fn augmented_twins_never_cross_the_split() {
    let lines: Vec<String> = (0..300)
        .map(|i| {
            qa_line(
                &format!("请问医生，孩子发烧{i}度怎么办？ how can a doctor help with fever {i}"),
                "多喝水，必要时就医。",
                &[],
            )
        })
        .collect();
    let mut s = settings(Format::OpenAiMessages);
    s.dedup.near = None;
    s.split = SplitSettings {
        train: 0.6,
        eval: 0.2,
        test: 0.2,
        seed: 3,
    };
    s.synonym = Some(SynonymSettings {
        dict: SynonymDict::parse(lmforge_ingest::augment::BUILTIN_SYNONYMS).unwrap(),
        probability: 1.0,
        copies: 2,
    });
    let out = run(&lines, &s).unwrap();
    let all = records(&out);
    let split_of: HashMap<&str, i32> = all.iter().map(|(s, r)| (r.id.as_str(), *s)).collect();
    let augmented: Vec<&(i32, Record)> = all
        .iter()
        .filter(|(_, r)| r.labels.contains_key("augmented"))
        .collect();
    assert!(!augmented.is_empty());
    for (split, r) in &augmented {
        assert_eq!(*split, 1, "augmented records are train only");
        let origin = &r.labels["origin"];
        assert_eq!(
            split_of[origin.as_str()],
            1,
            "origin of {} is in train",
            r.id
        );
        assert_eq!(r.labels["augmented"], "synonym");
        assert!(
            r.messages[0].content.contains("大夫") || r.messages[0].content.contains("physician")
        );
    }
    let train_originals = all
        .iter()
        .filter(|(s, r)| *s == 1 && !r.labels.contains_key("augmented"))
        .count();
    assert_eq!(
        augmented.len(),
        2 * train_originals,
        "two copies of every train record"
    );
    assert_eq!(rule(&out, "augment.synonym").added, augmented.len() as u64);
}

#[test]
fn balance_caps_and_fills_label_groups_in_train() {
    let mut lines = Vec::new();
    for i in 0..60 {
        lines.push(qa_line(
            &format!("common cold question number {i} {}", words(i, 4).join(" ")),
            "rest",
            &[("category", "cold")],
        ));
    }
    for i in 0..3 {
        lines.push(qa_line(
            &format!("rare disease question {i} {}", words(100 + i, 4).join(" ")),
            "see a specialist",
            &[("category", "rare")],
        ));
    }
    let mut s = settings(Format::OpenAiMessages);
    s.split = SplitSettings {
        train: 1.0,
        eval: 0.0,
        test: 0.0,
        seed: 1,
    };
    s.balance = Some(BalanceSettings {
        label_key: "category".into(),
        max_per_label: Some(20),
        min_per_label: Some(10),
        seed: 5,
    });
    let out = run(&lines, &s).unwrap();
    let all = records(&out);
    let count = |v: &str| {
        all.iter()
            .filter(|(_, r)| r.labels["category"] == v)
            .count()
    };
    assert_eq!(count("cold"), 20);
    assert_eq!(count("rare"), 10);
    let balance = rule(&out, "balance");
    assert_eq!((balance.removed, balance.added), (40, 7));
    // Before balancing `rare` was a rare class; the report names classes as they are output.
    let unbalanced = {
        let mut s = s.clone();
        s.balance = None;
        run(&lines, &s).unwrap()
    };
    assert_eq!(
        unbalanced.report.rare_labels,
        vec!["category=rare".to_owned()]
    );
    assert_eq!(unbalanced.report.label_distribution["category=cold"], 60);
}

#[test]
fn malformed_lines_are_reported_and_the_rest_processed() {
    let mut lines: Vec<String> = (0..30)
        .map(|i| {
            qa_line(
                &format!("question {i} {}", words(i, 5).join(" ")),
                "answer",
                &[],
            )
        })
        .collect();
    lines.insert(4, "{not json".into());
    lines.insert(10, r#"{"messages": "wrong"}"#.into());
    let out = run(&lines, &settings(Format::OpenAiMessages)).unwrap();
    assert_eq!(out.report.parse_error_count, 2);
    let lines_reported: Vec<u64> = out.report.parse_errors.iter().map(|e| e.line).collect();
    assert_eq!(lines_reported, vec![5, 11]);
    assert_eq!(out.report.parsed_records, 30);
    assert_eq!(out.records, 30);
    // Past the allowed fraction the run fails, naming the first bad line.
    let mut strict = settings(Format::OpenAiMessages);
    strict.max_parse_error_fraction = 0.05;
    let err = run(&lines, &strict).unwrap_err();
    assert!(
        matches!(err, PipelineError::TooManyParseErrors { first_line: 5, .. }),
        "{err}"
    );
}

#[test]
fn an_empty_result_is_an_error() {
    let lines = vec![qa_line("   ", "x", &[]), qa_line("q", "", &[])];
    let err = run(&lines, &settings(Format::OpenAiMessages)).unwrap_err();
    assert!(matches!(err, PipelineError::Empty(_)), "{err}");
    let err = run(&["garbage".to_owned()], &settings(Format::OpenAiMessages)).unwrap_err();
    assert!(
        err.to_string().contains("no record parsed (line 1"),
        "{err}"
    );
}

#[test]
fn report_has_histogram_and_shards_roll() {
    let lines: Vec<String> = (0..250)
        .map(|i| qa_line(&format!("q{i} {}", words(i, 6).join(" ")), "a", &[]))
        .collect();
    let mut s = settings(Format::OpenAiMessages);
    s.shard_records = 50;
    let out = run(&lines, &s).unwrap();
    let train = &out.splits[0];
    assert!(train.shards.len() >= 4, "{} shards", train.shards.len());
    assert_eq!(
        train.shards.iter().map(|s| s.records).sum::<u64>(),
        train.records
    );
    let total: u64 = out.report.length_histogram.iter().map(|b| b.count).sum();
    assert_eq!(total, out.records);
    assert_eq!(out.report.length_unit, "chars");
    // The split sha256 is over the concatenated uncompressed shards.
    let mut all = Vec::new();
    for shard in &train.shards {
        all.extend(zstd::decode_all(std::fs::File::open(&shard.path).unwrap()).unwrap());
    }
    use sha2::Digest;
    assert_eq!(hex::encode(sha2::Sha256::digest(&all)), train.sha256);
}
