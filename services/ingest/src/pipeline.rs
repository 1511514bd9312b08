//! The ingest pipeline over a local copy of the raw input, in two passes so that memory does
//! not grow with the input (beyond the dedup index):
//!
//! 1. read units → (parallel, rayon) parse, clean, dedup features → (sequential, input
//!    order) report, dedup verdict, split by content hash and seed. Eval and test records go
//!    straight to their zstd shard writers; train records go to a temporary file.
//! 2. the train file again: balance (down/up-sampling with exact per-label counts known from
//!    pass 1), then augmentation of each kept record right after it, into the train shards.
//!
//! Augmentation happens only in the train split, so an augmented twin of a train record can
//! never be in eval or test.

use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use lmforge_proto::v1 as pb;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::augment::{self, RewriteSettings, SynonymSettings};
use crate::clean::{CleanRules, Outcome};
use crate::dedup::{DedupSettings, Deduper, FeatureHasher, Features, Verdict};
use crate::minhash::splitmix64;
use crate::parse::{self, Format, FormatError, ParseOptions, Unit};
use crate::record::Record;
use crate::report::ReportBuilder;
use crate::rules::Rule;

/// Units handed to the parallel stage at once.
const BATCH: usize = 8192;

/// Train/eval/test ratios and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSettings {
    /// Train fraction.
    pub train: f64,
    /// Eval fraction.
    pub eval: f64,
    /// Test fraction.
    pub test: f64,
    /// Seed.
    pub seed: u64,
}

impl Default for SplitSettings {
    fn default() -> Self {
        Self {
            train: 0.9,
            eval: 0.1,
            test: 0.0,
            seed: 42,
        }
    }
}

/// Which split a record with `content_hash` goes to: a pure function of the hash and the
/// seed, so the same content lands in the same split in every run.
pub fn split_of(content_hash: u128, split: &SplitSettings) -> pb::DatasetSplit {
    let h =
        splitmix64(split.seed ^ (content_hash as u64) ^ splitmix64((content_hash >> 64) as u64));
    let u = (h >> 11) as f64 / (1u64 << 53) as f64;
    if u < split.train {
        pb::DatasetSplit::Train
    } else if u < split.train + split.eval {
        pb::DatasetSplit::Eval
    } else {
        pb::DatasetSplit::Test
    }
}

/// Label balancing of the train split.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSettings {
    /// Label key.
    pub label_key: String,
    /// Cap per value.
    pub max_per_label: Option<u64>,
    /// Floor per value (upsampling).
    pub min_per_label: Option<u64>,
    /// Seed.
    pub seed: u64,
}

/// Everything the pipeline needs, defaults filled.
#[derive(Debug, Clone)]
pub struct PipelineSettings {
    /// Input format (resolved).
    pub format: Format,
    /// Parsing.
    pub parse: ParseOptions,
    /// Max fraction of units failing to parse.
    pub max_parse_error_fraction: f64,
    /// Cleaning.
    pub clean: CleanRules,
    /// Dedup.
    pub dedup: DedupSettings,
    /// Split.
    pub split: SplitSettings,
    /// Balance; `None` → off.
    pub balance: Option<BalanceSettings>,
    /// Synonym augmentation; `None` → off.
    pub synonym: Option<SynonymSettings>,
    /// Model rewrite; `None` → off.
    pub rewrite: Option<RewriteSettings>,
    /// Notes to add to the report (e.g. a skipped rewrite).
    pub notes: Vec<String>,
    /// Records per shard.
    pub shard_records: usize,
    /// Uncompressed bytes per shard.
    pub shard_bytes: u64,
    /// Name recorded in `source` (`<name>:<line>`).
    pub source_name: String,
}

/// Why the pipeline failed.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// The input's format is unknown or does not fit as a whole.
    #[error(transparent)]
    Format(#[from] FormatError),
    /// Too many units failed to parse.
    #[error(
        "{errors} of {total} records failed to parse (more than {max_fraction}); first: line {first_line}: {first_message}"
    )]
    TooManyParseErrors {
        /// Failed units.
        errors: u64,
        /// All units.
        total: u64,
        /// The allowed fraction.
        max_fraction: f64,
        /// First failing line.
        first_line: u64,
        /// Its error.
        first_message: String,
    },
    /// Nothing survived.
    #[error("no records left: {0}")]
    Empty(String),
    /// A model rewrite failed.
    #[error("augment.rewrite: {0}")]
    Rewrite(String),
    /// Local temporary files.
    #[error("temporary file: {0}")]
    Io(#[from] std::io::Error),
}

