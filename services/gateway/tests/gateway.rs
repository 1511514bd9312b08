//! The gateway over HTTP and gRPC against a scripted inference service and real Postgres:
//! auth and limits, the response cache and request merging, routing (rules, `auto`,
//! fallback, reload), the compliance filter on streams, presets and history trimming.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::{MockInference, Script, TestGateway, bearer, content, user_chat};
use lmforge_proto::v1 as pb;
use serde_json::json;

const ROUTING: &str = r#"
allow_model_refs: false
models:
  - name: tiny
    targets: ["tiny@production"]
  - name: other
    targets: ["other@production"]
  - name: chatty
    targets: ["chatty@production"]
    max_input_tokens: 12
  - name: finance
    targets: ["finance@production"]
    filter: finance
  - name: strict
    targets: ["finance@production"]
    filter: strict
rules:
  - name: order-status
    regex: "where is my order|order status"
    answer: "Track your order at https://shop.example/orders."
  - name: refunds
    keywords: ["refund"]
    model: "refunds@production"
auto:
  small: "small@production"
  large: "large@production"
  max_small_chars: 60
  large_keywords: ["analyze", "prove"]
presets:
  java-expert:
    system: "You are a Java expert."
    examples:
      - user: "What is a record?"
        assistant: "An immutable data carrier."
filters:
  finance:
    phrases: ["保本", "无风险", "guaranteed return"]
    action: replace
    replacement: "[removed]"
  strict:
    phrases: ["guaranteed return"]
    action: refuse
    refusal: "I can't make promises about returns."
"#;

