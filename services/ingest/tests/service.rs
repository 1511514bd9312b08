//! DatasetService over real gRPC (127.0.0.1:0), real Postgres (a schema per test) and a
//! real artifact directory: upload stream → version → report → download, every shipped
//! sample format, URI ingest, idempotency and reuse, token bounds with a tokenizer fetched
//! from a real registry, the rewrite skip, deletion, and the field named by each bad input.

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_runtime::Listeners;
use sha2::{Digest, Sha256};
use tonic::Code;
use tonic::transport::Channel;

const SAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/data/samples");

type ServeTask = tokio::task::JoinHandle<Result<(), lmforge_runtime::StartupError>>;

struct Service {
    client: DatasetServiceClient<Channel>,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), lmforge_runtime::StartupError>>>,
    schemas: Vec<String>,
    artifacts: tempfile::TempDir,
    registry: Option<(tokio::sync::oneshot::Sender<()>, ServeTask)>,
    registry_url: Option<String>,
}

fn database_url() -> String {
    std::env::var("LMFORGE_DATABASE_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned())
}

fn unique(label: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("t{}_{n}_{label}", std::process::id())
}

async fn wait_ready<F, Fut>(mut probe: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match probe().await {
            Err(status) if status.code() == Code::NotFound => return,
            other => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "service did not start: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

impl Service {
    async fn start(label: &str) -> Self {
        Self::start_with(label, false).await
    }

    /// An ingest service; with `with_registry`, a real registry beside it (same artifacts).
    async fn start_with(label: &str, with_registry: bool) -> Self {
        let schema = unique(label);
        let artifacts = tempfile::tempdir().expect("temp dir");
        let mut registry = None;
        let mut registry_url = None;
        let mut schemas = vec![schema.clone()];
        if with_registry {
            let reg_schema = format!("{schema}_reg");
            let mut config =
                lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
            config.postgres.database_url = database_url();
            config.schema = reg_schema.clone();
            config.artifacts = artifacts.path().display().to_string();
            let listeners = Listeners::ephemeral().await.expect("bind");
            let addr = listeners.grpc_addr();
            let (tx, rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(lmforge_registry::serve(config, listeners, async {
                let _ = rx.await;
            }));
            registry_url = Some(format!("http://{addr}"));
            let probe = lmforge_proto::v1::registry_service_client::RegistryServiceClient::new(
                tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                    .unwrap()
                    .connect_lazy(),
            );
            wait_ready(|| {
                let mut c = probe.clone();
                async move {
                    c.get_model(pb::GetModelRequest {
                        name: "probe".into(),
                    })
                    .await
                    .map(|_| ())
                }
            })
            .await;
            registry = Some((tx, task));
            schemas.push(reg_schema);
        }
        let mut config =
            lmforge_ingest::Config::try_parse_from(["lmforge-ingest"]).expect("defaults");
        config.postgres.database_url = database_url();
        config.schema = schema.clone();
        config.artifacts = artifacts.path().display().to_string();
        config.work_dir = artifacts.path().join("work").display().to_string();
        if let Some(url) = &registry_url {
            config.registry_url = lmforge_runtime::args::parse_endpoint(url).unwrap();
        }
        // Nothing listens here: a rewrite call must fail fast, not hang.
        config.inference_url = lmforge_runtime::args::parse_endpoint("http://127.0.0.1:9").unwrap();
        let listeners = Listeners::ephemeral().await.expect("bind");
        let addr = listeners.grpc_addr();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(lmforge_ingest::serve(config, listeners, async {
            let _ = stop_rx.await;
        }));
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect_lazy();
        let client = DatasetServiceClient::new(channel).max_decoding_message_size(16 << 20);
        let probe_client = client.clone();
        wait_ready(|| {
            let mut c = probe_client.clone();
            async move {
                c.get_dataset(pb::GetDatasetRequest {
                    name: "probe".into(),
                })
                .await
                .map(|_| ())
            }
        })
        .await;
        Self {
            client,
            stop_tx: Some(stop_tx),
            task: Some(task),
            schemas,
            artifacts,
            registry,
            registry_url,
        }
    }

    async fn stop(mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("task").expect("clean stop");
        }
        if let Some((tx, task)) = self.registry.take() {
            let _ = tx.send(());
            task.await.expect("task").expect("clean stop");
        }
        if let Ok(pool) = sqlx::PgPool::connect(&database_url()).await {
            for schema in &self.schemas {
                let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .execute(&pool)
                    .await;
            }
        }
    }
}

/// Parse options tolerating the shipped samples' deliberate bad lines (one in a few records,
/// over the default 10%).
fn lenient() -> Option<pb::ParseOptions> {
    Some(pb::ParseOptions {
        max_parse_error_fraction: Some(0.5),
        ..Default::default()
    })
}

fn spec(name: &str, filename: &str) -> pb::DatasetIngestSpec {
    pb::DatasetIngestSpec {
        dataset_name: name.into(),
        filename: filename.into(),
        config: Some(pb::IngestConfig {
            parse: lenient(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn upload(
    client: &mut DatasetServiceClient<Channel>,
    spec: pb::DatasetIngestSpec,
    data: &[u8],
    chunk: usize,
) -> Result<pb::UploadDatasetResponse, tonic::Status> {
    let mut messages = vec![pb::UploadDatasetRequest {
        payload: Some(pb::upload_dataset_request::Payload::Metadata(spec)),
    }];
    for c in data.chunks(chunk.max(1)) {
        messages.push(pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Chunk(c.to_vec())),
        });
    }
    client
        .upload_dataset(tokio_stream::iter(messages))
        .await
        .map(|r| r.into_inner())
}

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(format!("{SAMPLES}/{name}")).expect("sample file")
}

async fn download(
    client: &mut DatasetServiceClient<Channel>,
    request: pb::DownloadDatasetVersionRequest,
) -> (Vec<pb::DatasetRecord>, Vec<u8>, pb::DatasetDownloadSummary) {
    let mut stream = client
        .download_dataset_version(request)
        .await
        .expect("download")
        .into_inner();
    let (mut records, mut bytes, mut summary) = (Vec::new(), Vec::new(), None);
    let mut start = None;
    while let Some(message) = stream.next().await {
        match message.expect("message").payload.expect("payload") {
            pb::download_dataset_version_response::Payload::Record(r) => records.push(r),
            pb::download_dataset_version_response::Payload::Chunk(c) => {
                let first = *start.get_or_insert(c.offset as usize);
                assert_eq!(
                    c.offset as usize,
                    first + bytes.len(),
                    "chunks are contiguous"
                );
                bytes.extend(c.data);
            }
            pb::download_dataset_version_response::Payload::Summary(s) => summary = Some(s),
        }
    }
    (records, bytes, summary.expect("a summary ends the stream"))
}

fn rule<'a>(report: &'a pb::DatasetReport, id: &str) -> &'a pb::RuleReport {
    report
        .rules
        .iter()
        .find(|r| r.rule == id)
        .unwrap_or_else(|| panic!("rule {id}"))
}

fn field_of(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_bad_request()
        .map(|b| b.field_violations[0].field.clone())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_stream_version_report_download() {
    let mut svc = Service::start("flow").await;
    let data = sample("medical_zh_en.jsonl");
    let mut s = spec("medical-qa", "medical_zh_en.jsonl");
    s.description = "medical Q&A".into();
    s.tags = [("domain".to_owned(), "medical".to_owned())].into();
    s.expected_size_bytes = data.len() as u64;
    s.expected_sha256 = hex::encode(Sha256::digest(&data));
    s.config = Some(pb::IngestConfig {
        split: Some(pb::SplitConfig {
            train_ratio: Some(0.5),
            eval_ratio: Some(0.5),
            test_ratio: Some(0.0),
            seed: Some(1),
            ..Default::default()
        }),
        parse: lenient(),
        ..Default::default()
    });
    let response = upload(&mut svc.client, s, &data, 97).await.expect("upload");
    let version = response.version.expect("version");
    assert!(!response.reused);
    assert_eq!(version.version, 1);
    assert_eq!(version.status, pb::DatasetVersionStatus::Ready as i32);
    assert_eq!(version.format, pb::DatasetFormat::OpenaiMessages as i32);
    assert_eq!(version.source_sha256, hex::encode(Sha256::digest(&data)));
    // 9 lines: 1 cut (parse error), med-3 exact dup of med-2, med-7 near dup of med-4,
    // med-6 has an empty answer: 5 records remain.
    assert_eq!(version.record_count, 5);
    assert_eq!(response.dataset.as_ref().unwrap().latest_version, 1);
    let applied = version.config.as_ref().unwrap();
    assert_eq!(
        applied
            .dedup
            .as_ref()
            .unwrap()
            .minhash
            .as_ref()
            .unwrap()
            .threshold,
        Some(0.8)
    );

    let report = svc
        .client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: "medical-qa@latest".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.input_lines, 9);
    assert_eq!(report.parsed_records, 8);
    assert_eq!(report.output_records, 5);
    assert_eq!(report.parse_error_count, 1);
    assert_eq!(report.parse_errors[0].line, 8);
    assert_eq!(rule(&report, "dedup.exact").removed, 1);
    assert_eq!(rule(&report, "dedup.minhash").removed, 1);
    assert_eq!(
        rule(&report, "filter.incomplete_dialogue").reasons["empty_turn"],
        1
    );
    assert_eq!(rule(&report, "pii.phone").changed, 1);
    assert_eq!(rule(&report, "pii.email").changed, 1);
    assert_eq!(report.dedup_cluster_count, 2);
    let exact = report
        .dedup_clusters
        .iter()
        .find(|c| c.method == pb::DedupMethod::Exact as i32)
        .unwrap();
    assert_eq!(
        (
            exact.kept_record_id.as_str(),
            exact.removed_record_ids.clone()
        ),
        ("med-2", vec!["med-3".to_owned()])
    );
    assert_eq!(report.label_distribution["category=common"], 3);
    assert_eq!(
        report.length_histogram.iter().map(|b| b.count).sum::<u64>(),
        5
    );
    assert!(
        report.rules.len() >= 18,
        "every rule listed, zeros included"
    );

    // Download all records, then each split raw, checking sizes and digests.
    let (records, _, summary) = download(
        &mut svc.client,
        pb::DownloadDatasetVersionRequest {
            dataset_version: "medical-qa/1".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(records.len(), 5);
    assert_eq!(summary.record_count, 5);
    assert_eq!(summary.transfer.unwrap().sha256, version.digest);
    let redacted = records.iter().find(|r| r.id == "med-5").unwrap();
    assert!(
        redacted.messages[0].content.contains("[PHONE]")
            && redacted.messages[0].content.contains("[EMAIL]")
    );
    assert!(
        records
            .iter()
            .all(|r| r.source.starts_with("medical_zh_en.jsonl:"))
    );
    for info in &version.splits {
        if info.record_count == 0 {
            continue;
        }
        let (_, bytes, summary) = download(
            &mut svc.client,
            pb::DownloadDatasetVersionRequest {
                dataset_version: version.id.clone(),
                split: info.split,
                mode: pb::DownloadMode::Raw as i32,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(bytes.len() as u64, info.size_bytes);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), info.sha256);
        assert_eq!(summary.transfer.unwrap().sha256, info.sha256);
        // Resume from an offset.
        let (_, tail, _) = download(
            &mut svc.client,
            pb::DownloadDatasetVersionRequest {
                dataset_version: version.id.clone(),
                split: info.split,
                mode: pb::DownloadMode::Raw as i32,
                offset: 10,
                ..Default::default()
            },
        )
        .await;
        assert_eq!(tail, bytes[10..]);
    }
    let (two, _, _) = download(
        &mut svc.client,
        pb::DownloadDatasetVersionRequest {
            dataset_version: "medical-qa".into(),
            max_records: 2,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(two.len(), 2);

    // Same content again: the existing version is returned.
    let again = upload(
        &mut svc.client,
        spec("medical-qa", "medical_zh_en.jsonl"),
        &data,
        4096,
    )
    .await
    .unwrap();
    // Default config differs (split), so the content differs: a new version.
    assert_eq!(again.version.as_ref().unwrap().version, 2);
    let same = upload(
        &mut svc.client,
        spec("medical-qa", "medical_zh_en.jsonl"),
        &data,
        1000,
    )
    .await
    .unwrap();
    assert!(same.reused);
    assert_eq!(same.version.unwrap().version, 2);
    // Idempotency key.
    let mut keyed = spec("medical-qa", "other.jsonl");
    keyed.client_request_id = "req-1".into();
    keyed.config = Some(pb::IngestConfig {
        dedup: Some(pb::DedupConfig {
            exact: Some(false),
            minhash: Some(pb::MinHashConfig {
                enabled: Some(false),
                ..Default::default()
            }),
        }),
        parse: lenient(),
        ..Default::default()
    });
    let first = upload(&mut svc.client, keyed.clone(), &data, 1000)
        .await
        .unwrap();
    let retry = upload(&mut svc.client, keyed, &data, 1000).await.unwrap();
    assert!(!first.reused && retry.reused);
    assert_eq!(first.version.unwrap().id, retry.version.unwrap().id);

    let versions = svc
        .client
        .list_dataset_versions(pb::ListDatasetVersionsRequest {
            dataset_name: "medical-qa".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        versions
            .versions
            .iter()
            .map(|v| v.version)
            .collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    let page = svc
        .client
        .list_dataset_versions(pb::ListDatasetVersionsRequest {
            dataset_name: "medical-qa".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.versions.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let datasets = svc
        .client
        .list_datasets(pb::ListDatasetsRequest {
            tags: [("domain".to_owned(), "medical".to_owned())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(datasets.datasets.len(), 1);
    assert_eq!(datasets.datasets[0].version_count, 3);

    svc.client
        .delete_dataset(pb::DeleteDatasetRequest {
            name: "medical-qa".into(),
        })
        .await
        .unwrap();
    let gone = svc
        .client
        .get_dataset(pb::GetDatasetRequest {
            name: "medical-qa".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    let gone = svc
        .client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: version.id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_format_is_detected_and_parsed() {
    let mut svc = Service::start("formats").await;
    let cases: [(&str, pb::DatasetFormat, u64, u64); 5] = [
        ("shop_sharegpt.json", pb::DatasetFormat::Sharegpt, 3, 0),
        ("bank_alpaca.jsonl", pb::DatasetFormat::Alpaca, 3, 0),
        ("dialogues.txt", pb::DatasetFormat::PlainDialogue, 2, 1),
        ("corpus.txt", pb::DatasetFormat::RawText, 3, 0),
        (
            "medical_zh_en.jsonl",
            pb::DatasetFormat::OpenaiMessages,
            5,
            1,
        ),
    ];
    for (file, format, records, errors) in cases {
        let name = file.split('.').next().unwrap().replace('_', "-");
        let response = upload(&mut svc.client, spec(&name, file), &sample(file), 500)
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        let version = response.version.unwrap();
        assert_eq!(version.format, format as i32, "{file}");
        assert_eq!(version.record_count, records, "{file}");
        let report = svc
            .client
            .get_dataset_report(pb::GetDatasetReportRequest {
                dataset_version: version.id,
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(report.parse_error_count, errors, "{file}");
    }
    // CSV with a Chinese header mapped by the request, a label column, and a short row.
    let mut s = spec("bank-faq", "faq.csv");
    s.config = Some(pb::IngestConfig {
        parse: Some(pb::ParseOptions {
            csv: Some(pb::CsvColumnMapping {
                question_column: Some("问题".into()),
                answer_column: Some("回答".into()),
                label_columns: vec!["类别".into()],
                ..Default::default()
            }),
            max_parse_error_fraction: Some(0.5),
            ..Default::default()
        }),
        ..Default::default()
    });
    let response = upload(&mut svc.client, s, &sample("faq.csv"), 64)
        .await
        .unwrap();
    let version = response.version.unwrap();
    assert_eq!(
        (version.format, version.record_count),
        (pb::DatasetFormat::Csv as i32, 3)
    );
    let report = svc
        .client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: version.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.parse_errors[0].line, 5);
    assert_eq!(report.label_distribution["类别=card"], 1);
    // Unknown format: a clear error naming the field.
    let err = upload(
        &mut svc.client,
        spec("mystery", "data.bin"),
        b"\x00\x01\x02binary",
        10,
    )
    .await
    .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err)),
        (Code::InvalidArgument, "metadata.format".to_owned())
    );
    assert!(
        err.message().contains("unknown format"),
        "{}",
        err.message()
    );
    // Only bad lines: nothing stored.
    let err = upload(
        &mut svc.client,
        spec("broken", "b.jsonl"),
        b"{\"messages\": \n{bad\n",
        10,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("line 1"), "{}", err.message());
    let missing = svc
        .client
        .get_dataset(pb::GetDatasetRequest {
            name: "broken".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        missing.code(),
        Code::NotFound,
        "a failed ingest leaves no dataset or version behind"
    );
    // GBK input declared by the request.
    let (gbk, _, _) = encoding_rs::GBK.encode("用户：你好\n助手：您好，请问有什么可以帮您？\n");
    let mut s = spec("gbk-chat", "chat.txt");
    s.config = Some(pb::IngestConfig {
        parse: Some(pb::ParseOptions {
            encoding: "gbk".into(),
            ..Default::default()
        }),
        ..Default::default()
    });
    let response = upload(&mut svc.client, s, &gbk, 7).await.unwrap();
    let (records, _, _) = download(
        &mut svc.client,
        pb::DownloadDatasetVersionRequest {
            dataset_version: response.version.unwrap().id,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(records[0].messages[0].content, "你好");
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_from_an_artifact_uri() {
    let mut svc = Service::start("uri").await;
    let path = svc.artifacts.path().join("incoming/bank.jsonl");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, sample("bank_alpaca.jsonl")).unwrap();
    let uri = format!("file://{}", path.display());
    let response = svc
        .client
        .create_dataset_from_uri(pb::CreateDatasetFromUriRequest {
            spec: Some(spec("bank", "")),
            uri: uri.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let version = response.version.unwrap();
    assert_eq!(
        (version.record_count, version.source.as_str()),
        (3, uri.as_str())
    );
    let err = svc
        .client
        .create_dataset_from_uri(pb::CreateDatasetFromUriRequest {
            spec: Some(spec("bank", "")),
            uri: format!("{uri}.missing"),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err)),
        (Code::InvalidArgument, "uri".to_owned())
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_bounds_use_the_tokenizer_of_a_registered_model() {
    use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
    let mut svc = Service::start_with("tokens", true).await;
    let url = svc.registry_url.clone().unwrap();
    let mut registry = RegistryServiceClient::new(
        tonic::transport::Endpoint::from_shared(url)
            .unwrap()
            .connect_lazy(),
    );
    let tokenizer = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../libs/model/fixtures/tiny-llama/tokenizer.json"
    ))
    .unwrap();
    let version = registry
        .create_model_version(pb::CreateModelVersionRequest {
            model_name: "tiny".into(),
            create_model_if_missing: true,
            format: pb::ModelFormat::HfSafetensors as i32,
            architecture: "LlamaForCausalLM".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .version;
    let messages = vec![
        pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Metadata(
                pb::UploadArtifactMetadata {
                    model_name: "tiny".into(),
                    version,
                    path: "tokenizer.json".into(),
                    size_bytes: tokenizer.len() as u64,
                    sha256: hex::encode(Sha256::digest(&tokenizer)),
                    content_type: String::new(),
                },
            )),
        },
        pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Chunk(
                tokenizer.clone(),
            )),
        },
    ];
    registry
        .upload_artifact(tokio_stream::iter(messages))
        .await
        .unwrap();
    registry
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: "tiny".into(),
            version,
            ..Default::default()
        })
        .await
        .unwrap();

    let local = tokenizers::Tokenizer::from_bytes(&tokenizer).unwrap();
    let count = |t: &str| local.encode(t, false).unwrap().len();
    let short = ("What is a fever?", "A high body temperature.");
    let long = (
        "Please explain in detail how seasonal influenza spreads between people in crowded places",
        "It spreads through droplets when infected people cough, sneeze or talk, and by touching contaminated surfaces.",
    );
    let bound = count(short.0) + count(short.1) + 2;
    assert!(count(long.0) + count(long.1) > bound);
    let line = |q: &str, a: &str| {
        serde_json::json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}).to_string()
    };
    let data = format!("{}\n{}\n", line(short.0, short.1), line(long.0, long.1));
    let mut s = spec("tokens", "t.jsonl");
    s.config = Some(pb::IngestConfig {
        cleaning: Some(pb::CleaningConfig {
            length: Some(pb::LengthBounds {
                max_tokens: Some(bound as u32),
                tokenizer_model: "tiny".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        split: Some(pb::SplitConfig {
            train_ratio: Some(1.0),
            eval_ratio: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    });
    let response = upload(&mut svc.client, s, data.as_bytes(), 100)
        .await
        .unwrap();
    let version = response.version.unwrap();
    assert_eq!(version.record_count, 1);
    assert_eq!(
        version.splits[0].token_count,
        (count(short.0) + count(short.1)) as u64
    );
    let report = svc
        .client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: version.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rule(&report, "filter.length").reasons["too_many_tokens"], 1);
    assert_eq!(report.length_unit, "tokens");
    // An unknown model names the field.
    let mut s = spec("tokens", "t.jsonl");
    s.config = Some(pb::IngestConfig {
        cleaning: Some(pb::CleaningConfig {
            length: Some(pb::LengthBounds {
                max_tokens: Some(5),
                tokenizer_model: "nope".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = upload(&mut svc.client, s, data.as_bytes(), 100)
        .await
        .unwrap_err();
    assert_eq!(
        (err.code(), field_of(&err).as_str()),
        (
            Code::InvalidArgument,
            "metadata.config.cleaning.length.tokenizer_model"
        ),
        "{err:?}"
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rewrite_without_a_model_is_skipped_with_a_note_and_synonyms_apply() {
    let mut svc = Service::start("augment").await;
    let mut s = spec("shop", "shop_sharegpt.json");
    s.config = Some(pb::IngestConfig {
        split: Some(pb::SplitConfig {
            train_ratio: Some(1.0),
            eval_ratio: Some(0.0),
            ..Default::default()
        }),
        augmentation: Some(pb::AugmentationConfig {
            synonym: Some(pb::SynonymReplacement {
                dictionary_uri: String::new(),
                replace_probability: Some(1.0),
                copies_per_record: Some(1),
            }),
            rewrite: Some(pb::ModelRewrite::default()),
        }),
        ..Default::default()
    });
    let response = upload(&mut svc.client, s, &sample("shop_sharegpt.json"), 200)
        .await
        .unwrap();
    let version = response.version.unwrap();
    let report = svc
        .client
        .get_dataset_report(pb::GetDatasetReportRequest {
            dataset_version: version.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.contains("augment.rewrite skipped: no model given")),
        "{:?}",
        report.notes
    );
    assert_eq!(rule(&report, "augment.rewrite").added, 0);
    let added = rule(&report, "augment.synonym").added;
    assert!(added >= 2, "{added}");
    assert_eq!(version.record_count, 3 + added);
    // With a model named, the rewrite calls inference; none listens here, so the ingest
    // fails as UNAVAILABLE and stores nothing.
    let mut s = spec("shop2", "shop_sharegpt.json");
    s.config = Some(pb::IngestConfig {
        augmentation: Some(pb::AugmentationConfig {
            synonym: None,
            rewrite: Some(pb::ModelRewrite {
                model: "qwen@production".into(),
                ..Default::default()
            }),
        }),
        split: Some(pb::SplitConfig {
            train_ratio: Some(1.0),
            eval_ratio: Some(0.0),
            ..Default::default()
        }),
        ..Default::default()
    });
    let err = upload(&mut svc.client, s, &sample("shop_sharegpt.json"), 200)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    assert_eq!(
        svc.client
            .get_dataset(pb::GetDatasetRequest {
                name: "shop2".into()
            })
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    svc.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_name_their_field() {
    let mut svc = Service::start("invalid").await;
    let data = sample("medical_zh_en.jsonl");
    let with = |f: &dyn Fn(&mut pb::DatasetIngestSpec)| {
        let mut s = spec("ok-name", "a.jsonl");
        f(&mut s);
        s
    };
    let cfg = |c: pb::IngestConfig| move |s: &mut pb::DatasetIngestSpec| s.config = Some(c.clone());
    let cases: Vec<(pb::DatasetIngestSpec, &str)> = vec![
        (
            with(&|s| s.dataset_name = "Bad Name".into()),
            "metadata.dataset_name",
        ),
        (with(&|s| s.format = 42), "metadata.format"),
        (
            with(&|s| s.expected_sha256 = "xyz".into()),
            "metadata.expected_sha256",
        ),
        (
            with(&|s| s.expected_size_bytes = 3),
            "metadata.expected_size_bytes",
        ),
        (
            with(&|s| s.expected_sha256 = "0".repeat(64)),
            "metadata.expected_sha256",
        ),
        (
            with(&cfg(pb::IngestConfig {
                split: Some(pb::SplitConfig {
                    train_ratio: Some(0.7),
                    eval_ratio: Some(0.7),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.split.train_ratio",
        ),
        (
            with(&cfg(pb::IngestConfig {
                cleaning: Some(pb::CleaningConfig {
                    length: Some(pb::LengthBounds {
                        max_tokens: Some(10),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.cleaning.length.tokenizer_model",
        ),
        (
            with(&cfg(pb::IngestConfig {
                dedup: Some(pb::DedupConfig {
                    exact: None,
                    minhash: Some(pb::MinHashConfig {
                        threshold: Some(1.5),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            })),
            "metadata.config.dedup.minhash.threshold",
        ),
        (
            with(&cfg(pb::IngestConfig {
                dedup: Some(pb::DedupConfig {
                    exact: None,
                    minhash: Some(pb::MinHashConfig {
                        num_perm: Some(8),
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            })),
            "metadata.config.dedup.minhash.num_perm",
        ),
        (
            with(&cfg(pb::IngestConfig {
                cleaning: Some(pb::CleaningConfig {
                    language: Some(pb::LanguageFilter {
                        allowed_languages: vec!["chinese".into()],
                        min_confidence: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.cleaning.language.allowed_languages",
        ),
        (
            with(&cfg(pb::IngestConfig {
                balance: Some(pb::BalanceConfig::default()),
                ..Default::default()
            })),
            "metadata.config.balance.label_key",
        ),
        (
            with(&cfg(pb::IngestConfig {
                parse: Some(pb::ParseOptions {
                    encoding: "klingon".into(),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.parse.encoding",
        ),
        (
            with(&cfg(pb::IngestConfig {
                parse: Some(pb::ParseOptions {
                    csv: Some(pb::CsvColumnMapping {
                        delimiter: Some(";;".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.parse.csv.delimiter",
        ),
        (
            with(&cfg(pb::IngestConfig {
                cleaning: Some(pb::CleaningConfig {
                    blocklist: Some(pb::Blocklist {
                        phrases: vec![String::new()],
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            "metadata.config.cleaning.blocklist.phrases",
        ),
        (
            with(&cfg(pb::IngestConfig {
                augmentation: Some(pb::AugmentationConfig {
                    synonym: Some(pb::SynonymReplacement {
                        copies_per_record: Some(11),
                        ..Default::default()
                    }),
                    rewrite: None,
                }),
                ..Default::default()
            })),
            "metadata.config.augmentation.synonym.copies_per_record",
        ),
        (
            with(&cfg(pb::IngestConfig {
                augmentation: Some(pb::AugmentationConfig {
                    synonym: Some(pb::SynonymReplacement {
                        dictionary_uri: "file:///nowhere/dict.txt".into(),
                        ..Default::default()
                    }),
                    rewrite: None,
                }),
                ..Default::default()
            })),
            "metadata.config.augmentation.synonym.dictionary_uri",
        ),
    ];
    for (s, field) in cases {
        let err = upload(&mut svc.client, s, &data, 1000).await.unwrap_err();
        assert_eq!(
            (err.code(), field_of(&err).as_str()),
            (Code::InvalidArgument, field),
            "{}",
            err.message()
        );
    }
    // Stream shape.
    let chunk_first = vec![pb::UploadDatasetRequest {
        payload: Some(pb::upload_dataset_request::Payload::Chunk(b"x".to_vec())),
    }];
    let err = svc
        .client
        .upload_dataset(tokio_stream::iter(chunk_first))
        .await
        .unwrap_err();
    assert_eq!(field_of(&err), "metadata");
    let twice = vec![
        pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Metadata(spec(
                "x", "a.jsonl",
            ))),
        },
        pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Metadata(spec(
                "x", "a.jsonl",
            ))),
        },
    ];
    assert_eq!(
        field_of(
            &svc.client
                .upload_dataset(tokio_stream::iter(twice))
                .await
                .unwrap_err()
        ),
        "metadata"
    );
    // Other RPCs.
    let e = svc
        .client
        .get_dataset(pb::GetDatasetRequest {
            name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_str()),
        (Code::InvalidArgument, "name")
    );
    let e = svc
        .client
        .get_dataset_version(pb::GetDatasetVersionRequest {
            dataset_version: "x/zero".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_str()),
        (Code::InvalidArgument, "dataset_version")
    );
    let e = svc
        .client
        .get_dataset_version(pb::GetDatasetVersionRequest {
            dataset_version: "nope/1".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = svc
        .client
        .list_datasets(pb::ListDatasetsRequest {
            page_size: -1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "page_size");
    let e = svc
        .client
        .list_datasets(pb::ListDatasetsRequest {
            page_token: "abc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "page_token");
    let e = svc
        .client
        .list_dataset_versions(pb::ListDatasetVersionsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "dataset_name");
    let e = svc
        .client
        .download_dataset_version(pb::DownloadDatasetVersionRequest::default())
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "dataset_version");
    let e = svc
        .client
        .delete_dataset(pb::DeleteDatasetRequest {
            name: "Bad Name".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "name");
    let e = svc
        .client
        .create_dataset_from_uri(pb::CreateDatasetFromUriRequest {
            spec: None,
            uri: "file:///x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "spec");
    let e = svc
        .client
        .create_dataset_from_uri(pb::CreateDatasetFromUriRequest {
            spec: Some(spec("x", "")),
            uri: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "uri");
    // A version exists: RAW download needs a split, and offsets stay within it.
    let v = upload(&mut svc.client, spec("ok-name", "a.jsonl"), &data, 1000)
        .await
        .unwrap()
        .version
        .unwrap();
    let e = svc
        .client
        .download_dataset_version(pb::DownloadDatasetVersionRequest {
            dataset_version: v.id.clone(),
            mode: pb::DownloadMode::Raw as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(field_of(&e), "split");
    let mut stream = svc
        .client
        .download_dataset_version(pb::DownloadDatasetVersionRequest {
            dataset_version: v.id.clone(),
            mode: pb::DownloadMode::Raw as i32,
            split: 1,
            offset: 1 << 40,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let e = stream.next().await.unwrap().unwrap_err();
    assert_eq!(
        (e.code(), field_of(&e).as_str()),
        (Code::InvalidArgument, "offset")
    );
    svc.stop().await;
}