/// One finished shard: a zstd file on local disk, to be stored.
#[derive(Debug)]
pub struct ShardFile {
    /// The compressed file.
    pub path: tempfile::TempPath,
    /// Records in it.
    pub records: u64,
    /// Uncompressed size.
    pub raw_size: u64,
}

/// A finished split.
#[derive(Debug)]
pub struct SplitOutput {
    /// Which split.
    pub split: pb::DatasetSplit,
    /// Records.
    pub records: u64,
    /// Uncompressed JSONL size.
    pub size_bytes: u64,
    /// sha256 of the uncompressed JSONL.
    pub sha256: String,
    /// Tokens, when a tokenizer is configured.
    pub tokens: u64,
    /// Shards in order.
    pub shards: Vec<ShardFile>,
}

impl SplitOutput {
    /// As `SplitInfo`.
    pub fn info(&self) -> pb::SplitInfo {
        pb::SplitInfo {
            split: self.split as i32,
            record_count: self.records,
            size_bytes: self.size_bytes,
            sha256: self.sha256.clone(),
            token_count: self.tokens,
        }
    }
}

/// The pipeline's result.
#[derive(Debug)]
pub struct PipelineOutput {
    /// Train, eval, test.
    pub splits: Vec<SplitOutput>,
    /// The report (ids filled in by the caller).
    pub report: pb::DatasetReport,
    /// sha256 over the split sha256s (train, eval, test, each followed by `\n`).
    pub digest: String,
    /// Records over all splits.
    pub records: u64,
}

/// Writes one split as zstd JSONL shards in a temporary directory.
struct ShardWriter {
    split: pb::DatasetSplit,
    dir: PathBuf,
    max_records: usize,
    max_bytes: u64,
    current: Option<(
        zstd::Encoder<'static, BufWriter<std::fs::File>>,
        tempfile::TempPath,
        u64,
        u64,
    )>,
    done: Vec<ShardFile>,
    hasher: Sha256,
    records: u64,
    size: u64,
    tokens: u64,
}

impl ShardWriter {
    fn new(split: pb::DatasetSplit, dir: &Path, max_records: usize, max_bytes: u64) -> Self {
        Self {
            split,
            dir: dir.to_path_buf(),
            max_records: max_records.max(1),
            max_bytes: max_bytes.max(1),
            current: None,
            done: Vec::new(),
            hasher: Sha256::new(),
            records: 0,
            size: 0,
            tokens: 0,
        }
    }

