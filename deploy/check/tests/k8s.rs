//! deploy/k8s: the kustomization's resources exist and parse, and every Deployment is
//! probed, sized and wired to Secrets and ConfigMaps that the kustomization defines.

use std::collections::{BTreeMap, BTreeSet};

use lmforge_deploy_check::{
    SERVICES, at, read, repo_root, scalar, seq_at, str_at, yaml_documents, yaml_file,
};
use serde_yaml::Value;

const K8S: &str = "deploy/k8s";

/// Every document of every file in the kustomization's `resources`.
fn resources() -> Vec<(String, Value)> {
    let kustomization = yaml_file(&format!("{K8S}/kustomization.yaml"));
    let listed = seq_at(&kustomization, &["resources"]);
    assert!(!listed.is_empty(), "kustomization.yaml lists no resources");
    let mut out = Vec::new();
    for item in listed {
        let file = item.as_str().expect("resources are file names");
        let path = format!("{K8S}/{file}");
        assert!(
            repo_root().join(&path).is_file(),
            "kustomization resource {path} does not exist"
        );
        let documents = yaml_documents(&read(&path), &path);
        assert!(!documents.is_empty(), "{path} is empty");
        for document in documents {
            for key in ["apiVersion", "kind"] {
                assert!(
                    str_at(&document, &[key]).is_some(),
                    "{path}: a document has no {key}"
                );
            }
            assert!(
                str_at(&document, &["metadata", "name"]).is_some(),
                "{path}: a document has no metadata.name"
            );
            out.push((path.clone(), document));
        }
    }
    out
}

fn of_kind<'a>(docs: &'a [(String, Value)], kind: &str) -> Vec<&'a Value> {
    docs.iter()
        .filter(|(_, d)| str_at(d, &["kind"]) == Some(kind))
        .map(|(_, d)| d)
        .collect()
}

fn name(doc: &Value) -> &str {
    str_at(doc, &["metadata", "name"]).unwrap_or_default()
}

/// ConfigMaps and Secrets the kustomization defines (as resources or generators), each
/// with its keys (`None`: keys unknown, as for generators from files or env files).
fn defined(docs: &[(String, Value)], kind: &str) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let mut out = BTreeMap::new();
    for doc in of_kind(docs, kind) {
        let mut keys = BTreeSet::new();
        for field in ["data", "stringData", "binaryData"] {
            if let Some(map) = at(doc, &[field]).and_then(Value::as_mapping) {
                keys.extend(map.keys().filter_map(scalar));
            }
        }
        out.insert(name(doc).to_owned(), Some(keys));
    }
    let kustomization = yaml_file(&format!("{K8S}/kustomization.yaml"));
    let generator = if kind == "Secret" {
        "secretGenerator"
    } else {
        "configMapGenerator"
    };
    for item in seq_at(&kustomization, &[generator]) {
        let generated = str_at(item, &["name"])
            .expect("generators have a name")
            .to_owned();
        let only_literals =
            seq_at(item, &["files"]).is_empty() && seq_at(item, &["envs"]).is_empty();
        let keys = only_literals.then(|| {
            seq_at(item, &["literals"])
                .iter()
                .filter_map(Value::as_str)
                .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
                .collect()
        });
        out.insert(generated, keys);
    }
    out
}

fn check_ref(
    what: &str,
    defined: &BTreeMap<String, Option<BTreeSet<String>>>,
    name: &str,
    key: Option<&str>,
) {
    let keys = defined.get(name).unwrap_or_else(|| {
        panic!("{what} refers to `{name}`, which the kustomization does not define")
    });
    if let (Some(keys), Some(key)) = (keys, key) {
        assert!(
            keys.contains(key),
            "{what} refers to key `{key}` of `{name}`, which has none"
        );
    }
}

