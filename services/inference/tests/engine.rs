//! The batching engine on a real (tiny, random) Llama checkpoint: batched outputs equal solo
//! outputs (greedy and seeded sampling, arrivals mid-batch, preemption under a tiny KV budget),
//! cancellation frees blocks, a full queue refuses at once, the prefix cache is reused, and
//! deadlines end requests.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{DType, Device};
use lmforge_inference::engine::constrain::{Grammars, OutputFormat};
use lmforge_inference::engine::{
    self, EngineConfig, EngineHandle, EngineRequest, Event, Finish, SubmitError,
};
use lmforge_model::sampling::SamplingParams;
use lmforge_model::stopping::StopConfig;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Model, hf};
use tokio::sync::mpsc::UnboundedReceiver;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../libs/model/fixtures/tiny-llama")
}

fn start(config: EngineConfig) -> EngineHandle {
    start_with_context(config, None)
}

/// The fixture with its context stretched (rope tables only; no weight depends on it), for
/// generations long enough to outlast a deadline on any machine.
fn start_with_context(config: EngineConfig, context: Option<usize>) -> EngineHandle {
    let mut ckpt = hf::load_checkpoint(&fixture(), DType::F32, &Device::Cpu).expect("checkpoint");
    if let Some(c) = context {
        ckpt.config.max_position_embeddings = c;
    }
    let model = Model::new(&ckpt.config, &ckpt.weights).expect("model");
    let tok = Arc::new(TextTokenizer::from_dir(&fixture()).expect("tokenizer"));
    engine::spawn(model, tok, config, "tiny-llama").expect("engine")
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| 3 + (seed * 37 + i * 11) % 290)
        .collect()
}

fn request(
    id: &str,
    prompt: Vec<u32>,
    max_tokens: usize,
    sampling: SamplingParams,
) -> EngineRequest {
    EngineRequest {
        id: id.to_string(),
        prompt,
        sampling,
        stop: StopConfig {
            max_tokens: Some(max_tokens),
            ..Default::default()
        },
        min_tokens: 0,
        logit_bias: vec![],
        format: None,
        n: 1,
        priority: 0,
        deadline: None,
        arrived: Instant::now(),
        span: opentelemetry::trace::SpanContext::empty_context(),
    }
}

/// Tokens of every choice and each choice's finish reason.
async fn collect(
    mut rx: UnboundedReceiver<Event>,
    n: usize,
) -> (Vec<Vec<u32>>, Vec<Finish>, Option<usize>) {
    let mut tokens = vec![Vec::new(); n];
    let mut finish = vec![None; n];
    let mut cached = None;
    while let Some(e) = rx.recv().await {
        match e {
            Event::Token { choice, id, .. } => tokens[choice as usize].push(id),
            Event::Finished { choice, reason } => finish[choice as usize] = Some(reason),
            Event::Admitted { cached_tokens, .. } => cached = Some(cached_tokens),
            Event::Expired => panic!("expired"),
        }
        if finish.iter().all(Option::is_some) {
            break;
        }
    }
    (
        tokens,
        finish.into_iter().map(|f| f.expect("finished")).collect(),
        cached,
    )
}

fn sampling(i: u32) -> SamplingParams {
    if i.is_multiple_of(2) {
        SamplingParams::greedy()
    } else {
        SamplingParams {
            temperature: 0.9,
            top_p: 0.95,
            seed: 1000 + i as u64,
            ..Default::default()
        }
    }
}

/// Each request alone on a fresh engine.
async fn solo(specs: &[(Vec<u32>, usize)]) -> Vec<Vec<u32>> {
    let engine = start(EngineConfig::default());
    let mut out = Vec::new();
    for (i, (p, max)) in specs.iter().enumerate() {
        let rx = engine
            .submit(request(
                &format!("solo{i}"),
                p.clone(),
                *max,
                sampling(i as u32),
            ))
            .expect("submit");
        out.push(collect(rx, 1).await.0.remove(0));
    }
    out
}