    fn write(&mut self, record: &Record, tokens: u64) -> std::io::Result<()> {
        if self.current.is_none() {
            let (file, path) = tempfile::NamedTempFile::new_in(&self.dir)?.into_parts();
            let encoder = zstd::Encoder::new(BufWriter::new(file), 3)?;
            self.current = Some((encoder, path, 0, 0));
        }
        let mut line = record.to_json_line();
        line.push('\n');
        let (encoder, _, records, bytes) = self.current.as_mut().expect("opened above");
        encoder.write_all(line.as_bytes())?;
        *records += 1;
        *bytes += line.len() as u64;
        let full = *records as usize >= self.max_records || *bytes >= self.max_bytes;
        self.hasher.update(line.as_bytes());
        self.records += 1;
        self.size += line.len() as u64;
        self.tokens += tokens;
        if full {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> std::io::Result<()> {
        if let Some((encoder, path, records, raw_size)) = self.current.take() {
            encoder.finish()?.flush()?;
            self.done.push(ShardFile {
                path,
                records,
                raw_size,
            });
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<SplitOutput> {
        self.close_shard()?;
        Ok(SplitOutput {
            split: self.split,
            records: self.records,
            size_bytes: self.size,
            sha256: hex::encode(self.hasher.finalize()),
            tokens: self.tokens,
            shards: self.done,
        })
    }
}

/// The streaming first stage: parse, clean and dedup features in parallel, verdicts in order.
/// Also what the benchmark drives.
///
/// Batches are pipelined: while the rayon pool computes batch N, one task takes the verdicts
/// of batch N−1 (the sequential part: report and dedup index), so the sequential work does
/// not leave a core idle. [`Stage1::batch`] therefore returns the survivors of the previous
/// batch, and [`Stage1::finish`] those of the last one.
pub struct Stage1<'a> {
    settings: &'a PipelineSettings,
    hasher: FeatureHasher,
    state: Stage1State,
    pending: Option<Vec<Processed>>,
}

struct Stage1State {
    report: ReportBuilder,
    deduper: Deduper,
}

/// A record that passed stage 1.
#[derive(Debug)]
pub struct Survivor {
    /// The cleaned record.
    pub record: Record,
    /// Its content hash (split key).
    pub content_hash: u128,
    /// Detected language.
    pub language: Option<String>,
    /// Token count.
    pub tokens: Option<usize>,
}

enum Processed {
    ParseError(parse::ParseError),
    Removed(crate::clean::Removed),
    Kept(Box<crate::clean::Kept>, Features),
}

fn compute(
    settings: &PipelineSettings,
    hasher: &FeatureHasher,
    units: Vec<Unit>,
) -> Vec<Processed> {
    units
        .into_par_iter()
        .map_init(Vec::new, |scratch, unit| {
            let parsed = match unit {
                Unit::Text { line, text } => parse::parse_unit(
                    line,
                    &text,
                    settings.format,
                    &settings.parse,
                    &settings.source_name,
                ),
                Unit::Parsed(result) => result,
            };
            match parsed {
                Err(e) => Processed::ParseError(e),
                Ok(record) => match settings.clean.apply(record) {
                    Outcome::Removed(r) => Processed::Removed(r),
                    Outcome::Kept(kept) => {
                        let features = hasher.features(&kept.record, scratch);
                        Processed::Kept(Box::new(kept), features)
                    }
                },
            }
        })
        .collect()
}

impl Stage1State {
    fn absorb(&mut self, processed: Vec<Processed>) -> Vec<Survivor> {
        let mut survivors = Vec::with_capacity(processed.len());
        for p in processed {
            match p {
                Processed::ParseError(e) => self.report.parse_error(e),
                Processed::Removed(r) => {
                    self.report.parsed_records += 1;
                    self.report.removed(r);
                }
                Processed::Kept(kept, features) => {
                    self.report.parsed_records += 1;
                    match self.deduper.check(&kept.record, &features) {
                        Verdict::Exact { seq } => {
                            let k = self.deduper.kept(seq);
                            self.report.duplicate(
                                pb::DedupMethod::Exact,
                                seq,
                                k,
                                &kept.record,
                                1.0,
                            );
                        }
                        Verdict::Near { seq, similarity } => {
                            let k = self.deduper.kept(seq);
                            self.report.duplicate(
                                pb::DedupMethod::Minhash,
                                seq,
                                k,
                                &kept.record,
                                similarity,
                            );
                        }
                        Verdict::Unique(_) => {
                            self.report.kept(&kept);
                            let kept = *kept;
                            survivors.push(Survivor {
                                record: kept.record,
                                content_hash: features.content_hash,
                                language: kept.language,
                                tokens: kept.tokens,
                            });
                        }
                    }
                }
            }
        }
        survivors
    }
}

impl<'a> Stage1<'a> {
    /// A fresh stage.
    pub fn new(settings: &'a PipelineSettings) -> Self {
        let deduper = Deduper::new(settings.dedup.clone());
        Self {
            settings,
            hasher: deduper.feature_hasher(),
            state: Stage1State {
                report: ReportBuilder::new(settings.clean.tokenizer.is_some()),
                deduper,
            },
            pending: None,
        }
    }

    /// The report so far (of the batches whose survivors were returned).
    pub fn report(&mut self) -> &mut ReportBuilder {
        &mut self.state.report
    }

    /// Takes one batch of units; returns the survivors of the previous batch, in input order.
    pub fn batch(&mut self, units: Vec<Unit>) -> Vec<Survivor> {
        let previous = self.pending.take();
        let (settings, hasher, state) = (self.settings, &self.hasher, &mut self.state);
        let (processed, survivors) = rayon::join(
            || compute(settings, hasher, units),
            || previous.map(|p| state.absorb(p)).unwrap_or_default(),
        );
        self.pending = Some(processed);
        survivors
    }

    /// The survivors of the last batch; call once the input is exhausted.
    pub fn finish(&mut self) -> Vec<Survivor> {
        match self.pending.take() {
            Some(p) => self.state.absorb(p),
            None => Vec::new(),
        }
    }

    /// The finished report builder.
    fn into_report(self) -> ReportBuilder {
        self.state.report
    }
}

/// Reads `input` (UTF-8) with `sink` getting units in batches; returns input lines.
///
/// Reading and splitting units runs on its own thread, a couple of batches ahead of `sink`,
/// so the sequential read overlaps the parallel work on the previous batch instead of
/// leaving a core idle between batches (`make bench`: ingest benchmark).
pub fn for_each_batch<R: BufRead + Send>(
    input: R,
    settings: &PipelineSettings,
    mut sink: impl FnMut(Vec<Unit>) -> std::io::Result<()>,
) -> Result<u64, PipelineError> {
    let (batches_tx, batches_rx) = std::sync::mpsc::sync_channel::<Vec<Unit>>(2);
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || {
            let mut batch = Vec::with_capacity(BATCH);
            let mut receiver_gone = false;
            let lines = parse::read_units(
                input,
                settings.format,
                &settings.parse,
                &settings.source_name,
                &mut |unit| {
                    if receiver_gone {
                        return;
                    }
                    batch.push(unit);
                    if batch.len() >= BATCH {
                        let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH));
                        receiver_gone = batches_tx.send(full).is_err();
                    }
                },
            );
            if !batch.is_empty() && !receiver_gone {
                let _ = batches_tx.send(batch);
            }
            lines
        });
        // The sink stops at its first error; dropping the receiver then stops the reader.
        let mut failure: Option<std::io::Error> = None;
        for batch in batches_rx {
            if let Err(e) = sink(batch) {
                failure = Some(e);
                break;
            }
        }
        let lines = reader
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(lines),
        }
    })
}

