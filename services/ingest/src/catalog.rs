//! Datasets and versions in Postgres (schema `ingest`). A version is inserted READY, with
//! its splits, shards and report, in one transaction after its shards are stored.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use lmforge_proto::v1 as pb;
use prost::Message;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::error::{IngestError, Result};

/// One stored shard.
#[derive(Debug, Clone)]
pub struct ShardRow {
    /// Split value.
    pub split: i32,
    /// sha256 of the compressed blob.
    pub sha256: String,
    /// Records.
    pub records: u64,
    /// Uncompressed size.
    pub raw_size: u64,
}

/// Everything a new version is made of.
#[derive(Debug)]
pub struct NewVersion {
    /// Dataset name (created when missing).
    pub dataset_name: String,
    /// Description (also the dataset's when it is created).
    pub description: String,
    /// Tags merged into the dataset's.
    pub tags: HashMap<String, String>,
    /// Idempotency key.
    pub client_request_id: Option<String>,
    /// Content digest.
    pub digest: String,
    /// Format used.
    pub format: i32,
    /// Config as applied.
    pub config: pb::IngestConfig,
    /// Total records.
    pub records: u64,
    /// File name or URI.
    pub source: String,
    /// Raw input blob.
    pub source_sha256: String,
    /// Raw input size.
    pub source_size: u64,
    /// Splits.
    pub splits: Vec<pb::SplitInfo>,
    /// Shards.
    pub shards: Vec<ShardRow>,
    /// Report.
    pub report: pb::DatasetReport,
    /// Pipeline start.
    pub started_at: DateTime<Utc>,
}

/// A version row.
#[derive(Debug, Clone)]
pub struct VersionRow {
    /// Version id.
    pub id: Uuid,
    /// Dataset name.
    pub dataset_name: String,
    /// As proto, without splits.
    pub version: pb::DatasetVersion,
    report: Vec<u8>,
}

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

const DATASET_COLUMNS: &str = "d.id, d.name, d.description, d.tags, d.created_at, d.updated_at, \
     (SELECT COALESCE(MAX(v.version), 0) FROM versions v WHERE v.dataset_id = d.id) AS latest, \
     (SELECT COUNT(*) FROM versions v WHERE v.dataset_id = d.id) AS version_count";

fn dataset_of(row: &sqlx::postgres::PgRow) -> pb::Dataset {
    let tags: serde_json::Value = row.get("tags");
    pb::Dataset {
        id: row.get::<Uuid, _>("id").to_string(),
        name: row.get("name"),
        description: row.get("description"),
        tags: serde_json::from_value(tags).unwrap_or_default(),
        latest_version: row.get::<i32, _>("latest") as u32,
        version_count: row.get::<i64, _>("version_count") as u32,
        created_at: Some(ts(row.get("created_at"))),
        updated_at: Some(ts(row.get("updated_at"))),
    }
}

const VERSION_COLUMNS: &str = "v.id, d.name AS dataset_name, v.version, v.status, v.digest, v.format, v.config, \
     v.record_count, v.source, v.source_sha256, v.source_size_bytes, v.description, v.created_at, \
     v.completed_at, v.report";

fn version_of(row: &sqlx::postgres::PgRow, artifact_uri: &str) -> VersionRow {
    let status = match row.get::<String, _>("status").as_str() {
        "ready" => pb::DatasetVersionStatus::Ready,
        "failed" => pb::DatasetVersionStatus::Failed,
        _ => pb::DatasetVersionStatus::Processing,
    };
    let config: Vec<u8> = row.get("config");
    let id: Uuid = row.get("id");
    let dataset_name: String = row.get("dataset_name");
    VersionRow {
        id,
        dataset_name: dataset_name.clone(),
        version: pb::DatasetVersion {
            id: id.to_string(),
            dataset_name,
            version: row.get::<i32, _>("version") as u32,
            digest: row.get("digest"),
            status: status as i32,
            failure: None,
            format: row.get("format"),
            config: pb::IngestConfig::decode(config.as_slice()).ok(),
            splits: Vec::new(),
            record_count: row.get::<i64, _>("record_count") as u64,
            source: row.get("source"),
            source_sha256: row.get("source_sha256"),
            source_size_bytes: row.get::<i64, _>("source_size_bytes") as u64,
            description: row.get("description"),
            created_at: Some(ts(row.get("created_at"))),
            completed_at: row.get::<Option<DateTime<Utc>>, _>("completed_at").map(ts),
            artifact_uri: artifact_uri.to_owned(),
        },
        report: row.get("report"),
    }
}

