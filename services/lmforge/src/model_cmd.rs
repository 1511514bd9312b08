//! `lmforge model …`: the registry from the command line. Lists print as tables; transfers
//! (import, export) show a progress bar and verify every file's sha256.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::Channel;

pub use lmforge_registry_client::upload::{CheckpointDir, KNOWN_ARCHITECTURES};

/// A registry client on `url` (`http://host:port`).
pub async fn connect(url: &str) -> anyhow::Result<RegistryServiceClient<Channel>> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the registry at {url}"))?;
    Ok(RegistryServiceClient::new(channel))
}

/// `lmforge model load|unload`: loads `reference` into (or unloads it from, draining) the
/// inference service at `url`, and says so.
pub async fn load_or_unload(url: &str, reference: &str, load: bool) -> anyhow::Result<()> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the inference service at {url}"))?;
    let mut inference =
        lmforge_proto::v1::inference_service_client::InferenceServiceClient::new(channel);
    if load {
        let loaded = inference
            .load_model(pb::LoadModelRequest {
                model_ref: reference.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        let resolved = loaded.resolved.unwrap_or_default();
        println!(
            "loaded {reference} ({}/{}) into {url}",
            resolved.name, resolved.version
        );
    } else {
        inference
            .unload_model(pb::UnloadModelRequest {
                model_ref: reference.to_owned(),
                drain: true,
            })
            .await
            .map_err(status_error)?;
        println!("unloaded {reference} from {url}");
    }
    Ok(())
}

/// A gRPC status as a CLI error: `NotFound: model `x` not found`.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// Checks a Hugging Face checkpoint (or PEFT adapter) directory.
pub fn inspect(dir: &Path) -> anyhow::Result<CheckpointDir> {
    Ok(lmforge_registry_client::upload::inspect(dir)?)
}

fn bar(total: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg:<28} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("the template is a valid constant"),
    );
    bar.set_message(label.to_owned());
    bar
}

/// Registers `dir` as a new READY version of `name` (created when missing).
pub async fn import(
    client: &mut RegistryServiceClient<Channel>,
    dir: &Path,
    name: &str,
    parent: Option<&str>,
    show_progress: bool,
) -> anyhow::Result<pb::ModelVersion> {
    let request = pb::CreateModelVersionRequest {
        model_name: name.to_owned(),
        create_model_if_missing: true,
        lineage: parent.map(|p| pb::Lineage {
            parent_version: Some(pb::ResolvedModel {
                requested_ref: p.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        created_by: format!("user:{}", std::env::var("USER").unwrap_or_default()),
        ..Default::default()
    };
    let bars: Arc<Mutex<HashMap<String, ProgressBar>>> = Default::default();
    let progress_bars = bars.clone();
    let progress = Arc::new(move |file: &str, size: u64, n: u64| {
        let mut bars = progress_bars.lock().expect("progress bars");
        bars.entry(file.to_owned())
            .or_insert_with(|| {
                if show_progress {
                    bar(size, file)
                } else {
                    ProgressBar::hidden()
                }
            })
            .inc(n);
    });
    let ready = lmforge_registry_client::upload::register_dir(client, dir, request, progress)
        .await
        .map_err(|e| match e {
            lmforge_registry_client::upload::UploadError::Registry(s) => status_error(s),
            other => anyhow::Error::new(other),
        })?;
    for b in bars.lock().expect("progress bars").values() {
        b.finish();
    }
    Ok(ready)
}

/// Writes the files of the version `reference` resolves to into `dir`, verifying each.
pub async fn export(
    client: &mut RegistryServiceClient<Channel>,
    reference: &str,
    dir: &Path,
    show_progress: bool,
) -> anyhow::Result<pb::ModelVersion> {
    let (version, _alias) = lmforge_registry_client::fetch::resolve(client, reference)
        .await
        .map_err(fetch_error)?;
    let mut bars: std::collections::HashMap<String, ProgressBar> = Default::default();
    lmforge_registry_client::fetch::download_all(client, dir, &version, &mut |file, n| {
        bars.entry(file.path.clone())
            .or_insert_with(|| {
                if show_progress {
                    bar(file.size_bytes, &file.path)
                } else {
                    ProgressBar::hidden()
                }
            })
            .inc(n);
    })
    .await
    .map_err(fetch_error)?;
    for b in bars.values() {
        b.finish();
    }
    Ok(version)
}

fn fetch_error(e: lmforge_registry_client::fetch::FetchError) -> anyhow::Error {
    match e {
        lmforge_registry_client::fetch::FetchError::Registry(s) => status_error(s),
        other => anyhow::anyhow!(other),
    }
}

fn status_name(status: i32) -> &'static str {
    match pb::ModelVersionStatus::try_from(status) {
        Ok(pb::ModelVersionStatus::Pending) => "PENDING",
        Ok(pb::ModelVersionStatus::Ready) => "READY",
        Ok(pb::ModelVersionStatus::Failed) => "FAILED",
        _ => "?",
    }
}

/// Prints models as a table.
pub fn print_models(models: &[pb::RegisteredModel]) {
    println!("{:<40} {:>8} {:>8}  aliases", "name", "versions", "latest");
    for model in models {
        let mut aliases: Vec<String> = model
            .aliases
            .iter()
            .map(|(a, v)| format!("{a}→{v}"))
            .collect();
        aliases.sort();
        println!(
            "{:<40} {:>8} {:>8}  {}",
            model.name,
            model.version_count,
            model.latest_version,
            aliases.join(", ")
        );
    }
}

/// Prints versions as a table.
pub fn print_versions(versions: &[pb::ModelVersion]) {
    println!(
        "{:<30} {:>7}  {:<8} {:<15} {:>12}  {:<14} {:<20} aliases",
        "model", "version", "status", "format", "size", "digest", "metrics"
    );
    for v in versions {
        let mut metrics: Vec<String> = v
            .metrics
            .iter()
            .map(|(k, x)| format!("{k}={x:.4}"))
            .collect();
        metrics.sort();
        println!(
            "{:<30} {:>7}  {:<8} {:<15} {:>12}  {:<14} {:<20} {}",
            v.model_name,
            v.version,
            status_name(v.status),
            format!(
                "{:?}",
                pb::ModelFormat::try_from(v.format).unwrap_or_default()
            ),
            v.total_size_bytes,
            v.digest.get(..12).unwrap_or("-"),
            metrics.join(" "),
            v.aliases.join(", ")
        );
    }
}
