//! deploy/docker-compose.yml, deploy/Dockerfile and deploy/prometheus: every service is
//! there, listens on 0.0.0.0 in its container, is scraped by Prometheus, and the alert
//! rules cover latency, errors and a full queue with metrics the services really export.

use std::collections::BTreeSet;

use lmforge_deploy_check::{SERVICES, at, read, rust_sources, scalar, seq_at, str_at, yaml_file};
use regex::Regex;
use serde_yaml::Value;

fn compose() -> Value {
    yaml_file("deploy/docker-compose.yml")
}

fn env_of(service: &Value, key: &str) -> Option<String> {
    at(service, &["environment", key]).and_then(scalar)
}

#[test]
fn service_ports_match_the_config_defaults() {
    for (service, grpc, admin) in SERVICES {
        let config = read(format!("services/{service}/src/config.rs"));
        let upper = service.to_uppercase();
        for (setting, port) in [("LISTEN", grpc), ("ADMIN_LISTEN", admin)] {
            let pattern = format!(
                r#"env = "LMFORGE_{upper}_{setting}",?\s*default_value = "127\.0\.0\.1:(\d+)""#
            );
            let found = Regex::new(&pattern)
                .unwrap()
                .captures(&config)
                .unwrap_or_else(|| {
                    panic!("services/{service}/src/config.rs: no LMFORGE_{upper}_{setting} default")
                });
            assert_eq!(
                found[1].parse::<u16>().unwrap(),
                *port,
                "LMFORGE_{upper}_{setting}"
            );
        }
    }
}

#[test]
fn compose_has_every_service_listening_on_all_interfaces() {
    let compose = compose();
    assert!(
        compose.get("version").is_none(),
        "no `version:` (Compose spec)"
    );
    assert!(
        compose.get("name").is_none(),
        "no `name:` (docker-compose 1.29 rejects it)"
    );
    let services = at(&compose, &["services"]).expect("services");
    for dependency in ["postgres", "nats", "jaeger", "prometheus"] {
        assert!(
            services.get(dependency).is_some(),
            "compose has no `{dependency}`"
        );
    }
    let nats_command: Vec<String> = seq_at(services, &["nats", "command"])
        .iter()
        .filter_map(scalar)
        .collect();
    assert!(
        nats_command.iter().any(|a| a == "-js"),
        "NATS runs without JetStream"
    );
    let jaeger_ports: Vec<String> = seq_at(services, &["jaeger", "ports"])
        .iter()
        .filter_map(scalar)
        .collect();
    for port in ["4317", "16686"] {
        assert!(
            jaeger_ports
                .iter()
                .any(|p| p.ends_with(&format!(":{port}"))),
            "jaeger port {port}"
        );
    }
    let mut lmforge = SERVICES
        .iter()
        .map(|(s, g, a)| (s.to_string(), *g, *a))
        .collect::<Vec<_>>();
    lmforge.push(("trainer-gpu".to_owned(), 50056, 9106));
    for (name, grpc, admin) in &lmforge {
        let service = services
            .get(name.as_str())
            .unwrap_or_else(|| panic!("compose has no `{name}`"));
        let binary = format!("lmforge-{}", name.trim_end_matches("-gpu"));
        let command: Vec<String> = seq_at(service, &["command"])
            .iter()
            .filter_map(scalar)
            .collect();
        assert_eq!(command.first(), Some(&binary), "{name}: command");
        assert_eq!(
            str_at(service, &["build", "dockerfile"]),
            Some("deploy/Dockerfile"),
            "{name}: build"
        );
        let upper = binary.trim_start_matches("lmforge-").to_uppercase();
        assert_eq!(
            env_of(service, &format!("LMFORGE_{upper}_LISTEN")),
            Some(format!("0.0.0.0:{grpc}")),
            "{name}"
        );
        assert_eq!(
            env_of(service, &format!("LMFORGE_{upper}_ADMIN_LISTEN")),
            Some(format!("0.0.0.0:{admin}")),
            "{name}"
        );
        assert_eq!(
            env_of(service, "OTEL_EXPORTER_OTLP_ENDPOINT").as_deref(),
            Some("http://jaeger:4317"),
            "{name}"
        );
        assert!(
            at(service, &["healthcheck"]).is_some(),
            "{name}: no healthcheck"
        );
    }
    // Postgres users and the shared artifact store.
    for name in ["ingest", "jobs", "registry", "gateway"] {
        assert!(
            env_of(&services[name], "LMFORGE_DATABASE_URL")
                .is_some_and(|u| u.contains("@postgres:"))
        );
    }
    for name in ["ingest", "registry", "trainer", "trainer-gpu"] {
        let artifacts = env_of(&services[name], "LMFORGE_ARTIFACTS").expect("LMFORGE_ARTIFACTS");
        let mounted = seq_at(&services[name], &["volumes"])
            .iter()
            .filter_map(Value::as_str)
            .any(|v| v.starts_with("artifacts:") && v.ends_with(&format!(":{artifacts}")));
        assert!(
            mounted,
            "{name}: the artifacts volume is not mounted at {artifacts}"
        );
    }
    // The GPU trainer: profile `gpu`, one NVIDIA device reserved.
    let gpu = &services["trainer-gpu"];
    assert!(
        seq_at(gpu, &["profiles"])
            .iter()
            .any(|p| p.as_str() == Some("gpu"))
    );
    let devices = seq_at(gpu, &["deploy", "resources", "reservations", "devices"]);
    assert!(
        devices
            .iter()
            .any(|d| str_at(d, &["driver"]) == Some("nvidia")),
        "trainer-gpu reserves no GPU"
    );
    assert_eq!(str_at(gpu, &["build", "target"]), Some("trainer-cuda"));
}