/// Stores a new version (or finds the one it repeats). Returns the dataset, the version and
/// whether an existing version was returned.
pub async fn commit_version(
    pool: &PgPool,
    new: NewVersion,
    artifact_uri: &str,
) -> Result<(pb::Dataset, VersionRow, bool)> {
    let mut tx = pool.begin().await?;
    let tags_json = serde_json::to_value(&new.tags).expect("string maps serialize");
    sqlx::query(
        "INSERT INTO datasets (id, name, description, tags) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(Uuid::new_v4())
    .bind(&new.dataset_name)
    .bind(&new.description)
    .bind(&tags_json)
    .execute(&mut *tx)
    .await?;
    let (dataset_id, next): (Uuid, i32) =
        sqlx::query_as("SELECT id, next_version FROM datasets WHERE name = $1 FOR UPDATE")
            .bind(&new.dataset_name)
            .fetch_one(&mut *tx)
            .await?;
    let existing: Option<Uuid> = match &new.client_request_id {
        Some(key) => {
            sqlx::query_scalar(
                "SELECT id FROM versions WHERE dataset_id = $1 AND client_request_id = $2",
            )
            .bind(dataset_id)
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?
        }
        None => None,
    };
    let existing = match existing {
        Some(id) => Some(id),
        None => sqlx::query_scalar("SELECT id FROM versions WHERE dataset_id = $1 AND digest = $2 AND status = 'ready' ORDER BY version LIMIT 1")
            .bind(dataset_id)
            .bind(&new.digest)
            .fetch_optional(&mut *tx)
            .await?,
    };
    let (version_id, reused) = match existing {
        Some(id) => (id, true),
        None => {
            let id = Uuid::new_v4();
            let report = new.report.encode_to_vec();
            sqlx::query(
                "INSERT INTO versions (id, dataset_id, version, status, digest, format, config, record_count, \
                 source, source_sha256, source_size_bytes, description, client_request_id, report, created_at, completed_at) \
                 VALUES ($1, $2, $3, 'ready', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, now())",
            )
            .bind(id)
            .bind(dataset_id)
            .bind(next)
            .bind(&new.digest)
            .bind(new.format)
            .bind(new.config.encode_to_vec())
            .bind(new.records as i64)
            .bind(&new.source)
            .bind(&new.source_sha256)
            .bind(new.source_size as i64)
            .bind(&new.description)
            .bind(&new.client_request_id)
            .bind(report)
            .bind(new.started_at)
            .execute(&mut *tx)
            .await?;
            for s in &new.splits {
                sqlx::query("INSERT INTO version_splits (version_id, split, record_count, size_bytes, sha256, token_count) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(id)
                    .bind(s.split)
                    .bind(s.record_count as i64)
                    .bind(s.size_bytes as i64)
                    .bind(&s.sha256)
                    .bind(s.token_count as i64)
                    .execute(&mut *tx)
                    .await?;
            }
            let mut index: HashMap<i32, i32> = HashMap::new();
            for shard in &new.shards {
                let idx = index.entry(shard.split).or_default();
                sqlx::query("INSERT INTO version_shards (version_id, split, idx, sha256, record_count, raw_size) VALUES ($1, $2, $3, $4, $5, $6)")
                    .bind(id)
                    .bind(shard.split)
                    .bind(*idx)
                    .bind(&shard.sha256)
                    .bind(shard.records as i64)
                    .bind(shard.raw_size as i64)
                    .execute(&mut *tx)
                    .await?;
                *idx += 1;
            }
            sqlx::query(
                "UPDATE datasets SET next_version = next_version + 1, updated_at = now(), tags = tags || $2 WHERE id = $1",
            )
            .bind(dataset_id)
            .bind(&tags_json)
            .execute(&mut *tx)
            .await?;
            (id, false)
        }
    };
    tx.commit().await?;
    let dataset = get_dataset(pool, &new.dataset_name).await?;
    let version = version_by_id(pool, version_id, artifact_uri).await?;
    Ok((dataset, version, reused))
}

/// A dataset by name or id.
pub async fn get_dataset(pool: &PgPool, name: &str) -> Result<pb::Dataset> {
    let by_id = Uuid::parse_str(name).ok();
    let row = sqlx::query(&format!(
        "SELECT {DATASET_COLUMNS} FROM datasets d WHERE d.name = $1 OR d.id = $2"
    ))
    .bind(name)
    .bind(by_id)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| IngestError::NotFound(format!("dataset `{name}`")))?;
    Ok(dataset_of(&row))
}

/// A page of datasets ordered by name; the token is the offset.
pub async fn list_datasets(
    pool: &PgPool,
    prefix: &str,
    tags: &HashMap<String, String>,
    limit: i64,
    offset: i64,
) -> Result<(Vec<pb::Dataset>, bool)> {
    let tags_json = serde_json::to_value(tags).expect("string maps serialize");
    let pattern = format!(
        "{}%",
        prefix
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_")
    );
    let rows = sqlx::query(&format!(
        "SELECT {DATASET_COLUMNS} FROM datasets d WHERE d.name LIKE $1 AND d.tags @> $2 ORDER BY d.name LIMIT $3 OFFSET $4"
    ))
    .bind(pattern)
    .bind(tags_json)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    Ok((
        rows.iter().take(limit as usize).map(dataset_of).collect(),
        more,
    ))
}

async fn version_by_id(pool: &PgPool, id: Uuid, artifact_uri: &str) -> Result<VersionRow> {
    let row = sqlx::query(&format!("SELECT {VERSION_COLUMNS} FROM versions v JOIN datasets d ON d.id = v.dataset_id WHERE v.id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .ok_or_else(|| IngestError::NotFound(format!("dataset version `{id}`")))?;
    let mut v = version_of(&row, artifact_uri);
    v.version.splits = splits(pool, id).await?;
    Ok(v)
}

/// Resolves `name/3`, `name@latest`, `name` or a version id (`field` names the request field).
pub async fn resolve_version(
    pool: &PgPool,
    reference: &str,
    field: &str,
    artifact_uri: &str,
) -> Result<VersionRow> {
    let reference = reference.trim();
    if reference.is_empty() {
        return Err(IngestError::invalid(field, "required"));
    }
    if let Ok(id) = Uuid::parse_str(reference) {
        return version_by_id(pool, id, artifact_uri).await;
    }
    let (name, number) = if let Some((name, n)) = reference.rsplit_once('/') {
        let n: i32 = n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
            IngestError::invalid(
                field,
                format!("`{reference}`: the version after `/` must be a positive number"),
            )
        })?;
        (name, Some(n))
    } else if let Some((name, alias)) = reference.rsplit_once('@') {
        if alias != "latest" {
            return Err(IngestError::invalid(
                field,
                format!("`{reference}`: only `@latest` is known"),
            ));
        }
        (name, None)
    } else {
        (reference, None)
    };
    crate::settings::check_name(field, name)?;
    let row = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN datasets d ON d.id = v.dataset_id \
         WHERE d.name = $1 AND ($2::int IS NULL OR v.version = $2) AND ($2::int IS NOT NULL OR v.status = 'ready') \
         ORDER BY v.version DESC LIMIT 1"
    ))
    .bind(name)
    .bind(number)
    .fetch_optional(pool)
    .await?
    .ok_or_else(|| IngestError::NotFound(format!("dataset version `{reference}`")))?;
    let mut v = version_of(&row, artifact_uri);
    v.version.splits = splits(pool, v.id).await?;
    Ok(v)
}