fn chat(model: &str, text: &str) -> serde_json::Value {
    json!({"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_completions_auth_and_limits() {
    let mock = MockInference::default();
    mock.script("tiny@production", Script::text("hello there"));
    let gw = TestGateway::start_with("basics", mock.start().await, ROUTING, |c| {
        c.max_body_bytes = 4096;
        c.max_tokens = 100;
        c.max_messages = 3;
    })
    .await;
    let (_, key) = gw.key("app", &["tiny", "auto"], 0, 0).await;

    let (status, headers, body) = gw
        .post("/v1/chat/completions", &key, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(content(&body, 0), "hello there");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["completion_tokens"], 2);
    assert_eq!(body["lmforge"]["route"], "tiny");
    assert_eq!(body["lmforge"]["resolved_model"], "tiny/1");
    assert!(
        body["system_fingerprint"]
            .as_str()
            .is_some_and(|f| f.starts_with("fp_abab"))
    );
    assert!(headers.contains_key("x-request-id"));

    // Text completions, n > 1.
    let (status, _, body) = gw
        .post(
            "/v1/completions",
            &key,
            &json!({"model": "tiny", "prompt": "x", "n": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "text_completion");
    assert_eq!(body["choices"].as_array().map(Vec::len), Some(3));

    // 401: none, unknown.
    let (status, _, body) = gw
        .post("/v1/chat/completions", "", &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"]["type"], "authentication_error");
    let (status, _, _) = gw
        .post("/v1/chat/completions", "lmf_nope", &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 401);
    // 404: unknown model; 403: a model the key may not use.
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("nope", "hi"))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("other", "hi"))
        .await;
    assert_eq!(status, 403, "{body}");

    // 400 naming the field.
    let cases = [
        (
            json!({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}),
            "max_tokens",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": 3}),
            "temperature",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "n": 0}),
            "n",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}),
            "max_tokens",
        ),
        (json!({"model": "tiny", "messages": []}), "messages"),
        (
            json!({"model": "tiny", "messages": [
            {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "user", "content": "d"}]}),
            "messages",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x".repeat(5000)}]}),
            "body",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"messages": [{"role": "user", "content": "x"}]}),
            "model",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}),
            "response_format.json_schema",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}}),
            "response_format.json_schema.name",
        ),
        (
            json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": [1]}}}),
            "response_format.json_schema.schema",
        ),
    ];
    for (body, field) in cases {
        let (status, _, answer) = gw.post("/v1/chat/completions", &key, &body).await;
        assert_eq!(status, 400, "{field}: {answer}");
        assert_eq!(answer["error"]["param"], field, "{answer}");
        assert_eq!(answer["error"]["type"], "invalid_request_error");
    }

    // /v1/models lists what the key may use.
    let models: serde_json::Value = gw
        .client
        .get(format!("{}/v1/models", gw.http))
        .bearer_auth(&key)
        .send()
        .await
        .expect("models")
        .json()
        .await
        .expect("json");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["tiny", "auto"]);

    // The gRPC mirror answers the same.
    let mut openai =
        pb::open_ai_service_client::OpenAiServiceClient::connect(format!("http://{}", gw.grpc))
            .await
            .expect("connect");
    let request = bearer(&key, user_chat("tiny", "hi"));
    let answer = openai
        .create_chat_completion(request)
        .await
        .expect("grpc chat")
        .into_inner();
    assert_eq!(
        answer.choices[0].message.as_ref().expect("message").content,
        "hello there"
    );
    // `response_format: json_schema` reaches inference as the schema's JSON text, from the
    // gRPC mirror's Struct (whole numbers stay integers) and from HTTP alike.
    let schema = json!({"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
        "required": ["city"]});
    let sent_format = || {
        let last = mock.last.lock().expect("last").clone().expect("a request");
        let format = last
            .sampling
            .and_then(|s| s.response_format)
            .expect("format");
        assert_eq!(format.r#type, pb::ResponseFormatType::JsonSchema as i32);
        serde_json::from_str::<serde_json::Value>(&format.json_schema).expect("schema JSON")
    };
    let request = bearer(
        &key,
        pb::ChatCompletionRequest {
            response_format: Some(pb::OpenAiResponseFormat {
                r#type: "json_schema".into(),
                json_schema: Some(pb::OpenAiJsonSchema {
                    name: "city".into(),
                    schema: Some(lmforge_proto::json::json_to_struct(&schema)),
                    ..Default::default()
                }),
            }),
            ..user_chat("tiny", "schema")
        },
    );
    openai
        .create_chat_completion(request)
        .await
        .expect("grpc chat with a schema");
    assert_eq!(sent_format(), schema);
    let mut body = chat("tiny", "schema over http");
    body["response_format"] = json!({"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": true}});
    let (status, _, answer) = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(sent_format(), schema);
    let request = bearer(
        &key,
        pb::ChatCompletionRequest {
            n: Some(2),
            stream_options: Some(pb::StreamOptions {
                include_usage: true,
            }),
            ..user_chat("tiny", "hi")
        },
    );
    let mut chunks = openai
        .stream_chat_completion(request)
        .await
        .expect("grpc stream")
        .into_inner();
    let mut texts = [String::new(), String::new()];
    let mut usage = None;
    while let Some(chunk) = futures::StreamExt::next(&mut chunks).await {
        let chunk = chunk.expect("chunk");
        assert_eq!(chunk.object, "chat.completion.chunk");
        for c in &chunk.choices {
            let delta = c.delta.clone().unwrap_or_default();
            texts[c.index as usize].push_str(delta.content.as_deref().unwrap_or_default());
        }
        usage = usage.or(chunk.usage);
    }
    assert_eq!(texts, ["hello there".to_owned(), "hello there".to_owned()]);
    assert_eq!(usage.map(|u| u.prompt_tokens), Some(5));

    // The legacy completion stream: text chunks, a finish reason, and a closing chunk with
    // the gateway's metadata even without usage.
    let request = bearer(
        &key,
        pb::CompletionRequest {
            model: "tiny".into(),
            prompt: "hi".into(),
            ..Default::default()
        },
    );
    let chunks: Vec<pb::Completion> = futures::StreamExt::collect::<Vec<_>>(
        openai
            .stream_completion(request)
            .await
            .expect("grpc completion stream")
            .into_inner(),
    )
    .await
    .into_iter()
    .map(|c| c.expect("chunk"))
    .collect();
    assert!(chunks.iter().all(|c| c.object == "text_completion"));
    let text: String = chunks
        .iter()
        .flat_map(|c| c.choices.iter().map(|ch| ch.text.as_str()))
        .collect();
    assert_eq!(text, "hello there");
    assert!(
        chunks
            .iter()
            .flat_map(|c| &c.choices)
            .any(|ch| !ch.finish_reason.is_empty()),
        "a finish reason"
    );
    let last = chunks.last().expect("chunks");
    assert!(last.choices.is_empty() && last.lmforge.is_some() && last.usage.is_none());
    let status = openai
        .create_chat_completion(pb::ChatCompletionRequest {
            model: "tiny".into(),
            ..Default::default()
        })
        .await
        .expect_err("no key");
    assert_eq!(status.code(), tonic::Code::Unauthenticated);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_and_revoked_keys_401() {
    let mock = MockInference::default();
    let gw = TestGateway::start("limits", mock.start().await, ROUTING).await;
    let (_, limited) = gw.key("limited", &[], 2, 0).await;
    for _ in 0..2 {
        let (status, _, body) = gw
            .post("/v1/chat/completions", &limited, &chat("tiny", "hi"))
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, headers, body) = gw
        .post("/v1/chat/completions", &limited, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let retry: u64 = headers["retry-after"]
        .to_str()
        .expect("ascii")
        .parse()
        .expect("seconds");
    assert!((1..=30).contains(&retry), "retry-after {retry}");

    // Tokens per minute: the first request overdraws the bucket, the next waits.
    let (_, tokens) = gw.key("tokens", &[], 0, 5).await;
    let (status, _, _) = gw
        .post(
            "/v1/chat/completions",
            &tokens,
            &chat("tiny", "one two three four"),
        )
        .await;
    assert_eq!(status, 200);
    let (status, _, body) = gw
        .post("/v1/chat/completions", &tokens, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 429, "{body}");

    let (id, key) = gw.key("doomed", &[], 0, 0).await;
    let (status, _, _) = gw
        .post("/v1/chat/completions", &key, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 200);
    let mut admin = gw.admin().await.expect("admin");
    let revoked = admin
        .revoke_api_key(gw.authed(pb::RevokeApiKeyRequest {
            id: id.clone(),
            reason: "leaked".into(),
        }))
        .await
        .expect("revoke")
        .into_inner();
    assert!(revoked.revoked_at.is_some());
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("revoked"))
    );
    // Only admins administer.
    let request = bearer(&limited, pb::ListApiKeysRequest::default());
    assert_eq!(
        admin
            .list_api_keys(request)
            .await
            .expect_err("not admin")
            .code(),
        tonic::Code::PermissionDenied
    );
    let listed = admin
        .list_api_keys(gw.authed(pb::ListApiKeysRequest {
            include_inactive: true,
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.keys.len(), 3);
    assert_eq!(listed.keys[0].name, "doomed");
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deterministic_answers_are_cached_and_merged_but_never_leak_across_models() {
    let mock = MockInference::default();
    mock.script(
        "tiny@production",
        Script {
            delay: Duration::from_millis(300),
            ..Script::text("cached words")
        },
    );
    let gw = TestGateway::start("cache", mock.start().await, ROUTING).await;
    let (_, key) = gw.key("app", &["tiny"], 0, 0).await;
    let (_, other) = gw.key("other", &["other"], 0, 0).await;

    // Eight identical concurrent requests: one generation.
    let body = chat("tiny", "same question");
    let answers =
        futures::future::join_all((0..8).map(|_| gw.post("/v1/chat/completions", &key, &body)))
            .await;
    for (status, _, answer) in &answers {
        assert_eq!(*status, 200, "{answer}");
        assert_eq!(content(answer, 0), "cached words");
    }
    assert_eq!(
        mock.calls.load(Ordering::SeqCst),
        1,
        "requests were not merged"
    );

    // Then a cache hit.
    let (_, _, hit) = gw.post("/v1/chat/completions", &key, &body).await;
    assert_eq!(hit["lmforge"]["cache_hit"], true);
    assert_eq!(content(&hit, 0), "cached words");
    assert_eq!(mock.calls.load(Ordering::SeqCst), 1);
    // A streamed identical request replays the cached answer.
    let events = gw.post_stream("/v1/chat/completions", &key, &json!({"model": "tiny", "messages": [{"role": "user", "content": "same question"}], "temperature": 0, "stream": true})).await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(mock.calls.load(Ordering::SeqCst), 1);

    // A key that may not use the model gets no cached answer.
    let (status, _, body_other) = gw.post("/v1/chat/completions", &other, &body).await;
    assert_eq!(status, 403, "{body_other}");
    assert!(body_other.get("choices").is_none());

    // Sampling without a seed is not cached; with no_cache neither; a seed is.
    let sampled = json!({"model": "tiny", "messages": [{"role": "user", "content": "same question"}], "temperature": 0.8});
    gw.post("/v1/chat/completions", &key, &sampled).await;
    gw.post("/v1/chat/completions", &key, &sampled).await;
    assert_eq!(mock.calls.load(Ordering::SeqCst), 3);
    let mut no_cache = body.clone();
    no_cache["no_cache"] = json!(true);
    gw.post("/v1/chat/completions", &key, &no_cache).await;
    assert_eq!(mock.calls.load(Ordering::SeqCst), 4);
    let seeded = json!({"model": "tiny", "messages": [{"role": "user", "content": "q"}], "temperature": 0.8, "seed": 7});
    gw.post("/v1/chat/completions", &key, &seeded).await;
    let (_, _, again) = gw.post("/v1/chat/completions", &key, &seeded).await;
    assert_eq!(again["lmforge"]["cache_hit"], true);
    assert_eq!(mock.calls.load(Ordering::SeqCst), 5);
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_rules_auto_sizes_fallback_and_reload() {
    let mock = MockInference::default();
    mock.script("small@production", Script::text("small answer"));
    mock.script("large@production", Script::text("large answer"));
    let gw = TestGateway::start("routing", mock.start().await, ROUTING).await;
    let (_, key) = gw.key("app", &[], 0, 0).await;

    // A rule's canned answer: no model call.
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            &key,
            &chat("auto", "Where is my order #123?"),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert!(content(&body, 0).contains("shop.example"));
    assert_eq!(body["lmforge"]["route"], "order-status");
    assert_eq!(mock.calls.load(Ordering::SeqCst), 0);
    // A rule's fixed model.
    gw.post(
        "/v1/chat/completions",
        &key,
        &chat("tiny", "I want a refund"),
    )
    .await;
    assert_eq!(
        mock.models_seen
            .lock()
            .expect("seen")
            .last()
            .map(String::as_str),
        Some("refunds@production")
    );

    // auto: short → small, long or keyword → large.
    let (_, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("auto", "hi"))
        .await;
    assert_eq!(content(&body, 0), "small answer");
    assert_eq!(body["lmforge"]["route"], "auto:small");
    let (_, _, body) = gw
        .post(
            "/v1/chat/completions",
            &key,
            &chat("auto", &"long question ".repeat(10)),
        )
        .await;
    assert_eq!(content(&body, 0), "large answer");
    let (_, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("auto", "analyze this"))
        .await;
    assert_eq!(body["lmforge"]["route"], "auto:large");

    // Fallback: the small model is down → the large one answers; overloaded likewise.
    mock.script(
        "small@production",
        Script::failing(tonic::Code::Unavailable),
    );
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("auto", "hello again"))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(content(&body, 0), "large answer");
    mock.script(
        "small@production",
        Script::failing(tonic::Code::ResourceExhausted),
    );
    let events = gw.post_stream("/v1/chat/completions", &key, &json!({"model": "auto", "stream": true, "messages": [{"role": "user", "content": "yo"}]})).await;
    assert!(
        events.iter().any(|e| e.contains("large answer")),
        "{events:?}"
    );
    // Both down → 503.
    mock.script(
        "large@production",
        Script::failing(tonic::Code::Unavailable),
    );
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("auto", "anyone?"))
        .await;
    assert_eq!(status, 503, "{body}");

    // Per-route counters show the saved large-model calls.
    let stats = gw
        .admin()
        .await
        .expect("admin")
        .get_routing_stats(gw.authed(pb::GetRoutingStatsRequest::default()))
        .await
        .expect("stats")
        .into_inner();
    let route = |name: &str| {
        stats
            .routes
            .iter()
            .find(|r| r.route == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(route("order-status").requests, 1);
    assert_eq!(route("auto:small").requests, 4);
    // Two of them fell back to the large model.
    assert_eq!(
        route("auto:small")
            .requests_by_target
            .get("small@production"),
        Some(&1)
    );
    assert_eq!(
        route("auto:small")
            .requests_by_target
            .get("large@production"),
        Some(&2)
    );
    assert_eq!(route("auto:large").requests, 2);
    assert!(route("auto:small").errors >= 1);

    // Reload on change: the rule now answers differently.
    gw.set_routing(&ROUTING.replace("Track your order at", "Orders are tracked at"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, _, body) = gw
            .post("/v1/chat/completions", &key, &chat("auto", "order status?"))
            .await;
        if content(&body, 0).starts_with("Orders are tracked") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "routing file not reloaded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_filter_stops_blocked_phrases_split_across_stream_chunks() {
    let mock = MockInference::default();
    mock.script(
        "finance@production",
        Script::chunks(&[
            "This fund is 保",
            "本 and offers a guaran",
            "teed ret",
            "urn for ",
            "everyone.",
        ]),
    );
    let gw = TestGateway::start("filter", mock.start().await, ROUTING).await;
    let (_, key) = gw.key("app", &[], 0, 0).await;
    let request = |model: &str| json!({"model": model, "stream": true, "n": 2, "messages": [{"role": "user", "content": "sell me"}]});

    let events = gw
        .post_stream("/v1/chat/completions", &key, &request("finance"))
        .await;
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut text = [String::new(), String::new()];
    for event in &events[..events.len() - 1] {
        assert!(
            !event.contains("guaran") || !event.contains("teed"),
            "{event}"
        );
        let chunk: serde_json::Value = serde_json::from_str(event).expect("json chunk");
        for choice in chunk["choices"].as_array().expect("choices") {
            let i = choice["index"].as_u64().expect("index") as usize;
            text[i].push_str(choice["delta"]["content"].as_str().unwrap_or_default());
            // Seen by the client so far: never a blocked phrase.
            assert!(!text[i].contains("保本") && !text[i].contains("guaranteed return"));
        }
    }
    for t in &text {
        assert_eq!(
            t,
            "This fund is [removed] and offers a [removed] for everyone."
        );
    }
    let last: serde_json::Value = serde_json::from_str(&events[events.len() - 2]).expect("json");
    assert_eq!(last["lmforge"]["filtered"], true, "{last}");

    // Refusal: the choice ends with content_filter and the fixed message.
    let events = gw
        .post_stream("/v1/chat/completions", &key, &request("strict"))
        .await;
    let joined = events.join("\n");
    assert!(joined.contains("I can't make promises about returns."));
    assert!(joined.contains("\"finish_reason\":\"content_filter\""));
    assert!(!joined.contains("guaran"));

    // Whole answers are filtered too.
    let (_, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("finance", "sell me"))
        .await;
    assert_eq!(
        content(&body, 0),
        "This fund is [removed] and offers a [removed] for everyone."
    );
    assert_eq!(
        body["lmforge"]["filter_rules"],
        json!(["finance/phrases[0]", "finance/phrases[2]"])
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presets_expand_and_history_is_trimmed_to_the_budget() {
    // Without a script the mock echoes the conversation it received.
    let mock = MockInference::default();
    let gw = TestGateway::start("presets", mock.start().await, ROUTING).await;
    let (_, key) = gw.key("app", &[], 0, 0).await;

    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &json!({"model": "tiny", "preset": "java-expert", "messages": [{"role": "user", "content": "What is a sealed class?"}]}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        content(&body, 0),
        "1: You are a Java expert.\n2: What is a record?\n3: An immutable data carrier.\n2: What is a sealed class?"
    );
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &json!({"model": "tiny", "preset": "nope", "messages": [{"role": "user", "content": "x"}]}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("preset"))
    );

    // Budget 12 tokens (words): the oldest turns go, the system and latest turns stay.
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three four"},
        {"role": "assistant", "content": "five six seven"},
        {"role": "user", "content": "eight nine"},
        {"role": "assistant", "content": "ten"},
        {"role": "user", "content": "latest question here"},
    ]);
    let (status, _, body) = gw
        .post(
            "/v1/chat/completions",
            &key,
            &json!({"model": "chatty", "messages": messages}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        content(&body, 0),
        "1: be brief\n2: eight nine\n3: ten\n2: latest question here"
    );
    // The latest turn alone over budget → 400 naming messages.
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &json!({"model": "chatty", "messages": [{"role": "user", "content": "a b c d e f g h i j k l m n"}]}))
        .await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("messages"))
    );
    gw.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inference_down_answers_503_and_batches_fan_out() {
    let mock = MockInference::default();
    let addr = mock.start().await;
    let gw = TestGateway::start("batch", addr, ROUTING).await;
    let (_, key) = gw.key("app", &["tiny"], 0, 0).await;
    let (status, _, body) = gw
        .post(
            "/v1/batch",
            &key,
            &json!({"requests": [
                {"chat": {"model": "tiny", "messages": [{"role": "user", "content": "a"}]}},
                {"completion": {"model": "tiny", "prompt": "b"}},
                {"chat": {"model": "other", "messages": [{"role": "user", "content": "c"}]}},
            ]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["items"][0]["chat"]["choices"][0]["message"]["content"],
        "2: a"
    );
    assert_eq!(body["items"][1]["completion"]["choices"][0]["text"], "b");
    assert_eq!(body["items"][2]["error"]["type"], "permission_error");
    gw.stop().await;

    // Nothing listening upstream.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let gw = TestGateway::start("down", dead, ROUTING).await;
    let (_, key) = gw.key("app", &[], 0, 0).await;
    let (status, _, body) = gw
        .post("/v1/chat/completions", &key, &chat("tiny", "hi"))
        .await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["type"], "server_error");
    gw.stop().await;
}
