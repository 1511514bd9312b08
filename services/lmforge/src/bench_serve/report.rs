//! Turning level runs into figures: per-level statistics, the issue's target checks, the
//! table printed on stdout and the JSON written by `--json`.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::{Value, json};

use super::load::LevelRun;
use super::reference::Reference;
use super::stats::Quantiles;

/// Failures of one kind within a level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureGroup {
    /// How many requests failed this way.
    pub count: usize,
    /// The message of the first one.
    pub example: String,
}

/// The figures of one concurrency level.
#[derive(Debug, Clone)]
pub struct LevelReport {
    /// Clients (closed loop) or in-flight cap (Poisson).
    pub concurrency: usize,
    /// `closed` or `poisson R/s`.
    pub arrival: String,
    /// Requests sent.
    pub requests: usize,
    /// Requests that ended with finish reason stop or length.
    pub completed: usize,
    /// Everything else: error statuses, timeouts, bad finish reasons, lost requests.
    pub failed: usize,
    /// Failures by kind.
    pub failures: BTreeMap<String, FailureGroup>,
    /// First send → last end of stream, in seconds.
    pub wall_s: f64,
    /// Completed requests per second of wall time.
    pub requests_per_s: f64,
    /// Tokens received by completed requests.
    pub output_tokens: u64,
    /// `output_tokens` per second of wall time.
    pub output_tokens_per_s: f64,
    /// Mean prompt tokens per completed request, as the server counted them.
    pub mean_prompt_tokens: Option<f64>,
    /// Time to first token of completed requests, seconds.
    pub ttft: Quantiles,
    /// Gaps between token messages of completed requests, seconds.
    pub itl: Quantiles,
    /// End-to-end latency of completed requests, seconds.
    pub e2e: Quantiles,
    /// Most requests in flight at once.
    pub max_in_flight: usize,
}

impl LevelReport {
    /// The figures of `run`.
    pub fn new(concurrency: usize, arrival: String, run: &LevelRun) -> Self {
        let mut failures: BTreeMap<String, FailureGroup> = BTreeMap::new();
        let (mut ttft, mut itl, mut e2e, mut prompt) = (vec![], vec![], vec![], vec![]);
        let mut output_tokens = 0;
        for outcome in &run.outcomes {
            if let Some(failure) = &outcome.failure {
                failures
                    .entry(failure.kind.clone())
                    .or_insert_with(|| FailureGroup {
                        count: 0,
                        example: failure.message.clone(),
                    })
                    .count += 1;
                continue;
            }
            output_tokens += outcome.output_tokens;
            ttft.extend(outcome.ttft.map(|t| t.as_secs_f64()));
            itl.extend(outcome.itl.iter().map(|t| t.as_secs_f64()));
            e2e.push(outcome.e2e.as_secs_f64());
            prompt.extend(outcome.prompt_tokens.map(f64::from));
        }
        let failed: usize = failures.values().map(|g| g.count).sum();
        let completed = run.outcomes.len() - failed;
        let wall_s = run.wall.as_secs_f64().max(f64::MIN_POSITIVE);
        Self {
            concurrency,
            arrival,
            requests: run.issued.max(run.outcomes.len()),
            completed,
            failed,
            failures,
            wall_s,
            requests_per_s: completed as f64 / wall_s,
            output_tokens,
            output_tokens_per_s: output_tokens as f64 / wall_s,
            mean_prompt_tokens: (!prompt.is_empty())
                .then(|| prompt.iter().sum::<f64>() / prompt.len() as f64),
            ttft: Quantiles::of(ttft),
            itl: Quantiles::of(itl),
            e2e: Quantiles::of(e2e),
            max_in_flight: run.max_in_flight,
        }
    }

