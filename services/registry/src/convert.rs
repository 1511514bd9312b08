//! Conversions between proto messages and domain types, at the edge of the service:
//! timestamps, JSON ↔ `google.protobuf.Struct`, formats, statuses and page tokens.

use std::collections::{BTreeMap, HashMap};

use base64::Engine;
use chrono::{DateTime, Utc};
use lmforge_proto::v1 as pb;

use crate::domain::{Alias, AliasEvent, FileEntry, Model, Version, VersionPin, VersionStatus};
use crate::error::{RegistryError, Result};

/// Default and maximum page sizes of list calls.
pub const DEFAULT_PAGE_SIZE: i64 = 50;
const MAX_PAGE_SIZE: i64 = 1000;

/// (limit, offset) from a request's page size and token.
pub fn page(page_size: i32, page_token: &str) -> Result<(i64, i64)> {
    if page_size < 0 {
        return Err(RegistryError::invalid("page_size", "must be >= 0"));
    }
    let limit = if page_size == 0 {
        DEFAULT_PAGE_SIZE
    } else {
        i64::from(page_size).min(MAX_PAGE_SIZE)
    };
    if page_token.is_empty() {
        return Ok((limit, 0));
    }
    let invalid = || RegistryError::invalid("page_token", "not a token from a previous response");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(page_token)
        .map_err(|_| invalid())?;
    let text = String::from_utf8(bytes).map_err(|_| invalid())?;
    let offset: i64 = text
        .strip_prefix("o:")
        .and_then(|n| n.parse().ok())
        .filter(|n| *n >= 0)
        .ok_or_else(invalid)?;
    Ok((limit, offset))
}

/// The token of the page after (limit, offset), empty when there is none.
pub fn next_token(more: bool, limit: i64, offset: i64) -> String {
    if more {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("o:{}", offset + limit))
    } else {
        String::new()
    }
}

/// A chrono time as a protobuf timestamp.
pub fn timestamp(time: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: time.timestamp(),
        nanos: time.timestamp_subsec_nanos() as i32,
    }
}

pub use lmforge_proto::json::{json_to_struct, struct_to_json};

