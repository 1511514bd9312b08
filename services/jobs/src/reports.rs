//! The jobs service's side of the worker protocol, and its background duties:
//!
//! - worker reports (NATS request/reply, queue group `lmforge-jobs`): every report is written
//!   to Postgres before it is answered;
//! - JetStream's max-deliveries advisory: the job ran out of attempts → FAILED with
//!   `MAX_ATTEMPTS_EXCEEDED`;
//! - the sweeper: a RUNNING job whose worker went silent goes back to QUEUED (its message is
//!   redelivered by JetStream), jobs past their `max_duration` fail with `TIMEOUT`, and jobs
//!   whose dispatch publish failed are dispatched again.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use lmforge_proto::v1 as pb;
use prost::Message;
use sqlx::{Postgres, Transaction};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

use crate::api::Shared;
use crate::store::{self, JobRow, Transition, is_terminal};

/// Answers worker reports until the subscription ends.
pub async fn serve_reports(shared: Arc<Shared>, mut reports: async_nats::Subscriber) {
    while let Some(message) = reports.next().await {
        let shared = shared.clone();
        // Reports of one job come one at a time (the worker awaits each answer), so they can
        // be handled concurrently across jobs.
        tokio::spawn(async move {
            let Some(reply_to) = message.reply.clone() else {
                return;
            };
            let reply = match pb::WorkerReport::decode(message.payload.as_ref()) {
                Ok(report) => {
                    let span = tracing::info_span!("jobs.report", job = %report.job_id);
                    let _ = span.set_parent(lmforge_telemetry::propagation::extract_nats_context(
                        message.headers.as_ref(),
                    ));
                    handle(&shared, report).instrument(span).await
                }
                Err(error) => pb::WorkerReply {
                    proceed: false,
                    message: format!("unreadable report: {error}"),
                    ..Default::default()
                },
            };
            let _ = shared
                .dispatcher
                .nats
                .publish(reply_to, reply.encode_to_vec().into())
                .await;
        });
    }
}

fn stop(message: impl Into<String>) -> pb::WorkerReply {
    pb::WorkerReply {
        proceed: false,
        message: message.into(),
        ..Default::default()
    }
}

async fn handle(shared: &Shared, report: pb::WorkerReport) -> pb::WorkerReply {
    let Ok(id) = Uuid::parse_str(&report.job_id) else {
        return stop(format!("`{}` is not a job id", report.job_id));
    };
    match apply(shared, id, report).await {
        Ok(reply) => reply,
        Err(error) => {
            tracing::warn!(job = %id, %error, "worker report not recorded");
            // Not `proceed: false`: the worker keeps going and retries the report.
            pb::WorkerReply {
                proceed: true,
                message: format!("error: {error}"),
                ..Default::default()
            }
        }
    }
}