#[test]
fn dockerfile_builds_every_binary() {
    let dockerfile = read("deploy/Dockerfile");
    for binary in [
        "lmforge ",
        "lmforge-ingest",
        "lmforge-jobs",
        "lmforge-trainer",
        "lmforge-registry",
        "lmforge-inference",
        "lmforge-gateway",
    ] {
        assert!(
            dockerfile.contains(binary),
            "deploy/Dockerfile does not mention `{}`",
            binary.trim()
        );
    }
    for needle in [
        "rust:1-bookworm",
        "cargo build --release",
        "--mount=type=cache",
        "debian:bookworm-slim",
        "ca-certificates",
        "USER 10001",
        "AS trainer-cuda",
    ] {
        assert!(
            dockerfile.contains(needle),
            "deploy/Dockerfile lacks `{needle}`"
        );
    }
    let ignore = read(".dockerignore");
    for path in ["target/", ".lmforge/", ".venv*"] {
        assert!(
            ignore.lines().any(|l| l.trim() == path),
            ".dockerignore lacks {path}"
        );
    }
}

#[test]
fn prometheus_scrapes_every_service() {
    let config = yaml_file("deploy/prometheus/prometheus.yml");
    let rule_files: Vec<&str> = seq_at(&config, &["rule_files"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        rule_files.iter().any(|f| f.ends_with("alerts.yml")),
        "alerts.yml is not loaded"
    );
    let mut targets = BTreeSet::new();
    for job in seq_at(&config, &["scrape_configs"]) {
        if str_at(job, &["metrics_path"]).is_some_and(|p| p != "/metrics") {
            continue;
        }
        for sd in seq_at(job, &["dns_sd_configs"]) {
            let port = at(sd, &["port"]).and_then(scalar).unwrap_or_default();
            for host in seq_at(sd, &["names"]).iter().filter_map(Value::as_str) {
                targets.insert(format!("{host}:{port}"));
            }
        }
        for sc in seq_at(job, &["static_configs"]) {
            targets.extend(seq_at(sc, &["targets"]).iter().filter_map(scalar));
        }
    }
    let compose = compose();
    for (service, _, admin) in SERVICES {
        assert!(
            targets.contains(&format!("{service}:{admin}")),
            "Prometheus does not scrape {service}:{admin}"
        );
        // …and that is the admin port the service listens on in compose.
        let upper = service.to_uppercase();
        let listen = env_of(
            &compose["services"][*service],
            &format!("LMFORGE_{upper}_ADMIN_LISTEN"),
        );
        assert_eq!(listen, Some(format!("0.0.0.0:{admin}")));
    }
}

#[test]
fn alerts_cover_latency_errors_and_full_queues_with_real_metrics() {
    let alerts = yaml_file("deploy/prometheus/alerts.yml");
    let rules: Vec<&Value> = seq_at(&alerts, &["groups"])
        .iter()
        .flat_map(|g| seq_at(g, &["rules"]))
        .collect();
    let exprs: Vec<String> = rules
        .iter()
        .filter(|r| str_at(r, &["alert"]).is_some())
        .map(|r| {
            str_at(r, &["expr"])
                .expect("every alert has an expr")
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let has = |needles: &[&str]| exprs.iter().any(|e| needles.iter().all(|n| e.contains(n)));
    assert!(
        has(&[
            "histogram_quantile(0.99",
            "grpc_server_handling_seconds_bucket",
            "> 1"
        ]),
        "no p99 > 1 s alert"
    );
    assert!(
        has(&["grpc_server_handled_total", "grpc_code", "> 0.01"]),
        "no error rate > 1% alert"
    );
    assert!(
        has(&["lmforge:request_rejected_total", "queue_"]),
        "no queue-full alert"
    );

    // Every metric an alert names is one the code records.
    let sources: String = rust_sources(&["libs", "services"])
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect();
    let metric = Regex::new(r"\b((?:lmforge:|grpc_server_|http_server_|gateway_)[a-z_]+)").unwrap();
    let mut seen = 0;
    for expr in &exprs {
        for found in metric.captures_iter(expr) {
            let name = &found[1];
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            assert!(
                sources.contains(&format!("\"{base}\"")),
                "alerts.yml uses `{name}`, which no service exports"
            );
            seen += 1;
        }
    }
    assert!(seen >= 3);
}
