//! `make bench` for the registry: resolve `name@production` from 64 concurrent clients over
//! loopback (req/s, p50, p99; target ≥ 5,000 req/s with p99 ≤ 10 ms), and a 500 MB artifact
//! upload and download (MB/s and peak memory; target ≥ 200 MB/s, memory flat).
//! Needs Postgres (`make bench` starts it). `LMFORGE_BENCH_SECONDS` and
//! `LMFORGE_BENCH_ARTIFACT_MB` shorten it.

use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use sha2::{Digest, Sha256};

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let seconds = env_number("LMFORGE_BENCH_SECONDS", 5);
    let artifact_mb = env_number("LMFORGE_BENCH_ARTIFACT_MB", 500);
    let schema = format!("bench_{}_registry", std::process::id());
    let artifacts = tempfile::tempdir().expect("temp dir");
    let mut config =
        lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
    config.schema = schema.clone();
    config.postgres.database_max_connections = 16;
    config.artifacts = artifacts.path().display().to_string();
    let listeners = lmforge_runtime::Listeners::ephemeral().await.expect("bind");
    let url = format!("http://{}", listeners.grpc_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(lmforge_registry::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));
    let channel = loop {
        match tonic::transport::Endpoint::from_shared(url.clone())
            .expect("valid")
            .connect()
            .await
        {
            Ok(channel) => break channel,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let mut client = RegistryServiceClient::new(channel);

    // One READY version with one small file, behind `production`.
    let version = loop {
        match client
            .create_model_version(pb::CreateModelVersionRequest {
                model_name: "bench".into(),
                create_model_if_missing: true,
                format: pb::ModelFormat::HfSafetensors as i32,
                ..Default::default()
            })
            .await
        {
            Ok(v) => break v.into_inner().version,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let small = vec![7u8; 1024];
    let upload_small = vec![
        pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Metadata(
                pb::UploadArtifactMetadata {
                    model_name: "bench".into(),
                    version,
                    path: "config.json".into(),
                    size_bytes: small.len() as u64,
                    sha256: hex::encode(Sha256::digest(&small)),
                    content_type: String::new(),
                },
            )),
        },
        pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Chunk(small.clone())),
        },
    ];
    client
        .upload_artifact(tokio_stream::iter(upload_small))
        .await
        .expect("small upload");

    // A large file, streamed in 1 MiB chunks generated on the fly.
    let chunk: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let chunk_sha = {
        let mut hasher = Sha256::new();
        for _ in 0..artifact_mb {
            hasher.update(&chunk);
        }
        hex::encode(hasher.finalize())
    };
    let size = artifact_mb * 1024 * 1024;
    let rss_before = peak_rss_mb();
    let metadata = pb::UploadArtifactRequest {
        payload: Some(pb::upload_artifact_request::Payload::Metadata(
            pb::UploadArtifactMetadata {
                model_name: "bench".into(),
                version,
                path: "model.safetensors".into(),
                size_bytes: size,
                sha256: chunk_sha.clone(),
                content_type: String::new(),
            },
        )),
    };
    let body = chunk.clone();
    let chunks = futures::stream::iter(0..artifact_mb).map(move |_| pb::UploadArtifactRequest {
        payload: Some(pb::upload_artifact_request::Payload::Chunk(body.clone())),
    });
    let started = Instant::now();
    client
        .upload_artifact(futures::stream::iter([metadata]).chain(chunks))
        .await
        .expect("large upload");
    let upload_secs = started.elapsed().as_secs_f64();
    let rss_after_upload = peak_rss_mb();
    client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: "bench".into(),
            version,
            ..Default::default()
        })
        .await
        .expect("finalize");
    let started = Instant::now();
    let mut stream = client
        .download_artifact(pb::DownloadArtifactRequest {
            model_name: "bench".into(),
            version,
            path: "model.safetensors".into(),
            offset: 0,
        })
        .await
        .expect("download")
        .into_inner();
    let mut received = 0u64;
    while let Some(message) = stream.next().await {
        if let Some(pb::download_artifact_response::Payload::Chunk(c)) =
            message.expect("chunk").payload
        {
            received += c.data.len() as u64;
        }
    }
    assert_eq!(received, size);
    let download_secs = started.elapsed().as_secs_f64();
    let rss_after_download = peak_rss_mb();
    client
        .set_alias(pb::SetAliasRequest {
            model_name: "bench".into(),
            alias: "production".into(),
            version,
            ..Default::default()
        })
        .await
        .expect("alias");

    // 64 closed-loop clients on 8 HTTP/2 connections.
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(
            tonic::transport::Endpoint::from_shared(url.clone())
                .expect("valid")
                .connect()
                .await
                .expect("connect"),
        );
    }
    let mut workers = Vec::new();
    for worker in 0..64 {
        let mut client = RegistryServiceClient::new(channels[worker % 8].clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let started = Instant::now();
                client
                    .resolve_model_ref(pb::ResolveModelRefRequest {
                        model_ref: "bench@production".into(),
                    })
                    .await
                    .expect("resolve");
                latencies.push(started.elapsed());
            }
            latencies
        }));
    }
    let started = Instant::now();
    let mut latencies: Vec<Duration> = Vec::new();
    for worker in workers {
        latencies.extend(worker.await.expect("worker"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };

    println!("| registry benchmark | lmforge | target |");
    println!("| --- | --- | --- |");
    println!(
        "| resolve name@production, 64 clients | {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms | ≥ 5,000 req/s, p99 ≤ 10 ms |",
        latencies.len() as f64 / elapsed,
        percentile(0.50),
        percentile(0.99)
    );
    println!(
        "| upload {artifact_mb} MB | {:.0} MB/s, peak RSS +{:.0} MB | ≥ 200 MB/s, flat |",
        artifact_mb as f64 / upload_secs,
        rss_after_upload - rss_before
    );
    println!(
        "| download {artifact_mb} MB | {:.0} MB/s, peak RSS +{:.0} MB | ≥ 200 MB/s, flat |",
        artifact_mb as f64 / download_secs,
        rss_after_download - rss_after_upload
    );

    let _ = stop_tx.send(());
    let _ = server.await;
    let database_url = std::env::var("LMFORGE_DATABASE_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned());
    if let Ok(pool) = sqlx::PgPool::connect(&database_url).await {
        let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
            .execute(&pool)
            .await;
    }
}