async fn apply(
    shared: &Shared,
    id: Uuid,
    report: pb::WorkerReport,
) -> Result<pb::WorkerReply, sqlx::Error> {
    use pb::worker_report::Report;
    let schema = shared.schema.as_str();
    let mut tx = shared.pool.begin().await?;
    let Some(row) = store::lock(&mut tx, id).await? else {
        return Ok(stop("unknown job"));
    };
    let Some(kind) = report.report else {
        return Ok(stop("empty report"));
    };
    let state = row.state();
    let attempt = report.attempt as i32;
    if let Report::Started(started) = &kind {
        let reply = start(&mut tx, shared, &row, &report.worker_id, attempt, started).await?;
        tx.commit().await?;
        if reply.proceed {
            return Ok(pb::WorkerReply {
                resume_from: store::latest_checkpoint(&shared.pool, id).await?,
                ..reply
            });
        }
        return Ok(reply);
    }
    // Everything else comes from the worker holding the job; anyone else is stale.
    let holder = state == pb::JobState::Running
        && row.worker_id == report.worker_id
        && row.attempt == attempt;
    if !holder {
        if let Report::Logs(logs) = kind {
            // Late lines of an attempt that already ended are still worth keeping.
            store::append_logs(&mut tx, schema, id, logs.lines).await?;
            tx.commit().await?;
        }
        return Ok(stop(format!(
            "job is {} (attempt {} on worker `{}`)",
            store::state_name(state),
            row.attempt,
            row.worker_id
        )));
    }
    let proceed = |row: &JobRow| pb::WorkerReply {
        proceed: !row.cancel_requested,
        message: if row.cancel_requested {
            "cancel requested".into()
        } else {
            String::new()
        },
        ..Default::default()
    };
    let reply = match kind {
        Report::Started(_) => unreachable!("handled above"),
        Report::Heartbeat(_) => {
            sqlx::query("UPDATE jobs SET heartbeat_at = now() WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            proceed(&row)
        }
        Report::Progress(mut progress) => {
            progress.attempt = report.attempt;
            sqlx::query(
                "UPDATE jobs SET latest_progress = $2, trained_tokens = $3, heartbeat_at = now(), \
                 updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .bind(progress.encode_to_vec())
            .bind(progress.trained_tokens as i64)
            .execute(&mut *tx)
            .await?;
            store::append_event(
                &mut tx,
                schema,
                id,
                pb::job_event::Event::Progress(progress),
            )
            .await?;
            proceed(&row)
        }
        Report::Checkpoint(mut checkpoint) => {
            checkpoint.job_id = id.to_string();
            checkpoint.attempt = report.attempt;
            sqlx::query(
                "INSERT INTO checkpoints (job_id, step, attempt, checkpoint) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (job_id, step) DO UPDATE SET attempt = $3, checkpoint = $4, \
                 created_at = now()",
            )
            .bind(id)
            .bind(checkpoint.step as i64)
            .bind(attempt)
            .bind(checkpoint.encode_to_vec())
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE jobs SET checkpoint_count = (SELECT count(*) FROM checkpoints WHERE job_id = $1), \
                 heartbeat_at = now(), updated_at = now() WHERE id = $1",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            store::append_event(
                &mut tx,
                schema,
                id,
                pb::job_event::Event::Checkpoint(checkpoint),
            )
            .await?;
            proceed(&row)
        }
        Report::Logs(logs) => {
            store::append_logs(&mut tx, schema, id, logs.lines).await?;
            proceed(&row)
        }
        Report::Succeeded(done) => {
            sqlx::query(
                "UPDATE jobs SET result_version = $2, result_metrics = $3, trained_tokens = $4 \
                 WHERE id = $1",
            )
            .bind(id)
            .bind(
                done.result_model_version
                    .as_ref()
                    .map(Message::encode_to_vec),
            )
            .bind(sqlx::types::Json(&done.metrics))
            .bind(done.trained_tokens as i64)
            .execute(&mut *tx)
            .await?;
            let version = done
                .result_model_version
                .as_ref()
                .map(|v| format!("{}/{}", v.name, v.version))
                .unwrap_or_default();
            let mut reason = format!("registered {version}");
            if !done.alias_note.is_empty() {
                reason.push_str("; ");
                reason.push_str(&done.alias_note);
            }
            store::transition(
                &mut tx,
                schema,
                &row,
                pb::JobState::Succeeded,
                Transition {
                    reason,
                    ..Default::default()
                },
            )
            .await?;
            stop("done")
        }
        Report::Failed(failed) => {
            let failure = failed.failure.unwrap_or_default();
            let reason = format!("{}: {}", failure.code, failure.message);
            if failed.retryable && row.attempt < row.max_attempts {
                move_to(
                    &mut tx,
                    schema,
                    &row,
                    pb::JobState::Queued,
                    format!("attempt {} failed, retrying ({reason})", row.attempt),
                )
                .await?;
            } else {
                let code = if failed.retryable {
                    "MAX_ATTEMPTS_EXCEEDED".to_owned()
                } else {
                    failure.code.clone()
                };
                store::transition(
                    &mut tx,
                    schema,
                    &row,
                    pb::JobState::Failed,
                    Transition {
                        reason: reason.clone(),
                        failure: Some((code, failure.message)),
                        ..Default::default()
                    },
                )
                .await?;
            }
            stop("recorded")
        }
        Report::Cancelled(c) => {
            move_to(
                &mut tx,
                schema,
                &row,
                pb::JobState::Cancelled,
                format!("cancelled by user; the worker stopped at step {}", c.step),
            )
            .await?;
            stop("cancelled")
        }
        Report::Released(r) => {
            move_to(
                &mut tx,
                schema,
                &row,
                pb::JobState::Queued,
                format!("released by worker `{}`: {}", report.worker_id, r.reason),
            )
            .await?;
            stop("released")
        }
    };
    tx.commit().await?;
    Ok(reply)
}

/// A state change that sets nothing but the state (and says why).
async fn move_to(
    tx: &mut Transaction<'_, Postgres>,
    schema: &str,
    row: &JobRow,
    to: pb::JobState,
    reason: impl Into<String>,
) -> Result<JobRow, sqlx::Error> {
    let change = Transition {
        reason: reason.into(),
        ..Default::default()
    };
    store::transition(tx, schema, row, to, change).await
}

/// A worker pulled the job's message and asks to run it.
async fn start(
    tx: &mut Transaction<'_, Postgres>,
    shared: &Shared,
    row: &JobRow,
    worker_id: &str,
    attempt: i32,
    started: &pb::WorkerStarted,
) -> Result<pb::WorkerReply, sqlx::Error> {
    let schema = shared.schema.as_str();
    let state = row.state();
    if is_terminal(state) {
        return Ok(stop(format!("job is already {}", store::state_name(state))));
    }
    if let Some(seq) = row.stream_seq
        && started.stream_sequence != 0
        && started.stream_sequence != seq as u64
    {
        return Ok(stop("a stale duplicate of the job's work message"));
    }
    if row.cancel_requested {
        move_to(
            tx,
            schema,
            row,
            pb::JobState::Cancelled,
            "cancelled by user while its worker was lost",
        )
        .await?;
        return Ok(stop("cancelled"));
    }
    if row.deadline.is_some_and(|d| d <= chrono::Utc::now()) {
        store::transition(
            tx,
            schema,
            row,
            pb::JobState::Failed,
            Transition {
                reason: "max_duration exceeded".into(),
                failure: Some(("TIMEOUT".into(), "the job ran past its max_duration".into())),
                ..Default::default()
            },
        )
        .await?;
        return Ok(stop("timed out"));
    }
    let mut row = row.clone();
    if state == pb::JobState::Running {
        // Redelivered before the sweeper noticed the previous worker was gone.
        row = move_to(
            tx,
            schema,
            &row,
            pb::JobState::Queued,
            format!("worker `{}` lost; the job was redelivered", row.worker_id),
        )
        .await?;
    }
    let resumed = if row.checkpoint_count > 0 {
        ", resuming from its latest checkpoint"
    } else {
        ""
    };
    let row = store::transition(
        tx,
        schema,
        &row,
        pb::JobState::Running,
        Transition {
            reason: format!(
                "attempt {attempt} on worker `{worker_id}` ({}){resumed}",
                started.device
            ),
            attempt: Some(attempt),
            worker_id: Some(worker_id.to_owned()),
            ..Default::default()
        },
    )
    .await?;
    Ok(pb::WorkerReply {
        proceed: true,
        job: Some(row.to_pb()),
        ..Default::default()
    })
}

/// JetStream gave up on a message: its job ran out of attempts.
pub async fn serve_advisories(shared: Arc<Shared>, mut advisories: async_nats::Subscriber) {
    #[derive(serde::Deserialize)]
    struct Advisory {
        stream_seq: u64,
        #[serde(default)]
        deliveries: u64,
    }
    while let Some(message) = advisories.next().await {
        let Ok(advisory) = serde_json::from_slice::<Advisory>(&message.payload) else {
            continue;
        };
        if let Err(error) = exhausted(&shared, advisory.stream_seq, advisory.deliveries).await {
            tracing::warn!(%error, seq = advisory.stream_seq, "max-deliveries advisory not applied");
        }
    }
}

async fn exhausted(shared: &Shared, seq: u64, deliveries: u64) -> Result<(), sqlx::Error> {
    let ids: Vec<(Uuid,)> = sqlx::query_as("SELECT id FROM jobs WHERE stream_seq = $1")
        .bind(seq as i64)
        .fetch_all(&shared.pool)
        .await?;
    for (id,) in ids {
        let mut tx = shared.pool.begin().await?;
        let Some(row) = store::lock(&mut tx, id).await? else {
            continue;
        };
        if !is_terminal(row.state()) {
            let last = last_failure(&mut tx, id).await?;
            let message = format!(
                "gave up after {deliveries} deliveries (max_deliver {}){last}",
                row.max_attempts
            );
            store::transition(
                &mut tx,
                &shared.schema,
                &row,
                pb::JobState::Failed,
                Transition {
                    reason: message.clone(),
                    failure: Some(("MAX_ATTEMPTS_EXCEEDED".into(), message)),
                    ..Default::default()
                },
            )
            .await?;
        }
        tx.commit().await?;
        shared.dispatcher.withdraw(&row).await;
    }
    Ok(())
}

/// `; last: <reason>` from the job's last state change, if any.
async fn last_failure(tx: &mut Transaction<'_, Postgres>, id: Uuid) -> Result<String, sqlx::Error> {
    let row: Option<(Vec<u8>,)> = sqlx::query_as(
        "SELECT event FROM events WHERE job_id = $1 AND kind = 'state_change' \
         ORDER BY sequence DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(row
        .and_then(|(b,)| pb::JobEvent::decode(b.as_slice()).ok())
        .and_then(|e| match e.event {
            Some(pb::job_event::Event::StateChange(c)) if !c.reason.is_empty() => {
                Some(format!("; last: {}", c.reason))
            }
            _ => None,
        })
        .unwrap_or_default())
}

/// Periodic duties; see the module docs.
pub async fn sweep_forever(shared: Arc<Shared>, ack_wait: Duration) {
    let every = (ack_wait / 2).clamp(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        tokio::time::sleep(every).await;
        if let Err(error) = sweep(&shared, ack_wait).await {
            tracing::warn!(%error, "job sweep failed");
        }
    }
}

async fn sweep(shared: &Shared, ack_wait: Duration) -> Result<(), sqlx::Error> {
    let silent = chrono::Duration::from_std(ack_wait * 2).unwrap_or(chrono::Duration::MAX);
    let lost: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM jobs WHERE state = 'running' AND heartbeat_at < now() - $1::interval",
    )
    .bind(silent)
    .fetch_all(&shared.pool)
    .await?;
    for (id,) in lost {
        let mut tx = shared.pool.begin().await?;
        if let Some(row) = store::lock(&mut tx, id).await?
            && row.state() == pb::JobState::Running
            && row
                .heartbeat_at
                .is_some_and(|h| h < chrono::Utc::now() - silent)
        {
            store::transition(
                &mut tx,
                &shared.schema,
                &row,
                pb::JobState::Queued,
                Transition {
                    reason: format!(
                        "worker `{}` lost (no heartbeat for {:?}); waiting for redelivery",
                        row.worker_id,
                        ack_wait * 2
                    ),
                    ..Default::default()
                },
            )
            .await?;
        }
        tx.commit().await?;
    }
    let late: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM jobs WHERE state IN ('queued', 'running') AND deadline < now()",
    )
    .fetch_all(&shared.pool)
    .await?;
    for (id,) in late {
        let mut tx = shared.pool.begin().await?;
        let Some(row) = store::lock(&mut tx, id).await? else {
            continue;
        };
        if is_terminal(row.state()) {
            continue;
        }
        store::transition(
            &mut tx,
            &shared.schema,
            &row,
            pb::JobState::Failed,
            Transition {
                reason: "max_duration exceeded".into(),
                failure: Some(("TIMEOUT".into(), "the job ran past its max_duration".into())),
                ..Default::default()
            },
        )
        .await?;
        tx.commit().await?;
        shared.dispatcher.withdraw(&row).await;
        shared.dispatcher.signal_cancel(id).await;
    }
    let undispatched: Vec<JobRow> = sqlx::query_as(
        "SELECT * FROM jobs WHERE state = 'queued' AND stream_seq IS NULL \
         AND created_at < now() - interval '2 seconds' LIMIT 100",
    )
    .fetch_all(&shared.pool)
    .await?;
    for row in undispatched {
        if let Err(error) = shared.dispatcher.dispatch(&shared.pool, &row).await {
            tracing::warn!(job = %row.id, %error, "dispatch retry failed");
            break;
        }
    }
    Ok(())
}