/// Versions of a dataset, newest first.
pub async fn list_versions(
    pool: &PgPool,
    dataset: &str,
    statuses: &[String],
    limit: i64,
    offset: i64,
    artifact_uri: &str,
) -> Result<(Vec<pb::DatasetVersion>, bool)> {
    get_dataset(pool, dataset).await?;
    let rows = sqlx::query(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN datasets d ON d.id = v.dataset_id \
         WHERE d.name = $1 AND (cardinality($2::text[]) = 0 OR v.status = ANY($2)) ORDER BY v.version DESC LIMIT $3 OFFSET $4"
    ))
    .bind(dataset)
    .bind(statuses)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let more = rows.len() as i64 > limit;
    let mut out = Vec::new();
    for row in rows.iter().take(limit as usize) {
        let mut v = version_of(row, artifact_uri);
        v.version.splits = splits(pool, v.id).await?;
        out.push(v.version);
    }
    Ok((out, more))
}

/// Split infos of a version, train, eval, test.
pub async fn splits(pool: &PgPool, version_id: Uuid) -> Result<Vec<pb::SplitInfo>> {
    let rows = sqlx::query("SELECT split, record_count, size_bytes, sha256, token_count FROM version_splits WHERE version_id = $1 ORDER BY split")
        .bind(version_id)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| pb::SplitInfo {
            split: r.get("split"),
            record_count: r.get::<i64, _>("record_count") as u64,
            size_bytes: r.get::<i64, _>("size_bytes") as u64,
            sha256: r.get("sha256"),
            token_count: r.get::<i64, _>("token_count") as u64,
        })
        .collect())
}

