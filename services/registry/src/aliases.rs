//! Aliases: atomic moves with compare-and-set, the audit history of every move, and live
//! notifications of moves for `WatchAlias`.
//!
//! A move is one transaction: lock the model row, check the target is READY and the
//! expected current version matches, upsert the alias, append the audit event and
//! `pg_notify` it. Notifications fan out through one `LISTEN` connection per registry
//! process ([`AliasWatcher`]) into a broadcast channel, so every replica's watchers see every
//! move, whichever replica made it.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::broadcast;
use uuid::Uuid;

use crate::domain::{Alias, AliasEvent, VersionStatus};
use crate::error::{RegistryError, Result};

/// What a client asked an alias move to do.
#[derive(Debug, Clone)]
pub struct AliasMove<'a> {
    /// Model name.
    pub model: &'a str,
    /// Alias name.
    pub alias: &'a str,
    /// Target version; None deletes the alias.
    pub to_version: Option<u32>,
    /// Compare-and-set: None = unconditional, Some(0) = must not exist, Some(n) = must be n.
    pub expected_current: Option<u32>,
    /// Who moves it.
    pub actor: &'a str,
    /// Why.
    pub reason: &'a str,
}

/// The notification channel of a registry schema (schemas in one database stay apart).
pub fn channel(schema: &str) -> String {
    format!("{schema}_alias_moves")
}

/// The channel announcing version changes (finalize, update, delete) of a schema.
pub fn changes_channel(schema: &str) -> String {
    format!("{schema}_version_changes")
}

/// Tells every replica that resolutions may have changed (their caches clear).
pub async fn announce_change(pool: &PgPool, schema: &str) {
    if let Err(error) = sqlx::query("SELECT pg_notify($1, '')")
        .bind(changes_channel(schema))
        .execute(pool)
        .await
    {
        // Other replicas then rely on their cache TTL.
        tracing::warn!(%error, "could not announce a version change");
    }
}

/// Applies a move; returns the alias after it (None when deleted) and the previous version.
pub async fn apply(
    pool: &PgPool,
    schema: &str,
    change: &AliasMove<'_>,
) -> Result<(Option<Alias>, Option<u32>)> {
    let mut tx = pool.begin().await?;
    let model_id: Option<Uuid> =
        sqlx::query_scalar("SELECT id FROM models WHERE name = $1 FOR UPDATE")
            .bind(change.model)
            .fetch_optional(&mut *tx)
            .await?;
    let model_id =
        model_id.ok_or_else(|| RegistryError::NotFound(format!("model `{}`", change.model)))?;
    let current: Option<i32> = sqlx::query_scalar(
        "SELECT v.version FROM aliases a JOIN versions v ON v.id = a.version_id \
         WHERE a.model_id = $1 AND a.alias = $2",
    )
    .bind(model_id)
    .bind(change.alias)
    .fetch_optional(&mut *tx)
    .await?;
    let current = current.map(|v| v.max(0) as u32);
    if let Some(expected) = change.expected_current {
        let actual = current.unwrap_or(0);
        if expected != actual {
            return Err(RegistryError::FailedPrecondition(format!(
                "alias `{}@{}` points to {}, not {expected}",
                change.model,
                change.alias,
                current.map_or("nothing".to_owned(), |v| format!("version {v}")),
            )));
        }
    }
    match change.to_version {
        Some(target) => {
            let row: Option<(Uuid, String)> = sqlx::query_as(
                "SELECT id, status FROM versions WHERE model_id = $1 AND version = $2",
            )
            .bind(model_id)
            .bind(target as i32)
            .fetch_optional(&mut *tx)
            .await?;
            let (version_id, status) = row.ok_or_else(|| {
                RegistryError::NotFound(format!("version `{}/{target}`", change.model))
            })?;
            if VersionStatus::from_db(&status) != VersionStatus::Ready {
                return Err(RegistryError::FailedPrecondition(format!(
                    "version `{}/{target}` is {}; aliases point only to READY versions",
                    change.model,
                    status.to_uppercase()
                )));
            }
            sqlx::query(
                "INSERT INTO aliases (model_id, alias, version_id, updated_by) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (model_id, alias) DO UPDATE SET version_id = EXCLUDED.version_id, \
                 updated_by = EXCLUDED.updated_by, updated_at = now()",
            )
            .bind(model_id)
            .bind(change.alias)
            .bind(version_id)
            .bind(change.actor)
            .execute(&mut *tx)
            .await?;
        }
        None => {
            if current.is_none() {
                return Err(RegistryError::NotFound(format!(
                    "alias `{}@{}`",
                    change.model, change.alias
                )));
            }
            sqlx::query("DELETE FROM aliases WHERE model_id = $1 AND alias = $2")
                .bind(model_id)
                .bind(change.alias)
                .execute(&mut *tx)
                .await?;
        }
    }
    let (sequence, at): (i64, DateTime<Utc>) = sqlx::query_as(
        "INSERT INTO alias_events (model_name, alias, from_version, to_version, actor, reason) \
         VALUES ($1, $2, $3, $4, $5, $6) RETURNING sequence, at",
    )
    .bind(change.model)
    .bind(change.alias)
    .bind(current.map(|v| v as i32))
    .bind(change.to_version.map(|v| v as i32))
    .bind(change.actor)
    .bind(change.reason)
    .fetch_one(&mut *tx)
    .await?;
    let event = AliasEvent {
        sequence: sequence.max(0) as u64,
        model_name: change.model.to_owned(),
        alias: change.alias.to_owned(),
        from_version: current,
        to_version: change.to_version,
        actor: change.actor.to_owned(),
        reason: change.reason.to_owned(),
        at,
    };
    let payload = serde_json::to_string(&event).expect("plain data always serializes");
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel(schema))
        .bind(payload)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let alias = match change.to_version {
        Some(_) => Some(get(pool, change.model, change.alias).await?),
        None => None,
    };
    Ok((alias, current))
}