/// Submit every spec at once (ids `{tag}{i}`, [`sampling`]`(i)`); their event channels.
fn submit_all(
    engine: &EngineHandle,
    specs: &[(Vec<u32>, usize)],
    tag: &str,
) -> Vec<UnboundedReceiver<Event>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, (p, max))| {
            engine
                .submit(request(
                    &format!("{tag}{i}"),
                    p.clone(),
                    *max,
                    sampling(i as u32),
                ))
                .expect("submit")
        })
        .collect()
}

/// Each request's one choice got its solo tokens and ended by length.
async fn expect_solo_tokens(rxs: Vec<UnboundedReceiver<Event>>, expected: &[Vec<u32>], what: &str) {
    for (i, rx) in rxs.into_iter().enumerate() {
        let (tokens, finish, _) = collect(rx, 1).await;
        assert_eq!(tokens[0], expected[i], "request {i} {what}");
        assert_eq!(finish[0], Finish::Length);
    }
}

fn specs() -> Vec<(Vec<u32>, usize)> {
    specs_of(6)
}

fn specs_of(n: u32) -> Vec<(Vec<u32>, usize)> {
    (0..n)
        .map(|i| (prompt(i, 5 + 3 * i as usize), 12 + i as usize))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_and_joining_requests_get_their_solo_tokens() {
    let specs = specs();
    let expected = solo(&specs).await;
    assert!(expected.iter().all(|t| !t.is_empty()));
    // All at once, with small prefill chunks so prompts and decodes share steps.
    let engine = start(EngineConfig {
        max_batch_tokens: 8,
        block_size: 4,
        num_blocks: 64,
        ..Default::default()
    });
    let rxs = submit_all(&engine, &specs, "b");
    expect_solo_tokens(rxs, &expected, "in a batch").await;
    // Half first; the rest join once the first ones are generating.
    let mut early = Vec::new();
    for (i, (p, max)) in specs.iter().enumerate().take(3) {
        early.push(
            engine
                .submit(request(
                    &format!("e{i}"),
                    p.clone(),
                    *max,
                    sampling(i as u32),
                ))
                .expect("submit"),
        );
    }
    let mut first = early.remove(0);
    let mut got = Vec::new();
    while got.len() < 3 {
        if let Some(Event::Token { id, .. }) = first.recv().await {
            got.push(id);
        }
    }
    let late: Vec<_> = (3..6)
        .map(|i| {
            let (p, max) = &specs[i];
            engine
                .submit(request(
                    &format!("l{i}"),
                    p.clone(),
                    *max,
                    sampling(i as u32),
                ))
                .expect("submit")
        })
        .collect();
    let (rest, _, _) = collect(first, 1).await;
    got.extend(&rest[0]);
    assert_eq!(got, expected[0], "request 0, others joining mid-generation");
    for (k, rx) in early.into_iter().chain(late).enumerate() {
        let i = k + 1;
        assert_eq!(
            collect(rx, 1).await.0[0],
            expected[i],
            "request {i}, joined mid-batch"
        );
    }
    wait_for(&engine, "every block back", |s| s.kv_blocks_used == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_batch_samples_on_the_pool_and_gets_solo_tokens() {
    // Twelve requests prefilled in one step, then decoding together: their steps sample on
    // the rayon pool (greedy and seeded alike) and still give each its solo tokens.
    let specs = specs_of(12);
    let expected = solo(&specs).await;
    let engine = start(EngineConfig {
        block_size: 4,
        num_blocks: 256,
        ..Default::default()
    });
    let rxs = submit_all(&engine, &specs, "w");
    expect_solo_tokens(rxs, &expected, "in a wide batch").await;
    wait_for(&engine, "every block back", |s| s.kv_blocks_used == 0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preemption_under_a_tiny_kv_budget_completes_every_request_correctly() {
    let specs = specs();
    let expected = solo(&specs).await;
    // 8 blocks of 4 tokens: the largest request needs 8 blocks on its own (20 + 17 tokens),
    // so requests keep preempting each other.
    let engine = start(EngineConfig {
        block_size: 4,
        num_blocks: 10,
        max_batch_tokens: 16,
        ..Default::default()
    });
    let rxs = submit_all(&engine, &specs, "p");
    let outs = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join_all(rxs.into_iter().map(|rx| collect(rx, 1))),
    )
    .await
    .expect("no hang under preemption");
    for (i, (tokens, finish, _)) in outs.into_iter().enumerate() {
        assert_eq!(tokens[0], expected[i], "request {i} after preemption");
        assert_eq!(finish[0], Finish::Length);
    }
    let stats = engine.stats();
    assert!(
        stats.preemptions > 0,
        "the budget forced preemption: {stats:?}"
    );
    wait_for(&engine, "every block back", |s| s.kv_blocks_used == 0).await;
}

async fn wait_for(engine: &EngineHandle, what: &str, cond: impl Fn(&engine::EngineStats) -> bool) {
    let t = Instant::now();
    while !cond(&engine.stats()) {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}: {:?}",
            engine.stats()
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_by_drop_or_abort_frees_blocks() {
    let engine = start(EngineConfig {
        block_size: 4,
        num_blocks: 32,
        ..Default::default()
    });
    let mut rx = engine
        .submit(request("drop", prompt(1, 10), 50, SamplingParams::greedy()))
        .expect("submit");
    while !matches!(rx.recv().await, Some(Event::Token { .. })) {}
    wait_for(&engine, "blocks in use", |s| s.kv_blocks_used > 0).await;
    drop(rx); // the client went away
    wait_for(&engine, "blocks freed after drop", |s| {
        s.kv_blocks_used == 0 && s.running == 0
    })
    .await;

    let mut rx = engine
        .submit(request(
            "abort-me",
            prompt(2, 10),
            50,
            SamplingParams::greedy(),
        ))
        .expect("submit");
    while !matches!(rx.recv().await, Some(Event::Token { .. })) {}
    engine.abort("abort-me");
    let mut tokens = 1;
    loop {
        match rx.recv().await.expect("event") {
            Event::Token { .. } => tokens += 1,
            Event::Finished { reason, .. } => {
                assert_eq!(reason, Finish::Cancelled);
                break;
            }
            _ => {}
        }
    }
    assert!(tokens < 50, "aborted before the end");
    wait_for(&engine, "blocks freed after abort", |s| {
        s.kv_blocks_used == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_refuses_at_once() {
    let engine = start(EngineConfig {
        max_running: 1,
        max_waiting_requests: 2,
        max_waiting_tokens: 40,
        block_size: 4,
        num_blocks: 64,
        ..Default::default()
    });
    let mut running = engine
        .submit(request("run", prompt(1, 5), 60, SamplingParams::greedy()))
        .expect("submit");
    while !matches!(running.recv().await, Some(Event::Token { .. })) {}
    let a = engine
        .submit(request("a", prompt(2, 5), 5, SamplingParams::greedy()))
        .expect("waits");
    let b = engine
        .submit(request("b", prompt(3, 5), 5, SamplingParams::greedy()))
        .expect("waits");
    let t = Instant::now();
    let refused = engine.submit(request("c", prompt(4, 5), 5, SamplingParams::greedy()));
    assert!(
        matches!(refused, Err(SubmitError::QueueFull(_))),
        "{refused:?}"
    );
    assert!(t.elapsed() < Duration::from_millis(50), "refused at once");
    drop(running);
    collect(a, 1).await;
    collect(b, 1).await;
    // The token bound: one request with too many prompt tokens is refused while others wait.
    let mut running = engine
        .submit(request("run2", prompt(1, 5), 60, SamplingParams::greedy()))
        .expect("submit");
    while !matches!(running.recv().await, Some(Event::Token { .. })) {}
    let _a = engine
        .submit(request("a2", prompt(2, 30), 5, SamplingParams::greedy()))
        .expect("waits");
    let refused = engine.submit(request("c2", prompt(4, 20), 5, SamplingParams::greedy()));
    assert!(
        matches!(refused, Err(SubmitError::QueueFull(ref why)) if why.contains("prompt tokens")),
        "{refused:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_prefix_is_served_from_cached_blocks() {
    let engine = start(EngineConfig {
        block_size: 4,
        num_blocks: 32,
        ..Default::default()
    });
    let p = prompt(7, 14);
    let (first, _, cached) = collect(
        engine
            .submit(request("x", p.clone(), 8, SamplingParams::greedy()))
            .expect("submit"),
        1,
    )
    .await;
    assert_eq!(cached, Some(0));
    let (second, _, cached) = collect(
        engine
            .submit(request("y", p.clone(), 8, SamplingParams::greedy()))
            .expect("submit"),
        1,
    )
    .await;
    assert_eq!(
        cached,
        Some(12),
        "three full blocks of the 14-token prompt reused"
    );
    assert_eq!(first, second, "same output from cached blocks");
    let mut other = p.clone();
    other[5] = 299;
    let (_, _, cached) = collect(
        engine
            .submit(request("z", other, 4, SamplingParams::greedy()))
            .expect("submit"),
        1,
    )
    .await;
    assert_eq!(cached, Some(4), "only the block before the change matches");
    let s = engine.stats();
    assert_eq!(s.prefix_cache_hit_tokens, 16);
    assert_eq!(s.prefix_cache_queried_tokens, 42);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_end_queued_and_running_requests() {
    let engine = start_with_context(
        EngineConfig {
            max_running: 1,
            block_size: 4,
            num_blocks: 1024,
            ..Default::default()
        },
        Some(4096),
    );
    let mut running = engine
        .submit(request(
            "long",
            prompt(1, 5),
            3000,
            SamplingParams::greedy(),
        ))
        .expect("submit");
    while !matches!(running.recv().await, Some(Event::Token { .. })) {}
    let mut queued = request("late", prompt(2, 5), 5, SamplingParams::greedy());
    queued.deadline = Some(Instant::now() + Duration::from_millis(1));
    let mut rx = engine.submit(queued).expect("submit");
    assert_eq!(rx.recv().await, Some(Event::Expired));
    drop(running);
    wait_for(&engine, "the long request freed", |s| s.running == 0).await;
    // 3000 tokens take far longer than 150 ms; admission takes far less.
    let mut timed = request("timed", prompt(3, 5), 3000, SamplingParams::greedy());
    timed.deadline = Some(Instant::now() + Duration::from_millis(150));
    let (tokens, finish, _) = collect(engine.submit(timed).expect("submit"), 1).await;
    assert_eq!(finish[0], Finish::DeadlineExceeded);
    assert!(
        !tokens[0].is_empty() && tokens[0].len() < 3000,
        "{}",
        tokens[0].len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_choices_are_independent_seeded_sequences() {
    let engine = start(EngineConfig::default());
    let mut r = request("n", prompt(5, 6), 10, sampling(1));
    r.n = 3;
    let (tokens, _, _) = collect(engine.submit(r).expect("submit"), 3).await;
    // Choice k samples with seed + k: equal to a single request with that seed.
    for (k, t) in tokens.iter().enumerate() {
        let mut s = sampling(1);
        s.seed += k as u64;
        let (alone, _, _) = collect(
            engine
                .submit(request(&format!("n{k}"), prompt(5, 6), 10, s))
                .expect("submit"),
            1,
        )
        .await;
        assert_eq!(&alone[0], t, "choice {k}");
    }
    assert_ne!(tokens[0], tokens[1]);
}

fn grammars(tok: &TextTokenizer) -> Arc<Grammars> {
    let vocab = tok.vocab_size();
    Arc::new(Grammars::new(tok, vocab, tok.eos_token_id()).expect("grammars"))
}

/// JSON mode: every choice, sampled or greedy, with a generous or a tight token budget, is
/// one JSON object, closed before max_tokens.
#[tokio::test]
async fn json_mode_outputs_always_parse_as_json_objects() {
    let engine = start(EngineConfig::default());
    let tok = TextTokenizer::from_dir(&fixture()).expect("tokenizer");
    let eos = tok.eos_token_id().into_iter().collect::<Vec<_>>();
    let format = grammars(&tok)
        .compile(&OutputFormat::JsonObject)
        .expect("compiles");
    for (i, max_tokens) in [2usize, 3, 8, 20, 40].into_iter().enumerate() {
        for s in 0..3u32 {
            let mut r = request(
                &format!("json{i}-{s}"),
                prompt(s, 6),
                max_tokens,
                sampling(s + 1),
            );
            r.format = Some(format.clone());
            r.stop.eos_token_ids = eos.clone();
            r.n = 2;
            let rx = engine.submit(r).expect("submit");
            let (tokens, _, _) = collect(rx, 2).await;
            for choice in tokens {
                assert!(choice.len() <= max_tokens);
                let text = tok.inner.decode(&choice, true).expect("decode");
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
                    panic!("max_tokens {max_tokens}: {text:?} is not JSON: {e}")
                });
                assert!(value.is_object(), "{text}");
            }
        }
    }
}

/// A complete constrained output ends its choice even when nothing could stop it otherwise:
/// no EOS (`ignore_eos`) and `min_tokens` beyond the object; and a row with every token
/// masked (a stop token the grammar needs) ends the choice with an error, not a panic.
#[tokio::test]
async fn complete_outputs_end_without_eos_and_conflicts_fail_cleanly() {
    let engine = start(EngineConfig::default());
    let tok = TextTokenizer::from_dir(&fixture()).expect("tokenizer");
    let format = grammars(&tok)
        .compile(&OutputFormat::JsonObject)
        .expect("compiles");
    for s in 0..3u32 {
        let mut r = request(&format!("noeos-{s}"), prompt(s, 6), 40, sampling(s + 1));
        r.format = Some(format.clone());
        r.stop.eos_token_ids = vec![];
        r.min_tokens = 39;
        let (tokens, finish, _) = collect(engine.submit(r).expect("submit"), 1).await;
        let text = tok.inner.decode(&tokens[0], true).expect("decode");
        assert!(
            serde_json::from_str::<serde_json::Value>(&text).is_ok_and(|v| v.is_object()),
            "{text:?}"
        );
        // Ended by the grammar, unless it closed on the very last token allowed.
        match finish[0] {
            Finish::Stop { .. } => assert!(tokens[0].len() < 40),
            Finish::Length => assert_eq!(tokens[0].len(), 40),
            ref other => panic!("{other:?}"),
        }
    }
    // `{` as a stop token: the grammar's only first token is never allowed.
    let open = tok.token_id("{").expect("`{` is a token");
    let mut r = request("conflict", prompt(1, 6), 10, SamplingParams::greedy());
    r.format = Some(format.clone());
    r.stop.stop_token_ids = vec![open];
    let (tokens, finish, _) = collect(engine.submit(r).expect("submit"), 1).await;
    assert!(tokens[0].is_empty());
    assert!(
        matches!(&finish[0], Finish::Error(e) if e.contains("every token is masked")),
        "{:?}",
        finish[0]
    );
    // The engine is still serving.
    let (tokens, _, _) = collect(
        engine
            .submit(request("after", prompt(2, 6), 3, SamplingParams::greedy()))
            .expect("submit"),
        1,
    )
    .await;
    assert_eq!(tokens[0].len(), 3);
}

/// Structured output: a random model's every choice is valid under the schema.
#[tokio::test]
async fn json_schema_outputs_follow_the_schema() {
    let engine = start(EngineConfig::default());
    let tok = TextTokenizer::from_dir(&fixture()).expect("tokenizer");
    let schema = serde_json::json!({
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 8},
            "rating": {"enum": ["good", "bad"]},
            "stars": {"type": "integer", "minimum": 1, "maximum": 5},
        },
        "required": ["city", "rating", "stars"],
        "additionalProperties": false,
    });
    let format = grammars(&tok)
        .compile(&OutputFormat::JsonSchema(schema))
        .expect("compiles");
    for s in 0..4u32 {
        let mut r = request(&format!("schema-{s}"), prompt(s, 6), 200, sampling(s + 1));
        r.format = Some(format.clone());
        r.stop.eos_token_ids = tok.eos_token_id().into_iter().collect();
        r.n = 2;
        let rx = engine.submit(r).expect("submit");
        let (tokens, _, _) = collect(rx, 2).await;
        for choice in tokens {
            let text = tok.inner.decode(&choice, true).expect("decode");
            let value: serde_json::Value =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}"));
            let city = value["city"].as_str().expect("city");
            assert!(city.chars().count() <= 8, "{text}");
            assert!(
                ["good", "bad"].contains(&value["rating"].as_str().unwrap_or("")),
                "{text}"
            );
            assert!(
                (1..=5).contains(&value["stars"].as_i64().unwrap_or(0)),
                "{text}"
            );
            assert_eq!(value.as_object().map(|o| o.len()), Some(3), "{text}");
        }
    }
}
