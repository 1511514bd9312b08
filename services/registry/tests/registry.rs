//! The registry over real gRPC, real Postgres (a schema of its own per test) and a real
//! artifact directory: numbering under concurrency, idempotency, uploads that must not
//! become READY when corrupted, downloads, aliases under concurrent resolvers, WatchAlias,
//! and the error code of each bad input.

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::Listeners;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

struct Registry {
    client: RegistryServiceClient<Channel>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), lmforge_runtime::StartupError>>>,
    schema: String,
    _artifacts: tempfile::TempDir,
}

impl Registry {
    async fn start(label: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let schema = format!("t{}_{n}_{label}", std::process::id());
        Self::start_on(&schema, tempfile::tempdir().expect("temp dir")).await
    }

    /// A registry replica on an existing schema and artifact directory.
    async fn start_on(schema: &str, artifacts: tempfile::TempDir) -> Self {
        let schema = schema.to_owned();
        let mut config =
            lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
        if let Ok(url) = std::env::var("LMFORGE_DATABASE_URL") {
            config.postgres.database_url = url;
        }
        config.postgres.database_max_connections = 30;
        config.schema = schema.clone();
        config.artifacts = artifacts.path().display().to_string();
        let listeners = Listeners::ephemeral().await.expect("bind");
        let addr = listeners.grpc_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(lmforge_registry::serve(config, listeners, async {
            let _ = stop_rx.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid")
            .connect_lazy();
        let mut client = RegistryServiceClient::new(channel);
        // Ready once a call gets past transport errors (migrations run before serving).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match client
                .get_model(pb::GetModelRequest {
                    name: "probe".into(),
                })
                .await
            {
                Err(status) if status.code() == Code::NotFound => break,
                other => {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "registry did not start: {other:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        Self {
            client,
            stop_tx: Some(stop_tx),
            task: Some(task),
            schema,
            _artifacts: artifacts,
        }
    }

    /// Stops this replica but leaves the schema to the replica that owns it.
    async fn stop_keeping_schema(mut self) {
        if let Some(stop_tx) = self.stop_tx.take() {
            let _ = stop_tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("task").expect("clean stop");
        }
    }

    async fn stop(mut self) {
        if let Some(stop_tx) = self.stop_tx.take() {
            let _ = stop_tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("task").expect("clean stop");
        }
        let url = std::env::var("LMFORGE_DATABASE_URL")
            .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned());
        if let Ok(pool) = sqlx::PgPool::connect(&url).await {
            let _ = sqlx::query(&format!("DROP SCHEMA \"{}\" CASCADE", self.schema))
                .execute(&pool)
                .await;
        }
    }
}

fn new_version(model: &str, request_id: &str) -> pb::CreateModelVersionRequest {
    pb::CreateModelVersionRequest {
        model_name: model.into(),
        create_model_if_missing: true,
        client_request_id: request_id.into(),
        format: pb::ModelFormat::HfSafetensors as i32,
        architecture: "LlamaForCausalLM".into(),
        metrics: [("eval_loss".to_owned(), 1.5)].into(),
        ..Default::default()
    }
}

async fn upload(
    client: &mut RegistryServiceClient<Channel>,
    model: &str,
    version: u32,
    path: &str,
    data: &[u8],
    claimed_sha: Option<String>,
) -> Result<pb::ArtifactFile, tonic::Status> {
    let sha = claimed_sha.unwrap_or_else(|| hex::encode(Sha256::digest(data)));
    let mut messages = vec![pb::UploadArtifactRequest {
        payload: Some(pb::upload_artifact_request::Payload::Metadata(
            pb::UploadArtifactMetadata {
                model_name: model.into(),
                version,
                path: path.into(),
                size_bytes: data.len() as u64,
                sha256: sha,
                content_type: String::new(),
            },
        )),
    }];
    for chunk in data.chunks(7000) {
        messages.push(pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Chunk(chunk.to_vec())),
        });
    }
    client
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

/// Creates, uploads one file and finalizes a READY version; returns its number.
async fn ready_version(
    client: &mut RegistryServiceClient<Channel>,
    model: &str,
    data: &[u8],
) -> u32 {
    let version = client
        .create_model_version(new_version(model, ""))
        .await
        .expect("create")
        .into_inner()
        .version;
    upload(client, model, version, "model.safetensors", data, None)
        .await
        .expect("upload");
    let finalized = client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: model.into(),
            version,
            ..Default::default()
        })
        .await
        .expect("finalize")
        .into_inner();
    assert_eq!(finalized.status, pb::ModelVersionStatus::Ready as i32);
    version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_registrations_get_versions_one_to_twenty() {
    let registry = Registry::start("numbering").await;
    let tasks = (0..20).map(|i| {
        let mut client = registry.client.clone();
        tokio::spawn(async move {
            client
                .create_model_version(new_version("acme/bank", &format!("req-{i}")))
                .await
                .expect("create version")
                .into_inner()
                .version
        })
    });
    let mut numbers: Vec<u32> = futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("task"))
        .collect();
    numbers.sort_unstable();
    assert_eq!(numbers, (1..=20).collect::<Vec<u32>>());