    /// The level as a JSON object (durations in seconds).
    pub fn to_json(&self) -> Value {
        let quantiles = |q: &Quantiles| json!({ "p50": q.p50, "p99": q.p99 });
        let failures: serde_json::Map<String, Value> = self
            .failures
            .iter()
            .map(|(kind, g)| {
                (
                    kind.clone(),
                    json!({ "count": g.count, "example": g.example }),
                )
            })
            .collect();
        json!({
            "concurrency": self.concurrency,
            "arrival": self.arrival,
            "requests": self.requests,
            "completed": self.completed,
            "failed": self.failed,
            "failures": failures,
            "wall_s": self.wall_s,
            "requests_per_s": self.requests_per_s,
            "output_tokens": self.output_tokens,
            "output_tokens_per_s": self.output_tokens_per_s,
            "mean_output_tokens": (self.completed > 0)
                .then(|| self.output_tokens as f64 / self.completed as f64),
            "mean_prompt_tokens": self.mean_prompt_tokens,
            "ttft_s": quantiles(&self.ttft),
            "itl_s": quantiles(&self.itl),
            "e2e_s": quantiles(&self.e2e),
            "max_in_flight": self.max_in_flight,
        })
    }
}

/// One of the issue's targets, evaluated on a run.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// The target, in words (`≥ 3.00×`).
    pub target: String,
    /// What was measured; `None` when the run lacks the data (check skipped).
    pub actual: Option<String>,
    /// `None` when skipped.
    pub passed: Option<bool>,
}

fn level(levels: &[LevelReport], concurrency: usize) -> Option<&LevelReport> {
    levels.iter().find(|l| l.concurrency == concurrency)
}

fn ratio_check(name: &str, min_ratio: f64, ratio: Option<f64>, missing: &str) -> Check {
    Check {
        name: name.to_owned(),
        target: format!("≥ {min_ratio:.2}×"),
        actual: Some(ratio.map_or_else(|| missing.to_owned(), |r| format!("{r:.2}×"))),
        passed: ratio.map(|r| r >= min_ratio),
    }
}

/// The issue's targets: zero failures everywhere; p99 TTFT ≤ 3× p50 at 32 streams; on
/// `tiny`, 32 streams ≥ 8× one stream; on `small`, 32 streams ≥ 3× transformers' static
/// batch 16 (its decode figure, as BENCH.md reports it).
pub fn checks(
    shape: Option<&str>,
    levels: &[LevelReport],
    reference: Option<&Reference>,
) -> Vec<Check> {
    let sent: usize = levels.iter().map(|l| l.requests).sum();
    let failed: usize = levels.iter().map(|l| l.failed).sum();
    let mut checks = vec![Check {
        name: "no request failed or lost".to_owned(),
        target: "0 failed".to_owned(),
        actual: Some(format!("{failed} failed of {sent}")),
        passed: Some(failed == 0),
    }];
    let at32 = level(levels, 32);
    let ttft = at32.and_then(|l| Some((l.ttft.p50?, l.ttft.p99?)));
    checks.push(ratio_check_max(
        "TTFT p99 / p50 at 32 streams",
        3.0,
        ttft.map(|(p50, p99)| p99 / p50.max(f64::MIN_POSITIVE)),
    ));
    let tok_s = |c| level(levels, c).map(|l| l.output_tokens_per_s);
    match shape {
        Some("tiny") => checks.push(ratio_check(
            "tiny: 32 streams / 1 stream (output tok/s)",
            8.0,
            tok_s(32).zip(tok_s(1)).map(|(a, b)| a / b),
            "needs levels 1 and 32",
        )),
        Some("small") => {
            let batch16 = reference.and_then(|r| r.decode.get(&16).copied());
            checks.push(ratio_check(
                "small: 32 streams / transformers batch 16",
                3.0,
                tok_s(32).zip(batch16).map(|(a, b)| a / b),
                "needs level 32 and the reference",
            ));
        }
        _ => {}
    }
    checks
}

fn ratio_check_max(name: &str, max_ratio: f64, ratio: Option<f64>) -> Check {
    Check {
        name: name.to_owned(),
        target: format!("≤ {max_ratio:.2}×"),
        actual: Some(ratio.map_or_else(|| "needs level 32".to_owned(), |r| format!("{r:.2}×"))),
        passed: ratio.map(|r| r <= max_ratio),
    }
}

