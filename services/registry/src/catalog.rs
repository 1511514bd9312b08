//! Models and versions in Postgres: creation with gapless numbering, idempotent
//! registration, files, finalization, lookup and reference resolution.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

use crate::domain::{FileEntry, Lineage, Model, NewVersion, Version, VersionPin, VersionStatus};
use crate::error::{RegistryError, Result};
use crate::names::{ModelRef, parse_model_ref};

#[derive(sqlx::FromRow)]
struct ModelRow {
    id: Uuid,
    name: String,
    description: String,
    tags: sqlx::types::Json<BTreeMap<String, String>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    latest_version: Option<i32>,
    version_count: i64,
    aliases: sqlx::types::Json<BTreeMap<String, i32>>,
}

/// A model row with its counts and aliases, in one round trip (no query per listed model).
const MODEL_COLUMNS: &str = "m.id, m.name, m.description, m.tags, m.created_at, m.updated_at, \
    (SELECT max(v.version) FROM versions v WHERE v.model_id = m.id AND v.status = 'ready') \
        AS latest_version, \
    (SELECT count(*) FROM versions v WHERE v.model_id = m.id) AS version_count, \
    COALESCE((SELECT json_object_agg(a.alias, v.version) FROM aliases a \
        JOIN versions v ON v.id = a.version_id WHERE a.model_id = m.id), '{}'::json) AS aliases";

/// Splits the `limit + 1` rows a page query fetched into the page and whether more follow.
pub(crate) fn split_page<T>(mut rows: Vec<T>, limit: i64) -> (Vec<T>, bool) {
    let more = rows.len() as i64 > limit;
    rows.truncate(limit.max(0) as usize);
    (rows, more)
}

#[derive(sqlx::FromRow)]
struct VersionRow {
    id: Uuid,
    model_name: String,
    version: i32,
    status: String,
    status_message: String,
    format: String,
    digest: String,
    lineage: sqlx::types::Json<Lineage>,
    hyperparameters: sqlx::types::Json<serde_json::Value>,
    metrics: sqlx::types::Json<BTreeMap<String, f64>>,
    chat_template: String,
    architecture: String,
    context_length: i32,
    parameter_count: i64,
    description: String,
    tags: sqlx::types::Json<BTreeMap<String, String>>,
    created_by: String,
    created_at: DateTime<Utc>,
    finalized_at: Option<DateTime<Utc>>,
    updated_at: DateTime<Utc>,
    files: sqlx::types::Json<Vec<FileRow>>,
    aliases: Vec<String>,
}

#[derive(serde::Deserialize)]
struct FileRow {
    path: String,
    size_bytes: i64,
    sha256: String,
    content_type: String,
}

/// A version row with its files and aliases, in one round trip (resolution is the hot path).
const VERSION_COLUMNS: &str = "v.id, m.name AS model_name, v.version, v.status, v.status_message, \
    v.format, v.digest, v.lineage, v.hyperparameters, v.metrics, v.chat_template, v.architecture, \
    v.context_length, v.parameter_count, v.description, v.tags, v.created_by, v.created_at, \
    v.finalized_at, v.updated_at, \
    COALESCE((SELECT json_agg(json_build_object('path', f.path, 'size_bytes', f.size_bytes, \
        'sha256', f.sha256, 'content_type', f.content_type) ORDER BY f.path) \
        FROM version_files f WHERE f.version_id = v.id), '[]'::json) AS files, \
    ARRAY(SELECT a.alias FROM aliases a WHERE a.version_id = v.id ORDER BY a.alias) AS aliases";

fn model_not_found(name: &str) -> RegistryError {
    RegistryError::NotFound(format!("model `{name}`"))
}

fn version_not_found(name: &str, version: u32) -> RegistryError {
    RegistryError::NotFound(format!("version `{name}/{version}`"))
}

fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// Creates a model; ALREADY_EXISTS when the name is taken.
pub async fn create_model(
    pool: &PgPool,
    name: &str,
    description: &str,
    tags: &BTreeMap<String, String>,
) -> Result<Model> {
    let inserted =
        sqlx::query("INSERT INTO models (id, name, description, tags) VALUES ($1, $2, $3, $4)")
            .bind(Uuid::new_v4())
            .bind(name)
            .bind(description)
            .bind(sqlx::types::Json(tags))
            .execute(pool)
            .await;
    match inserted {
        Ok(_) => get_model(pool, name).await,
        Err(error) if is_unique_violation(&error) => {
            Err(RegistryError::AlreadyExists(format!("model `{name}`")))
        }
        Err(error) => Err(error.into()),
    }
}

/// One model with its counts and aliases.
pub async fn get_model(pool: &PgPool, name: &str) -> Result<Model> {
    let row: Option<ModelRow> = sqlx::query_as(&format!(
        "SELECT {MODEL_COLUMNS} FROM models m WHERE m.name = $1"
    ))
    .bind(name)
    .fetch_optional(pool)
    .await?;
    row.map(model_from_row).ok_or_else(|| model_not_found(name))
}

fn model_from_row(row: ModelRow) -> Model {
    Model {
        id: row.id,
        name: row.name,
        description: row.description,
        tags: row.tags.0,
        latest_version: row.latest_version.unwrap_or(0).max(0) as u32,
        version_count: row.version_count.max(0) as u32,
        aliases: row
            .aliases
            .0
            .into_iter()
            .map(|(alias, version)| (alias, version.max(0) as u32))
            .collect(),
        created_at: row.created_at,
        updated_at: row.updated_at,
    }
}

/// A page of models matching filter clauses (name, description, tags), in `order`
/// (`name`, `created_at` or `updated_at`, ascending unless `descending`).
pub async fn list_models(
    pool: &PgPool,
    clauses: &[crate::search::Clause],
    order: (&str, bool),
    limit: i64,
    offset: i64,
) -> Result<(Vec<Model>, bool)> {
    use crate::search::{Key, Value};
    let mut query = sqlx::QueryBuilder::<Postgres>::new(format!(
        "SELECT {MODEL_COLUMNS} FROM models m WHERE TRUE"
    ));
    for clause in clauses {
        query.push(" AND ");
        match &clause.key {
            Key::Tag(tag) => {
                query.push("(m.tags->>");
                query.push_bind(tag.clone());
                query.push(")");
            }
            Key::Text("v.description") => {
                query.push("m.description");
            }
            // `check_model_keys` lets only these through; the name column is fixed text.
            _ => {
                query.push("m.name");
            }
        }
        query.push(" ");
        query.push(clause.op.sql());
        query.push(" ");
        let texts: Vec<String> = match &clause.value {
            Value::Text(text) => vec![text.clone()],
            Value::List(items) => items
                .iter()
                .filter_map(|v| match v {
                    Value::Text(t) => Some(t.clone()),
                    _ => None,
                })
                .collect(),
            Value::Number(n) => vec![n.to_string()],
        };
        if matches!(clause.value, Value::List(_)) {
            query.push("(");
            for (index, text) in texts.into_iter().enumerate() {
                if index > 0 {
                    query.push(", ");
                }
                query.push_bind(text);
            }
            query.push(")");
        } else if let Some(text) = texts.into_iter().next() {
            query.push_bind(text);
        }
    }
    // The column comes from a fixed list, never from the request text.
    let column = match order.0 {
        "created_at" => "m.created_at",
        "updated_at" => "m.updated_at",
        _ => "m.name",
    };
    query.push(format!(
        " ORDER BY {column} {}, m.name LIMIT ",
        if order.1 { "DESC" } else { "ASC" }
    ));
    query.push_bind(limit + 1);
    query.push(" OFFSET ");
    query.push_bind(offset);
    let rows: Vec<ModelRow> = query.build_query_as().fetch_all(pool).await?;
    let (rows, more) = split_page(rows, limit);
    Ok((rows.into_iter().map(model_from_row).collect(), more))
}

