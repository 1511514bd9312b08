//! `lmforge.v1.JobService`: submit (validate, resolve, store, dispatch), get, list, cancel,
//! watch, logs and checkpoints.

use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::Stream;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::job_service_server::JobService;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use prost::Message;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::broadcast;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use uuid::Uuid;

use crate::dispatch::Dispatcher;
use crate::spec;
use crate::store::{self, JobRow, Transition, db_error, is_terminal};

/// Shared state of the RPCs and the worker-report handler.
#[derive(Clone)]
pub struct Shared {
    pub pool: PgPool,
    pub schema: String,
    pub dispatcher: Dispatcher,
    pub max_attempts: u32,
    /// Job ids whose events changed (from Postgres NOTIFY, all replicas).
    pub events: broadcast::Sender<Uuid>,
}

/// `lmforge.v1.JobService`.
#[derive(Clone)]
pub struct JobApi {
    shared: Arc<Shared>,
    registry: RegistryServiceClient<Channel>,
    datasets: DatasetServiceClient<Channel>,
}

impl JobApi {
    pub fn new(shared: Arc<Shared>, registry: Channel, ingest: Channel) -> Self {
        Self {
            shared,
            registry: RegistryServiceClient::new(registry),
            datasets: DatasetServiceClient::new(ingest),
        }
    }
}

