//! Adds up what the pipeline did, in input order, into the run report
//! (`lmforge.v1.DatasetReport`): per-rule counts and examples, parse errors, duplicate
//! clusters, and the distributions of the output (languages, labels, lengths).

use std::collections::{BTreeMap, HashMap};

use lmforge_proto::v1 as pb;

use crate::clean::{Kept, Removed};
use crate::parse::ParseError;
use crate::record::{Record, truncate_chars};
use crate::rules::Rule;

/// Parse errors kept in the report (the count covers all).
pub const MAX_PARSE_ERRORS: usize = 100;
/// Examples kept per rule.
pub const MAX_EXAMPLES: usize = 5;
/// Duplicate clusters kept in the report (the largest).
pub const MAX_CLUSTERS: usize = 100;
/// Removed ids kept per duplicate cluster.
const MAX_CLUSTER_MEMBERS: usize = 1000;
/// Upper bounds of the length histogram buckets (the last bucket is unbounded).
pub const LENGTH_BUCKETS: [u64; 12] = [
    16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
];
/// A label value is rare when it has fewer than this fraction of the largest value's records.
pub const RARE_FRACTION: f64 = 0.1;
/// Label keys with more distinct values than this are not categorical (no coverage check).
const MAX_CATEGORICAL_VALUES: usize = 100;

#[derive(Debug, Default)]
struct Cluster {
    method: i32,
    kept_id: String,
    kept_line: u64,
    removed_ids: Vec<String>,
    removed_lines: Vec<u64>,
    removed: u64,
    min_similarity: f64,
}

/// The report under construction.
#[derive(Debug)]
pub struct ReportBuilder {
    rules: Vec<pb::RuleReport>,
    /// Input lines (or JSON array items).
    pub input_lines: u64,
    /// Records parsed.
    pub parsed_records: u64,
    /// Parse errors seen.
    pub parse_error_count: u64,
    parse_errors: Vec<pb::ParseError>,
    clusters: HashMap<(i32, u64), Cluster>,
    languages: BTreeMap<String, u64>,
    labels: BTreeMap<String, u64>,
    histogram: [u64; LENGTH_BUCKETS.len() + 1],
    /// Messages about skipped steps.
    pub notes: Vec<String>,
    /// `tokens` or `chars`.
    pub length_unit: &'static str,
}

impl ReportBuilder {
    /// An empty report; `tokens` says whether lengths are counted in tokens.
    pub fn new(tokens: bool) -> Self {
        Self {
            rules: Rule::ALL
                .iter()
                .map(|r| pb::RuleReport {
                    rule: r.id().to_owned(),
                    ..Default::default()
                })
                .collect(),
            input_lines: 0,
            parsed_records: 0,
            parse_error_count: 0,
            parse_errors: Vec::new(),
            clusters: HashMap::new(),
            languages: BTreeMap::new(),
            labels: BTreeMap::new(),
            histogram: [0; LENGTH_BUCKETS.len() + 1],
            notes: Vec::new(),
            length_unit: if tokens { "tokens" } else { "chars" },
        }
    }

    fn rule(&mut self, rule: Rule) -> &mut pb::RuleReport {
        &mut self.rules[rule as usize]
    }

    /// The counts of one rule so far.
    pub fn rule_report(&self, rule: Rule) -> &pb::RuleReport {
        &self.rules[rule as usize]
    }

    fn example(&mut self, rule: Rule, example: impl FnOnce() -> pb::RuleExample) {
        let r = self.rule(rule);
        if r.examples.len() < MAX_EXAMPLES {
            r.examples.push(example());
        }
    }

    /// A line that did not parse.
    pub fn parse_error(&mut self, error: ParseError) {
        self.parse_error_count += 1;
        if self.parse_errors.len() < MAX_PARSE_ERRORS {
            self.parse_errors.push(pb::ParseError {
                line: error.line,
                message: error.message,
                excerpt: error.excerpt,
            });
        }
    }

    /// The first parse error, `(line, message)`.
    pub fn first_parse_error(&self) -> Option<(u64, String)> {
        self.parse_errors
            .first()
            .map(|e| (e.line, e.message.clone()))
    }

