//! `lmforge model import` / `export` against a real registry: a Hugging Face checkpoint
//! directory goes in as a READY version and comes back out byte-identical; directories that
//! are not a supported checkpoint are refused before anything is uploaded.

use clap::Parser;
use lmforge::model_cmd;
use lmforge_e2e::{database_url, drop_schemas, unique_name};
use lmforge_runtime::Listeners;

fn write(dir: &std::path::Path, path: &str, bytes: &[u8]) {
    let target = dir.join(path);
    std::fs::create_dir_all(target.parent().expect("has a parent")).expect("mkdir");
    std::fs::write(target, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_then_export_is_byte_identical() {
    let schema = unique_name("transfer");
    let artifacts = tempfile::tempdir().expect("temp dir");
    let mut config =
        lmforge_registry::Config::try_parse_from(["lmforge-registry"]).expect("defaults");
    config.postgres.database_url = database_url();
    config.schema = schema.clone();
    config.artifacts = artifacts.path().display().to_string();
    let listeners = Listeners::ephemeral().await.expect("bind");
    let url = format!("http://{}", listeners.grpc_addr());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = tokio::spawn(lmforge_registry::serve(config, listeners, async {
        let _ = stop_rx.await;
    }));
    lmforge::probe::wait_serving(
        url.trim_start_matches("http://")
            .parse()
            .expect("socket address"),
    )
    .await
    .expect("registry serves");

    let source = tempfile::tempdir().expect("temp dir");
    let weights: Vec<u8> = (0..2_500_000u32).map(|i| (i % 253) as u8).collect();
    write(
        source.path(),
        "config.json",
        br#"{"architectures": ["Qwen2ForCausalLM"], "max_position_embeddings": 1024}"#,
    );
    write(source.path(), "model.safetensors", &weights);
    write(source.path(), "tokenizer.json", b"{\"model\": {}}");
    write(
        source.path(),
        "tokenizer_config.json",
        br#"{"chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}"#,
    );
    write(source.path(), "extra/notes.txt", "中文说明".as_bytes());

    let mut client = model_cmd::connect(&url).await.expect("connect");
    let version = model_cmd::import(&mut client, source.path(), "acme/qwen-tiny", None, false)
        .await
        .expect("import");
    assert_eq!(version.version, 1);
    assert_eq!(version.architecture, "Qwen2ForCausalLM");
    assert_eq!(version.context_length, 1024);
    assert!(version.chat_template.contains("m.content"));
    assert_eq!(version.files.len(), 5);

    let target = tempfile::tempdir().expect("temp dir");
    model_cmd::export(&mut client, "acme/qwen-tiny@latest", target.path(), false)
        .await
        .expect("export");
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "extra/notes.txt",
    ] {
        assert_eq!(
            std::fs::read(source.path().join(file)).expect("source"),
            std::fs::read(target.path().join(file)).expect("exported"),
            "{file} round-trips byte for byte"
        );
    }

    // Not a supported checkpoint: refused with the reason, nothing registered.
    let gpt2 = tempfile::tempdir().expect("temp dir");
    write(
        gpt2.path(),
        "config.json",
        br#"{"architectures": ["GPT2LMHeadModel"]}"#,
    );
    write(gpt2.path(), "model.safetensors", b"x");
    let error = model_cmd::import(&mut client, gpt2.path(), "acme/qwen-tiny", None, false)
        .await
        .expect_err("unsupported architecture");
    assert!(error.to_string().contains("GPT2LMHeadModel"), "{error}");
    let empty = tempfile::tempdir().expect("temp dir");
    let error = model_cmd::import(&mut client, empty.path(), "acme/qwen-tiny", None, false)
        .await
        .expect_err("no checkpoint");
    assert!(error.to_string().contains("config.json"), "{error}");

    let _ = stop_tx.send(());
    service.await.expect("task").expect("clean stop");
    drop_schemas(&schema).await;
}