/// Changes a model's description and tags.
pub async fn update_model(
    pool: &PgPool,
    name: &str,
    description: Option<&str>,
    set_tags: &BTreeMap<String, String>,
    delete_tags: &[String],
) -> Result<Model> {
    let mut tx = pool.begin().await?;
    let row: Option<(Uuid, sqlx::types::Json<BTreeMap<String, String>>)> =
        sqlx::query_as("SELECT id, tags FROM models WHERE name = $1 FOR UPDATE")
            .bind(name)
            .fetch_optional(&mut *tx)
            .await?;
    let (id, mut tags) = row.ok_or_else(|| model_not_found(name))?;
    for key in delete_tags {
        tags.0.remove(key);
    }
    tags.0.extend(set_tags.clone());
    sqlx::query(
        "UPDATE models SET description = COALESCE($2, description), tags = $3, updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(description)
    .bind(tags)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    get_model(pool, name).await
}

/// Deletes a model and its versions; refused while an alias points into it.
pub async fn delete_model(pool: &PgPool, name: &str) -> Result<()> {
    let mut tx = pool.begin().await?;
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM models WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    let id = id.ok_or_else(|| model_not_found(name))?;
    let aliases: Vec<String> =
        sqlx::query_scalar("SELECT alias FROM aliases WHERE model_id = $1 ORDER BY alias")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    if !aliases.is_empty() {
        return Err(RegistryError::FailedPrecondition(format!(
            "model `{name}` still has aliases ({}); delete them first",
            aliases.join(", ")
        )));
    }
    sqlx::query("DELETE FROM models WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

fn request_digest(request: &NewVersion) -> String {
    let canonical = serde_json::to_vec(request).expect("plain data always serializes");
    hex::encode(Sha256::digest(canonical))
}

/// Resolves a lineage reference to a pinned READY version.
async fn pin(pool: &PgPool, field: &'static str, reference: &str) -> Result<VersionPin> {
    let parsed = parse_model_ref(field, reference)?;
    let (version, _) = resolve(pool, &parsed).await.map_err(|error| match error {
        RegistryError::NotFound(what) => RegistryError::NotFound(format!("{field}: {what}")),
        other => other,
    })?;
    Ok(VersionPin {
        name: version.model_name,
        version: version.version,
        digest: version.digest,
    })
}

/// Creates a PENDING version numbered right after the model's last one. A repeated
/// `client_request_id` returns the version it created, or ALREADY_EXISTS when the retry
/// asks for something different.
pub async fn create_version(pool: &PgPool, request: &NewVersion) -> Result<Version> {
    let base_model = match &request.base_model_ref {
        Some(reference) => Some(pin(pool, "lineage.base_model_version", reference).await?),
        None => None,
    };
    let parent_version = match &request.parent_ref {
        Some(reference) => Some(pin(pool, "lineage.parent_version", reference).await?),
        None => None,
    };
    let lineage = Lineage {
        base_model,
        dataset_version_id: request.dataset_version_id.clone(),
        training_job_id: request.training_job_id.clone(),
        parent_version,
    };
    let digest = request_digest(request);
    let mut tx = pool.begin().await?;
    let model_id = lock_model(
        &mut tx,
        &request.model_name,
        request.create_model_if_missing,
    )
    .await?;

    if !request.client_request_id.is_empty() {
        let existing: Option<(i32, Option<String>)> = sqlx::query_as(
            "SELECT version, request_digest FROM versions WHERE model_id = $1 AND client_request_id = $2",
        )
        .bind(model_id)
        .bind(&request.client_request_id)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some((version, previous)) = existing {
            tx.rollback().await?;
            if previous.as_deref() != Some(digest.as_str()) {
                return Err(RegistryError::AlreadyExists(format!(
                    "client_request_id `{}` was used for a different request (version {version})",
                    request.client_request_id
                )));
            }
            return get_version(pool, &request.model_name, version as u32).await;
        }
    }

    let number: i32 = sqlx::query_scalar(
        "UPDATE models SET next_version = next_version + 1 WHERE id = $1 RETURNING next_version - 1",
    )
    .bind(model_id)
    .fetch_one(&mut *tx)
    .await?;
    let client_request_id =
        (!request.client_request_id.is_empty()).then_some(request.client_request_id.as_str());
    sqlx::query(
        "INSERT INTO versions (id, model_id, version, status, format, lineage, hyperparameters, \
         metrics, chat_template, architecture, context_length, description, tags, created_by, \
         client_request_id, request_digest) \
         VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)",
    )
    .bind(Uuid::new_v4())
    .bind(model_id)
    .bind(number)
    .bind(&request.format)
    .bind(sqlx::types::Json(&lineage))
    .bind(sqlx::types::Json(&request.hyperparameters))
    .bind(sqlx::types::Json(&request.metrics))
    .bind(&request.chat_template)
    .bind(&request.architecture)
    .bind(request.context_length as i32)
    .bind(&request.description)
    .bind(sqlx::types::Json(&request.tags))
    .bind(&request.created_by)
    .bind(client_request_id)
    .bind(&digest)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    get_version(pool, &request.model_name, number as u32).await
}

/// Locks the model row for the rest of the transaction, creating the model if asked.
async fn lock_model(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    create_if_missing: bool,
) -> Result<Uuid> {
    if create_if_missing {
        sqlx::query("INSERT INTO models (id, name) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING")
            .bind(Uuid::new_v4())
            .bind(name)
            .execute(&mut **tx)
            .await?;
    }
    let id: Option<Uuid> = sqlx::query_scalar("SELECT id FROM models WHERE name = $1 FOR UPDATE")
        .bind(name)
        .fetch_optional(&mut **tx)
        .await?;
    id.ok_or_else(|| model_not_found(name))
}

/// One version with its files and aliases.
pub async fn get_version(pool: &PgPool, name: &str, version: u32) -> Result<Version> {
    let row: Option<VersionRow> = sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id \
         WHERE m.name = $1 AND v.version = $2"
    ))
    .bind(name)
    .bind(version as i32)
    .fetch_optional(pool)
    .await?;
    let row = row.ok_or_else(|| version_not_found(name, version))?;
    Ok(version_from_row(row))
}

fn version_from_row(row: VersionRow) -> Version {
    Version {
        id: row.id,
        model_name: row.model_name,
        version: row.version.max(0) as u32,
        status: VersionStatus::from_db(&row.status),
        status_message: row.status_message,
        format: row.format,
        digest: row.digest,
        files: row
            .files
            .0
            .into_iter()
            .map(|f| FileEntry {
                path: f.path,
                size_bytes: f.size_bytes.max(0) as u64,
                sha256: f.sha256,
                content_type: f.content_type,
            })
            .collect(),
        lineage: row.lineage.0,
        hyperparameters: row.hyperparameters.0,
        metrics: row.metrics.0,
        chat_template: row.chat_template,
        architecture: row.architecture,
        context_length: row.context_length.max(0) as u32,
        parameter_count: row.parameter_count.max(0) as u64,
        description: row.description,
        tags: row.tags.0,
        aliases: row.aliases,
        created_by: row.created_by,
        created_at: row.created_at,
        finalized_at: row.finalized_at,
        updated_at: row.updated_at,
    }
}

/// A page of one model's versions, newest first, optionally only in `statuses`.
pub async fn list_versions(
    pool: &PgPool,
    name: &str,
    statuses: &[VersionStatus],
    limit: i64,
    offset: i64,
) -> Result<(Vec<Version>, bool)> {
    get_model(pool, name).await?;
    let statuses: Vec<&str> = statuses.iter().map(|s| s.as_db()).collect();
    let rows: Vec<VersionRow> = sqlx::query_as(&format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id \
         WHERE m.name = $1 AND (cardinality($2::text[]) = 0 OR v.status = ANY($2)) \
         ORDER BY v.version DESC LIMIT $3 OFFSET $4"
    ))
    .bind(name)
    .bind(&statuses)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let (rows, more) = split_page(rows, limit);
    Ok((rows.into_iter().map(version_from_row).collect(), more))
}