    // A retry with the same request id returns the same version; different content refused.
    let mut client = registry.client.clone();
    let again = client
        .create_model_version(new_version("acme/bank", "req-7"))
        .await
        .expect("idempotent retry")
        .into_inner();
    let first = client
        .list_model_versions(pb::ListModelVersionsRequest {
            model_name: "acme/bank".into(),
            page_size: 100,
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(first.versions.len(), 20, "the retry created nothing");
    assert!(first.versions.iter().any(|v| v.id == again.id));
    let mut different = new_version("acme/bank", "req-7");
    different.description = "something else".into();
    let status = client
        .create_model_version(different)
        .await
        .expect_err("same id, different request");
    assert_eq!(status.code(), Code::AlreadyExists);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploads_are_verified_and_downloads_round_trip() {
    let registry = Registry::start("artifacts").await;
    let mut client = registry.client.clone();
    let version = client
        .create_model_version(new_version("tiny", "r1"))
        .await
        .expect("create")
        .into_inner()
        .version;
    let weights: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();

    // Corrupted: the claimed sha256 is not the bytes'.
    let wrong = hex::encode(Sha256::digest(b"other bytes"));
    let status = upload(
        &mut client,
        "tiny",
        version,
        "model.safetensors",
        &weights,
        Some(wrong),
    )
    .await
    .expect_err("corrupted upload");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    // Truncated: fewer bytes than declared.
    let mut short = vec![pb::UploadArtifactRequest {
        payload: Some(pb::upload_artifact_request::Payload::Metadata(
            pb::UploadArtifactMetadata {
                model_name: "tiny".into(),
                version,
                path: "model.safetensors".into(),
                size_bytes: weights.len() as u64,
                sha256: hex::encode(Sha256::digest(&weights)),
                content_type: String::new(),
            },
        )),
    }];
    short.push(pb::UploadArtifactRequest {
        payload: Some(pb::upload_artifact_request::Payload::Chunk(
            weights[..1000].to_vec(),
        )),
    });
    let status = client
        .upload_artifact(tokio_stream::iter(short))
        .await
        .expect_err("truncated upload");
    assert_eq!(status.code(), Code::InvalidArgument);
    // Nothing was recorded, so the version cannot become READY.
    let status = client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: "tiny".into(),
            version,
            ..Default::default()
        })
        .await
        .expect_err("no files");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let config = br#"{"architectures":["LlamaForCausalLM"]}"#;
    upload(
        &mut client,
        "tiny",
        version,
        "model.safetensors",
        &weights,
        None,
    )
    .await
    .expect("good upload");
    upload(&mut client, "tiny", version, "config.json", config, None)
        .await
        .expect("good upload");
    let ready = client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: "tiny".into(),
            version,
            ..Default::default()
        })
        .await
        .expect("finalize")
        .into_inner();
    assert_eq!(ready.status, pb::ModelVersionStatus::Ready as i32);
    let manifest = {
        let mut files = [
            (
                "config.json",
                hex::encode(Sha256::digest(config)),
                config.len(),
            ),
            (
                "model.safetensors",
                hex::encode(Sha256::digest(&weights)),
                weights.len(),
            ),
        ];
        files.sort();
        files
            .iter()
            .map(|(path, sha, size)| format!("{sha} {size} {path}\n"))
            .collect::<String>()
    };
    assert_eq!(
        ready.digest,
        hex::encode(Sha256::digest(manifest.as_bytes()))
    );
    assert_eq!(
        ready.total_size_bytes,
        (weights.len() + config.len()) as u64
    );
    // READY is immutable: no more files.
    let status = upload(&mut client, "tiny", version, "extra.bin", b"x", None)
        .await
        .expect_err("immutable");
    assert_eq!(status.code(), Code::FailedPrecondition);

    for offset in [0u64, 1_234_567] {
        let mut stream = client
            .download_artifact(pb::DownloadArtifactRequest {
                model_name: "tiny".into(),
                version,
                path: "model.safetensors".into(),
                offset,
            })
            .await
            .expect("download")
            .into_inner();
        let mut received = Vec::new();
        let mut summary = None;
        while let Some(message) = stream.next().await {
            match message.expect("chunk").payload {
                Some(pb::download_artifact_response::Payload::Chunk(chunk)) => {
                    assert_eq!(chunk.offset, offset + received.len() as u64);
                    assert!(chunk.data.len() <= 1024 * 1024);
                    received.extend_from_slice(&chunk.data);
                }
                Some(pb::download_artifact_response::Payload::Summary(s)) => summary = Some(s),
                None => panic!("empty message"),
            }
        }
        assert_eq!(received, weights[offset as usize..]);
        let summary = summary.expect("a final summary");
        assert_eq!(summary.total_size_bytes, weights.len() as u64);
        assert_eq!(summary.sha256, hex::encode(Sha256::digest(&weights)));
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alias_moves_are_atomic_watched_and_audited() {
    let registry = Registry::start("aliases").await;
    let mut client = registry.client.clone();
    let mut versions = Vec::new();
    for i in 0..3u8 {
        versions.push(ready_version(&mut client, "adviser", &[i; 100]).await);
    }
    let pending = client
        .create_model_version(new_version("adviser", ""))
        .await
        .expect("pending version")
        .into_inner()
        .version;

    // Aliases only point at READY versions.
    let status = client
        .set_alias(pb::SetAliasRequest {
            model_name: "adviser".into(),
            alias: "production".into(),
            version: pending,
            ..Default::default()
        })
        .await
        .expect_err("pending target");
    assert_eq!(status.code(), Code::FailedPrecondition);

    let set = |version: u32, expected: Option<u32>| pb::SetAliasRequest {
        model_name: "adviser".into(),
        alias: "production".into(),
        version,
        expected_current_version: expected,
        actor: "user:test".into(),
        reason: "rollout".into(),
    };
    client
        .set_alias(set(versions[0], Some(0)))
        .await
        .expect("create alias");

    let mut watch = client
        .watch_alias(pb::WatchAliasRequest {
            model_name: "adviser".into(),
            alias: "production".into(),
        })
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("initial").expect("ok");
    assert!(first.initial);
    assert_eq!(first.current.expect("exists").version, versions[0]);

    // Resolvers run while the alias moves; every answer is a READY version.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let resolvers: Vec<_> = (0..4)
        .map(|_| {
            let mut client = registry.client.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut seen = 0u32;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let resolved = client
                        .resolve_model_ref(pb::ResolveModelRefRequest {
                            model_ref: "adviser@production".into(),
                        })
                        .await
                        .expect("resolves")
                        .into_inner();
                    let version = resolved.version.expect("a version");
                    assert_eq!(version.status, pb::ModelVersionStatus::Ready as i32);
                    assert_eq!(resolved.alias, "production");
                    seen += 1;
                }
                seen
            })
        })
        .collect();
    let moves = [versions[1], versions[2], versions[0], versions[2]];
    let mut current = versions[0];
    for target in moves {
        let response = client
            .set_alias(set(target, Some(current)))
            .await
            .expect("move")
            .into_inner();
        assert_eq!(response.previous_version, Some(current));
        current = target;
    }
    // A stale compare-and-set is refused.
    let status = client
        .set_alias(set(versions[1], Some(versions[0])))
        .await
        .expect_err("stale expected version");
    assert_eq!(status.code(), Code::FailedPrecondition);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for resolver in resolvers {
        assert!(resolver.await.expect("resolver") > 0);
    }

    for target in moves {
        let update = tokio::time::timeout(Duration::from_secs(10), watch.next())
            .await
            .expect("a move within 10s")
            .expect("stream open")
            .expect("ok");
        assert!(!update.initial);
        assert_eq!(update.event.expect("event").to_version, Some(target));
    }

    let history = client
        .get_alias_history(pb::GetAliasHistoryRequest {
            model_name: "adviser".into(),
            alias: "production".into(),
            ..Default::default()
        })
        .await
        .expect("history")
        .into_inner()
        .events;
    let trail: Vec<(Option<u32>, Option<u32>)> = history
        .iter()
        .map(|e| (e.from_version, e.to_version))
        .collect();
    assert_eq!(
        trail,
        [
            (None, Some(versions[0])),
            (Some(versions[0]), Some(versions[1])),
            (Some(versions[1]), Some(versions[2])),
            (Some(versions[2]), Some(versions[0])),
            (Some(versions[0]), Some(versions[2])),
        ]
    );
    assert!(history.iter().all(|e| e.actor == "user:test"));
    // The model's whole history (no alias given) names each event's alias.
    let everything = client
        .get_alias_history(pb::GetAliasHistoryRequest {
            model_name: "adviser".into(),
            ..Default::default()
        })
        .await
        .expect("model history")
        .into_inner()
        .events;
    assert_eq!(everything.len(), history.len());
    assert!(everything.iter().all(|e| e.alias == "production"));

    for (reference, expected) in [
        ("adviser@production", versions[2]),
        ("adviser@latest", versions[2]),
        ("adviser", versions[2]),
        (&format!("adviser/{}", versions[1]) as &str, versions[1]),
    ] {
        let resolved = client
            .resolve_model_ref(pb::ResolveModelRefRequest {
                model_ref: reference.into(),
            })
            .await
            .expect("resolve")
            .into_inner();
        assert_eq!(
            resolved.version.expect("version").version,
            expected,
            "{reference}"
        );
    }

    // Versions: metadata is mutable, an aliased version cannot be deleted, others can.
    let updated = client
        .update_model_version(pb::UpdateModelVersionRequest {
            model_name: "adviser".into(),
            version: versions[2],
            set_metrics: [("eval_loss".to_owned(), 0.9)].into(),
            set_tags: [("stage".to_owned(), "canary".to_owned())].into(),
            ..Default::default()
        })
        .await
        .expect("update metadata")
        .into_inner();
    assert_eq!(updated.metrics.get("eval_loss"), Some(&0.9));
    assert_eq!(
        updated.tags.get("stage").map(String::as_str),
        Some("canary")
    );
    let status = client
        .delete_model_version(pb::DeleteModelVersionRequest {
            model_name: "adviser".into(),
            version: versions[2],
        })
        .await
        .expect_err("aliased");
    assert_eq!(status.code(), Code::FailedPrecondition);
    client
        .delete_model_version(pb::DeleteModelVersionRequest {
            model_name: "adviser".into(),
            version: versions[1],
        })
        .await
        .expect("an unaliased version can go");
    let status = client
        .get_model_version(pb::GetModelVersionRequest {
            model_name: "adviser".into(),
            version: versions[1],
        })
        .await
        .expect_err("deleted");
    assert_eq!(status.code(), Code::NotFound);

    // Search across versions by metric, tag and status, ordered by a metric.
    let search = |filter: &str, order_by: &str| pb::SearchModelVersionsRequest {
        filter: filter.into(),
        order_by: order_by.into(),
        ..Default::default()
    };
    let found = client
        .search_model_versions(search(
            "metrics.eval_loss < 1.0 AND tags.stage = 'canary' AND name = 'adviser'",
            "",
        ))
        .await
        .expect("search")
        .into_inner()
        .versions;
    assert_eq!(
        found.iter().map(|v| v.version).collect::<Vec<_>>(),
        [versions[2]]
    );
    let by_loss = client
        .search_model_versions(search(
            "name = 'adviser' AND status = 'READY'",
            "metrics.eval_loss ASC",
        ))
        .await
        .expect("search")
        .into_inner()
        .versions;
    assert_eq!(
        by_loss.first().map(|v| v.version),
        Some(versions[2]),
        "lowest loss first"
    );
    assert_eq!(
        by_loss.len(),
        2,
        "READY only: the deleted and pending versions are out"
    );
    let status = client
        .search_model_versions(search("metrics.eval_loss < 'low'", ""))
        .await
        .expect_err("bad filter");
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("filter: at character"),
        "{}",
        status.message()
    );

    // Models filter by name, description and tags, and order by name or time.
    for (name, domain) in [("bank-a", "bank"), ("bank-b", "bank"), ("shop", "retail")] {
        client
            .create_model(pb::CreateModelRequest {
                name: name.into(),
                tags: [("domain".to_owned(), domain.to_owned())].into(),
                ..Default::default()
            })
            .await
            .expect("create");
    }
    let list = |filter: &str, order_by: &str| pb::ListRegisteredModelsRequest {
        filter: filter.into(),
        order_by: order_by.into(),
        page_size: 1,
        ..Default::default()
    };
    let page = client
        .list_models(list("tags.domain = 'bank'", "name DESC"))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(
        page.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["bank-b"]
    );
    let next = client
        .list_models(pb::ListRegisteredModelsRequest {
            page_token: page.next_page_token,
            ..list("tags.domain = 'bank'", "name DESC")
        })
        .await
        .expect("next page")
        .into_inner();
    assert_eq!(
        next.models
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>(),
        ["bank-a"]
    );
    assert!(next.next_page_token.is_empty());
    let status = client
        .list_models(list("metrics.eval_loss < 1", ""))
        .await
        .expect_err("not a model key");
    assert_eq!(status.code(), Code::InvalidArgument);

    // A model with an alias cannot be deleted.
    let status = client
        .delete_model(pb::DeleteModelRequest {
            name: "adviser".into(),
        })
        .await
        .expect_err("alias points into it");
    assert_eq!(status.code(), Code::FailedPrecondition);
    drop(watch);
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_the_right_code_naming_the_field() {
    let registry = Registry::start("errors").await;
    let mut client = registry.client.clone();
    let create = |name: &str| pb::CreateModelRequest {
        name: name.into(),
        ..Default::default()
    };
    client.create_model(create("taken")).await.expect("create");

    let cases: Vec<(Result<(), tonic::Status>, Code, &str)> = vec![
        (
            client.create_model(create("Bad Name")).await.map(drop),
            Code::InvalidArgument,
            "name",
        ),
        (
            client
                .create_model(create(&"x".repeat(129)))
                .await
                .map(drop),
            Code::InvalidArgument,
            "name",
        ),
        (
            client.create_model(create("taken")).await.map(drop),
            Code::AlreadyExists,
            "taken",
        ),
        (
            client
                .get_model(pb::GetModelRequest {
                    name: "missing".into(),
                })
                .await
                .map(drop),
            Code::NotFound,
            "missing",
        ),
        (
            client
                .create_model_version(pb::CreateModelVersionRequest {
                    model_name: "taken".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "format",
        ),
        (
            client
                .create_model_version(pb::CreateModelVersionRequest {
                    create_model_if_missing: false,
                    ..new_version("absent-model", "")
                })
                .await
                .map(drop),
            Code::NotFound,
            "absent-model",
        ),
        (
            client
                .resolve_model_ref(pb::ResolveModelRefRequest {
                    model_ref: "taken@Prod".into(),
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "model_ref",
        ),
        (
            client
                .resolve_model_ref(pb::ResolveModelRefRequest {
                    model_ref: "taken@production".into(),
                })
                .await
                .map(drop),
            Code::NotFound,
            "production",
        ),
        (
            client
                .get_model_version(pb::GetModelVersionRequest {
                    model_name: "taken".into(),
                    version: 0,
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "version",
        ),
        (
            client
                .list_models(pb::ListRegisteredModelsRequest {
                    page_token: "bogus".into(),
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "page_token",
        ),
        (
            client
                .set_alias(pb::SetAliasRequest {
                    model_name: "taken".into(),
                    alias: "latest".into(),
                    version: 1,
                    ..Default::default()
                })
                .await
                .map(drop),
            Code::InvalidArgument,
            "alias",
        ),
        (
            client
                .create_model_version(pb::CreateModelVersionRequest {
                    lineage: Some(pb::Lineage {
                        base_model_version: Some(pb::ResolvedModel {
                            requested_ref: "ghost@production".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    ..new_version("taken", "")
                })
                .await
                .map(drop),
            Code::NotFound,
            "lineage.base_model_version",
        ),
    ];
    for (index, (result, code, needle)) in cases.into_iter().enumerate() {
        match result {
            Ok(()) => panic!("case {index}: expected {code:?}, got OK"),
            Err(status) => {
                assert_eq!(status.code(), code, "case {index}: {status:?}");
                assert!(
                    status.message().contains(needle),
                    "case {index}: `{needle}` named in `{}`",
                    status.message()
                );
            }
        }
    }
    registry.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_on_one_replica_reaches_the_resolve_cache_of_another() {
    let first = Registry::start("replicas").await;
    let shared = tempfile::tempdir().expect("temp dir");
    let second = Registry::start_on(&first.schema, shared).await;
    let mut a = first.client.clone();
    let mut b = second.client.clone();
    let one = ready_version(&mut a, "shared", b"one").await;
    let two = ready_version(&mut a, "shared", b"two").await;
    let set = |version: u32| pb::SetAliasRequest {
        model_name: "shared".into(),
        alias: "production".into(),
        version,
        ..Default::default()
    };
    a.set_alias(set(one)).await.expect("alias");
    let resolve = pb::ResolveModelRefRequest {
        model_ref: "shared@production".into(),
    };
    let resolved = |r: pb::ResolveModelRefResponse| r.version.expect("version").version;
    // Replica B resolves (and caches) version one.
    assert_eq!(
        resolved(
            b.resolve_model_ref(resolve.clone())
                .await
                .expect("b")
                .into_inner()
        ),
        one
    );
    assert_eq!(
        resolved(
            b.resolve_model_ref(resolve.clone())
                .await
                .expect("b")
                .into_inner()
        ),
        one
    );
    // A moves the alias; B's cache is cleared by the notification, well before its TTL.
    a.set_alias(set(two)).await.expect("move");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let now = resolved(
            b.resolve_model_ref(resolve.clone())
                .await
                .expect("b")
                .into_inner(),
        );
        if now == two {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica B still answers {now}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Read-your-writes on the replica that moved it: immediate.
    a.set_alias(set(one)).await.expect("move back");
    assert_eq!(
        resolved(
            a.resolve_model_ref(resolve.clone())
                .await
                .expect("a")
                .into_inner()
        ),
        one
    );
    // Finalizing a new version changes `@latest` at once too.
    let latest = pb::ResolveModelRefRequest {
        model_ref: "shared@latest".into(),
    };
    assert_eq!(
        resolved(
            a.resolve_model_ref(latest.clone())
                .await
                .expect("a")
                .into_inner()
        ),
        two
    );
    let three = ready_version(&mut a, "shared", b"three").await;
    assert_eq!(
        resolved(a.resolve_model_ref(latest).await.expect("a").into_inner()),
        three
    );
    second.stop_keeping_schema().await;
    first.stop().await;
}
