//! Domain types of the registry, free of gRPC: what the catalog and alias modules read and
//! write, and what `api` converts to and from the proto messages.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A registered model.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Server-assigned id.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Key/value tags.
    pub tags: BTreeMap<String, String>,
    /// Highest READY version, 0 when none.
    pub latest_version: u32,
    /// Number of versions in any state.
    pub version_count: u32,
    /// Alias → version.
    pub aliases: BTreeMap<String, u32>,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change of description or tags.
    pub updated_at: DateTime<Utc>,
}

/// Lifecycle of a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionStatus {
    /// Files are being uploaded; not resolvable.
    Pending,
    /// Finalized, immutable, resolvable.
    Ready,
    /// Registration failed.
    Failed,
}

impl VersionStatus {
    /// The value stored in Postgres.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Ready => "ready",
            Self::Failed => "failed",
        }
    }

    /// Parses the stored value.
    pub fn from_db(value: &str) -> Self {
        match value {
            "ready" => Self::Ready,
            "failed" => Self::Failed,
            _ => Self::Pending,
        }
    }
}

/// A pinned reference to one version (lineage).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct VersionPin {
    /// Model name.
    pub name: String,
    /// Version number.
    pub version: u32,
    /// The version's digest at the time it was pinned.
    pub digest: String,
}

/// Where a version came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Lineage {
    /// The version it was fine-tuned from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_model: Option<VersionPin>,
    /// The dataset version it was trained on.
    #[serde(default)]
    pub dataset_version_id: String,
    /// The training job that produced it.
    #[serde(default)]
    pub training_job_id: String,
    /// For adapters: the version they apply to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<VersionPin>,
}

/// One file of a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    /// Relative path inside the version.
    pub path: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Lowercase hex sha256 (also the blob's address in the artifact store).
    pub sha256: String,
    /// MIME type, may be empty.
    pub content_type: String,
}

/// A model version.
#[derive(Debug, Clone, PartialEq)]
pub struct Version {
    /// Server-assigned id.
    pub id: Uuid,
    /// Its model.
    pub model_name: String,
    /// 1, 2, 3… per model.
    pub version: u32,
    /// Lifecycle state.
    pub status: VersionStatus,
    /// Why it FAILED, when it did.
    pub status_message: String,
    /// `hf-safetensors`, `peft-lora`, `q8_0` or `gguf`.
    pub format: String,
    /// sha256 of the manifest; empty until READY.
    pub digest: String,
    /// Files, sorted by path.
    pub files: Vec<FileEntry>,
    /// Where it came from.
    pub lineage: Lineage,
    /// Training hyperparameters (a JSON object).
    pub hyperparameters: serde_json::Value,
    /// Metrics such as `eval_loss`.
    pub metrics: BTreeMap<String, f64>,
    /// Jinja chat template used in training and serving.
    pub chat_template: String,
    /// `LlamaForCausalLM`, …
    pub architecture: String,
    /// Context length in tokens.
    pub context_length: u32,
    /// Parameter count.
    pub parameter_count: u64,
    /// Free text.
    pub description: String,
    /// Key/value tags.
    pub tags: BTreeMap<String, String>,
    /// Aliases pointing here.
    pub aliases: Vec<String>,
    /// Who registered it (`key:…`, `job:…`, `user:…`).
    pub created_by: String,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// When it became READY or FAILED.
    pub finalized_at: Option<DateTime<Utc>>,
    /// Last metadata change.
    pub updated_at: DateTime<Utc>,
}

impl Version {
    /// Total bytes of its files.
    pub fn total_size(&self) -> u64 {
        self.files.iter().map(|f| f.size_bytes).sum()
    }
}

/// Everything needed to create a version.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewVersion {
    /// Model to add it to.
    pub model_name: String,
    /// Create the model when missing.
    pub create_model_if_missing: bool,
    /// Idempotency key.
    pub client_request_id: String,
    /// Format (validated).
    pub format: String,
    /// Lineage, with refs still unresolved.
    pub base_model_ref: Option<String>,
    /// Parent version ref for adapters.
    pub parent_ref: Option<String>,
    /// Dataset version id.
    pub dataset_version_id: String,
    /// Training job id.
    pub training_job_id: String,
    /// Hyperparameters (a JSON object).
    pub hyperparameters: serde_json::Value,
    /// Metrics.
    pub metrics: BTreeMap<String, f64>,
    /// Chat template.
    pub chat_template: String,
    /// Architecture.
    pub architecture: String,
    /// Context length.
    pub context_length: u32,
    /// Free text.
    pub description: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Actor.
    pub created_by: String,
}

/// An alias and what it points to.
#[derive(Debug, Clone, PartialEq)]
pub struct Alias {
    /// Its model.
    pub model_name: String,
    /// Alias name.
    pub alias: String,
    /// Version it points to.
    pub version: u32,
    /// That version's digest.
    pub digest: String,
    /// Last move.
    pub updated_at: DateTime<Utc>,
    /// Who moved it last.
    pub updated_by: String,
}

/// One alias move in the audit history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AliasEvent {
    /// Increasing sequence number.
    pub sequence: u64,
    /// Its model.
    pub model_name: String,
    /// Alias name.
    pub alias: String,
    /// Version before the move (None: created).
    pub from_version: Option<u32>,
    /// Version after the move (None: deleted).
    pub to_version: Option<u32>,
    /// Who moved it.
    pub actor: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// Formats a version may have.
pub const FORMATS: &[&str] = &["hf-safetensors", "peft-lora", "q8_0", "gguf"];