/// Locks a version row for the rest of the transaction; returns its id and status.
async fn lock_version(
    tx: &mut Transaction<'_, Postgres>,
    name: &str,
    version: u32,
) -> Result<(Uuid, VersionStatus)> {
    let row: Option<(Uuid, String)> = sqlx::query_as(
        "SELECT v.id, v.status FROM versions v JOIN models m ON m.id = v.model_id \
         WHERE m.name = $1 AND v.version = $2 FOR UPDATE OF v",
    )
    .bind(name)
    .bind(version as i32)
    .fetch_optional(&mut **tx)
    .await?;
    let (id, status) = row.ok_or_else(|| version_not_found(name, version))?;
    Ok((id, VersionStatus::from_db(&status)))
}

/// Records a stored blob as a file of a PENDING version (replacing the same path).
pub async fn add_file(pool: &PgPool, name: &str, version: u32, file: &FileEntry) -> Result<()> {
    let mut tx = pool.begin().await?;
    let (id, status) = lock_version(&mut tx, name, version).await?;
    if status != VersionStatus::Pending {
        return Err(RegistryError::FailedPrecondition(format!(
            "version `{name}/{version}` is {}; files can only be added while PENDING",
            status.as_db().to_uppercase()
        )));
    }
    sqlx::query(
        "INSERT INTO version_files (version_id, path, size_bytes, sha256, content_type) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (version_id, path) DO UPDATE \
         SET size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256, content_type = EXCLUDED.content_type",
    )
    .bind(id)
    .bind(&file.path)
    .bind(file.size_bytes as i64)
    .bind(&file.sha256)
    .bind(&file.content_type)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Moves a PENDING version to READY (digest = sha256 of its manifest) or FAILED.
/// Finalizing a READY version again with success returns it unchanged.
pub async fn finalize(
    pool: &PgPool,
    name: &str,
    version: u32,
    failure: Option<&str>,
    expected_digest: &str,
) -> Result<Version> {
    let mut tx = pool.begin().await?;
    let (id, status) = lock_version(&mut tx, name, version).await?;
    match (status, failure) {
        (VersionStatus::Pending, _) => {}
        (VersionStatus::Ready, None) => {
            tx.rollback().await?;
            return get_version(pool, name, version).await;
        }
        (other, _) => {
            return Err(RegistryError::FailedPrecondition(format!(
                "version `{name}/{version}` is already {}",
                other.as_db().to_uppercase()
            )));
        }
    }
    if let Some(message) = failure {
        sqlx::query(
            "UPDATE versions SET status = 'failed', status_message = $2, finalized_at = now(), updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(message)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return get_version(pool, name, version).await;
    }
    let files: Vec<(String, String, i64)> =
        sqlx::query_as("SELECT path, sha256, size_bytes FROM version_files WHERE version_id = $1")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    if files.is_empty() {
        return Err(RegistryError::FailedPrecondition(format!(
            "version `{name}/{version}` has no files; upload them before finalizing"
        )));
    }
    let digest = lmforge_store::manifest_digest(
        files
            .iter()
            .map(|(path, sha, size)| (path.as_str(), sha.as_str(), size.max(&0).unsigned_abs())),
    );
    if !expected_digest.is_empty() && expected_digest != digest {
        return Err(RegistryError::invalid(
            "expected_digest",
            format!("the uploaded files have digest {digest}, not {expected_digest}"),
        ));
    }
    sqlx::query(
        "UPDATE versions SET status = 'ready', digest = $2, finalized_at = now(), updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(&digest)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    get_version(pool, name, version).await
}

/// Resolves a reference to a READY version (and the alias it went through, if any).
pub async fn resolve(pool: &PgPool, reference: &ModelRef) -> Result<(Version, Option<String>)> {
    match reference {
        ModelRef::Version(name, number) => {
            let version = get_version(pool, name, *number).await?;
            if version.status != VersionStatus::Ready {
                return Err(RegistryError::FailedPrecondition(format!(
                    "version `{name}/{number}` is {}, not READY",
                    version.status.as_db().to_uppercase()
                )));
            }
            Ok((version, None))
        }
        ModelRef::Latest(name) => {
            let number: Option<i32> = sqlx::query_scalar(
                "SELECT max(v.version) FROM versions v JOIN models m ON m.id = v.model_id \
                 WHERE m.name = $1 AND v.status = 'ready'",
            )
            .bind(name)
            .fetch_one(pool)
            .await?;
            match number {
                Some(number) => Ok((get_version(pool, name, number as u32).await?, None)),
                None => {
                    get_model(pool, name).await?;
                    Err(RegistryError::NotFound(format!(
                        "a READY version of `{name}`"
                    )))
                }
            }
        }
        ModelRef::Alias(name, alias) => {
            let row: Option<VersionRow> = sqlx::query_as(&format!(
                "SELECT {VERSION_COLUMNS} FROM aliases al JOIN models m ON m.id = al.model_id \
                 JOIN versions v ON v.id = al.version_id WHERE m.name = $1 AND al.alias = $2"
            ))
            .bind(name)
            .bind(alias)
            .fetch_optional(pool)
            .await?;
            let row =
                row.ok_or_else(|| RegistryError::NotFound(format!("alias `{name}@{alias}`")))?;
            Ok((version_from_row(row), Some(alias.clone())))
        }
    }
}

/// The file `path` of a version.
pub async fn file(pool: &PgPool, name: &str, version: u32, path: &str) -> Result<FileEntry> {
    let found = get_version(pool, name, version).await?;
    found
        .files
        .into_iter()
        .find(|f| f.path == path)
        .ok_or_else(|| RegistryError::NotFound(format!("file `{path}` in `{name}/{version}`")))
}

/// Changes a version's description, tags and metrics; nothing else of a version is mutable.
pub async fn update_version(
    pool: &PgPool,
    name: &str,
    version: u32,
    description: Option<&str>,
    set_tags: &BTreeMap<String, String>,
    delete_tags: &[String],
    set_metrics: &BTreeMap<String, f64>,
) -> Result<Version> {
    let mut tx = pool.begin().await?;
    type Row = (
        Uuid,
        sqlx::types::Json<BTreeMap<String, String>>,
        sqlx::types::Json<BTreeMap<String, f64>>,
    );
    let row: Option<Row> = sqlx::query_as(
        "SELECT v.id, v.tags, v.metrics FROM versions v JOIN models m ON m.id = v.model_id \
         WHERE m.name = $1 AND v.version = $2 FOR UPDATE OF v",
    )
    .bind(name)
    .bind(version as i32)
    .fetch_optional(&mut *tx)
    .await?;
    let (id, mut tags, mut metrics) = row.ok_or_else(|| version_not_found(name, version))?;
    for key in delete_tags {
        tags.0.remove(key);
    }
    tags.0.extend(set_tags.clone());
    metrics.0.extend(set_metrics.clone());
    sqlx::query(
        "UPDATE versions SET description = COALESCE($2, description), tags = $3, metrics = $4, \
         updated_at = now() WHERE id = $1",
    )
    .bind(id)
    .bind(description)
    .bind(tags)
    .bind(metrics)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    get_version(pool, name, version).await
}

/// Deletes a version; refused while an alias points to it or an adapter names it as parent.
pub async fn delete_version(pool: &PgPool, name: &str, version: u32) -> Result<()> {
    let mut tx = pool.begin().await?;
    let (id, _) = lock_version(&mut tx, name, version).await?;
    let aliases: Vec<String> =
        sqlx::query_scalar("SELECT alias FROM aliases WHERE version_id = $1 ORDER BY alias")
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
    if !aliases.is_empty() {
        return Err(RegistryError::FailedPrecondition(format!(
            "alias {} points to `{name}/{version}`; move or delete it first",
            aliases.join(", ")
        )));
    }
    let children: Vec<(String, i32)> = sqlx::query_as(
        "SELECT m.name, v.version FROM versions v JOIN models m ON m.id = v.model_id \
         WHERE v.lineage -> 'parent_version' ->> 'name' = $1 \
         AND (v.lineage -> 'parent_version' ->> 'version')::int = $2 LIMIT 5",
    )
    .bind(name)
    .bind(version as i32)
    .fetch_all(&mut *tx)
    .await?;
    if let Some((child, number)) = children.first() {
        return Err(RegistryError::FailedPrecondition(format!(
            "adapter `{child}/{number}` is built on `{name}/{version}`"
        )));
    }
    sqlx::query("DELETE FROM versions WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Versions across models matching parsed filter clauses, statuses and a creation range.
pub async fn search_versions(
    pool: &PgPool,
    clauses: &[crate::search::Clause],
    statuses: &[VersionStatus],
    created: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    order: &crate::search::Order,
    limit: i64,
    offset: i64,
) -> Result<(Vec<Version>, bool)> {
    use crate::search::{Key, Order, Value};
    let mut query = sqlx::QueryBuilder::<Postgres>::new(format!(
        "SELECT {VERSION_COLUMNS} FROM versions v JOIN models m ON m.id = v.model_id WHERE TRUE"
    ));
    for clause in clauses {
        query.push(" AND ");
        match &clause.key {
            // Fixed expressions chosen by the parser, never user text.
            Key::Text(expression) | Key::Int(expression) => {
                query.push(*expression);
            }
            Key::Tag(tag) => {
                query.push("(v.tags->>");
                query.push_bind(tag.clone());
                query.push(")");
            }
            Key::Metric(metric) => {
                query.push("((v.metrics->>");
                query.push_bind(metric.clone());
                query.push(")::float8)");
            }
        }
        query.push(" ");
        query.push(clause.op.sql());
        query.push(" ");
        let push_one = |query: &mut sqlx::QueryBuilder<Postgres>, value: &Value| match value {
            Value::Number(n) => {
                query.push_bind(*n);
                query.push("::float8");
            }
            Value::Text(text) => {
                query.push_bind(text.clone());
            }
            Value::List(_) => {}
        };
        match &clause.value {
            Value::List(items) => {
                query.push("(");
                for (index, item) in items.iter().enumerate() {
                    if index > 0 {
                        query.push(", ");
                    }
                    push_one(&mut query, item);
                }
                query.push(")");
            }
            single => push_one(&mut query, single),
        }
    }
    if !statuses.is_empty() {
        let names: Vec<&str> = statuses.iter().map(|s| s.as_db()).collect();
        query.push(" AND v.status = ANY(");
        query.push_bind(names);
        query.push(")");
    }
    if let Some(start) = created.0 {
        query.push(" AND v.created_at >= ");
        query.push_bind(start);
    }
    if let Some(end) = created.1 {
        query.push(" AND v.created_at < ");
        query.push_bind(end);
    }
    let direction = |descending: bool| if descending { " DESC" } else { " ASC" };
    match order {
        Order::CreatedAt(descending) => {
            query.push(" ORDER BY v.created_at");
            query.push(direction(*descending));
        }
        Order::Version(descending) => {
            query.push(" ORDER BY v.version");
            query.push(direction(*descending));
        }
        Order::Name(descending) => {
            query.push(" ORDER BY m.name");
            query.push(direction(*descending));
            query.push(", v.version");
        }
        Order::Metric(metric, descending) => {
            query.push(" ORDER BY (v.metrics->>");
            query.push_bind(metric.clone());
            query.push(")::float8");
            query.push(direction(*descending));
            query.push(" NULLS LAST");
        }
    }
    query.push(", v.id LIMIT ");
    query.push_bind(limit + 1);
    query.push(" OFFSET ");
    query.push_bind(offset);
    let rows: Vec<VersionRow> = query.build_query_as().fetch_all(pool).await?;
    let (rows, more) = split_page(rows, limit);
    Ok((rows.into_iter().map(version_from_row).collect(), more))
}