    /// A record a rule removed.
    pub fn removed(&mut self, removed: Removed) {
        let r = self.rule(removed.rule);
        r.removed += 1;
        *r.reasons.entry(removed.key).or_default() += 1;
        self.example(removed.rule, || pb::RuleExample {
            record_id: removed.id,
            line: removed.line,
            before: removed.excerpt,
            after: String::new(),
            reason: removed.detail,
        });
    }

    /// A record cleaning kept: counts the rules that changed or flagged it.
    pub fn kept(&mut self, kept: &Kept) {
        let after = || kept.record.excerpt(500);
        for rule in [
            Rule::Mojibake,
            Rule::ControlChars,
            Rule::Nfkc,
            Rule::Whitespace,
        ] {
            if kept.changed & (1 << rule as u32) != 0 {
                self.rule(rule).changed += 1;
                self.example(rule, || pb::RuleExample {
                    record_id: kept.record.id.clone(),
                    line: kept.record.line,
                    before: kept.before.clone().unwrap_or_default(),
                    after: after(),
                    reason: "text changed".into(),
                });
            }
        }
        let pii = [
            (Rule::PiiEmail, kept.pii.email, "[EMAIL]"),
            (Rule::PiiPhone, kept.pii.phone, "[PHONE]"),
            (Rule::PiiResidentId, kept.pii.cn_resident_id, "[ID_CARD]"),
            (Rule::PiiBankCard, kept.pii.bank_card, "[BANK_CARD]"),
        ];
        for (rule, n, tag) in pii {
            if n > 0 {
                let r = self.rule(rule);
                r.changed += 1;
                *r.reasons.entry("replaced".into()).or_default() += u64::from(n);
                self.example(rule, || pb::RuleExample {
                    record_id: kept.record.id.clone(),
                    line: kept.record.line,
                    before: kept.before.clone().unwrap_or_default(),
                    after: after(),
                    reason: format!("{n} × {tag}"),
                });
            }
        }
        if let Some(phrase) = &kept.flagged {
            let r = self.rule(Rule::Blocklist);
            r.flagged += 1;
            *r.reasons.entry(format!("phrase:{phrase}")).or_default() += 1;
            self.example(Rule::Blocklist, || pb::RuleExample {
                record_id: kept.record.id.clone(),
                line: kept.record.line,
                before: String::new(),
                after: after(),
                reason: format!("flagged `{phrase}`"),
            });
        }
    }

    /// A duplicate removed in favour of the kept record `kept_key` (`(method, kept seq)`).
    pub fn duplicate(
        &mut self,
        method: pb::DedupMethod,
        kept_seq: u64,
        kept: (&str, u64),
        removed: &Record,
        similarity: f64,
    ) {
        let rule = if method == pb::DedupMethod::Exact {
            Rule::DedupExact
        } else {
            Rule::DedupMinhash
        };
        let r = self.rule(rule);
        r.removed += 1;
        *r.reasons.entry("duplicate".into()).or_default() += 1;
        self.example(rule, || pb::RuleExample {
            record_id: removed.id.clone(),
            line: removed.line,
            before: removed.excerpt(500),
            after: String::new(),
            reason: format!(
                "duplicate of {} (line {}), similarity {similarity:.2}",
                kept.0, kept.1
            ),
        });
        let cluster = self
            .clusters
            .entry((method as i32, kept_seq))
            .or_insert_with(|| Cluster {
                method: method as i32,
                kept_id: kept.0.to_owned(),
                kept_line: kept.1,
                min_similarity: 1.0,
                ..Default::default()
            });
        cluster.removed += 1;
        cluster.min_similarity = cluster.min_similarity.min(similarity);
        if cluster.removed_ids.len() < MAX_CLUSTER_MEMBERS {
            cluster.removed_ids.push(removed.id.clone());
            cluster.removed_lines.push(removed.line);
        }
    }

    /// Counts for balance and augmentation.
    pub fn count(&mut self, rule: Rule, removed: u64, added: u64, reason: &str) {
        let r = self.rule(rule);
        r.removed += removed;
        r.added += added;
        if removed + added > 0 {
            *r.reasons.entry(reason.to_owned()).or_default() += removed + added;
        }
    }