/// Proto format enum → stored name; `field` names it in errors.
pub fn format_name(field: &'static str, format: i32) -> Result<&'static str> {
    match pb::ModelFormat::try_from(format) {
        Ok(pb::ModelFormat::HfSafetensors) => Ok("hf-safetensors"),
        Ok(pb::ModelFormat::PeftLora) => Ok("peft-lora"),
        Ok(pb::ModelFormat::Q80) => Ok("q8_0"),
        Ok(pb::ModelFormat::Gguf) => Ok("gguf"),
        Ok(pb::ModelFormat::Unspecified) => Err(RegistryError::invalid(
            field,
            "required: HF_SAFETENSORS, PEFT_LORA, Q8_0 or GGUF",
        )),
        Err(_) => Err(RegistryError::invalid(
            field,
            format!("unknown format {format}"),
        )),
    }
}

fn format_enum(name: &str) -> pb::ModelFormat {
    match name {
        "hf-safetensors" => pb::ModelFormat::HfSafetensors,
        "peft-lora" => pb::ModelFormat::PeftLora,
        "q8_0" => pb::ModelFormat::Q80,
        "gguf" => pb::ModelFormat::Gguf,
        _ => pb::ModelFormat::Unspecified,
    }
}

/// Proto status → domain status (Unspecified → None).
pub fn status(field: &'static str, value: i32) -> Result<Option<VersionStatus>> {
    match pb::ModelVersionStatus::try_from(value) {
        Ok(pb::ModelVersionStatus::Unspecified) => Ok(None),
        Ok(pb::ModelVersionStatus::Pending) => Ok(Some(VersionStatus::Pending)),
        Ok(pb::ModelVersionStatus::Ready) => Ok(Some(VersionStatus::Ready)),
        Ok(pb::ModelVersionStatus::Failed) => Ok(Some(VersionStatus::Failed)),
        Err(_) => Err(RegistryError::invalid(
            field,
            format!("unknown status {value}"),
        )),
    }
}

/// A request's list of statuses (empty → any); `field` names it in errors.
pub fn statuses(field: &'static str, values: Vec<i32>) -> Result<Vec<VersionStatus>> {
    let mut wanted = Vec::new();
    for value in values {
        wanted.extend(status(field, value)?);
    }
    Ok(wanted)
}

/// Domain versions → proto, for list and search answers.
pub fn versions(
    versions: Vec<Version>,
    store: &lmforge_store::ArtifactStore,
) -> Vec<pb::ModelVersion> {
    versions.into_iter().map(|v| version(v, store)).collect()
}

fn status_enum(status: VersionStatus) -> pb::ModelVersionStatus {
    match status {
        VersionStatus::Pending => pb::ModelVersionStatus::Pending,
        VersionStatus::Ready => pb::ModelVersionStatus::Ready,
        VersionStatus::Failed => pb::ModelVersionStatus::Failed,
    }
}

fn hash_map<V: Clone>(map: &BTreeMap<String, V>) -> HashMap<String, V> {
    map.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn pin(pin: &Option<VersionPin>) -> Option<pb::ResolvedModel> {
    pin.as_ref().map(|p| pb::ResolvedModel {
        name: p.name.clone(),
        version: p.version,
        digest: p.digest.clone(),
        requested_ref: String::new(),
    })
}

/// Domain model → proto.
pub fn model(model: Model) -> pb::RegisteredModel {
    pb::RegisteredModel {
        id: model.id.to_string(),
        name: model.name,
        description: model.description,
        tags: hash_map(&model.tags),
        latest_version: model.latest_version,
        version_count: model.version_count,
        aliases: hash_map(&model.aliases),
        created_at: Some(timestamp(model.created_at)),
        updated_at: Some(timestamp(model.updated_at)),
    }
}

/// Domain file → proto.
pub fn file(file: FileEntry) -> pb::ArtifactFile {
    pb::ArtifactFile {
        path: file.path,
        size_bytes: file.size_bytes,
        sha256: file.sha256,
        content_type: file.content_type,
    }
}

/// Domain version → proto; `store` gives the artifact URI.
pub fn version(version: Version, store: &lmforge_store::ArtifactStore) -> pb::ModelVersion {
    let total_size_bytes = version.total_size();
    pb::ModelVersion {
        id: version.id.to_string(),
        model_name: version.model_name.clone(),
        version: version.version,
        status: status_enum(version.status) as i32,
        status_message: version.status_message,
        format: format_enum(&version.format) as i32,
        digest: version.digest,
        files: version.files.into_iter().map(file).collect(),
        total_size_bytes,
        lineage: Some(pb::Lineage {
            base_model_version: pin(&version.lineage.base_model),
            dataset_version_id: version.lineage.dataset_version_id,
            training_job_id: version.lineage.training_job_id,
            parent_version: pin(&version.lineage.parent_version),
        }),
        hyperparameters: Some(json_to_struct(&version.hyperparameters)),
        metrics: hash_map(&version.metrics),
        chat_template: version.chat_template,
        architecture: version.architecture,
        context_length: version.context_length,
        parameter_count: version.parameter_count,
        description: version.description,
        tags: hash_map(&version.tags),
        aliases: version.aliases,
        created_by: version.created_by,
        created_at: Some(timestamp(version.created_at)),
        finalized_at: version.finalized_at.map(timestamp),
        updated_at: Some(timestamp(version.updated_at)),
        artifact_uri: format!("{}/{}", store.url().trim_end_matches('/'), "blobs/sha256"),
    }
}

/// Domain alias → proto.
pub fn alias(alias: Alias) -> pb::ModelAlias {
    pb::ModelAlias {
        model_name: alias.model_name,
        alias: alias.alias,
        version: alias.version,
        digest: alias.digest,
        updated_at: Some(timestamp(alias.updated_at)),
        updated_by: alias.updated_by,
    }
}

/// Domain alias event → proto.
pub fn event(event: AliasEvent) -> pb::AliasEvent {
    pb::AliasEvent {
        sequence: event.sequence,
        model_name: event.model_name,
        alias: event.alias,
        from_version: event.from_version,
        to_version: event.to_version,
        actor: event.actor,
        reason: event.reason,
        time: Some(timestamp(event.at)),
    }
}

/// Proto tag map → sorted map.
pub fn tags(map: HashMap<String, String>) -> BTreeMap<String, String> {
    map.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_reject_garbage() {
        assert_eq!(page(0, "").ok(), Some((DEFAULT_PAGE_SIZE, 0)));
        assert_eq!(page(5000, "").ok(), Some((1000, 0)));
        let token = next_token(true, 10, 20);
        assert_eq!(page(10, &token).ok(), Some((10, 30)));
        assert_eq!(next_token(false, 10, 20), "");
        assert!(page(10, "garbage!").is_err());
        assert!(page(-1, "").is_err());
    }
}