/// `41.2 ms`, `1.27 s`, `-`.
fn seconds(value: Option<f64>) -> String {
    match value {
        None => "-".to_owned(),
        Some(s) if s < 1.0 => format!("{:.1} ms", s * 1000.0),
        Some(s) => format!("{s:.2} s"),
    }
}

/// The levels as a table, one row per level, then any failures spelled out.
pub fn table(levels: &[LevelReport]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>6} {:>8} {:>11} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
        "conc",
        "reqs",
        "failed",
        "req/s",
        "out tok/s",
        "TTFT p50",
        "TTFT p99",
        "ITL p50",
        "ITL p99",
        "e2e p50",
        "e2e p99"
    );
    for l in levels {
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>6} {:>8.2} {:>11.1} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9}",
            l.concurrency,
            l.requests,
            l.failed,
            l.requests_per_s,
            l.output_tokens_per_s,
            seconds(l.ttft.p50),
            seconds(l.ttft.p99),
            seconds(l.itl.p50),
            seconds(l.itl.p99),
            seconds(l.e2e.p50),
            seconds(l.e2e.p99),
        );
    }
    for l in levels {
        for (kind, group) in &l.failures {
            let _ = writeln!(
                out,
                "  ! concurrency {}: {} request(s) failed with {kind}: {}",
                l.concurrency, group.count, group.example
            );
        }
    }
    out
}

/// The checks as a table.
pub fn checks_table(checks: &[Check]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<46} {:>10} {:>24}  result",
        "check", "target", "actual"
    );
    for c in checks {
        let result = match c.passed {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "skipped",
        };
        let _ = writeln!(
            out,
            "{:<46} {:>10} {:>24}  {result}",
            c.name,
            c.target,
            c.actual.as_deref().unwrap_or("-")
        );
    }
    out
}

