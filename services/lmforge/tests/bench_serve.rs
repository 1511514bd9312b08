//! The load generator of `lmforge bench serve` (and `lmforge generate`'s streaming) against a
//! real tonic server in the test: a scripted `InferenceService` that streams a known number
//! of tokens with known delays, fails chosen requests in chosen ways, and counts how many
//! streams it serves at once.
//!
//! These tests run on the real clock: tokio's paused clock auto-advances whenever every task
//! waits, including while a loopback packet is on its way, so it shifts exactly the client-side
//! timings under test. Bounds are therefore one-sided where the scripted delay is a floor
//! (a token cannot arrive before the server sends it) and generous above it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use lmforge::bench_serve::load::{self, Arrival, LevelPlan, RequestSpec};
use lmforge::bench_serve::report::LevelReport;
use lmforge::bench_serve::stats::LengthDist;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_proto::v1::inference_service_server::{InferenceService, InferenceServiceServer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::codegen::BoxStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

const FIRST_TOKEN: Duration = Duration::from_millis(100);
const TOKEN_GAP: Duration = Duration::from_millis(25);
/// How late a message may arrive on a busy machine before a test calls it wrong.
const SLACK_MS: f64 = 60.0;

/// What the scripted server does with request number `index` (from its request id).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Script {
    /// Streams `max_tokens` tokens: the first after FIRST_TOKEN, then one per TOKEN_GAP.
    Tokens,
    /// Answers RESOURCE_EXHAUSTED at once.
    Reject,
    /// Streams two tokens, then fails the stream with INTERNAL.
    BreakMidStream,
    /// Streams every token but ends without a finish reason.
    NoFinish,
    /// Never sends anything.
    Hang,
}