#[test]
fn resources_exist_and_parse() {
    let docs = resources();
    assert!(!of_kind(&docs, "Namespace").is_empty(), "no Namespace");
    assert!(
        !of_kind(&docs, "ConfigMap").is_empty(),
        "no ConfigMap of shared settings"
    );
    assert!(!defined(&docs, "Secret").is_empty(), "no Secret");
    let has_pvc = !of_kind(&docs, "PersistentVolumeClaim").is_empty();
    let s3 = of_kind(&docs, "ConfigMap")
        .iter()
        .any(|c| str_at(c, &["data", "LMFORGE_ARTIFACTS"]).is_some_and(|v| v.starts_with("s3://")));
    assert!(
        has_pvc || s3,
        "artifacts need a PersistentVolumeClaim or an s3:// store"
    );
}

#[test]
fn every_service_has_a_deployment_and_a_service() {
    let docs = resources();
    let deployments: BTreeSet<&str> = of_kind(&docs, "Deployment").into_iter().map(name).collect();
    let services: BTreeSet<&str> = of_kind(&docs, "Service").into_iter().map(name).collect();
    for (service, grpc, _) in SERVICES {
        assert!(deployments.contains(service), "no Deployment `{service}`");
        assert!(services.contains(service), "no Service `{service}`");
        let svc = of_kind(&docs, "Service")
            .into_iter()
            .find(|s| name(s) == *service)
            .unwrap();
        assert!(
            seq_at(svc, &["spec", "ports"])
                .iter()
                .any(|p| at(p, &["port"]).and_then(Value::as_u64) == Some(u64::from(*grpc))),
            "Service `{service}` does not expose gRPC port {grpc}"
        );
    }
}

#[test]
fn deployments_are_probed_sized_and_wired() {
    let docs = resources();
    let config_maps = defined(&docs, "ConfigMap");
    let secrets = defined(&docs, "Secret");
    let deployments = of_kind(&docs, "Deployment");
    assert!(!deployments.is_empty());
    for deployment in deployments {
        let deployment_name = name(deployment);
        let pod = at(deployment, &["spec", "template"]).expect("a pod template");
        let containers = seq_at(pod, &["spec", "containers"]);
        assert!(!containers.is_empty(), "{deployment_name}: no containers");
        let mut all_ports = BTreeSet::new();
        for container in containers {
            let what = format!(
                "{deployment_name}/{}",
                str_at(container, &["name"]).unwrap_or("?")
            );
            let ports: BTreeSet<u64> = seq_at(container, &["ports"])
                .iter()
                .filter_map(|p| at(p, &["containerPort"]).and_then(Value::as_u64))
                .collect();
            all_ports.extend(ports.iter().copied());
            for probe in ["readinessProbe", "livenessProbe"] {
                let port = at(container, &[probe, "grpc", "port"])
                    .and_then(Value::as_u64)
                    .unwrap_or_else(|| panic!("{what}: no gRPC {probe}"));
                assert!(
                    ports.contains(&port),
                    "{what}: {probe} port {port} is not a declared container port"
                );
            }
            // Liveness asks the always-SERVING `lmforge.liveness` (libs/runtime): the overall
            // status follows Postgres/NATS, and an outage must not restart every replica.
            assert_eq!(
                str_at(container, &["livenessProbe", "grpc", "service"]),
                Some("lmforge.liveness"),
                "{what}: liveness must ask service lmforge.liveness"
            );
            assert_eq!(
                str_at(container, &["readinessProbe", "grpc", "service"]).unwrap_or(""),
                "",
                "{what}: readiness asks the overall status"
            );
            let requests = at(container, &["resources", "requests"])
                .and_then(Value::as_mapping)
                .unwrap_or_else(|| panic!("{what}: no resource requests"));
            for resource in ["cpu", "memory"] {
                assert!(
                    requests.contains_key(resource),
                    "{what}: no {resource} request"
                );
            }
            for source in seq_at(container, &["envFrom"]) {
                if let Some(cm) = str_at(source, &["configMapRef", "name"]) {
                    check_ref(&format!("{what} envFrom"), &config_maps, cm, None);
                }
                if let Some(secret) = str_at(source, &["secretRef", "name"]) {
                    check_ref(&format!("{what} envFrom"), &secrets, secret, None);
                }
            }
            for var in seq_at(container, &["env"]) {
                let var_name = str_at(var, &["name"]).unwrap_or("?");
                let label = format!("{what} env {var_name}");
                if let Some(r) = at(var, &["valueFrom", "secretKeyRef"]) {
                    check_ref(
                        &label,
                        &secrets,
                        str_at(r, &["name"]).unwrap_or_default(),
                        str_at(r, &["key"]),
                    );
                }
                if let Some(r) = at(var, &["valueFrom", "configMapKeyRef"]) {
                    check_ref(
                        &label,
                        &config_maps,
                        str_at(r, &["name"]).unwrap_or_default(),
                        str_at(r, &["key"]),
                    );
                }
            }
        }
        let annotation = str_at(pod, &["metadata", "annotations", "prometheus.io/port"])
            .unwrap_or_else(|| panic!("{deployment_name}: no prometheus.io/port annotation"));
        let admin: u64 = annotation.parse().expect("prometheus.io/port is a number");
        assert!(
            all_ports.contains(&admin),
            "{deployment_name}: prometheus.io/port {admin} is not a container port"
        );
        if let Some((_, _, expected)) = SERVICES
            .iter()
            .find(|(s, _, _)| deployment_name.starts_with(s))
        {
            assert_eq!(admin, u64::from(*expected), "{deployment_name}: admin port");
        }
    }
}

