//! Structural checks of the deployment files under `deploy/` and of README.md's settings
//! table, run by `make lint` (`cargo test -p lmforge-deploy-check`).
//!
//! The library holds the helpers (finding the repository, reading YAML documents, walking
//! source files); the checks themselves are the integration tests in `tests/`.

use std::path::{Path, PathBuf};

use serde_yaml::Value;

/// The repository root (two levels above this crate).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("the repository root exists")
}

/// Reads a file under the repository root, panicking with its path when it cannot.
pub fn read(relative: impl AsRef<Path>) -> String {
    let path = repo_root().join(relative.as_ref());
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Every YAML document of `text` (`---`-separated), with `<<` merge keys applied and empty
/// documents dropped; `origin` names the text in panics.
pub fn yaml_documents(text: &str, origin: &str) -> Vec<Value> {
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let mut value = <Value as serde::Deserialize>::deserialize(document)
            .unwrap_or_else(|e| panic!("{origin}: invalid YAML: {e}"));
        value
            .apply_merge()
            .unwrap_or_else(|e| panic!("{origin}: bad merge key: {e}"));
        if !value.is_null() {
            documents.push(value);
        }
    }
    documents
}

/// The single YAML document of the file at `relative` (under the repository root).
pub fn yaml_file(relative: &str) -> Value {
    let mut documents = yaml_documents(&read(relative), relative);
    assert_eq!(
        documents.len(),
        1,
        "{relative}: expected exactly one YAML document"
    );
    documents.remove(0)
}

/// Follows `path` (mapping keys, or decimal indexes into sequences) from `value`.
pub fn at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(value, |node, step| match node {
        Value::Sequence(items) => items.get(step.parse::<usize>().ok()?),
        _ => node.get(*step),
    })
}

/// The string at `path`, if there is one.
pub fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    at(value, path).and_then(Value::as_str)
}

/// The items of the sequence at `path` (empty when absent).
pub fn seq_at<'a>(value: &'a Value, path: &[&str]) -> &'a [Value] {
    at(value, path)
        .and_then(Value::as_sequence)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

/// A scalar (string, number or bool) as text; `None` for mappings, sequences and null.
pub fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Every `*.rs` file under `dirs` (relative to the repository root), skipping `target/`.
pub fn rust_sources(dirs: &[&str]) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = repo_root();
    let mut files = Vec::new();
    for dir in dirs {
        walk(&root.join(dir), &mut files);
    }
    files.sort();
    files
}

/// The lmforge services, each with its gRPC and admin ports (the defaults of
/// `services/*/src/config.rs`).
pub const SERVICES: &[(&str, u16, u16)] = &[
    ("ingest", 50051, 9101),
    ("jobs", 50052, 9102),
    ("registry", 50053, 9103),
    ("inference", 50054, 9104),
    ("gateway", 50055, 9105),
    ("trainer", 50056, 9106),
];
