//! The service binary as an operator runs it: bad configuration exits non-zero with one
//! clear line naming the setting (never a panic), and SIGTERM drains and exits 0.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_lmforge-ingest");

/// Runs the binary with `args` and env overrides; returns (exit code, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let output = Command::new(BIN)
        .args(args)
        .env_remove("LMFORGE_INGEST_LISTEN")
        .env_remove("LMFORGE_INGEST_ADMIN_LISTEN")
        .envs(env.iter().copied())
        .env("LMFORGE_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .expect("the binary runs");
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), stderr)
}

fn assert_one_clear_line(stderr: &str, needle: &str) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line, got:\n{stderr}");
    assert!(lines[0].starts_with("error: "), "{stderr}");
    assert!(lines[0].contains(needle), "`{needle}` named in: {stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn bad_settings_are_one_line_naming_them() {
    let (code, stderr) = run(&["--registry-url", "not a url"], &[]);
    assert_eq!(code, 2);
    assert_one_clear_line(&stderr, "--registry-url");
    let (code, stderr) = run(
        &["--listen", "127.0.0.1:0"],
        &[
            ("LMFORGE_INGEST_ADMIN_LISTEN", "127.0.0.1:0"),
            ("LMFORGE_ARTIFACTS", "ftp://nowhere/x"),
        ],
    );
    assert_eq!(code, 1);
    assert_one_clear_line(&stderr, "LMFORGE_ARTIFACTS");
}

#[test]
fn sigterm_drains_and_exits_zero() {
    let database_url = std::env::var("LMFORGE_DATABASE_URL")
        .unwrap_or_else(|_| lmforge_runtime::args::DEFAULT_DATABASE_URL.to_owned());
    let schema = format!("t{}_process_ingest", std::process::id());
    let artifacts = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(BIN)
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .args(["--schema", &schema])
        .args(["--artifacts", &artifacts.path().display().to_string()])
        .env("LMFORGE_DATABASE_URL", &database_url)
        .env("LMFORGE_LOG", "info")
        .env("LMFORGE_LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let stderr = child.stderr.take().expect("piped");
    let mut lines = BufReader::new(stderr).lines();
    let serving = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("\"message\":\"serving\""))
        .expect("the service logs that it serves (is Postgres up? run `make services`)");
    assert!(serving.contains("\"grpc\":\"127.0.0.1:"), "{serving}");
    let started = Instant::now();
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = child.wait().expect("child exits");
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        rest.join("\n")
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    if let Ok(rt) = tokio::runtime::Runtime::new() {
        rt.block_on(async {
            if let Ok(pool) = sqlx::PgPool::connect(&database_url).await {
                let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                    .execute(&pool)
                    .await;
            }
        });
    }
}