fn invalid(field: &str, reason: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

pub fn parse_id(id: &str, field: &str) -> Result<Uuid, Status> {
    if id.is_empty() {
        return Err(invalid(field, "is required"));
    }
    Uuid::parse_str(id).map_err(|_| invalid(field, format!("`{id}` is not a job id")))
}

fn page_size(size: i32, field: &str) -> Result<i64, Status> {
    match size {
        s if s < 0 => Err(invalid(field, "must not be negative")),
        0 => Ok(50),
        s => Ok(i64::from(s.min(1000))),
    }
}

/// The sha256 of the request as submitted (idempotency fingerprint).
fn fingerprint(spec: &pb::JobSpec) -> String {
    hex::encode(Sha256::digest(spec.encode_to_vec()))
}

/// A referenced service's answer for a reference the client gave, naming the field.
fn reference_error(field: &str, status: Status) -> Status {
    match status.code() {
        Code::NotFound => Status::not_found(format!("{field}: {}", status.message())),
        Code::InvalidArgument => invalid(field, status.message()),
        Code::FailedPrecondition => {
            Status::failed_precondition(format!("{field}: {}", status.message()))
        }
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown => {
            Status::unavailable(format!("cannot resolve {field}: {}", status.message()))
        }
        _ => status,
    }
}

async fn get_row(pool: &PgPool, id: Uuid) -> Result<JobRow, Status> {
    store::get(pool, id)
        .await
        .map_err(db_error)?
        .ok_or_else(|| Status::not_found(format!("job {id} not found")))
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn submit_job(
        &self,
        request: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let request = request.into_inner();
        let submitted = spec::validate(request.spec.as_ref())
            .map_err(|e| invalid(&e.field, &e.reason))?
            .clone();
        let request_sha256 = fingerprint(&submitted);
        let shared = &self.shared;
        // A retry of an earlier submit answers before anything is resolved again.
        if !submitted.client_request_id.is_empty()
            && let Some(row) = existing(&shared.pool, &submitted.client_request_id).await?
        {
            return same_request(row, &request_sha256);
        }
        let mut spec = submitted.clone();
        // References are resolved once, here; the job keeps what they meant at submit time.
        let dataset = self
            .datasets
            .clone()
            .get_dataset_version(pb::GetDatasetVersionRequest {
                dataset_version: spec.dataset_version.clone(),
            })
            .await
            .map_err(|s| reference_error("spec.dataset_version", s))?
            .into_inner();
        if dataset.status != pb::DatasetVersionStatus::Ready as i32 {
            return Err(Status::failed_precondition(format!(
                "spec.dataset_version: {}/{} is not READY",
                dataset.dataset_name, dataset.version
            )));
        }
        let (resolved_base, base_name, context) = match &spec.base {
            Some(pb::job_spec::Base::BaseModel(reference)) => {
                let version = resolve_model(&self.registry, reference, "spec.base_model").await?;
                let context = version.context_length;
                let resolved = pb::ResolvedModel {
                    name: version.model_name.clone(),
                    version: version.version,
                    digest: version.digest.clone(),
                    requested_ref: reference.clone(),
                };
                (Some(resolved), version.model_name, context)
            }
            Some(pb::job_spec::Base::FromScratch(fs)) => {
                if let Some(pb::tokenizer_spec::Source::FromModel(reference)) =
                    fs.tokenizer.as_ref().and_then(|t| t.source.as_ref())
                {
                    resolve_model(
                        &self.registry,
                        reference,
                        "spec.from_scratch.tokenizer.from_model",
                    )
                    .await?;
                }
                (None, String::new(), spec::scratch_context(&spec))
            }
            None => unreachable!("validated"),
        };
        spec::fill_defaults(&mut spec, context).map_err(|e| invalid(&e.field, &e.reason))?;
        let deadline = spec.max_duration.as_ref().map(|d| {
            Utc::now()
                + chrono::Duration::seconds(d.seconds)
                + chrono::Duration::nanoseconds(i64::from(d.nanos))
        });
        let (row, created) = store::insert(
            &shared.pool,
            store::NewJob {
                id: Uuid::new_v4(),
                spec,
                request_sha256: request_sha256.clone(),
                max_attempts: shared.max_attempts as i32,
                base_model_name: base_name,
                resolved_base,
                resolved_dataset_version_id: dataset.id.clone(),
                deadline,
            },
        )
        .await
        .map_err(db_error)?;
        if !created {
            return same_request(row, &request_sha256);
        }
        let mut tx = shared.pool.begin().await.map_err(db_error)?;
        store::append_logs(
            &mut tx,
            &shared.schema,
            row.id,
            vec![store::service_log(
                pb::LogLevel::Info,
                0,
                format!(
                    "submitted: dataset {}/{} ({}), output model {}",
                    dataset.dataset_name, dataset.version, dataset.id, row.output_model_name
                ),
            )],
        )
        .await
        .map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        // A failed publish leaves the job QUEUED without a dispatch message; the sweeper
        // dispatches it again.
        let row = match shared.dispatcher.dispatch(&shared.pool, &row).await {
            Ok(row) => row,
            Err(error) => {
                tracing::warn!(job = %row.id, %error, "dispatch failed; the sweeper retries");
                row
            }
        };
        tracing::info!(job = %row.id, "job submitted");
        Ok(Response::new(row.to_pb()))
    }

    async fn get_job(
        &self,
        request: Request<pb::GetJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let id = parse_id(&request.get_ref().id, "id")?;
        Ok(Response::new(get_row(&self.shared.pool, id).await?.to_pb()))
    }

    async fn list_jobs(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let r = request.into_inner();
        let limit = page_size(r.page_size, "page_size")?;
        let mut states = Vec::new();
        for (i, s) in r.states.iter().enumerate() {
            let state = pb::JobState::try_from(*s)
                .map_err(|_| invalid(&format!("states[{i}]"), "unknown state"))?;
            if state != pb::JobState::Unspecified {
                states.push(store::state_name(state).to_owned());
            }
        }
        let cursor = if r.page_token.is_empty() {
            None
        } else {
            Some(decode_cursor(&r.page_token).ok_or_else(|| invalid("page_token", "malformed"))?)
        };
        let bound = |t: &Option<prost_types::Timestamp>| {
            t.as_ref()
                .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        };
        let (from, to) = r
            .created
            .as_ref()
            .map_or((None, None), |c| (bound(&c.start), bound(&c.end)));
        let rows: Vec<JobRow> = sqlx::query_as(
            "SELECT * FROM jobs WHERE \
               (cardinality($1::text[]) = 0 OR state = ANY($1)) \
               AND ($2 = '' OR output_model_name = $2) \
               AND ($3 = '' OR base_model_name = $3) \
               AND ($4::timestamptz IS NULL OR created_at >= $4) \
               AND ($5::timestamptz IS NULL OR created_at < $5) \
               AND ($6::timestamptz IS NULL OR (created_at, id) < ($6, $7)) \
             ORDER BY created_at DESC, id DESC LIMIT $8",
        )
        .bind(&states)
        .bind(&r.output_model_name)
        .bind(&r.base_model_name)
        .bind(from)
        .bind(to)
        .bind(cursor.map(|c| c.0))
        .bind(cursor.map(|c| c.1))
        .bind(limit + 1)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(db_error)?;
        let more = rows.len() as i64 > limit;
        let rows = &rows[..rows.len().min(limit as usize)];
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => encode_cursor(last.created_at, last.id),
            _ => String::new(),
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: rows.iter().map(JobRow::to_pb).collect(),
            next_page_token,
        }))
    }

    async fn cancel_job(
        &self,
        request: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let r = request.into_inner();
        let id = parse_id(&r.id, "id")?;
        if r.reason.chars().count() > 1024 {
            return Err(invalid("reason", "at most 1024 characters"));
        }
        let shared = &self.shared;
        let mut tx = shared.pool.begin().await.map_err(db_error)?;
        let row = store::lock(&mut tx, id)
            .await
            .map_err(db_error)?
            .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        let state = row.state();
        if is_terminal(state) {
            return Err(Status::failed_precondition(format!(
                "job {id} is already {}",
                store::state_name(state)
            )));
        }
        let why = if r.reason.is_empty() {
            "cancelled by user".to_owned()
        } else {
            format!("cancelled by user: {}", r.reason)
        };
        let row = if state == pb::JobState::Queued {
            store::transition(
                &mut tx,
                &shared.schema,
                &row,
                pb::JobState::Cancelled,
                Transition {
                    reason: why,
                    ..Default::default()
                },
            )
            .await
            .map_err(db_error)?
        } else {
            let row: JobRow = sqlx::query_as(
                "UPDATE jobs SET cancel_requested = true, updated_at = now() WHERE id = $1 \
                 RETURNING *",
            )
            .bind(id)
            .fetch_one(&mut *tx)
            .await
            .map_err(db_error)?;
            store::append_logs(
                &mut tx,
                &shared.schema,
                id,
                vec![store::service_log(
                    pb::LogLevel::Info,
                    row.attempt,
                    format!("cancel requested ({why}); the worker stops at its next step"),
                )],
            )
            .await
            .map_err(db_error)?;
            row
        };
        tx.commit().await.map_err(db_error)?;
        if state == pb::JobState::Queued {
            shared.dispatcher.withdraw(&row).await;
        } else {
            shared.dispatcher.signal_cancel(id).await;
        }
        Ok(Response::new(row.to_pb()))
    }

    async fn watch_job(
        &self,
        request: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let r = request.into_inner();
        let id = parse_id(&r.id, "id")?;
        let shared = self.shared.clone();
        // Subscribe before the snapshot so nothing between the two is missed.
        let mut wake = shared.events.subscribe();
        let row = get_row(&shared.pool, id).await?;
        let mut cursor = if r.after_sequence > 0 {
            r.after_sequence
        } else {
            (row.next_event_seq - 1) as u64
        };
        let include_logs = r.include_logs;
        let stream = async_stream(move |tx| async move {
            let snapshot = pb::JobEvent {
                sequence: 0,
                time: Some(store::timestamp(Utc::now())),
                event: Some(pb::job_event::Event::Snapshot(row.to_pb())),
            };
            if tx.send(Ok(snapshot)).await.is_err() {
                return;
            }
            if is_terminal(row.state()) && r.after_sequence == 0 {
                let _ = tx
                    .send(Ok(pb::JobEvent {
                        sequence: cursor,
                        time: Some(store::timestamp(Utc::now())),
                        event: Some(pb::job_event::Event::Finished(row.to_pb())),
                    }))
                    .await;
                return;
            }
            loop {
                let events = match store::events_after(&shared.pool, id, cursor, 500).await {
                    Ok(events) => events,
                    Err(e) => {
                        let _ = tx.send(Err(db_error(e))).await;
                        return;
                    }
                };
                let fetched = events.len();
                for event in events {
                    cursor = event.sequence;
                    let finished = matches!(event.event, Some(pb::job_event::Event::Finished(_)));
                    let is_log = matches!(event.event, Some(pb::job_event::Event::Log(_)));
                    if (!is_log || include_logs) && tx.send(Ok(event)).await.is_err() {
                        return;
                    }
                    if finished {
                        return;
                    }
                }
                if fetched == 500 {
                    continue;
                }
                // Wait for this job's next notification (or re-check now and then, in case a
                // notification was lost while the listener reconnected).
                let deadline = tokio::time::sleep(std::time::Duration::from_secs(2));
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        _ = tx.closed() => return,
                        woke = wake.recv() => match woke {
                            Ok(job) if job == id => break,
                            Ok(_) => {}
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => return,
                        },
                    }
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_job_logs(
        &self,
        request: Request<pb::GetJobLogsRequest>,
    ) -> Result<Response<pb::GetJobLogsResponse>, Status> {
        let r = request.into_inner();
        let id = parse_id(&r.id, "id")?;
        let limit = page_size(r.page_size, "page_size")?;
        let after: i64 = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| invalid("page_token", "malformed"))?
        };
        let min_level = pb::LogLevel::try_from(r.min_level)
            .map_err(|_| invalid("min_level", "unknown level"))? as i32;
        get_row(&self.shared.pool, id).await?;
        let rows: Vec<(i64, DateTime<Utc>, i32, String, i32, String)> = sqlx::query_as(
            "SELECT sequence, time, level, message, attempt, worker_id FROM logs \
             WHERE job_id = $1 AND sequence > $2 AND level >= $3 \
               AND ($4::int IS NULL OR attempt = $4) \
             ORDER BY sequence LIMIT $5",
        )
        .bind(id)
        .bind(after)
        .bind(min_level)
        .bind(r.attempt.map(|a| a as i32))
        .bind(limit + 1)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(db_error)?;
        let more = rows.len() as i64 > limit;
        let lines: Vec<pb::JobLogLine> = rows
            .into_iter()
            .take(limit as usize)
            .map(
                |(seq, time, level, message, attempt, worker_id)| pb::JobLogLine {
                    sequence: seq as u64,
                    time: Some(store::timestamp(time)),
                    level,
                    message,
                    attempt: attempt as u32,
                    worker_id,
                },
            )
            .collect();
        let next_page_token = match (more, lines.last()) {
            (true, Some(last)) => last.sequence.to_string(),
            _ => String::new(),
        };
        Ok(Response::new(pb::GetJobLogsResponse {
            lines,
            next_page_token,
        }))
    }

    async fn list_job_checkpoints(
        &self,
        request: Request<pb::ListJobCheckpointsRequest>,
    ) -> Result<Response<pb::ListJobCheckpointsResponse>, Status> {
        let r = request.into_inner();
        let id = parse_id(&r.id, "id")?;
        let limit = page_size(r.page_size, "page_size")?;
        let offset: i64 = if r.page_token.is_empty() {
            0
        } else {
            r.page_token
                .parse()
                .map_err(|_| invalid("page_token", "malformed"))?
        };
        get_row(&self.shared.pool, id).await?;
        let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
            "SELECT checkpoint FROM checkpoints WHERE job_id = $1 \
             ORDER BY step DESC OFFSET $2 LIMIT $3",
        )
        .bind(id)
        .bind(offset)
        .bind(limit + 1)
        .fetch_all(&self.shared.pool)
        .await
        .map_err(db_error)?;
        let more = rows.len() as i64 > limit;
        Ok(Response::new(pb::ListJobCheckpointsResponse {
            checkpoints: rows
                .into_iter()
                .take(limit as usize)
                .filter_map(|(b,)| pb::JobCheckpoint::decode(b.as_slice()).ok())
                .collect(),
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
        }))
    }
}