fn length_of(record: &Record, tokens: Option<usize>) -> u64 {
    tokens.map_or_else(|| record.char_len() as u64, |t| t as u64)
}

/// Runs the whole pipeline on the UTF-8 file at `input`; shards go to `work_dir`.
pub fn run(
    input: &Path,
    settings: &PipelineSettings,
    work_dir: &Path,
) -> Result<PipelineOutput, PipelineError> {
    let started = Instant::now();
    let mut stage = Stage1::new(settings);
    let mut eval = ShardWriter::new(
        pb::DatasetSplit::Eval,
        work_dir,
        settings.shard_records,
        settings.shard_bytes,
    );
    let mut test = ShardWriter::new(
        pb::DatasetSplit::Test,
        work_dir,
        settings.shard_records,
        settings.shard_bytes,
    );
    let (train_file, train_path) = tempfile::NamedTempFile::new_in(work_dir)?.into_parts();
    let mut train_tmp = BufWriter::new(train_file);
    // Per balance-label value: count, and the smallest sampling hashes (max-heaps).
    let mut label_counts: HashMap<String, u64> = HashMap::new();
    let mut smallest: HashMap<String, BinaryHeap<u64>> = HashMap::new();
    let heap_cap = settings
        .balance
        .as_ref()
        .map(|b| {
            b.max_per_label
                .unwrap_or(0)
                .max(b.min_per_label.unwrap_or(0)) as usize
        })
        .unwrap_or(0);
    let balance_hash = |b: &BalanceSettings, content_hash: u128| {
        splitmix64(b.seed ^ (content_hash as u64) ^ 0xBA1A)
    };

    let mut handle = |s: Survivor, report: &mut ReportBuilder| -> std::io::Result<()> {
        let length = length_of(&s.record, s.tokens);
        match split_of(s.content_hash, &settings.split) {
            pb::DatasetSplit::Train => {
                if let Some(b) = &settings.balance {
                    let value = s
                        .record
                        .labels
                        .get(&b.label_key)
                        .cloned()
                        .unwrap_or_default();
                    *label_counts.entry(value.clone()).or_default() += 1;
                    let heap = smallest.entry(value).or_default();
                    heap.push(balance_hash(b, s.content_hash));
                    if heap.len() > heap_cap {
                        heap.pop();
                    }
                }
                writeln!(
                    train_tmp,
                    "{}\t{}\t{}\t{}",
                    s.content_hash,
                    s.language.as_deref().unwrap_or("-"),
                    s.tokens.map_or(-1, |t| t as i64),
                    s.record.to_json_line()
                )?;
            }
            split => {
                let writer = if split == pb::DatasetSplit::Eval {
                    &mut eval
                } else {
                    &mut test
                };
                writer.write(&s.record, s.tokens.unwrap_or(0) as u64)?;
                report.output(&s.record, s.language.as_deref(), length);
            }
        }
        Ok(())
    };
    let input_file = BufReader::with_capacity(1 << 20, std::fs::File::open(input)?);
    let lines = for_each_batch(input_file, settings, |units| {
        for s in stage.batch(units) {
            handle(s, stage.report())?;
        }
        Ok(())
    })?;
    for s in stage.finish() {
        handle(s, stage.report())?;
    }
    stage.report().input_lines = lines;
    train_tmp.flush()?;
    drop(train_tmp);

    let report = stage.report();
    let total_units = report.parsed_records + report.parse_error_count;
    if report.parsed_records == 0 {
        let first = report_first_error(report);
        return Err(PipelineError::Empty(match first {
            Some((line, msg)) => format!("no record parsed (line {line}: {msg})"),
            None => "the input holds no records".into(),
        }));
    }
    if total_units > 0
        && report.parse_error_count as f64 / total_units as f64 > settings.max_parse_error_fraction
    {
        let (first_line, first_message) = report_first_error(report).unwrap_or((0, String::new()));
        return Err(PipelineError::TooManyParseErrors {
            errors: report.parse_error_count,
            total: total_units,
            max_fraction: settings.max_parse_error_fraction,
            first_line,
            first_message,
        });
    }

    // Pass 2: balance and augment the train split.
    let thresholds: HashMap<String, (u64, u64, u64)> = match &settings.balance {
        None => HashMap::new(),
        Some(b) => label_counts
            .iter()
            .map(|(value, &count)| {
                let heap = smallest
                    .get(value)
                    .map(|h| h.clone().into_sorted_vec())
                    .unwrap_or_default();
                // (keep threshold, copies each, extra threshold)
                let nth = |n: u64| {
                    if n == 0 {
                        None
                    } else {
                        heap.get(n as usize - 1).copied()
                    }
                };
                match (b.max_per_label, b.min_per_label) {
                    (Some(max), _) if count > max => (value.clone(), (nth(max).unwrap_or(0), 1, 0)),
                    (_, Some(min)) if count < min && count > 0 => {
                        let copies = min / count;
                        let extra = min % count;
                        (
                            value.clone(),
                            (
                                u64::MAX,
                                copies,
                                nth(extra).map_or(0, |t| t.saturating_add(1)),
                            ),
                        )
                    }
                    _ => (value.clone(), (u64::MAX, 1, 0)),
                }
            })
            .collect(),
    };
    let mut train = ShardWriter::new(
        pb::DatasetSplit::Train,
        work_dir,
        settings.shard_records,
        settings.shard_bytes,
    );
    let (mut downsampled, mut upsampled, mut synonym_added, mut rewrite_added) =
        (0u64, 0u64, 0u64, 0u64);
    let train_in = BufReader::with_capacity(1 << 20, std::fs::File::open(&train_path)?);
    let token_count = |r: &Record| {
        settings.clean.tokenizer.as_ref().map(|t| {
            r.texts_ref()
                .filter(|s| !s.is_empty())
                .map(|s| t.count(s))
                .sum::<usize>()
        })
    };
    for line in train_in.lines() {
        let line = line?;
        let mut parts = line.splitn(4, '\t');
        let (Some(hash), Some(lang), Some(tokens), Some(json)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(std::io::Error::other("corrupt train temporary file").into());
        };
        let content_hash: u128 = hash
            .parse()
            .map_err(|_| std::io::Error::other("corrupt train temporary file"))?;
        let record: Record = serde_json::from_str(json).map_err(std::io::Error::other)?;
        let tokens: Option<usize> = tokens
            .parse::<i64>()
            .ok()
            .filter(|t| *t >= 0)
            .map(|t| t as usize);
        let language = (lang != "-").then_some(lang);
        let mut emissions = 1u64;
        if let Some(b) = &settings.balance {
            let value = record
                .labels
                .get(&b.label_key)
                .map(String::as_str)
                .unwrap_or("");
            let (keep_max, copies, extra) =
                thresholds.get(value).copied().unwrap_or((u64::MAX, 1, 0));
            let h = balance_hash(b, content_hash);
            if h > keep_max {
                downsampled += 1;
                if downsampled <= crate::report::MAX_EXAMPLES as u64 {
                    stage.report().note_example(
                        Rule::Balance,
                        &record,
                        format!("downsampled `{}={value}`", b.label_key),
                    );
                }
                continue;
            }
            emissions = copies + u64::from(h < extra);
        }
        let length = length_of(&record, tokens);
        train.write(&record, tokens.unwrap_or(0) as u64)?;
        stage.report().output(&record, language, length);
        for k in 1..emissions {
            let mut copy = record.clone();
            copy.id = format!("{}#up{k}", record.id);
            copy.labels.insert("origin".into(), record.id.clone());
            copy.labels.insert("balance".into(), "upsampled".into());
            train.write(&copy, tokens.unwrap_or(0) as u64)?;
            stage.report().output(&copy, language, length);
            upsampled += 1;
            if upsampled <= crate::report::MAX_EXAMPLES as u64 {
                stage
                    .report()
                    .note_example(Rule::Balance, &copy, "upsampled".into());
            }
        }
        if let Some(syn) = &settings.synonym {
            for c in 1..=syn.copies {
                let seed = splitmix64(content_hash as u64 ^ u64::from(c));
                let copy = augment::augmented_copy(&record, "syn", c, |t| {
                    Ok(syn.dict.replace(t, syn.probability, seed))
                })
                .map_err(PipelineError::Rewrite)?;
                if let Some(copy) = copy {
                    let t = token_count(&copy);
                    train.write(&copy, t.unwrap_or(0) as u64)?;
                    stage.report().output(&copy, language, length_of(&copy, t));
                    synonym_added += 1;
                    if synonym_added <= crate::report::MAX_EXAMPLES as u64 {
                        stage.report().note_example(
                            Rule::AugmentSynonym,
                            &copy,
                            format!("synonyms of {}", record.id),
                        );
                    }
                }
            }
        }
        if let Some(rw) = &settings.rewrite {
            let u = (splitmix64(content_hash as u64 ^ 0x5EED) >> 11) as f64 / (1u64 << 53) as f64;
            if u < rw.sample_fraction {
                for c in 1..=rw.copies {
                    let copy =
                        augment::augmented_copy(&record, "rw", c, |t| rw.rewriter.rewrite(t))
                            .map_err(PipelineError::Rewrite)?;
                    if let Some(copy) = copy {
                        let t = token_count(&copy);
                        train.write(&copy, t.unwrap_or(0) as u64)?;
                        stage.report().output(&copy, language, length_of(&copy, t));
                        rewrite_added += 1;
                        if rewrite_added <= crate::report::MAX_EXAMPLES as u64 {
                            stage.report().note_example(
                                Rule::AugmentRewrite,
                                &copy,
                                format!("rewrite of {}", record.id),
                            );
                        }
                    }
                }
            }
        }
    }
    drop(train_path);
    let mut report = stage.into_report();
    report.count(Rule::Balance, downsampled, 0, "downsampled");
    report.count(Rule::Balance, 0, upsampled, "upsampled");
    report.count(Rule::AugmentSynonym, 0, synonym_added, "added");
    report.count(Rule::AugmentRewrite, 0, rewrite_added, "added");
    report.notes.extend(settings.notes.iter().cloned());

    let splits = vec![train.finish()?, eval.finish()?, test.finish()?];
    let records: u64 = splits.iter().map(|s| s.records).sum();
    if records == 0 {
        return Err(PipelineError::Empty(format!(
            "every one of the {} parsed records was removed by the rules (see the report's counts)",
            report.parsed_records
        )));
    }
    let mut digest = Sha256::new();
    for s in &splits {
        digest.update(s.sha256.as_bytes());
        digest.update(b"\n");
    }
    let infos = splits.iter().map(SplitOutput::info).collect();
    let report = report.finish(0, records, infos, started.elapsed());
    Ok(PipelineOutput {
        splits,
        report,
        digest: hex::encode(digest.finalize()),
        records,
    })
}

fn report_first_error(report: &ReportBuilder) -> Option<(u64, String)> {
    report.first_parse_error()
}

/// Split counts, for callers that only need sizes.
pub fn split_counts(output: &PipelineOutput) -> BTreeMap<i32, u64> {
    output
        .splits
        .iter()
        .map(|s| (s.split as i32, s.records))
        .collect()
}