/// Shards of a version's split, in order.
pub async fn shards(pool: &PgPool, version_id: Uuid, split: i32) -> Result<Vec<ShardRow>> {
    let rows = sqlx::query("SELECT split, sha256, record_count, raw_size FROM version_shards WHERE version_id = $1 AND split = $2 ORDER BY idx")
        .bind(version_id)
        .bind(split)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .iter()
        .map(|r| ShardRow {
            split: r.get("split"),
            sha256: r.get("sha256"),
            records: r.get::<i64, _>("record_count") as u64,
            raw_size: r.get::<i64, _>("raw_size") as u64,
        })
        .collect())
}

/// The stored report of a version, with its ids filled in.
pub fn report(version: &VersionRow) -> Result<pb::DatasetReport> {
    let mut report = pb::DatasetReport::decode(version.report.as_slice())
        .map_err(|e| IngestError::Storage(format!("corrupt report of {}: {e}", version.id)))?;
    report.dataset_version_id = version.version.id.clone();
    report.dataset_name = version.dataset_name.clone();
    report.version = version.version.version;
    report.format = version.version.format;
    report.created_at = version.version.completed_at;
    Ok(report)
}

/// Deletes a dataset; returns the shard blobs no other version references any more. Raw
/// uploads are left in the store: its blobs may be shared with other services (same bytes,
/// same address), and only shards are certainly ingest's own.
pub async fn delete_dataset(pool: &PgPool, name: &str) -> Result<Vec<String>> {
    let mut tx = pool.begin().await?;
    let id: Uuid = sqlx::query_scalar("SELECT id FROM datasets WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| IngestError::NotFound(format!("dataset `{name}`")))?;
    let blobs: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT s.sha256 FROM version_shards s JOIN versions v ON v.id = s.version_id WHERE v.dataset_id = $1",
    )
    .bind(id)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM datasets WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    let still_used: Vec<String> =
        sqlx::query_scalar("SELECT DISTINCT sha256 FROM version_shards WHERE sha256 = ANY($1)")
            .bind(&blobs)
            .fetch_all(&mut *tx)
            .await?;
    tx.commit().await?;
    Ok(blobs
        .into_iter()
        .filter(|b| !still_used.contains(b))
        .collect())
}