async fn existing(pool: &PgPool, client_request_id: &str) -> Result<Option<JobRow>, Status> {
    sqlx::query_as("SELECT * FROM jobs WHERE client_request_id = $1")
        .bind(client_request_id)
        .fetch_optional(pool)
        .await
        .map_err(db_error)
}

fn same_request(row: JobRow, request_sha256: &str) -> Result<Response<pb::Job>, Status> {
    if row.request_sha256 == request_sha256 {
        Ok(Response::new(row.to_pb()))
    } else {
        Err(Status::already_exists(format!(
            "spec.client_request_id: already used by job {} with a different spec",
            row.id
        )))
    }
}

async fn resolve_model(
    registry: &RegistryServiceClient<Channel>,
    reference: &str,
    field: &str,
) -> Result<pb::ModelVersion, Status> {
    registry
        .clone()
        .resolve_model_ref(pb::ResolveModelRefRequest {
            model_ref: reference.to_owned(),
        })
        .await
        .map_err(|s| reference_error(field, s))?
        .into_inner()
        .version
        .ok_or_else(|| Status::internal("the registry answered without a version"))
}

fn encode_cursor(t: DateTime<Utc>, id: Uuid) -> String {
    format!("{}_{id}", t.timestamp_micros())
}

fn decode_cursor(token: &str) -> Option<(DateTime<Utc>, Uuid)> {
    let (micros, id) = token.split_once('_')?;
    Some((
        DateTime::from_timestamp_micros(micros.parse().ok()?)?,
        Uuid::parse_str(id).ok()?,
    ))
}

/// A server stream fed by a task writing into a channel (the task ends when the client goes).
fn async_stream<F, Fut>(body: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::JobEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let t = DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("time");
        let id = Uuid::new_v4();
        assert_eq!(decode_cursor(&encode_cursor(t, id)), Some((t, id)));
        assert_eq!(decode_cursor("nope"), None);
    }
}
