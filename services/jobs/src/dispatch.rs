//! Putting jobs on the work queue and taking them off: one JetStream message per runnable job
//! (its sequence is kept on the job row), a wake-up for idle workers, and the cancel signal
//! for a running one.

use async_nats::jetstream;
use sqlx::PgPool;
use uuid::Uuid;

use crate::queue::{self, JOB_ID_HEADER, QueueNames};
use crate::store::JobRow;

#[derive(Clone)]
pub struct Dispatcher {
    pub nats: async_nats::Client,
    pub js: jetstream::Context,
    pub names: QueueNames,
}

impl Dispatcher {
    /// Publishes the job's work message (with the submitter's trace context) and records its
    /// stream sequence. Returns the updated row.
    pub async fn dispatch(&self, pool: &PgPool, row: &JobRow) -> Result<JobRow, String> {
        let spec = row.spec();
        let device = queue::device_class(spec.resources.as_ref().map_or(0, |r| r.device));
        let subject = self
            .names
            .dispatch_subject(device, queue::band(row.priority));
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(JOB_ID_HEADER, row.id.to_string().as_str());
        lmforge_telemetry::propagation::inject_nats_headers(&mut headers);
        let ack = self
            .js
            .publish_with_headers(subject, headers, row.id.to_string().into())
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        let updated: JobRow =
            sqlx::query_as("UPDATE jobs SET stream_seq = $2 WHERE id = $1 RETURNING *")
                .bind(row.id)
                .bind(ack.sequence as i64)
                .fetch_one(pool)
                .await
                .map_err(|e| e.to_string())?;
        // A wake-up only; a worker that misses it finds the message on its next poll.
        let _ = self
            .nats
            .publish(self.names.available_subject(), bytes::Bytes::new())
            .await;
        Ok(updated)
    }

    /// Removes a job's work message from the stream (cancelled or failed while queued). A
    /// message already delivered is refused by the jobs service when its worker reports.
    pub async fn withdraw(&self, row: &JobRow) {
        let Some(seq) = row.stream_seq else { return };
        if let Ok(stream) = self.js.get_stream(&self.names.stream).await
            && let Err(error) = stream.delete_message(seq as u64).await
        {
            tracing::debug!(job = %row.id, %error, "work message already gone");
        }
    }

    /// Tells the worker running `id` to stop at its next step.
    pub async fn signal_cancel(&self, id: Uuid) {
        let _ = self
            .nats
            .publish(
                self.names.cancel_subject(&id.to_string()),
                bytes::Bytes::new(),
            )
            .await;
    }
}
