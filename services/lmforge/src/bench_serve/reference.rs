//! The reference beside lmforge in the same invocation: Hugging Face `transformers`'
//! static-batch greedy `generate` on the same checkpoint directory
//! (`scripts/inference/bench_transformers_generate.py`), as BENCH.md asks for ratios rather
//! than absolute figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, ensure};
use serde_json::{Value, json};

/// The script, found from the crate's source tree (the benchmark runs from a checkout).
pub const SCRIPT: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../scripts/inference/bench_transformers_generate.py"
);

/// Batch sizes the reference runs: one stream, and BENCH.md's static batch of 16.
pub const BATCHES: [u32; 2] = [1, 16];

/// What the reference measured.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reference {
    /// The Python that ran it.
    pub python: String,
    /// Decode tokens/s per batch size (prefill excluded, as in BENCH.md).
    pub decode: BTreeMap<u32, f64>,
    /// Whole-`generate` tokens/s per batch size (prefill included).
    pub generate: BTreeMap<u32, f64>,
    /// `transformers` and `torch` versions.
    pub versions: String,
}

impl Reference {
    /// As JSON for the report.
    pub fn to_json(&self) -> Value {
        let by_batch = |m: &BTreeMap<u32, f64>| -> serde_json::Map<String, Value> {
            m.iter().map(|(b, v)| (b.to_string(), json!(v))).collect()
        };
        json!({
            "python": self.python,
            "versions": self.versions,
            "decode_tok_s": by_batch(&self.decode),
            "generate_tok_s": by_batch(&self.generate),
        })
    }

    /// Parses the script's output.
    pub fn parse(python: &str, stdout: &[u8]) -> anyhow::Result<Self> {
        let value: Value =
            serde_json::from_slice(stdout).context("the reference printed no JSON")?;
        let by_batch = |key: &str| -> BTreeMap<u32, f64> {
            value[key]
                .as_object()
                .map(|m| {
                    m.iter()
                        .filter_map(|(b, v)| Some((b.parse().ok()?, v.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let reference = Self {
            python: python.to_owned(),
            decode: by_batch("decode"),
            generate: by_batch("generate"),
            versions: format!(
                "transformers {}, torch {}",
                value["transformers"].as_str().unwrap_or("?"),
                value["torch"].as_str().unwrap_or("?")
            ),
        };
        ensure!(
            !reference.decode.is_empty(),
            "the reference measured nothing: {value}"
        );
        Ok(reference)
    }

    /// Side-by-side rows: each reference batch size with lmforge's figure at that many
    /// concurrent streams (`lmforge` maps concurrency → output tokens/s).
    pub fn table(&self, lmforge: &BTreeMap<usize, f64>) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "reference: transformers static-batch greedy generate, same checkpoint ({})",
            self.versions
        );
        let _ = writeln!(
            out,
            "{:>6} {:>17} {:>19} {:>22} {:>8}",
            "batch", "hf decode tok/s", "hf generate tok/s", "lmforge streams tok/s", "ratio"
        );
        for (&batch, &decode) in &self.decode {
            let ours = lmforge.get(&(batch as usize)).copied();
            let _ = writeln!(
                out,
                "{:>6} {:>17.1} {:>19.1} {:>22} {:>8}",
                batch,
                decode,
                self.generate.get(&batch).copied().unwrap_or(f64::NAN),
                ours.map_or_else(|| "-".to_owned(), |t| format!("{t:.1}")),
                ours.map_or_else(|| "-".to_owned(), |t| format!("{:.2}×", t / decode)),
            );
        }
        out
    }
}

/// The Python to run the reference with: `explicit` (flag or `LMFORGE_BENCH_PYTHON`), else
/// the first that exists of the repository's `.venv-bench` (BENCH.md's install) and
/// `~/.cache/lmforge-venv`.
pub fn find_python(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return Some(path.to_owned());
    }
    let mut candidates = vec![PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../.venv-bench/bin/python"
    ))];
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/lmforge-venv/bin/python"));
    }
    candidates.into_iter().find(|p| p.exists())
}

/// Runs the reference on `checkpoint` (blocking the calling task's thread is avoided: the
/// script runs as a child process).
pub async fn run(
    python: &Path,
    checkpoint: &Path,
    prompt_len: u32,
    output_len: u32,
    seed: u64,
) -> anyhow::Result<Reference> {
    let batches: Vec<String> = BATCHES.iter().map(u32::to_string).collect();
    let output = tokio::process::Command::new(python)
        .arg(SCRIPT)
        .arg("--checkpoint")
        .arg(checkpoint)
        .args(["--prompt-len", &prompt_len.to_string()])
        .args(["--output-len", &output_len.to_string()])
        .args(["--batches", &batches.join(",")])
        .args(["--seed", &seed.to_string()])
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("cannot run {}", python.display()))?;
    ensure!(
        output.status.success(),
        "{} {SCRIPT} failed ({}): {}",
        python.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    Reference::parse(&python.display().to_string(), &output.stdout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scripts_output_parses_and_prints_beside_lmforge() {
        let stdout =
            br#"{"decode": {"1": 223.0, "16": 1799.5}, "generate": {"1": 200.0, "16": 1500.0},
                          "transformers": "5.24.0", "torch": "2.15.0", "threads": 2}"#;
        let reference = Reference::parse("py", stdout).expect("valid output");
        assert_eq!(reference.decode[&16], 1799.5);
        assert_eq!(reference.generate[&1], 200.0);
        assert_eq!(reference.versions, "transformers 5.24.0, torch 2.15.0");
        let table = reference.table(&BTreeMap::from([(1, 446.0), (32, 5000.0)]));
        assert!(table.contains("2.00×"), "{table}");
        assert_eq!(reference.to_json()["decode_tok_s"]["16"], 1799.5);
        assert!(Reference::parse("py", b"{}").is_err());
        assert!(Reference::parse("py", b"Traceback").is_err());
    }
}
