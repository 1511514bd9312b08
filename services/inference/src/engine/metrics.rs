//! The engine's Prometheus metrics, named after vLLM's (`vllm:` → `lmforge:`), each labelled
//! with the model reference it serves.

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use super::Finish;

/// Register descriptions (once, at service start).
pub fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "lmforge:time_to_first_token_seconds",
        Unit::Seconds,
        "Arrival to first generated token."
    );
    describe_histogram!(
        "lmforge:inter_token_latency_seconds",
        Unit::Seconds,
        "Time between consecutive tokens of a sequence."
    );
    describe_histogram!(
        "lmforge:e2e_request_latency_seconds",
        Unit::Seconds,
        "Arrival to the last choice's end."
    );
    describe_histogram!(
        "lmforge:request_queue_time_seconds",
        Unit::Seconds,
        "Time waiting for admission."
    );
    describe_histogram!(
        "lmforge:iteration_seconds",
        Unit::Seconds,
        "Duration of one engine forward step."
    );
    describe_histogram!(
        "lmforge:batch_size",
        Unit::Count,
        "Sequences in one engine step."
    );
    describe_gauge!(
        "lmforge:num_requests_running",
        Unit::Count,
        "Sequences generating."
    );
    describe_gauge!(
        "lmforge:num_requests_waiting",
        Unit::Count,
        "Requests and preempted sequences waiting."
    );
    describe_gauge!(
        "lmforge:kv_blocks_used",
        Unit::Count,
        "KV cache blocks referenced by sequences."
    );
    describe_gauge!(
        "lmforge:kv_cache_usage_perc",
        Unit::Percent,
        "Fraction of KV blocks in use (0-1)."
    );
    describe_counter!(
        "lmforge:prefix_cache_queries_total",
        Unit::Count,
        "Prompt tokens looked up in the prefix cache."
    );
    describe_counter!(
        "lmforge:prefix_cache_hits_total",
        Unit::Count,
        "Prompt tokens found in the prefix cache."
    );
    describe_counter!(
        "lmforge:num_preemptions_total",
        Unit::Count,
        "Sequences preempted for recompute."
    );
    describe_counter!(
        "lmforge:request_rejected_total",
        Unit::Count,
        "Requests refused at admission, by reason."
    );
    describe_counter!(
        "lmforge:generation_tokens_total",
        Unit::Count,
        "Tokens generated."
    );
    describe_counter!(
        "lmforge:request_success_total",
        Unit::Count,
        "Choices finished, by finish reason."
    );
}

pub fn ttft(model: &str, d: Duration) {
    histogram!("lmforge:time_to_first_token_seconds", "model" => model.to_string()).record(d);
}

pub fn itl(model: &str, d: Duration) {
    histogram!("lmforge:inter_token_latency_seconds", "model" => model.to_string()).record(d);
}

pub fn e2e(model: &str, d: Duration) {
    histogram!("lmforge:e2e_request_latency_seconds", "model" => model.to_string()).record(d);
}

pub fn queue_time(model: &str, d: Duration) {
    histogram!("lmforge:request_queue_time_seconds", "model" => model.to_string()).record(d);
}

pub fn step(model: &str, sequences: usize, d: Duration) {
    histogram!("lmforge:iteration_seconds", "model" => model.to_string()).record(d);
    histogram!("lmforge:batch_size", "model" => model.to_string()).record(sequences as f64);
}

pub fn gauges(model: &str, running: usize, waiting: usize, used: usize, total: usize) {
    gauge!("lmforge:num_requests_running", "model" => model.to_string()).set(running as f64);
    gauge!("lmforge:num_requests_waiting", "model" => model.to_string()).set(waiting as f64);
    gauge!("lmforge:kv_blocks_used", "model" => model.to_string()).set(used as f64);
    gauge!("lmforge:kv_cache_usage_perc", "model" => model.to_string())
        .set(used as f64 / total.max(1) as f64);
}

pub fn prefix_cache(model: &str, queried: usize, hits: usize) {
    counter!("lmforge:prefix_cache_queries_total", "model" => model.to_string())
        .increment(queried as u64);
    counter!("lmforge:prefix_cache_hits_total", "model" => model.to_string())
        .increment(hits as u64);
}

pub fn preempted(model: &str) {
    counter!("lmforge:num_preemptions_total", "model" => model.to_string()).increment(1);
}

pub fn rejected(model: &str, reason: &'static str) {
    counter!("lmforge:request_rejected_total", "model" => model.to_string(), "reason" => reason)
        .increment(1);
}

pub fn generated(model: &str) {
    counter!("lmforge:generation_tokens_total", "model" => model.to_string()).increment(1);
}

pub fn finished(model: &str, reason: &Finish) {
    let reason = match reason {
        Finish::Stop { .. } => "stop",
        Finish::Length => "length",
        Finish::Cancelled => "cancelled",
        Finish::DeadlineExceeded => "deadline_exceeded",
        Finish::Error(_) => "error",
    };
    counter!("lmforge:request_success_total", "model" => model.to_string(), "finished_reason" => reason).increment(1);
}
