//! The `jobs` schema: job rows ↔ `pb::Job`, and the per-job event and log sequences.
//!
//! Every change to a job happens in a transaction that holds the job's row lock, appends the
//! matching event (sequence numbers come from the row, so they have no gaps) and sends a
//! `NOTIFY` with the job id, which wakes the `WatchJob` streams of every replica.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use lmforge_proto::v1 as pb;
use prost::Message;
use sqlx::{FromRow, PgPool, Postgres, Transaction};
use tonic::Status;
use uuid::Uuid;

/// Postgres channel of job events for `schema`.
pub fn channel(schema: &str) -> String {
    format!("{schema}_job_events")
}

/// A database error as a gRPC status (UNAVAILABLE when Postgres is unreachable).
pub fn db_error(error: sqlx::Error) -> Status {
    match &error {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
            Status::unavailable(format!("database unavailable: {error}"))
        }
        _ => {
            tracing::error!(%error, "database error");
            Status::internal("database error")
        }
    }
}

pub fn state_name(state: pb::JobState) -> &'static str {
    match state {
        pb::JobState::Queued | pb::JobState::Unspecified => "queued",
        pb::JobState::Running => "running",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
    }
}

pub fn state_of(name: &str) -> pb::JobState {
    match name {
        "running" => pb::JobState::Running,
        "succeeded" => pb::JobState::Succeeded,
        "failed" => pb::JobState::Failed,
        "cancelled" => pb::JobState::Cancelled,
        _ => pb::JobState::Queued,
    }
}

pub fn is_terminal(state: pb::JobState) -> bool {
    matches!(
        state,
        pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled
    )
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// One row of `jobs`.
#[derive(Debug, Clone, FromRow)]
pub struct JobRow {
    pub id: Uuid,
    pub client_request_id: Option<String>,
    pub spec: Vec<u8>,
    pub request_sha256: String,
    pub state: String,
    pub attempt: i32,
    pub max_attempts: i32,
    pub failure_code: String,
    pub failure_message: String,
    pub cancel_requested: bool,
    pub priority: i32,
    pub output_model_name: String,
    pub base_model_name: String,
    pub resolved_base: Option<Vec<u8>>,
    pub resolved_dataset_version_id: String,
    pub result_version: Option<Vec<u8>>,
    pub result_metrics: sqlx::types::Json<HashMap<String, f64>>,
    pub latest_progress: Option<Vec<u8>>,
    pub trained_tokens: i64,
    pub worker_id: String,
    pub checkpoint_count: i32,
    pub stream_seq: Option<i64>,
    pub heartbeat_at: Option<DateTime<Utc>>,
    pub deadline: Option<DateTime<Utc>>,
    pub next_event_seq: i64,
    pub next_log_seq: i64,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
}

impl JobRow {
    pub fn state(&self) -> pb::JobState {
        state_of(&self.state)
    }

    pub fn spec(&self) -> pb::JobSpec {
        pb::JobSpec::decode(self.spec.as_slice()).unwrap_or_default()
    }

    pub fn to_pb(&self) -> pb::Job {
        let decode_model =
            |b: &Option<Vec<u8>>| b.as_deref().and_then(|b| pb::ResolvedModel::decode(b).ok());
        let state = self.state();
        pb::Job {
            id: self.id.to_string(),
            spec: Some(self.spec()),
            state: state as i32,
            attempt: self.attempt as u32,
            max_attempts: self.max_attempts as u32,
            failure: (state == pb::JobState::Failed).then(|| pb::Failure {
                code: self.failure_code.clone(),
                message: self.failure_message.clone(),
                details: Default::default(),
            }),
            cancel_requested: self.cancel_requested,
            created_at: Some(timestamp(self.created_at)),
            started_at: self.started_at.map(timestamp),
            finished_at: self.finished_at.map(timestamp),
            updated_at: Some(timestamp(self.updated_at)),
            trained_tokens: self.trained_tokens as u64,
            resolved_base_model: decode_model(&self.resolved_base),
            resolved_dataset_version_id: self.resolved_dataset_version_id.clone(),
            result_model_version: decode_model(&self.result_version),
            result_metrics: self.result_metrics.0.clone(),
            latest_progress: self
                .latest_progress
                .as_deref()
                .and_then(|b| pb::JobProgress::decode(b).ok()),
            worker_id: self.worker_id.clone(),
            checkpoint_count: self.checkpoint_count as u32,
        }
    }
}

/// A job about to be inserted.
pub struct NewJob {
    pub id: Uuid,
    pub spec: pb::JobSpec,
    pub request_sha256: String,
    pub max_attempts: i32,
    pub base_model_name: String,
    pub resolved_base: Option<pb::ResolvedModel>,
    pub resolved_dataset_version_id: String,
    pub deadline: Option<DateTime<Utc>>,
}

/// Inserts a QUEUED job; on a `client_request_id` already used, returns the existing row and
/// `false` instead.
pub async fn insert(pool: &PgPool, job: NewJob) -> Result<(JobRow, bool), sqlx::Error> {
    let crid = (!job.spec.client_request_id.is_empty()).then(|| job.spec.client_request_id.clone());
    let inserted: Option<JobRow> = sqlx::query_as(
        "INSERT INTO jobs (id, client_request_id, spec, request_sha256, state, max_attempts, \
         priority, output_model_name, base_model_name, resolved_base, \
         resolved_dataset_version_id, deadline) \
         VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $8, $9, $10, $11) \
         ON CONFLICT (client_request_id) WHERE client_request_id IS NOT NULL DO NOTHING \
         RETURNING *",
    )
    .bind(job.id)
    .bind(&crid)
    .bind(job.spec.encode_to_vec())
    .bind(&job.request_sha256)
    .bind(job.max_attempts)
    .bind(job.spec.priority)
    .bind(&job.spec.output_model_name)
    .bind(&job.base_model_name)
    .bind(job.resolved_base.as_ref().map(Message::encode_to_vec))
    .bind(&job.resolved_dataset_version_id)
    .bind(job.deadline)
    .fetch_optional(pool)
    .await?;
    match inserted {
        Some(row) => Ok((row, true)),
        None => {
            let row: JobRow = sqlx::query_as("SELECT * FROM jobs WHERE client_request_id = $1")
                .bind(&crid)
                .fetch_one(pool)
                .await?;
            Ok((row, false))
        }
    }
}

pub async fn get(pool: &PgPool, id: Uuid) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1")
        .bind(id)
        .fetch_optional(pool)
        .await
}

