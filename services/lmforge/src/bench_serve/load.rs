//! The load generator: issues `GenerateStream` calls at one concurrency level, closed-loop
//! or with Poisson arrivals, and times every request from the client's side.
//!
//! Every request that is sent ends as exactly one [`RequestOutcome`] — a timeout, an error
//! status, a stream that ends without a finish reason, or a task that died all count as
//! failures — so nothing is silently dropped. Requests are built from `(seed, index)` alone,
//! so a run is reproducible whatever order the clients pick them up in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lmforge_model::Rng;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::transport::Channel;

use super::stats::{LengthDist, poisson_gap};
use crate::generate_cmd::finish_name;

/// How requests arrive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrival {
    /// C clients, each sending its next request when the previous one finishes.
    Closed,
    /// Poisson arrivals at `rate` requests/s, at most C in flight (an arrival waits for a
    /// free slot).
    Poisson {
        /// Mean arrivals per second.
        rate: f64,
    },
}

impl std::fmt::Display for Arrival {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => write!(f, "closed"),
            Self::Poisson { rate } => write!(f, "poisson {rate}/s"),
        }
    }
}

/// What every request of a run looks like.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// Model reference; empty → the replica's default model.
    pub model: String,
    /// Prompt length in tokens (in words with `text`).
    pub prompt_len: LengthDist,
    /// `max_tokens` of each request.
    pub output_len: LengthDist,
    /// Token ids are drawn from `FIRST_ORDINARY_ID..vocab_size`.
    pub vocab_size: u32,
    /// Send prompts as text (random words) instead of token ids.
    pub text: bool,
    /// Sampling temperature (0 = greedy).
    pub temperature: f32,
    /// Keep generating past EOS so every request produces `max_tokens`.
    pub ignore_eos: bool,
}

/// Ids below this are special tokens (`<pad>`, `<s>`, `</s>`) in lmforge's checkpoints.
const FIRST_ORDINARY_ID: u32 = 3;

const WORDS: &[&str] = &[
    "the", "model", "serves", "many", "requests", "at", "once", "while", "each", "token",
    "streams", "back", "to", "its", "client", "batch", "cache", "block", "prompt", "answer",
    "bank", "account", "transfer", "balance", "card", "loan", "rate", "fee", "branch", "help",
    "please", "explain", "why", "how", "what", "when", "my", "your", "is", "a",
];