/// The whole run as one JSON document: `run` (what was measured how), `levels`,
/// `reference` (null without one) and `checks`.
pub fn document(
    run: Value,
    levels: &[LevelReport],
    reference: Option<&Reference>,
    checks: &[Check],
) -> Value {
    json!({
        "run": run,
        "levels": levels.iter().map(LevelReport::to_json).collect::<Vec<_>>(),
        "reference": reference.map(Reference::to_json),
        "checks": checks
            .iter()
            .map(|c| json!({
                "name": c.name,
                "target": c.target,
                "actual": c.actual,
                "passed": c.passed,
            }))
            .collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::bench_serve::load::{Failure, RequestOutcome};

    fn ok(ttft_ms: u64, itl_ms: &[u64], tokens: u64) -> RequestOutcome {
        RequestOutcome {
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: itl_ms.iter().map(|&ms| Duration::from_millis(ms)).collect(),
            e2e: Duration::from_millis(ttft_ms + itl_ms.iter().sum::<u64>()),
            output_tokens: tokens,
            prompt_tokens: Some(32),
            failure: None,
        }
    }

    fn failed(kind: &str) -> RequestOutcome {
        RequestOutcome {
            failure: Some(Failure {
                kind: kind.into(),
                message: format!("{kind} happened"),
            }),
            ..Default::default()
        }
    }

    fn run(outcomes: Vec<RequestOutcome>) -> LevelRun {
        LevelRun {
            issued: outcomes.len(),
            outcomes,
            wall: Duration::from_secs(2),
            max_in_flight: 2,
        }
    }

    #[test]
    fn a_level_counts_failures_and_times_only_completed_requests() {
        let report = LevelReport::new(
            2,
            "closed".into(),
            &run(vec![
                ok(10, &[5, 5], 3),
                ok(30, &[7], 2),
                failed("ResourceExhausted"),
                failed("ResourceExhausted"),
                failed("timeout"),
            ]),
        );
        assert_eq!(
            (report.requests, report.completed, report.failed),
            (5, 2, 3)
        );
        assert_eq!(report.failures["ResourceExhausted"].count, 2);
        assert_eq!(report.failures["timeout"].example, "timeout happened");
        assert_eq!(report.output_tokens, 5);
        assert!((report.output_tokens_per_s - 2.5).abs() < 1e-9);
        assert!((report.requests_per_s - 1.0).abs() < 1e-9);
        assert!((report.ttft.p50.expect("two samples") - 0.020).abs() < 1e-9);
        assert!((report.itl.p50.expect("three samples") - 0.005).abs() < 1e-9);
        assert_eq!(report.mean_prompt_tokens, Some(32.0));
        let table = table(std::slice::from_ref(&report));
        assert!(table.contains("2 request(s) failed with ResourceExhausted"));
    }

    #[test]
    fn the_json_document_has_the_documented_shape() {
        let level = LevelReport::new(1, "closed".into(), &run(vec![ok(10, &[5], 2)]));
        let checks = checks(Some("tiny"), std::slice::from_ref(&level), None);
        let doc = document(json!({"shape": "tiny"}), &[level], None, &checks);
        let level = &doc["levels"][0];
        for key in [
            "concurrency",
            "arrival",
            "requests",
            "completed",
            "failed",
            "failures",
            "wall_s",
            "requests_per_s",
            "output_tokens",
            "output_tokens_per_s",
            "mean_output_tokens",
            "mean_prompt_tokens",
            "max_in_flight",
        ] {
            assert!(level.get(key).is_some(), "levels[0].{key} missing: {level}");
        }
        for key in ["ttft_s", "itl_s", "e2e_s"] {
            assert!(level[key]["p50"].is_f64() && level[key]["p99"].is_f64());
        }
        assert!(doc["reference"].is_null());
        assert_eq!(doc["run"]["shape"], "tiny");
        let names: Vec<&str> = doc["checks"]
            .as_array()
            .expect("array")
            .iter()
            .map(|c| c["name"].as_str().expect("name"))
            .collect();
        assert_eq!(names.len(), 3);
        assert_eq!(doc["checks"][0]["passed"], true);
        // No level 32: the ratio checks are skipped, not failed.
        assert!(doc["checks"][1]["passed"].is_null());
        assert!(doc["checks"][2]["passed"].is_null());
    }

    #[test]
    fn checks_follow_the_issue_targets() {
        let mk = |c: usize, tok_s: f64, p50: f64, p99: f64, failed: usize| LevelReport {
            concurrency: c,
            arrival: "closed".into(),
            requests: 10,
            completed: 10 - failed,
            failed,
            failures: BTreeMap::new(),
            wall_s: 1.0,
            requests_per_s: 1.0,
            output_tokens: 0,
            output_tokens_per_s: tok_s,
            mean_prompt_tokens: None,
            ttft: Quantiles {
                p50: Some(p50),
                p99: Some(p99),
            },
            itl: Quantiles::default(),
            e2e: Quantiles::default(),
            max_in_flight: c,
        };
        let good = [mk(1, 100.0, 0.01, 0.02, 0), mk(32, 900.0, 0.1, 0.25, 0)];
        let results: Vec<_> = checks(Some("tiny"), &good, None)
            .into_iter()
            .map(|c| c.passed)
            .collect();
        assert_eq!(results, [Some(true), Some(true), Some(true)]);
        let bad = [mk(1, 100.0, 0.01, 0.02, 1), mk(32, 700.0, 0.1, 0.35, 0)];
        let results: Vec<_> = checks(Some("tiny"), &bad, None)
            .into_iter()
            .map(|c| c.passed)
            .collect();
        assert_eq!(results, [Some(false), Some(false), Some(false)]);
        let reference = Reference {
            decode: BTreeMap::from([(1, 15.0), (16, 131.0)]),
            ..Default::default()
        };
        let small = checks(Some("small"), &good, Some(&reference));
        assert_eq!(small[2].passed, Some(true), "900 ≥ 3 × 131");
        assert_eq!(checks(Some("small"), &good, None)[2].passed, None);
    }
}