/// Locks a job's row for the rest of `tx`.
pub async fn lock(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query_as("SELECT * FROM jobs WHERE id = $1 FOR UPDATE")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
}

/// Appends one event to a locked job and notifies watchers at commit. Returns its sequence.
pub async fn append_event(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    id: Uuid,
    event: pb::job_event::Event,
) -> Result<u64, sqlx::Error> {
    let kind = match &event {
        pb::job_event::Event::Snapshot(_) => "snapshot",
        pb::job_event::Event::StateChange(_) => "state_change",
        pb::job_event::Event::Progress(_) => "progress",
        pb::job_event::Event::Checkpoint(_) => "checkpoint",
        pb::job_event::Event::Log(_) => "log",
        pb::job_event::Event::Finished(_) => "finished",
    };
    let (seq,): (i64,) = sqlx::query_as(
        "UPDATE jobs SET next_event_seq = next_event_seq + 1 WHERE id = $1 \
         RETURNING next_event_seq - 1",
    )
    .bind(id)
    .fetch_one(&mut **tx)
    .await?;
    let record = pb::JobEvent {
        sequence: seq as u64,
        time: Some(timestamp(Utc::now())),
        event: Some(event),
    };
    sqlx::query("INSERT INTO events (job_id, sequence, kind, event) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(seq)
        .bind(kind)
        .bind(record.encode_to_vec())
        .execute(&mut **tx)
        .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(channel(schema))
        .bind(id.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(seq as u64)
}

/// Appends log lines to a locked job (as log rows and as log events).
pub async fn append_logs(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    id: Uuid,
    lines: Vec<pb::JobLogLine>,
) -> Result<(), sqlx::Error> {
    for mut line in lines {
        let (seq,): (i64,) = sqlx::query_as(
            "UPDATE jobs SET next_log_seq = next_log_seq + 1 WHERE id = $1 \
             RETURNING next_log_seq - 1",
        )
        .bind(id)
        .fetch_one(&mut **tx)
        .await?;
        let mut message: String = line.message.chars().take(4096).collect();
        if let Some(p) = message.find('\n') {
            message.truncate(p);
        }
        let time = line
            .time
            .as_ref()
            .and_then(|t| DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or_else(Utc::now);
        sqlx::query(
            "INSERT INTO logs (job_id, sequence, time, level, message, attempt, worker_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(seq)
        .bind(time)
        .bind(line.level)
        .bind(&message)
        .bind(line.attempt as i32)
        .bind(&line.worker_id)
        .execute(&mut **tx)
        .await?;
        line.sequence = seq as u64;
        line.message = message;
        line.time = Some(timestamp(time));
        append_event(tx, schema, id, pb::job_event::Event::Log(line)).await?;
    }
    Ok(())
}

/// A log line written by the jobs service itself.
pub fn service_log(
    level: pb::LogLevel,
    attempt: i32,
    message: impl Into<String>,
) -> pb::JobLogLine {
    pb::JobLogLine {
        sequence: 0,
        time: Some(timestamp(Utc::now())),
        level: level as i32,
        message: message.into(),
        attempt: attempt.max(0) as u32,
        worker_id: String::new(),
    }
}

/// What a state change sets besides the state.
#[derive(Debug, Default)]
pub struct Transition {
    pub reason: String,
    pub failure: Option<(String, String)>,
    pub attempt: Option<i32>,
    pub worker_id: Option<String>,
}

/// Moves a locked job to `to`, recording the state-change event (and the finished event for
/// terminal states). Timestamps follow: `started_at` on the first RUNNING, `finished_at` on a
/// terminal state.
pub async fn transition(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    row: &JobRow,
    to: pb::JobState,
    change: Transition,
) -> Result<JobRow, sqlx::Error> {
    let from = row.state();
    let (code, message) = change.failure.clone().unwrap_or_default();
    let updated: JobRow = sqlx::query_as(
        "UPDATE jobs SET state = $2, \
           attempt = COALESCE($3, attempt), \
           worker_id = COALESCE($4, worker_id), \
           failure_code = $5, failure_message = $6, \
           started_at = CASE WHEN $2 = 'running' THEN COALESCE(started_at, now()) ELSE started_at END, \
           finished_at = CASE WHEN $2 IN ('succeeded', 'failed', 'cancelled') THEN now() ELSE NULL END, \
           heartbeat_at = CASE WHEN $2 = 'running' THEN now() ELSE heartbeat_at END, \
           cancel_requested = CASE WHEN $2 IN ('succeeded', 'failed', 'cancelled') THEN false ELSE cancel_requested END, \
           updated_at = now() \
         WHERE id = $1 RETURNING *",
    )
    .bind(row.id)
    .bind(state_name(to))
    .bind(change.attempt)
    .bind(change.worker_id)
    .bind(&code)
    .bind(&message)
    .fetch_one(&mut **tx)
    .await?;
    append_event(
        tx,
        schema,
        row.id,
        pb::job_event::Event::StateChange(pb::JobStateChange {
            from: from as i32,
            to: to as i32,
            attempt: updated.attempt as u32,
            reason: change.reason.clone(),
        }),
    )
    .await?;
    let level = if to == pb::JobState::Failed {
        pb::LogLevel::Error
    } else {
        pb::LogLevel::Info
    };
    let mut text = format!("{} → {}", state_name(from), state_name(to));
    if !change.reason.is_empty() {
        text.push_str(": ");
        text.push_str(&change.reason);
    }
    append_logs(
        tx,
        schema,
        row.id,
        vec![service_log(level, updated.attempt, text)],
    )
    .await?;
    if is_terminal(to) {
        append_event(
            tx,
            schema,
            row.id,
            pb::job_event::Event::Finished(updated.to_pb()),
        )
        .await?;
    }
    Ok(updated)
}

/// Job events with a sequence greater than `after`, oldest first (at most `limit`).
pub async fn events_after(
    pool: &PgPool,
    id: Uuid,
    after: u64,
    limit: i64,
) -> Result<Vec<pb::JobEvent>, sqlx::Error> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
        "SELECT event FROM events WHERE job_id = $1 AND sequence > $2 ORDER BY sequence LIMIT $3",
    )
    .bind(id)
    .bind(after as i64)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(b,)| pb::JobEvent::decode(b.as_slice()).ok())
        .collect())
}

/// The newest checkpoint of a job (to resume from).
pub async fn latest_checkpoint(
    pool: &PgPool,
    id: Uuid,
) -> Result<Option<pb::JobCheckpoint>, sqlx::Error> {
    let row: Option<(Vec<u8>,)> = sqlx::query_as(
        "SELECT checkpoint FROM checkpoints WHERE job_id = $1 ORDER BY step DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    Ok(row.and_then(|(b,)| pb::JobCheckpoint::decode(b.as_slice()).ok()))
}