impl RequestSpec {
    /// Request `index` of the run seeded with `seed`; the same pair always gives the same
    /// request.
    pub fn request(&self, seed: u64, index: u64, request_id: String) -> pb::GenerateRequest {
        let mut rng = Rng::new(seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let prompt_len = self.prompt_len.sample(&mut rng);
        let output_len = self.output_len.sample(&mut rng);
        let input = if self.text {
            let words: Vec<&str> = (0..prompt_len)
                .map(|_| WORDS[rng.below(WORDS.len())])
                .collect();
            pb::generate_request::Input::Prompt(words.join(" "))
        } else {
            let span = self.vocab_size.saturating_sub(FIRST_ORDINARY_ID).max(1) as usize;
            let ids = (0..prompt_len)
                .map(|_| FIRST_ORDINARY_ID + rng.below(span) as u32)
                .collect();
            pb::generate_request::Input::TokenIds(pb::TokenIds { ids })
        };
        pb::GenerateRequest {
            request_id,
            model: self.model.clone(),
            input: Some(input),
            sampling: Some(pb::SamplingParams {
                max_tokens: Some(output_len),
                temperature: Some(self.temperature),
                ignore_eos: self.ignore_eos,
                seed: Some(seed ^ index),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Why a request failed, grouped by `kind` in reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// `ResourceExhausted`, `timeout`, `no finish reason`, `finish error`, …
    pub kind: String,
    /// The details of this occurrence.
    pub message: String,
}

/// One request as the client saw it.
#[derive(Debug, Clone, Default)]
pub struct RequestOutcome {
    /// Sending the request → the first message carrying tokens.
    pub ttft: Option<Duration>,
    /// Gaps between consecutive messages carrying tokens.
    pub itl: Vec<Duration>,
    /// Sending the request → the end of the stream.
    pub e2e: Duration,
    /// Tokens received.
    pub output_tokens: u64,
    /// Prompt tokens as the server counted them (from the final usage).
    pub prompt_tokens: Option<u32>,
    /// Set when the request failed.
    pub failure: Option<Failure>,
}

/// Runs one request and times it; never panics, every ending is an outcome.
pub async fn one_request(
    mut client: InferenceServiceClient<Channel>,
    request: pb::GenerateRequest,
    timeout: Duration,
) -> RequestOutcome {
    let start = Instant::now();
    let mut outcome = RequestOutcome::default();
    let mut stream_failure = None;
    let streamed = tokio::time::timeout(timeout, async {
        let mut stream = client.generate_stream(request).await?.into_inner();
        let mut last_token_at = None;
        let mut finish = None;
        while let Some(message) = stream.message().await? {
            let now = Instant::now();
            if !message.tokens.is_empty() {
                match last_token_at {
                    None => outcome.ttft = Some(now - start),
                    Some(previous) => outcome.itl.push(now - previous),
                }
                last_token_at = Some(now);
                outcome.output_tokens += message.tokens.len() as u64;
            }
            if let Some(usage) = message.usage {
                outcome.prompt_tokens = Some(usage.prompt_tokens);
            }
            if let Some(error) = message.error {
                stream_failure = Some(format!("{}: {}", error.code, error.message));
            }
            if message.finish_reason != pb::FinishReason::Unspecified as i32 {
                finish = Some(message.finish_reason);
            }
        }
        Ok::<_, tonic::Status>(finish)
    })
    .await;
    outcome.e2e = start.elapsed();
    let failure = |kind: &str, message: String| {
        Some(Failure {
            kind: kind.to_owned(),
            message,
        })
    };
    outcome.failure = match streamed {
        Err(_) => failure("timeout", format!("no end of stream within {timeout:?}")),
        Ok(Err(status)) => failure(&format!("{:?}", status.code()), status.message().to_owned()),
        Ok(Ok(None)) => failure(
            "no finish reason",
            "the stream ended without a finish reason".to_owned(),
        ),
        Ok(Ok(Some(reason))) => match pb::FinishReason::try_from(reason) {
            Ok(pb::FinishReason::Stop | pb::FinishReason::Length) => None,
            Ok(other) => failure(
                &format!("finish {}", finish_name(other)),
                stream_failure.unwrap_or_default(),
            ),
            Err(_) => failure("finish unknown", format!("finish reason {reason}")),
        },
    };
    outcome
}

/// One concurrency level to run.
#[derive(Debug, Clone)]
pub struct LevelPlan {
    /// Clients (closed) or the in-flight cap (Poisson).
    pub concurrency: usize,
    /// How requests arrive.
    pub arrival: Arrival,
    /// Stop after this many requests.
    pub requests: Option<usize>,
    /// Stop sending new requests after this long (in-flight ones finish).
    pub duration: Option<Duration>,
    /// A request taking longer counts as failed (`timeout`).
    pub request_timeout: Duration,
    /// Seeds the prompts and the arrivals.
    pub seed: u64,
    /// Request ids are `{id_prefix}-{index}`.
    pub id_prefix: String,
}

/// What a level produced.
#[derive(Debug, Clone)]
pub struct LevelRun {
    /// Requests sent.
    pub issued: usize,
    /// One per request sent.
    pub outcomes: Vec<RequestOutcome>,
    /// From the first send to the end of the last stream.
    pub wall: Duration,
    /// Most requests in flight at any moment.
    pub max_in_flight: usize,
}

/// Counts requests in flight and remembers the peak.
#[derive(Debug, Default)]
struct InFlight {
    now: AtomicUsize,
    peak: AtomicUsize,
}

impl InFlight {
    async fn track<F: std::future::Future>(&self, work: F) -> F::Output {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        let output = work.await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        output
    }
}

/// Runs one level against `client` and returns every outcome.
pub async fn run_level(
    client: &InferenceServiceClient<Channel>,
    spec: &Arc<RequestSpec>,
    plan: &LevelPlan,
) -> LevelRun {
    assert!(plan.concurrency > 0, "concurrency is validated to be ≥ 1");
    assert!(
        plan.requests.is_some() || plan.duration.is_some(),
        "a level needs a request count or a duration"
    );
    let start = Instant::now();
    let deadline = plan.duration.map(|d| start + d);
    let limit = plan.requests.unwrap_or(usize::MAX);
    let in_flight = Arc::new(InFlight::default());
    let issued = Arc::new(AtomicUsize::new(0));
    let send = {
        let (client, spec, plan, in_flight, issued) = (
            client.clone(),
            Arc::clone(spec),
            plan.clone(),
            Arc::clone(&in_flight),
            Arc::clone(&issued),
        );
        move |index: usize| {
            let request = spec.request(
                plan.seed,
                index as u64,
                format!("{}-{index}", plan.id_prefix),
            );
            let (client, in_flight, timeout) =
                (client.clone(), Arc::clone(&in_flight), plan.request_timeout);
            issued.fetch_add(1, Ordering::SeqCst);
            async move { in_flight.track(one_request(client, request, timeout)).await }
        }
    };
    let tasks: Vec<tokio::task::JoinHandle<Vec<RequestOutcome>>> = match plan.arrival {
        Arrival::Closed => {
            let next = Arc::new(AtomicUsize::new(0));
            (0..plan.concurrency)
                .map(|_| {
                    let (next, send) = (Arc::clone(&next), send.clone());
                    tokio::spawn(async move {
                        let mut outcomes = Vec::new();
                        loop {
                            if deadline.is_some_and(|d| Instant::now() >= d) {
                                break;
                            }
                            let index = next.fetch_add(1, Ordering::SeqCst);
                            if index >= limit {
                                break;
                            }
                            outcomes.push(send(index).await);
                        }
                        outcomes
                    })
                })
                .collect()
        }
        Arrival::Poisson { rate } => {
            let slots = Arc::new(Semaphore::new(plan.concurrency));
            let mut arrivals = Rng::new(plan.seed ^ 0xA5A5_A5A5_5A5A_5A5A);
            let mut next_arrival = start;
            let mut tasks = Vec::new();
            for index in 0..limit {
                next_arrival += poisson_gap(&mut arrivals, rate);
                if deadline.is_some_and(|d| next_arrival >= d) {
                    break;
                }
                tokio::time::sleep_until(next_arrival).await;
                let slot = Arc::clone(&slots)
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let request = send(index);
                tasks.push(tokio::spawn(async move {
                    let outcome = request.await;
                    drop(slot);
                    vec![outcome]
                }));
            }
            tasks
        }
    };
    let mut outcomes = Vec::new();
    for task in tasks {
        match task.await {
            Ok(done) => outcomes.extend(done),
            Err(join) => tracing::error!(error = %join, "a load-generator task failed"),
        }
    }
    let issued = issued.load(Ordering::SeqCst);
    // A task that died took its outcomes with it: its requests count as lost, not dropped.
    while outcomes.len() < issued {
        outcomes.push(RequestOutcome {
            failure: Some(Failure {
                kind: "lost".to_owned(),
                message: "the client task died before the request ended".to_owned(),
            }),
            ..Default::default()
        });
    }
    LevelRun {
        issued,
        outcomes,
        wall: start.elapsed(),
        max_in_flight: in_flight.peak.load(Ordering::SeqCst),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: bool) -> RequestSpec {
        RequestSpec {
            model: "m".into(),
            prompt_len: "4..12".parse().expect("valid"),
            output_len: LengthDist::fixed(7),
            vocab_size: 50,
            text,
            temperature: 0.0,
            ignore_eos: true,
        }
    }

    #[test]
    fn requests_are_reproducible_and_exact_in_length() {
        let spec = spec(false);
        let a = spec.request(3, 10, "a".into());
        let b = spec.request(3, 10, "b".into());
        assert_eq!(a.input, b.input, "same seed and index, same prompt");
        assert_ne!(a.input, spec.request(3, 11, "c".into()).input);
        assert_ne!(a.input, spec.request(4, 10, "d".into()).input);
        for index in 0..100 {
            let request = spec.request(1, index, String::new());
            let Some(pb::generate_request::Input::TokenIds(ids)) = request.input else {
                panic!("token ids expected");
            };
            assert!((4..=12).contains(&ids.ids.len()));
            assert!(ids.ids.iter().all(|&id| (3..50).contains(&id)));
            let sampling = request.sampling.expect("set");
            assert_eq!(sampling.max_tokens, Some(7));
            assert!(sampling.ignore_eos);
        }
        let Some(pb::generate_request::Input::Prompt(text)) =
            self::spec(true).request(1, 0, String::new()).input
        else {
            panic!("text expected");
        };
        assert!((4..=12).contains(&text.split(' ').count()));
    }
}
