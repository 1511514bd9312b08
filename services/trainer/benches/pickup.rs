//! Submit → pickup latency with an idle worker (issue 6's target: p50 ≤ 50 ms), measured on
//! the real stack: registry, ingest and jobs services, Postgres, NATS JetStream and an
//! in-process trainer worker. Pickup is the job's `started_at − created_at`, both stamped by
//! Postgres: from the row's insert at Submit to the RUNNING transition the worker's start
//! report makes. Each job is one optimizer step; the next is submitted once the worker is idle.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Duration;

use common::{JobsTuning, Stack, spec};
use lmforge_proto::v1 as pb;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn millis(t: &Option<prost_types::Timestamp>) -> f64 {
    let t = t.as_ref().expect("timestamp");
    t.seconds as f64 * 1e3 + f64::from(t.nanos) / 1e6
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut stack = Stack::start("bench_pickup", JobsTuning::default()).await;
        stack.import_base("base-tiny").await;
        let dataset = stack.upload_dataset("bench", 12).await;
        stack.start_worker("bench").await;
        let runs = 40;
        let mut latencies = Vec::with_capacity(runs);
        for i in 0..runs {
            let mut s = spec("base-tiny/1", &dataset, "bench-out", 1);
            if let Some(h) = s.hyperparameters.as_mut() {
                h.eval_every_steps = 0;
                h.checkpoint_every_steps = 0;
            }
            let job = stack.submit(s).await.expect("submit");
            let done = stack
                .wait_for(
                    &job.id,
                    &[pb::JobState::Succeeded, pb::JobState::Failed],
                    Duration::from_secs(60),
                )
                .await;
            assert_eq!(
                done.state,
                pb::JobState::Succeeded as i32,
                "{:?}",
                done.failure
            );
            // The first job warms the caches (model and dataset downloads).
            if i > 0 {
                latencies.push(millis(&done.started_at) - millis(&done.created_at));
            }
            // Let the worker go idle (waiting for work) before the next submit.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        latencies.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&latencies, 0.5), percentile(&latencies, 0.99));
        println!();
        println!(
            "| jobs: submit → pickup (idle worker, n={}) | p50 | p99 | target p50 | |",
            latencies.len()
        );
        println!("|---|---|---|---|---|");
        println!(
            "| pickup latency | {p50:.1} ms | {p99:.1} ms | ≤ 50 ms | {} |",
            if p50 <= 50.0 { "PASS" } else { "FAIL" }
        );
        stack.stop().await;
    });
}