#[derive(Clone)]
struct Scripted {
    script: Arc<dyn Fn(u64) -> Script + Send + Sync>,
    active: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

fn token(id: u32) -> pb::TokenInfo {
    pb::TokenInfo {
        id,
        text: format!("t{id}"),
        ..Default::default()
    }
}

#[tonic::async_trait]
impl InferenceService for Scripted {
    async fn generate_stream(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<BoxStream<pb::GenerateStreamResponse>>, Status> {
        let request = request.into_inner();
        let index: u64 = request
            .request_id
            .rsplit('-')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let script = (self.script)(index);
        if script == Script::Reject {
            return Err(Status::resource_exhausted("the queue is full"));
        }
        let max_tokens = request.sampling.and_then(|s| s.max_tokens).unwrap_or(4);
        let (tx, rx) = mpsc::channel(8);
        let (active, peak) = (Arc::clone(&self.active), Arc::clone(&self.peak));
        let now = active.fetch_add(1, Ordering::SeqCst) + 1;
        peak.fetch_max(now, Ordering::SeqCst);
        tokio::spawn(async move {
            if script == Script::Hang {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            for i in 0..max_tokens {
                tokio::time::sleep(if i == 0 { FIRST_TOKEN } else { TOKEN_GAP }).await;
                if script == Script::BreakMidStream && i == 2 {
                    active.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(Err(Status::internal("engine crashed"))).await;
                    return;
                }
                let last = i + 1 == max_tokens;
                if last {
                    // Before the last message, so the client's next request cannot overlap.
                    active.fetch_sub(1, Ordering::SeqCst);
                }
                let finish = if last && script == Script::Tokens {
                    pb::FinishReason::Length
                } else {
                    pb::FinishReason::Unspecified
                };
                let message = pb::GenerateStreamResponse {
                    request_id: request.request_id.clone(),
                    tokens: vec![token(i + 3)],
                    text: format!("t{} ", i + 3),
                    finish_reason: finish as i32,
                    usage: last.then_some(pb::Usage {
                        prompt_tokens: 8,
                        completion_tokens: max_tokens,
                        total_tokens: 8 + max_tokens,
                        cached_prompt_tokens: 0,
                    }),
                    ..Default::default()
                };
                if tx.send(Ok(message)).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct Server {
    addr: SocketAddr,
    peak: Arc<AtomicUsize>,
    active: Arc<AtomicUsize>,
}

async fn start(script: impl Fn(u64) -> Script + Send + Sync + 'static) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound");
    let service = Scripted {
        script: Arc::new(script),
        active: Arc::default(),
        peak: Arc::default(),
    };
    let (peak, active) = (Arc::clone(&service.peak), Arc::clone(&service.active));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(InferenceServiceServer::new(service))
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    Server { addr, peak, active }
}

async fn client(addr: SocketAddr) -> InferenceServiceClient<Channel> {
    lmforge::generate_cmd::connect(&format!("http://{addr}"))
        .await
        .expect("the test server accepts connections")
}

fn spec(output_tokens: u32) -> Arc<RequestSpec> {
    Arc::new(RequestSpec {
        model: String::new(),
        prompt_len: "8..16".parse().expect("valid"),
        output_len: LengthDist::fixed(output_tokens),
        vocab_size: 4096,
        text: false,
        temperature: 0.0,
        ignore_eos: true,
    })
}

fn plan(concurrency: usize, arrival: Arrival, requests: usize) -> LevelPlan {
    LevelPlan {
        concurrency,
        arrival,
        requests: Some(requests),
        duration: None,
        request_timeout: Duration::from_secs(60),
        seed: 7,
        id_prefix: "test".to_owned(),
    }
}

fn ms(seconds: Option<f64>) -> f64 {
    seconds.expect("there are samples") * 1000.0
}

#[tokio::test]
async fn closed_loop_measures_the_scripted_delays_and_keeps_c_in_flight() {
    let server = start(|_| Script::Tokens).await;
    let client = client(server.addr).await;
    let run = load::run_level(&client, &spec(5), &plan(4, Arrival::Closed, 12)).await;
    let report = LevelReport::new(4, "closed".into(), &run);

    assert_eq!(
        (report.requests, report.completed, report.failed),
        (12, 12, 0)
    );
    assert_eq!(report.output_tokens, 60);
    assert_eq!(report.mean_prompt_tokens, Some(8.0));
    // TTFT is at least the scripted first-token delay, e2e at least the whole script; both
    // within a busy machine's slack of it.
    for (name, q, floor) in [("ttft", report.ttft, 100.0), ("e2e", report.e2e, 200.0)] {
        for value in [ms(q.p50), ms(q.p99)] {
            assert!(
                (floor..floor + SLACK_MS).contains(&value),
                "{name} {value} ms, scripted {floor} ms"
            );
        }
    }
    // The median gap is the scripted one (a late message shortens the gap after it, so the
    // median, not each gap, is what matches).
    let itl = ms(report.itl.p50);
    assert!(
        (20.0..40.0).contains(&itl),
        "itl p50 {itl} ms, scripted 25 ms"
    );
    // Four clients, three requests of 200 ms each, back to back.
    assert!(
        (0.6..0.6 + 3.0 * SLACK_MS / 1000.0).contains(&report.wall_s),
        "wall {}",
        report.wall_s
    );
    assert!((report.output_tokens_per_s - 60.0 / report.wall_s).abs() < 1e-9);
    assert_eq!(
        report.max_in_flight, 4,
        "the client keeps C requests in flight"
    );
    assert_eq!(
        server.peak.load(Ordering::SeqCst),
        4,
        "the server never sees more than C streams"
    );
    assert_eq!(server.active.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn every_failure_is_counted_by_kind_and_none_is_dropped() {
    let server = start(|index| match index % 6 {
        1 => Script::Reject,
        2 => Script::BreakMidStream,
        3 => Script::NoFinish,
        4 => Script::Hang,
        _ => Script::Tokens,
    })
    .await;
    let client = client(server.addr).await;
    let mut plan = plan(3, Arrival::Closed, 18);
    plan.request_timeout = Duration::from_secs(1);
    let run = load::run_level(&client, &spec(4), &plan).await;
    let report = LevelReport::new(3, "closed".into(), &run);

    assert_eq!(run.issued, 18);
    assert_eq!(run.outcomes.len(), 18, "one outcome per request sent");
    assert_eq!((report.completed, report.failed), (6, 12));
    let counts: Vec<(&str, usize)> = report
        .failures
        .iter()
        .map(|(kind, group)| (kind.as_str(), group.count))
        .collect();
    assert_eq!(
        counts,
        [
            ("Internal", 3),
            ("ResourceExhausted", 3),
            ("no finish reason", 3),
            ("timeout", 3),
        ]
    );
    assert_eq!(
        report.failures["ResourceExhausted"].example,
        "the queue is full"
    );
    // Only completed requests count towards throughput and latency.
    assert_eq!(report.output_tokens, 6 * 4);
    assert!(
        ms(report.e2e.p99) < 175.0 + SLACK_MS,
        "the timeouts are not in e2e"
    );
    let table = lmforge::bench_serve::report::table(&[report]);
    assert!(
        table.contains("3 request(s) failed with timeout"),
        "{table}"
    );
}

#[tokio::test]
async fn poisson_arrivals_follow_the_rate_and_respect_the_in_flight_cap() {
    let server = start(|_| Script::Tokens).await;
    let client = client(server.addr).await;

    // Arrivals far faster than service: the cap of 3 is what limits the load.
    let run = load::run_level(
        &client,
        &spec(6),
        &plan(3, Arrival::Poisson { rate: 1000.0 }, 15),
    )
    .await;
    let report = LevelReport::new(3, "poisson".into(), &run);
    assert_eq!((report.completed, report.failed), (15, 0));
    assert_eq!(report.max_in_flight, 3);
    assert_eq!(server.peak.load(Ordering::SeqCst), 3);

    // Arrivals slower than service: the wall time is about requests / rate.
    let run = load::run_level(
        &client,
        &spec(1),
        &plan(64, Arrival::Poisson { rate: 100.0 }, 40),
    )
    .await;
    let report = LevelReport::new(64, "poisson".into(), &run);
    assert_eq!((report.completed, report.failed), (40, 0));
    // 40 gaps of mean 10 ms plus the last request's 100 ms.
    assert!(
        (0.3..0.8).contains(&report.wall_s),
        "40 arrivals at 100/s took {} s",
        report.wall_s
    );
    assert!(report.max_in_flight < 64);
}

#[tokio::test]
async fn a_duration_bounds_the_level_instead_of_a_count() {
    let server = start(|_| Script::Tokens).await;
    let client = client(server.addr).await;
    let mut plan = plan(2, Arrival::Closed, 0);
    plan.requests = None;
    plan.duration = Some(Duration::from_millis(600));
    let run = load::run_level(&client, &spec(3), &plan).await;
    // 150 ms per request, 2 clients: about 4 rounds before sends stop at 600 ms, then the
    // requests in flight finish.
    assert!((6..=10).contains(&run.issued), "issued {}", run.issued);
    assert_eq!(run.outcomes.len(), run.issued);
    assert!(run.outcomes.iter().all(|o| o.failure.is_none()));
    let most = Duration::from_millis(600 + 150) + Duration::from_secs_f64(2.0 * SLACK_MS / 1000.0);
    assert!(run.wall <= most, "wall {:?}", run.wall);
}

#[tokio::test]
async fn generate_streams_text_as_it_arrives_and_summarises() {
    let server = start(|_| Script::Tokens).await;
    let mut client = client(server.addr).await;
    let request = pb::GenerateRequest {
        request_id: "cli-0".into(),
        input: Some(pb::generate_request::Input::Prompt("hello".into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(3),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut out = Vec::new();
    let summary = lmforge::generate_cmd::stream(&mut client, request, &mut out)
        .await
        .expect("the stream completes");
    assert_eq!(String::from_utf8(out).expect("utf-8"), "t3 t4 t5 \n");
    assert_eq!(summary.finish_reasons(), [Some(pb::FinishReason::Length)]);
    assert_eq!(summary.completion_tokens(), 3);
    assert!(!summary.failed());
    let first = summary.first_token.expect("tokens arrived");
    assert!(first >= FIRST_TOKEN, "TTFT {first:?}");
    let line = summary.to_string();
    assert!(
        line.starts_with("finish length · 8 prompt + 3 completion tokens · TTFT "),
        "{line}"
    );
    assert!(line.contains(" tok/s · "), "{line}");
}

#[tokio::test]
async fn generate_turns_an_error_status_into_one_line() {
    let server = start(|_| Script::Reject).await;
    let mut client = client(server.addr).await;
    let request = pb::GenerateRequest {
        request_id: "cli-1".into(),
        input: Some(pb::generate_request::Input::Prompt("hello".into())),
        ..Default::default()
    };
    let error = lmforge::generate_cmd::stream(&mut client, request, &mut Vec::new())
        .await
        .expect_err("rejected");
    assert_eq!(error.to_string(), "ResourceExhausted: the queue is full");
}

#[derive(Debug, clap::Parser)]
struct BenchCli {
    #[command(subcommand)]
    command: lmforge::bench_serve::BenchCommand,
}

#[tokio::test]
async fn bench_serve_against_an_address_writes_the_json_report() {
    use clap::Parser;
    let server = start(|_| Script::Tokens).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("nested/report.json");
    let cli = BenchCli::try_parse_from([
        "bench",
        "serve",
        "--inference",
        &format!("http://{}", server.addr),
        "--concurrency",
        "1,3",
        "--requests",
        "6",
        "--output-len",
        "2..3",
        "--warmup",
        "1",
        "--json",
        json.to_str().expect("utf-8 path"),
    ])
    .expect("valid flags");
    lmforge::bench_serve::run(cli.command)
        .await
        .expect("every request completes");
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).expect("the report is written"))
            .expect("JSON");
    let levels = report["levels"].as_array().expect("levels");
    let concurrency: Vec<u64> = levels
        .iter()
        .map(|l| l["concurrency"].as_u64().expect("number"))
        .collect();
    assert_eq!(concurrency, [1, 3]);
    for level in levels {
        assert_eq!(level["requests"], 6);
        assert_eq!(level["failed"], 0);
        let mean = level["mean_output_tokens"].as_f64().expect("number");
        assert!((2.0..=3.0).contains(&mean), "output 2..3 tokens: {mean}");
    }
    assert_eq!(report["run"]["output_len"], "2..3");
    assert!(report["reference"].is_null());
    assert_eq!(report["checks"][0]["passed"], true);

    // A server that rejects everything makes the command fail, with the count.
    let rejecting = start(|_| Script::Reject).await;
    let cli = BenchCli::try_parse_from([
        "bench",
        "serve",
        "--inference",
        &format!("http://{}", rejecting.addr),
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--warmup",
        "0",
    ])
    .expect("valid flags");
    let error = lmforge::bench_serve::run(cli.command)
        .await
        .expect_err("rejected requests fail the run");
    assert_eq!(error.to_string(), "4 request(s) failed");
}