#[test]
fn inference_autoscales_on_its_waiting_queue() {
    let docs = resources();
    let hpas = of_kind(&docs, "HorizontalPodAutoscaler");
    let hpa = hpas
        .iter()
        .find(|h| str_at(h, &["spec", "scaleTargetRef", "name"]) == Some("inference"))
        .expect("an HPA targets the inference Deployment");
    assert_eq!(str_at(hpa, &["apiVersion"]), Some("autoscaling/v2"));
    assert_eq!(
        str_at(hpa, &["spec", "scaleTargetRef", "kind"]),
        Some("Deployment")
    );
    let metric = seq_at(hpa, &["spec", "metrics"])
        .iter()
        .find(|m| str_at(m, &["type"]) == Some("Pods"))
        .and_then(|m| str_at(m, &["pods", "metric", "name"]))
        .expect("the HPA has a Pods metric");
    // prometheus-adapter maps the engine's gauge to that name.
    let adapter = yaml_file(&format!("{K8S}/deps/prometheus-adapter-values.yaml"));
    let rule = seq_at(&adapter, &["rules", "custom"])
        .iter()
        .find(|r| str_at(r, &["name", "as"]) == Some(metric))
        .unwrap_or_else(|| panic!("no prometheus-adapter rule publishes `{metric}`"));
    let series = str_at(rule, &["seriesQuery"]).expect("a seriesQuery");
    let source = series.split('{').next().unwrap_or_default();
    let engine = read("services/inference/src/engine/metrics.rs");
    assert!(
        engine.contains(&format!("\"{source}\"")),
        "the inference engine exports no `{source}`"
    );
}

#[test]
fn a_trainer_requests_a_gpu() {
    let docs = resources();
    let gpu_trainers: Vec<&str> = of_kind(&docs, "Deployment")
        .into_iter()
        .filter(|d| name(d).starts_with("trainer"))
        .filter(|d| {
            seq_at(d, &["spec", "template", "spec", "containers"])
                .iter()
                .any(|c| {
                    at(c, &["resources", "limits", "nvidia.com/gpu"]).is_some()
                        || at(c, &["resources", "requests", "nvidia.com/gpu"]).is_some()
                })
        })
        .map(name)
        .collect();
    assert!(
        !gpu_trainers.is_empty(),
        "no trainer Deployment requests nvidia.com/gpu"
    );
}

#[test]
fn dependencies_parse() {
    let postgres = yaml_file(&format!("{K8S}/deps/postgres-cluster.yaml"));
    assert_eq!(str_at(&postgres, &["kind"]), Some("Cluster"));
    assert_eq!(
        str_at(&postgres, &["apiVersion"]),
        Some("postgresql.cnpg.io/v1")
    );
    let nats = yaml_file(&format!("{K8S}/deps/nats-values.yaml"));
    assert_eq!(
        at(&nats, &["config", "jetstream", "enabled"]).and_then(Value::as_bool),
        Some(true),
        "NATS values must enable JetStream"
    );
    assert!(repo_root().join(K8S).join("README.md").is_file());
}
