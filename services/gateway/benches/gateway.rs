//! Gateway overhead (`make bench`): 32 concurrent streams straight to an inference server vs
//! through the gateway (HTTP SSE), and cache-hit throughput. The inference side is a scripted
//! server that streams a fixed answer at once, so the difference is the gateway's own cost.
//! Needs Postgres (`make services`). Prints a table with each figure beside its target.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{MockInference, Script, TestGateway};
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;

/// The allocator of the `lmforge-gateway` binary (src/main.rs), so the figures are the
/// process's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CONCURRENCY: usize = 32;
const STREAMS_PER_CLIENT: usize = 40;
const CHUNKS: usize = 16;

fn p50(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

async fn direct(addr: std::net::SocketAddr) -> Vec<Duration> {
    let tasks = (0..CONCURRENCY).map(|c| {
        tokio::spawn(async move {
            // One connection per client, as 32 separate callers would have.
            let mut client = InferenceServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("connect");
            let mut out = Vec::new();
            for i in 0..STREAMS_PER_CLIENT {
                let started = Instant::now();
                let mut stream = client
                    .generate_stream(pb::GenerateRequest {
                        request_id: format!("d{c}-{i}"),
                        model: "bench@production".into(),
                        input: Some(pb::generate_request::Input::Prompt("hi".into())),
                        ..Default::default()
                    })
                    .await
                    .expect("stream")
                    .into_inner();
                while let Some(m) = stream.next().await {
                    m.expect("message");
                }
                out.push(started.elapsed());
            }
            out
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("task"))
        .collect()
}

async fn through_gateway(gw: &TestGateway, key: &str) -> Vec<Duration> {
    let tasks = (0..CONCURRENCY).map(|_| {
        let client = gw.client.clone();
        let url = format!("{}/v1/chat/completions", gw.http);
        let key = key.to_owned();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for _ in 0..STREAMS_PER_CLIENT {
                let started = Instant::now();
                let body = client
                    .post(&url)
                    .bearer_auth(&key)
                    .json(&serde_json::json!({"model": "bench", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
                    .send()
                    .await
                    .expect("send")
                    .text()
                    .await
                    .expect("body");
                assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
                out.push(started.elapsed());
            }
            out
        })
    });
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .flat_map(|r| r.expect("task"))
        .collect()
}

async fn cache_hits(gw: &TestGateway, key: &str, duration: Duration) -> f64 {
    let body = serde_json::to_vec(&serde_json::json!({"model": "bench", "temperature": 0, "messages": [{"role": "user", "content": "cached"}]}))
        .expect("json");
    let url = format!("{}/v1/chat/completions", gw.http);
    // Warm the cache.
    gw.client
        .post(&url)
        .bearer_auth(key)
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .expect("warm");
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let tasks = (0..CONCURRENCY).map(|_| {
        let (client, url, key, body) =
            (gw.client.clone(), url.clone(), key.to_owned(), body.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < deadline {
                let response = client
                    .post(&url)
                    .bearer_auth(&key)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("send");
                assert_eq!(response.status().as_u16(), 200);
                response.bytes().await.expect("body");
                n += 1;
            }
            n
        })
    });
    let total: u64 = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .sum();
    total as f64 / started.elapsed().as_secs_f64()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn row(metric: &str, value: &str, target: &str, verdict: &str) {
    println!("{metric:<44} {value:>12} {target:>10}  {verdict}");
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mock = MockInference::default();
        let chunks: Vec<String> = (0..CHUNKS).map(|i| format!("tok{i} ")).collect();
        let chunk_refs: Vec<&str> = chunks.iter().map(String::as_str).collect();
        mock.script("bench@production", Script::chunks(&chunk_refs));
        let addr = mock.start().await;
        let routing = "models:\n  - name: bench\n    targets: [\"bench@production\"]\n";
        let gw = TestGateway::start("bench", addr, routing).await;
        let (_, key) = gw.key("bench", &[], 0, 0).await;

        // Warm-up, then alternate to share the machine's noise fairly.
        direct(addr).await;
        through_gateway(&gw, &key).await;
        let mut direct_samples = Vec::new();
        let mut gateway_samples = Vec::new();
        for _ in 0..3 {
            direct_samples.extend(direct(addr).await);
            gateway_samples.extend(through_gateway(&gw, &key).await);
        }
        let (d, g) = (p50(direct_samples), p50(gateway_samples));
        let added = g.saturating_sub(d);
        let rps = cache_hits(&gw, &key, Duration::from_secs(5)).await;

        let verdict = |ok: bool| if ok { "ok" } else { "MISSED" };
        println!();
        println!("gateway benchmark ({CONCURRENCY} concurrent clients, {CHUNKS}-chunk streams)");
        row("metric", "value", "target", "");
        row("p50 stream, straight to inference", &ms(d), "", "");
        row("p50 stream, through the gateway (HTTP SSE)", &ms(g), "", "");
        row(
            "added p50 latency",
            &ms(added),
            "<= 2 ms",
            verdict(added <= Duration::from_millis(2)),
        );
        row(
            "cache hits (HTTP, non-streamed)",
            &format!("{rps:.0} req/s"),
            ">= 10000",
            verdict(rps >= 10_000.0),
        );
        gw.stop().await;
    });
}