/// One alias; NOT_FOUND when it does not exist.
pub async fn get(pool: &PgPool, model: &str, alias: &str) -> Result<Alias> {
    let mut found = list(pool, model, Some(alias)).await?;
    found
        .pop()
        .ok_or_else(|| RegistryError::NotFound(format!("alias `{model}@{alias}`")))
}

/// Every alias of a model (or just `only`), by name.
pub async fn list(pool: &PgPool, model: &str, only: Option<&str>) -> Result<Vec<Alias>> {
    let exists: Option<Uuid> = sqlx::query_scalar("SELECT id FROM models WHERE name = $1")
        .bind(model)
        .fetch_optional(pool)
        .await?;
    if exists.is_none() {
        return Err(RegistryError::NotFound(format!("model `{model}`")));
    }
    let rows: Vec<(String, i32, String, DateTime<Utc>, String)> = sqlx::query_as(
        "SELECT a.alias, v.version, v.digest, a.updated_at, a.updated_by FROM aliases a \
         JOIN models m ON m.id = a.model_id JOIN versions v ON v.id = a.version_id \
         WHERE m.name = $1 AND ($2::text IS NULL OR a.alias = $2) ORDER BY a.alias",
    )
    .bind(model)
    .bind(only)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(alias, version, digest, updated_at, updated_by)| Alias {
            model_name: model.to_owned(),
            alias,
            version: version.max(0) as u32,
            digest,
            updated_at,
            updated_by,
        })
        .collect())
}

/// A page of an alias's audit history, oldest first.
pub async fn history(
    pool: &PgPool,
    model: &str,
    alias: &str,
    limit: i64,
    offset: i64,
) -> Result<(Vec<AliasEvent>, bool)> {
    type Row = (
        i64,
        String,
        Option<i32>,
        Option<i32>,
        String,
        String,
        DateTime<Utc>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT sequence, alias, from_version, to_version, actor, reason, at FROM alias_events \
         WHERE model_name = $1 AND ($2 = '' OR alias = $2) ORDER BY sequence LIMIT $3 OFFSET $4",
    )
    .bind(model)
    .bind(alias)
    .bind(limit + 1)
    .bind(offset)
    .fetch_all(pool)
    .await?;
    let (rows, more) = crate::catalog::split_page(rows, limit);
    let events = rows
        .into_iter()
        .map(
            |(sequence, alias, from, to, actor, reason, at)| AliasEvent {
                sequence: sequence.max(0) as u64,
                model_name: model.to_owned(),
                alias,
                from_version: from.map(|v| v.max(0) as u32),
                to_version: to.map(|v| v.max(0) as u32),
                actor,
                reason,
                at,
            },
        )
        .collect();
    Ok((events, more))
}

/// Fans alias-move notifications from Postgres out to in-process watchers.
#[derive(Debug, Clone)]
pub struct AliasWatcher {
    events_tx: broadcast::Sender<AliasEvent>,
}

impl AliasWatcher {
    /// Starts listening on the schema's channels; reconnects by itself (sqlx's listener
    /// re-issues LISTEN after a lost connection). Every notification clears `cache`.
    pub async fn start(
        pool: &PgPool,
        schema: &str,
        cache: crate::cache::ResolveCache,
    ) -> Result<Self> {
        let mut listener = PgListener::connect_with(pool).await?;
        let moves = channel(schema);
        let changes = changes_channel(schema);
        listener
            .listen_all([moves.as_str(), changes.as_str()])
            .await?;
        let (events_tx, _) = broadcast::channel(1024);
        let sender = events_tx.clone();
        tokio::spawn(async move {
            loop {
                match listener.recv().await {
                    Ok(notification) if notification.channel() == changes => cache.invalidate(),
                    Ok(notification) => {
                        cache.invalidate();
                        match serde_json::from_str::<AliasEvent>(notification.payload()) {
                            Ok(event) => {
                                // No receivers is fine: nobody is watching right now.
                                let _ = sender.send(event);
                            }
                            Err(error) => tracing::warn!(%error, "unreadable alias notification"),
                        }
                    }
                    Err(error) => {
                        // Notifications may have been missed while disconnected.
                        cache.invalidate();
                        tracing::warn!(%error, "alias listener lost its connection, retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(Self { events_tx })
    }

    /// A receiver of every move from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AliasEvent> {
        self.events_tx.subscribe()
    }
}
