//! `lmforge model …`: the registry from the command line. Lists print as tables; transfers
//! (import, export) show a progress bar and verify every file's sha256.

use std::path::Path;

use anyhow::{Context, ensure};
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Upload chunk size: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1024 * 1024;

/// Architectures the model core can train and serve.
pub const KNOWN_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// A registry client on `url` (`http://host:port`).
pub async fn connect(url: &str) -> anyhow::Result<RegistryServiceClient<Channel>> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the registry at {url}"))?;
    Ok(RegistryServiceClient::new(channel))
}

/// A gRPC status as a CLI error: `NotFound: model `x` not found`.
pub fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", status.code(), status.message())
}

/// What a checkpoint directory holds, as checked before anything is uploaded.
#[derive(Debug)]
pub struct CheckpointDir {
    /// `hf-safetensors` or `peft-lora`.
    pub format: pb::ModelFormat,
    /// From `config.json` (`architectures[0]`), empty for adapters.
    pub architecture: String,
    /// `max_position_embeddings`, 0 when absent.
    pub context_length: u32,
    /// Chat template from `tokenizer_config.json`, empty when absent.
    pub chat_template: String,
    /// Every regular file, relative paths, sorted.
    pub files: Vec<String>,
}

/// Checks a Hugging Face checkpoint (or PEFT adapter) directory.
pub fn inspect(dir: &Path) -> anyhow::Result<CheckpointDir> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    let has = |name: &str| files.iter().any(|f| f == name);
    if has("adapter_config.json") {
        ensure!(
            has("adapter_model.safetensors"),
            "{}: adapter_config.json without adapter_model.safetensors",
            dir.display()
        );
        return Ok(CheckpointDir {
            format: pb::ModelFormat::PeftLora,
            architecture: String::new(),
            context_length: 0,
            chat_template: String::new(),
            files,
        });
    }
    ensure!(
        has("config.json"),
        "{}: no config.json (not a Hugging Face checkpoint)",
        dir.display()
    );
    ensure!(
        files.iter().any(|f| f.ends_with(".safetensors")),
        "{}: no *.safetensors weights",
        dir.display()
    );
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.join("config.json")).context("reading config.json")?,
    )
    .context("config.json is not JSON")?;
    let architecture = config["architectures"][0]
        .as_str()
        .context("config.json has no `architectures`")?
        .to_owned();
    ensure!(
        KNOWN_ARCHITECTURES.contains(&architecture.as_str()),
        "config.json: architecture `{architecture}` is not supported (supported: {})",
        KNOWN_ARCHITECTURES.join(", ")
    );
    let context_length = config["max_position_embeddings"].as_u64().unwrap_or(0) as u32;
    let chat_template = std::fs::read(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|c| c["chat_template"].as_str().map(str::to_owned))
        .unwrap_or_default();
    Ok(CheckpointDir {
        format: pb::ModelFormat::HfSafetensors,
        architecture,
        context_length,
        chat_template,
        files,
    })
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let entry = entry?;
        let path = entry.path();
        let kind = entry.file_type()?;
        if kind.is_dir() {
            collect_files(root, &path, out)?;
        } else if kind.is_file() {
            let relative = path
                .strip_prefix(root)
                .expect("walked from root")
                .to_string_lossy()
                .replace('\\', "/");
            out.push(relative);
        }
    }
    Ok(())
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

async fn sha256_of(path: &Path) -> anyhow::Result<(String, u64)> {
    let mut file = tokio::fs::File::open(path).await?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).await?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Registers `dir` as a new READY version of `name` (created when missing).
pub async fn import(
    client: &mut RegistryServiceClient<Channel>,
    dir: &Path,
    name: &str,
    parent: Option<&str>,
    show_progress: bool,
) -> anyhow::Result<pb::ModelVersion> {
    let checkpoint = inspect(dir)?;
    let version = client
        .create_model_version(pb::CreateModelVersionRequest {
            model_name: name.to_owned(),
            create_model_if_missing: true,
            format: checkpoint.format as i32,
            architecture: checkpoint.architecture.clone(),
            context_length: checkpoint.context_length,
            chat_template: checkpoint.chat_template.clone(),
            lineage: parent.map(|p| pb::Lineage {
                parent_version: Some(pb::ResolvedModel {
                    requested_ref: p.to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            created_by: format!("user:{}", std::env::var("USER").unwrap_or_default()),
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    for relative in &checkpoint.files {
        let path = dir.join(relative);
        let (sha256, size) = sha256_of(&path).await?;
        let progress = if show_progress {
            bar(size, relative)
        } else {
            ProgressBar::hidden()
        };
        let metadata = pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Metadata(
                pb::UploadArtifactMetadata {
                    model_name: name.to_owned(),
                    version: version.version,
                    path: relative.clone(),
                    size_bytes: size,
                    sha256,
                    content_type: String::new(),
                },
            )),
        };
        let file = tokio::fs::File::open(&path).await?;
        let reader_progress = progress.clone();
        let chunks = futures::stream::unfold(file, move |mut file| {
            let progress = reader_progress.clone();
            async move {
                let mut buffer = vec![0u8; CHUNK];
                match file.read(&mut buffer).await {
                    Ok(0) | Err(_) => None,
                    Ok(read) => {
                        buffer.truncate(read);
                        progress.inc(read as u64);
                        Some((
                            pb::UploadArtifactRequest {
                                payload: Some(pb::upload_artifact_request::Payload::Chunk(buffer)),
                            },
                            file,
                        ))
                    }
                }
            }
        });
        client
            .upload_artifact(futures::stream::iter([metadata]).chain(chunks))
            .await
            .map_err(status_error)
            .with_context(|| format!("uploading {relative}"))?;
        progress.finish();
    }
    let ready = client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: name.to_owned(),
            version: version.version,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    Ok(ready)
}

/// Writes the files of the version `reference` resolves to into `dir`, verifying each.
pub async fn export(
    client: &mut RegistryServiceClient<Channel>,
    reference: &str,
    dir: &Path,
    show_progress: bool,
) -> anyhow::Result<pb::ModelVersion> {
    let (version, _alias) = lmforge_inference::fetch::resolve(client, reference)
        .await
        .map_err(fetch_error)?;
    let mut bars: std::collections::HashMap<String, ProgressBar> = Default::default();
    lmforge_inference::fetch::download_all(client, dir, &version, &mut |file, n| {
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

fn fetch_error(e: lmforge_inference::fetch::FetchError) -> anyhow::Error {
    match e {
        lmforge_inference::fetch::FetchError::Registry(s) => status_error(s),
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
