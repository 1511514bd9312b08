//! The JetStream work queue between the jobs service and trainer workers, and the NATS
//! subjects of the worker protocol. Shared by both sides so they agree on every name.
//!
//! One work-queue stream holds one message per runnable job, on the subject
//! `<prefix>.queue.<device>.<band>`. Each (device, band) pair has one durable pull consumer
//! shared by all trainers (explicit acks, `ack_wait`, `max_deliver`). Priorities are honoured
//! by bands: a worker always takes from the highest band that has work (`high` for a
//! priority above 0, `normal` for 0, `low` below 0), FIFO within a band. Devices: `any` jobs are taken by
//! every worker; `cpu` and `cuda` jobs only by workers of that kind.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};

/// Priority bands, highest first.
pub const BANDS: [&str; 3] = ["high", "normal", "low"];
/// Device classes of dispatch subjects.
pub const DEVICES: [&str; 3] = ["any", "cpu", "cuda"];

/// Header carrying the job id on dispatch messages.
pub const JOB_ID_HEADER: &str = "Lmforge-Job-Id";

/// The band of a priority in [-100, 100].
pub fn band(priority: i32) -> &'static str {
    match priority {
        p if p > 0 => "high",
        0 => "normal",
        _ => "low",
    }
}

/// The device class of a job's `resources.device`.
pub fn device_class(device: i32) -> &'static str {
    match lmforge_proto::v1::Device::try_from(device) {
        Ok(lmforge_proto::v1::Device::Cpu) => "cpu",
        Ok(lmforge_proto::v1::Device::Cuda) => "cuda",
        _ => "any",
    }
}

/// Names of the stream, its consumers and the protocol subjects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// Subject prefix, e.g. `lmforge.jobs` (tests use their own).
    pub prefix: String,
    /// Stream name, e.g. `LMFORGE_JOBS`.
    pub stream: String,
}

impl QueueNames {
    pub fn new(prefix: impl Into<String>, stream: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            stream: stream.into(),
        }
    }

    /// Where a job of this device class and band is dispatched.
    pub fn dispatch_subject(&self, device: &str, band: &str) -> String {
        format!("{}.queue.{device}.{band}", self.prefix)
    }

    /// The durable consumer for a (device, band) pair.
    pub fn consumer_name(device: &str, band: &str) -> String {
        format!("trainers-{device}-{band}")
    }

    /// Worker → jobs reports about one job (request/reply).
    pub fn report_subject(&self, job_id: &str) -> String {
        format!("{}.report.{job_id}", self.prefix)
    }

    /// All reports (the jobs service's subscription).
    pub fn report_wildcard(&self) -> String {
        format!("{}.report.*", self.prefix)
    }

    /// Jobs → worker: cancel the job now.
    pub fn cancel_subject(&self, job_id: &str) -> String {
        format!("{}.cancel.{job_id}", self.prefix)
    }

    /// Jobs → idle workers: new work was dispatched (a wake-up; the queue is the truth).
    pub fn available_subject(&self) -> String {
        format!("{}.available", self.prefix)
    }

    /// JetStream's advisory when a message ran out of deliveries on any of our consumers.
    pub fn max_deliveries_advisory(&self) -> String {
        format!(
            "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{}.*",
            self.stream
        )
    }

    /// The consumers a worker of `worker_device` (`cpu` or `cuda`) takes work from, in the
    /// order it tries them: by band, highest first; its own device class before `any`.
    pub fn consumer_order(worker_device: &str) -> Vec<(&'static str, &'static str)> {
        let own = if worker_device.starts_with("cuda") {
            "cuda"
        } else {
            "cpu"
        };
        BANDS
            .iter()
            .flat_map(|band| [(own, *band), ("any", *band)])
            .map(|(d, b)| {
                (
                    DEVICES.iter().find(|x| **x == d).copied().unwrap_or("any"),
                    b,
                )
            })
            .collect()
    }
}

/// Redelivery settings of the consumers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSettings {
    /// Without an ack or an `in_progress` heartbeat for this long, a message is redelivered.
    pub ack_wait: Duration,
    /// Deliveries per message (= attempts per job); then the job is FAILED.
    pub max_deliver: i64,
    /// Stream replicas, applied when the stream is created.
    pub replicas: usize,
}

/// Creates (or opens) the stream and its consumers. Idempotent; both the jobs service and
/// the workers call it at startup.
pub async fn ensure(
    js: &jetstream::Context,
    names: &QueueNames,
    settings: QueueSettings,
) -> Result<stream::Stream, String> {
    let stream = js
        .get_or_create_stream(stream::Config {
            name: names.stream.clone(),
            subjects: vec![format!("{}.queue.>", names.prefix)],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {}: {e}", names.stream))?;
    for device in DEVICES {
        for band in BANDS {
            let name = QueueNames::consumer_name(device, band);
            stream
                .get_or_create_consumer(
                    &name,
                    consumer::pull::Config {
                        durable_name: Some(name.clone()),
                        filter_subject: names.dispatch_subject(device, band),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: settings.ack_wait,
                        max_deliver: settings.max_deliver,
                        max_ack_pending: -1,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| format!("consumer {name}: {e}"))?;
        }
    }
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_consumer_order() {
        assert_eq!((band(5), band(0), band(-3)), ("high", "normal", "low"));
        let order = QueueNames::consumer_order("cuda:0");
        assert_eq!(order[0], ("cuda", "high"));
        assert_eq!(order[1], ("any", "high"));
        assert_eq!(order.last(), Some(&("any", "low")));
        assert!(
            QueueNames::consumer_order("cpu")
                .iter()
                .all(|(d, _)| *d != "cuda")
        );
        let n = QueueNames::new("t1.jobs", "T1_JOBS");
        assert_eq!(n.dispatch_subject("cpu", "low"), "t1.jobs.queue.cpu.low");
        assert_eq!(n.report_subject("x"), "t1.jobs.report.x");
    }
}
