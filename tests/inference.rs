//! The inference service over gRPC, against a real registry (Postgres): a registered
//! checkpoint is downloaded, loaded and served; unary, streaming and batch answers agree;
//! bad input is refused naming the field; abort and disconnect free the sequence; a full queue
//! refuses at once; an alias move swaps versions with no failed request; metrics are exported.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lmforge::model_cmd;
use lmforge_e2e::{database_url, drop_schemas, unique_name};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_runtime::Listeners;
use tonic::Code;
use tonic::transport::Channel;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../libs/model/fixtures")
        .join(name)
}

struct Env {
    schema: String,
    registry: RegistryServiceClient<Channel>,
    client: InferenceServiceClient<Channel>,
    admin: SocketAddr,
    inference_addr: SocketAddr,
    registry_url: String,
    stops: Vec<tokio::sync::oneshot::Sender<()>>,
    _dirs: Vec<tempfile::TempDir>,
}

impl Env {
    /// A registry and an inference service; `tune` adjusts the inference config.
    async fn start(label: &str, tune: impl FnOnce(&mut lmforge_inference::Config)) -> Env {
        let schema = unique_name(label);
        let artifacts = tempfile::tempdir().expect("temp dir");
        let cache = tempfile::tempdir().expect("temp dir");
        let mut rc =
            lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
        rc.postgres.database_url = database_url();
        rc.schema = schema.clone();
        rc.artifacts = artifacts.path().display().to_string();
        let rl = Listeners::ephemeral().await.expect("bind");
        let registry_addr = rl.grpc_addr();
        let (rtx, rrx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(lmforge_registry::serve(rc, rl, async {
            let _ = rrx.await;
        }));
        lmforge::probe::wait_serving(registry_addr)
            .await
            .expect("registry serves");

        let mut ic =
            lmforge_inference::Config::try_parse_from(["lmforge-inference"]).expect("defaults");
        ic.registry_url = format!("http://{registry_addr}").parse().expect("url");
        ic.cache_dir = cache.path().to_path_buf();
        ic.kv_blocks = Some(64);
        ic.block_size = 4;
        tune(&mut ic);
        let il = Listeners::ephemeral().await.expect("bind");
        let (addr, admin) = (il.grpc_addr(), il.admin_addr());
        let (itx, irx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(lmforge_inference::serve(ic, il, async {
            let _ = irx.await;
        }));
        lmforge::probe::wait_serving(addr)
            .await
            .expect("inference serves");
        Env {
            schema,
            registry: model_cmd::connect(&format!("http://{registry_addr}"))
                .await
                .expect("registry"),
            client: InferenceServiceClient::connect(format!("http://{addr}"))
                .await
                .expect("inference"),
            admin,
            inference_addr: addr,
            registry_url: format!("http://{registry_addr}"),
            stops: vec![itx, rtx],
            _dirs: vec![artifacts, cache],
        }
    }

    async fn import(&mut self, dir: &Path, name: &str) -> u32 {
        model_cmd::import(&mut self.registry, dir, name, None, false)
            .await
            .expect("import")
            .version
    }

    async fn set_alias(&mut self, name: &str, alias: &str, version: u32) {
        self.registry
            .set_alias(pb::SetAliasRequest {
                model_name: name.into(),
                alias: alias.into(),
                version,
                actor: "user:test".into(),
                ..Default::default()
            })
            .await
            .expect("set alias");
    }

    async fn load(&mut self, model_ref: &str) -> pb::LoadedModel {
        self.client
            .load_model(pb::LoadModelRequest {
                model_ref: model_ref.into(),
                ..Default::default()
            })
            .await
            .expect("load")
            .into_inner()
    }

    async fn stop(self) {
        for s in self.stops {
            let _ = s.send(());
        }
        drop_schemas(&self.schema).await;
    }
}

fn req(id: &str, prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        request_id: id.into(),
        input: Some(pb::generate_request::Input::Prompt(prompt.into())),
        sampling: Some(pb::SamplingParams {
            max_tokens: Some(max_tokens),
            temperature: Some(0.0),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn models(client: &mut InferenceServiceClient<Channel>) -> Vec<pb::LoadedModel> {
    client
        .list_models(pb::ListLoadedModelsRequest {})
        .await
        .expect("list")
        .into_inner()
        .models
}

async fn wait_idle(client: &mut InferenceServiceClient<Channel>) {
    let t = Instant::now();
    loop {
        let m = models(client).await;
        if m.iter()
            .all(|m| m.running_requests == 0 && m.kv_blocks_used == 0 && m.waiting_requests == 0)
        {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "sequences not freed: {m:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_a_registered_model_over_grpc() {
    let mut env = Env::start("infer_api", |_| {}).await;
    env.import(&fixture("tiny-llama"), "acme/tiny").await;
    let loaded = env.load("acme/tiny@latest").await;
    assert_eq!(loaded.state, pb::LoadedModelState::Ready as i32);
    assert_eq!(loaded.context_length, 64);
    assert_eq!(loaded.kv_blocks_total, 64);
    let c = &mut env.client;

    let unary = c
        .generate(req("u1", "hello world", 12))
        .await
        .expect("generate")
        .into_inner();
    let choice = &unary.choices[0];
    assert_eq!(choice.token_ids.len(), 12);
    assert_eq!(choice.finish_reason, pb::FinishReason::Length as i32);
    let usage = unary.usage.expect("usage");
    assert_eq!(usage.completion_tokens, 12);
    assert!(usage.prompt_tokens >= 2);
    let timings = unary.timings.expect("timings");
    assert!(timings.time_to_first_token.is_some() && timings.total.is_some());
    assert_eq!(unary.model.expect("model").version, 1);

    // The stream carries the same tokens and text, usage on its last message.
    let mut stream = c
        .generate_stream(req("s1", "hello world", 12))
        .await
        .expect("stream")
        .into_inner();
    let (mut text, mut ids, mut last) = (String::new(), Vec::new(), None);
    while let Some(msg) = stream.next().await {
        let msg = msg.expect("message");
        text.push_str(&msg.text);
        ids.extend(msg.tokens.iter().map(|t| t.id));
        // No log-probabilities unless asked for.
        assert!(msg.tokens.iter().all(|t| t.logprob.is_none()), "{msg:?}");
        last = Some(msg);
    }
    let last = last.expect("messages");
    assert_eq!(ids, choice.token_ids);
    assert_eq!(text, choice.text);
    assert_eq!(last.finish_reason, pb::FinishReason::Length as i32);
    assert_eq!(last.usage.expect("usage").completion_tokens, 12);
    // Asked for, every token has a log-probability (≤ 0, the best of its alternatives for
    // greedy picks) and its alternatives.
    let mut asked = req("lp", "hello world", 5);
    let sampling = asked.sampling.as_mut().expect("sampling");
    (sampling.logprobs, sampling.top_logprobs) = (true, Some(3));
    let answer = c.generate(asked).await.expect("logprobs").into_inner();
    let answer = &answer.choices[0];
    assert_eq!(answer.token_ids, choice.token_ids[..5]);
    assert_eq!(answer.tokens.len(), 5);
    let mut total = 0.0;
    for t in &answer.tokens {
        let lp = t.logprob.expect("a logprob per token");
        assert!(lp <= 0.0 && t.top_logprobs.len() == 3, "{t:?}");
        assert_eq!(t.top_logprobs[0].id, t.id, "greedy picks the most likely");
        total += f64::from(lp);
    }
    let cumulative = answer.cumulative_logprob.expect("cumulative");
    assert!((cumulative - total).abs() < 1e-4, "{cumulative} vs {total}");

    // Chat input is rendered with the version's template.
    let mut chat = req("c1", "", 4);
    chat.input = Some(pb::generate_request::Input::Chat(pb::ChatInput {
        messages: vec![pb::ChatMessage {
            role: pb::ChatRole::User as i32,
            content: "你好".into(),
            name: None,
        }],
        ..Default::default()
    }));
    let tokenized = c
        .tokenize(pb::TokenizeRequest {
            input: Some(pb::tokenize_request::Input::Chat(pb::ChatInput {
                messages: vec![pb::ChatMessage {
                    role: pb::ChatRole::User as i32,
                    content: "你好".into(),
                    name: None,
                }],
                ..Default::default()
            })),
            ..Default::default()
        })
        .await
        .expect("tokenize")
        .into_inner();
    assert_eq!(tokenized.rendered_text, "用户：你好\n助手：");
    let answer = c.generate(chat).await.expect("chat").into_inner();
    assert_eq!(
        answer.usage.expect("usage").prompt_tokens as usize,
        tokenized.tokens.len()
    );
    let count = c
        .count_tokens(pb::CountTokensRequest {
            input: Some(pb::count_tokens_request::Input::Text("hello world".into())),
            ..Default::default()
        })
        .await
        .expect("count")
        .into_inner();
    assert_eq!(count.token_count, usage.prompt_tokens);
    assert_eq!(count.context_length, 64);

    // Bad input names the field; unknown models are NOT_FOUND.
    let mut bad = req("b1", "hi", 4);
    bad.sampling.as_mut().expect("sampling").temperature = Some(5.0);
    let e = c.generate(bad).await.expect_err("temperature");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().starts_with("sampling.temperature"),
        "{}",
        e.message()
    );
    // `response_format`: the schema is required, must be JSON and must compile; the field is
    // named in the message and in the BadRequest detail the gateway reads.
    for (schema, why) in [
        ("", "required"),
        ("{not json", "not JSON"),
        (
            r#"{"type": "integer", "minimum": 3, "maximum": 1}"#,
            "nsatisfiable",
        ),
    ] {
        let mut bad = req("b4", "hi", 4);
        bad.sampling.as_mut().expect("sampling").response_format = Some(pb::ResponseFormat {
            r#type: pb::ResponseFormatType::JsonSchema as i32,
            json_schema: schema.into(),
        });
        let e = c.generate(bad).await.expect_err("bad schema");
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(
            e.message()
                .starts_with("sampling.response_format.json_schema: ")
                && e.message().contains(why),
            "{schema}: {}",
            e.message()
        );
        let field = tonic_types::StatusExt::get_details_bad_request(&e)
            .and_then(|b| b.field_violations.into_iter().next())
            .map(|v| v.field);
        assert_eq!(
            field.as_deref(),
            Some("sampling.response_format.json_schema")
        );
    }
    let long = "word ".repeat(200);
    let e = c.generate(req("b2", &long, 4)).await.expect_err("too long");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("context is 64"), "{}", e.message());
    let mut other = req("b3", "hi", 4);
    other.model = "acme/nothing".into();
    assert_eq!(
        c.generate(other).await.expect_err("unknown").code(),
        Code::NotFound
    );

    // A batch: each item independent, a bad one does not fail the others.
    let mut items = vec![req("", "one", 5), req("", "two three", 6)];
    let mut broken = req("", "x", 5);
    broken.sampling.as_mut().expect("sampling").top_p = Some(0.0);
    items.push(broken);
    let batch = c
        .generate_batch(pb::GenerateBatchRequest { requests: items })
        .await
        .expect("batch")
        .into_inner();
    assert_eq!(batch.items.len(), 3);
    for (i, want) in [(0, 5), (1, 6)] {
        match &batch.items[i].result {
            Some(pb::generate_batch_item::Result::Response(r)) => {
                assert_eq!(r.choices[0].token_ids.len(), want)
            }
            other => panic!("item {i}: {other:?}"),
        }
    }
    match &batch.items[2].result {
        Some(pb::generate_batch_item::Result::Error(f)) => {
            assert_eq!(f.code, "INVALID_ARGUMENT");
            assert!(
                f.message.starts_with("requests[2].sampling.top_p"),
                "{}",
                f.message
            );
        }
        other => panic!("item 2: {other:?}"),
    }
    // The same version again with q8_0 weights, as a second model of the replica.
    let q8 = c
        .load_model(pb::LoadModelRequest {
            model_ref: "acme/tiny/1".into(),
            quantization: pb::Quantization::Q80 as i32,
            ..Default::default()
        })
        .await
        .expect("q8_0 load")
        .into_inner();
    assert_eq!(q8.quantization, pb::Quantization::Q80 as i32);
    assert!(!q8.is_default);
    let mut r = req("q8", "hello world", 6);
    r.model = "acme/tiny/1".into();
    let q8_answer = c.generate(r).await.expect("q8_0 generate").into_inner();
    assert_eq!(q8_answer.choices[0].token_ids.len(), 6);
    assert_eq!(models(c).await.len(), 2);
    let (status, metrics) = lmforge::probe::admin_get(env.admin, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(status, 200);
    for name in [
        "lmforge:time_to_first_token_seconds",
        "lmforge:inter_token_latency_seconds",
        "lmforge:e2e_request_latency_seconds",
        "lmforge:request_queue_time_seconds",
        "lmforge:num_requests_running",
        "lmforge:kv_blocks_used",
        "lmforge:prefix_cache_hits_total",
        "lmforge:request_rejected_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_disconnect_and_a_full_queue() {
    let mut env = Env::start("infer_cancel", |c| {
        c.max_running = 1;
        c.max_waiting_requests = 1;
    })
    .await;
    env.import(&fixture("tiny-llama"), "acme/tiny").await;
    env.load("acme/tiny/1").await;
    let c = &mut env.client;

    // Abort: the stream ends CANCELLED and the sequence is freed.
    let mut stream = c
        .generate_stream(req("to-abort", "hello", 55))
        .await
        .expect("stream")
        .into_inner();
    stream.next().await.expect("first").expect("ok");
    let aborted = c
        .abort(pb::AbortRequest {
            request_id: "to-abort".into(),
        })
        .await
        .expect("abort")
        .into_inner();
    assert!(aborted.aborted);
    let mut last = None;
    while let Some(m) = stream.next().await {
        last = Some(m.expect("message"));
    }
    assert_eq!(
        last.expect("last").finish_reason,
        pb::FinishReason::Cancelled as i32
    );
    wait_idle(c).await;

    // Disconnect: dropping the stream frees the sequence.
    let mut stream = c
        .generate_stream(req("to-drop", "hello", 55))
        .await
        .expect("stream")
        .into_inner();
    stream.next().await.expect("first").expect("ok");
    drop(stream);
    wait_idle(c).await;
    // A unary call whose client gives up is freed as well.
    let mut unary = req("to-timeout", "hello", 55);
    unary.sampling.as_mut().expect("sampling").max_tokens = Some(55);
    let mut slow = tonic::Request::new(unary);
    slow.set_timeout(Duration::from_millis(1));
    let _ = c.generate(slow).await;
    wait_idle(c).await;

    // One running, one waiting, the third refused at once.
    let mut running = c
        .generate_stream(req("r", "hello", 55))
        .await
        .expect("stream")
        .into_inner();
    running.next().await.expect("first").expect("ok");
    let mut c2 = c.clone();
    let waiting = tokio::spawn(async move { c2.generate(req("w", "hi", 3)).await });
    let t = Instant::now();
    loop {
        if models(c).await[0].waiting_requests == 1 {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let t = Instant::now();
    let e = c.generate(req("x", "hi", 3)).await.expect_err("full");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(t.elapsed() < Duration::from_millis(200));
    drop(running);
    let w = waiting
        .await
        .expect("join")
        .expect("the waiting request completes");
    assert_eq!(w.into_inner().choices[0].token_ids.len(), 3);
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alias_move_swaps_versions_with_no_failed_request() {
    let mut env = Env::start("infer_swap", |_| {}).await;
    let v1 = env.import(&fixture("tiny-llama"), "acme/swap").await;
    let v2 = env.import(&fixture("tiny-qwen2"), "acme/swap").await;
    env.set_alias("acme/swap", "production", v1).await;
    let loaded = env.load("acme/swap@production").await;
    assert!(loaded.follow_alias);
    assert_eq!(loaded.resolved.expect("resolved").version, v1);

    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let mut c = env.client.clone();
        let (stop, done) = (stop.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut versions = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let mut r = req(&format!("w{w}-{i}"), "hello", 8);
                r.model = "acme/swap@production".into();
                let resp = c
                    .generate(r)
                    .await
                    .expect("no request fails during the swap")
                    .into_inner();
                assert_eq!(resp.choices[0].token_ids.len(), 8);
                versions.push(resp.model.expect("model").version);
                done.fetch_add(1, Ordering::Relaxed);
                i += 1;
            }
            versions
        }));
    }
    while done.load(Ordering::Relaxed) < 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    env.set_alias("acme/swap", "production", v2).await;
    let t = Instant::now();
    loop {
        let m = models(&mut env.client).await;
        if m[0].resolved.as_ref().is_some_and(|r| r.version == v2) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "no swap: {m:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let before = done.load(Ordering::Relaxed);
    while done.load(Ordering::Relaxed) < before + 8 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.await.expect("worker"));
    }
    assert!(
        all.contains(&v1) && all.contains(&v2),
        "served both versions"
    );
    assert_eq!(all.last().copied(), Some(v2));
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_share_a_memory_budget() {
    // ~900 KiB of weights with their packed serving copy (panels padded to 64 rows) and 1200
    // KV blocks of 512 bytes each: one (~1.5 MiB) fits in 2 MiB, two do not.
    let mut env = Env::start("infer_budget", |c| {
        c.kv_blocks = Some(1200);
        c.memory_budget_mb = 2;
    })
    .await;
    env.import(&fixture("tiny-llama"), "acme/a").await;
    env.import(&fixture("tiny-llama"), "acme/b").await;
    env.load("acme/a/1").await;
    let e = env
        .client
        .load_model(pb::LoadModelRequest {
            model_ref: "acme/b/1".into(),
            ..Default::default()
        })
        .await
        .expect_err("over budget");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("memory budget"), "{}", e.message());
    // Unloading the first makes room.
    env.client
        .unload_model(pb::UnloadModelRequest {
            model_ref: "acme/a/1".into(),
            drain: false,
        })
        .await
        .expect("unload");
    assert_eq!(
        env.load("acme/b/1").await.state,
        pb::LoadedModelState::Ready as i32
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_rewrites_records_through_the_inference_service() {
    use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
    let mut env = Env::start("infer_rewrite", |_| {}).await;
    env.import(&fixture("tiny-llama"), "acme/rewriter").await;
    env.load("acme/rewriter@latest").await;
    let inference_url = format!("http://{}", env.inference_addr);
    let work = tempfile::tempdir().expect("temp dir");
    let mut config = lmforge_ingest::Config::try_parse_from(["lmforge-ingest"]).expect("defaults");
    config.postgres.database_url = database_url();
    config.schema = format!("{}_ingest", env.schema);
    config.artifacts = work.path().join("artifacts").display().to_string();
    config.work_dir = work.path().join("work").display().to_string();
    config.registry_url = env.registry_url.parse().expect("url");
    config.inference_url = inference_url.parse().expect("url");
    let listeners = Listeners::ephemeral().await.expect("bind");
    let addr = listeners.grpc_addr();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(lmforge_ingest::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));
    lmforge::probe::wait_serving(addr)
        .await
        .expect("ingest serves");
    let mut ingest = DatasetServiceClient::connect(format!("http://{addr}"))
        .await
        .expect("ingest");

    let data = [
        r#"{"messages": [{"role": "user", "content": "How do I reset my password?"}, {"role": "assistant", "content": "Open settings, then choose reset password and follow the email link."}]}"#,
        r#"{"messages": [{"role": "user", "content": "订单多久发货？"}, {"role": "assistant", "content": "一般在付款后二十四小时内发货，节假日顺延。"}]}"#,
    ]
    .join("\n");
    let spec = pb::DatasetIngestSpec {
        dataset_name: "support".into(),
        filename: "support.jsonl".into(),
        config: Some(pb::IngestConfig {
            augmentation: Some(pb::AugmentationConfig {
                synonym: None,
                rewrite: Some(pb::ModelRewrite {
                    model: "acme/rewriter@latest".into(),
                    // The fixture's context is 64 tokens: a bare template, and long texts cut.
                    prompt_template: "{text}".into(),
                    sampling: Some(pb::SamplingParams {
                        truncate_prompt_tokens: Some(40),
                        max_tokens: Some(8),
                        temperature: Some(0.0),
                        ignore_eos: true,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
            }),
            split: Some(pb::SplitConfig {
                train_ratio: Some(1.0),
                eval_ratio: Some(0.0),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let messages = vec![
        pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Metadata(spec)),
        },
        pb::UploadDatasetRequest {
            payload: Some(pb::upload_dataset_request::Payload::Chunk(
                data.into_bytes(),
            )),
        },
    ];
    let response = ingest
        .upload_dataset(futures::stream::iter(messages))
        .await
        .expect("upload with a live rewrite")
        .into_inner();
    let version = response.version.expect("version");
    assert_eq!(
        version.record_count, 4,
        "two records and one rewrite of each"
    );
    let mut stream = ingest
        .download_dataset_version(pb::DownloadDatasetVersionRequest {
            dataset_version: version.id.clone(),
            ..Default::default()
        })
        .await
        .expect("download")
        .into_inner();
    let mut rewritten = 0;
    while let Some(m) = stream.next().await {
        if let Some(pb::download_dataset_version_response::Payload::Record(r)) =
            m.expect("message").payload
            && r.labels.get("augmented").map(String::as_str) == Some("rewrite")
        {
            rewritten += 1;
        }
    }
    assert_eq!(rewritten, 2);
    let _ = stop_tx.send(());
    env.stop().await;
}