    /// An example for a rule that added or removed `record`.
    pub fn note_example(&mut self, rule: Rule, record: &Record, reason: String) {
        self.example(rule, || pb::RuleExample {
            record_id: record.id.clone(),
            line: record.line,
            before: String::new(),
            after: record.excerpt(500),
            reason,
        });
    }

    /// An output record: language, labels and length distributions.
    pub fn output(&mut self, record: &Record, language: Option<&str>, length: u64) {
        if let Some(lang) = language {
            *self.languages.entry(lang.to_owned()).or_default() += 1;
        }
        for (k, v) in &record.labels {
            if k == "origin" {
                continue;
            }
            let key = format!("{k}={}", truncate_chars(v, 64));
            if self.labels.len() < 10_000 || self.labels.contains_key(&key) {
                *self.labels.entry(key).or_default() += 1;
            }
        }
        let bucket = LENGTH_BUCKETS
            .iter()
            .position(|b| length <= *b)
            .unwrap_or(LENGTH_BUCKETS.len());
        self.histogram[bucket] += 1;
    }

    /// Label values with fewer than [`RARE_FRACTION`] of their key's largest value.
    pub fn rare_labels(&self) -> Vec<String> {
        let mut by_key: BTreeMap<&str, Vec<(&str, u64)>> = BTreeMap::new();
        for (kv, n) in &self.labels {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            by_key.entry(k).or_default().push((v, *n));
        }
        let mut rare = Vec::new();
        for (k, values) in by_key {
            if values.len() < 2 || values.len() > MAX_CATEGORICAL_VALUES {
                continue;
            }
            let largest = values.iter().map(|(_, n)| *n).max().unwrap_or(0) as f64;
            for (v, n) in values {
                if (n as f64) < RARE_FRACTION * largest {
                    rare.push(format!("{k}={v}"));
                }
            }
        }
        rare
    }

    /// The finished report (ids and version filled in by the caller).
    pub fn finish(
        self,
        format: i32,
        output_records: u64,
        splits: Vec<pb::SplitInfo>,
        elapsed: std::time::Duration,
    ) -> pb::DatasetReport {
        let rare_labels = self.rare_labels();
        let mut clusters: Vec<Cluster> = self.clusters.into_values().collect();
        let cluster_count = clusters.len() as u64;
        clusters.sort_by(|a, b| {
            b.removed
                .cmp(&a.removed)
                .then(a.kept_line.cmp(&b.kept_line))
        });
        clusters.truncate(MAX_CLUSTERS);
        let mut lower = 0u64;
        let length_histogram = LENGTH_BUCKETS
            .iter()
            .map(|b| Some(*b))
            .chain(std::iter::once(None))
            .zip(self.histogram)
            .map(|(upper, count)| {
                let bucket = pb::LengthBucket {
                    min_length: lower,
                    max_length: upper.unwrap_or(0),
                    count,
                };
                lower = upper.map_or(0, |u| u + 1);
                bucket
            })
            .collect();
        pb::DatasetReport {
            format,
            input_lines: self.input_lines,
            parsed_records: self.parsed_records,
            output_records,
            rules: self.rules,
            parse_error_count: self.parse_error_count,
            parse_errors: self.parse_errors,
            dedup_cluster_count: cluster_count,
            dedup_clusters: clusters
                .into_iter()
                .map(|c| pb::DedupCluster {
                    method: c.method,
                    kept_record_id: c.kept_id,
                    kept_line: c.kept_line,
                    removed_record_ids: c.removed_ids,
                    removed_lines: c.removed_lines,
                    min_similarity: c.min_similarity,
                })
                .collect(),
            language_distribution: self.languages.into_iter().collect(),
            splits,
            label_distribution: self.labels.into_iter().collect(),
            processing_time: prost_types::Duration::try_from(elapsed).ok(),
            length_histogram,
            length_unit: self.length_unit.to_owned(),
            rare_labels,
            notes: self.notes,
            ..Default::default()
        }
    }
}
