//! Checkpoint directories into the registry: [`inspect`] checks what a directory holds before
//! anything is sent, [`register_dir`] creates the version, streams every file (with its
//! sha256, which the registry verifies) and finalizes it.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;

/// Upload chunk size: well under gRPC's 4 MiB message limit.
const CHUNK: usize = 1024 * 1024;

/// Architectures the model core can train and serve.
pub const KNOWN_ARCHITECTURES: &[&str] =
    &["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"];

/// Hears (file, its size, bytes just read) while a directory uploads.
pub type Progress = std::sync::Arc<dyn Fn(&str, u64, u64) + Send + Sync>;

/// Why a directory could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("uploading {path}: {status}")]
    Upload { path: String, status: tonic::Status },
    #[error("registry: {0}")]
    Registry(#[from] tonic::Status),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UploadError + '_ {
    move |source| UploadError::Io {
        path: path.to_path_buf(),
        source,
    }
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
pub fn inspect(dir: &Path) -> Result<CheckpointDir, UploadError> {
    let invalid = |m: String| UploadError::Invalid(format!("{}: {m}", dir.display()));
    let files = list_files(dir)?;
    let has = |name: &str| files.iter().any(|f| f == name);
    if has("adapter_config.json") {
        if !has("adapter_model.safetensors") {
            return Err(invalid(
                "adapter_config.json without adapter_model.safetensors".into(),
            ));
        }
        return Ok(CheckpointDir {
            format: pb::ModelFormat::PeftLora,
            architecture: String::new(),
            context_length: 0,
            chat_template: String::new(),
            files,
        });
    }
    if !has("config.json") {
        return Err(invalid(
            "no config.json (not a Hugging Face checkpoint)".into(),
        ));
    }
    if !files.iter().any(|f| f.ends_with(".safetensors")) {
        return Err(invalid("no *.safetensors weights".into()));
    }
    let path = dir.join("config.json");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let config: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("config.json is not JSON: {e}")))?;
    let architecture = config["architectures"][0]
        .as_str()
        .ok_or_else(|| invalid("config.json has no `architectures`".into()))?
        .to_owned();
    if !KNOWN_ARCHITECTURES.contains(&architecture.as_str()) {
        return Err(invalid(format!(
            "config.json: architecture `{architecture}` is not supported (supported: {})",
            KNOWN_ARCHITECTURES.join(", ")
        )));
    }
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

/// Every regular file under `dir`, as sorted `/`-separated relative paths.
pub fn list_files(dir: &Path) -> Result<Vec<String>, UploadError> {
    let mut files = Vec::new();
    collect_files(dir, dir, &mut files)?;
    files.sort();
    Ok(files)
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<String>) -> Result<(), UploadError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io(&path))?;
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

/// The sha256 (hex) and size of a file.
pub async fn sha256_of(path: &Path) -> Result<(String, u64), UploadError> {
    let mut file = tokio::fs::File::open(path).await.map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer).await.map_err(io(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        size += read as u64;
    }
    Ok((hex::encode(hasher.finalize()), size))
}

/// Registers `dir` as a new READY version. `request` carries the model name and whatever
/// the caller knows (lineage, tags, metrics, description, `create_model_if_missing`); its
/// format, architecture, context length and chat template are filled from the directory
/// where left empty. `progress` hears (file, its size, bytes just read) for every chunk.
pub async fn register_dir<T: crate::Transport>(
    client: &mut RegistryServiceClient<T>,
    dir: &Path,
    mut request: pb::CreateModelVersionRequest,
    progress: Progress,
) -> Result<pb::ModelVersion, UploadError> {
    let checkpoint = inspect(dir)?;
    if request.format == 0 {
        request.format = checkpoint.format as i32;
    }
    if request.architecture.is_empty() {
        request.architecture = checkpoint.architecture.clone();
    }
    if request.context_length == 0 {
        request.context_length = checkpoint.context_length;
    }
    if request.chat_template.is_empty() {
        request.chat_template = checkpoint.chat_template.clone();
    }
    let name = request.model_name.clone();
    let version = client.create_model_version(request).await?.into_inner();
    // A retried registration (same `client_request_id`) that already completed.
    if version.status == pb::ModelVersionStatus::Ready as i32 {
        return Ok(version);
    }
    for relative in &checkpoint.files {
        let path = dir.join(relative);
        let (sha256, size) = sha256_of(&path).await?;
        let metadata = pb::UploadArtifactRequest {
            payload: Some(pb::upload_artifact_request::Payload::Metadata(
                pb::UploadArtifactMetadata {
                    model_name: name.clone(),
                    version: version.version,
                    path: relative.clone(),
                    size_bytes: size,
                    sha256,
                    content_type: String::new(),
                },
            )),
        };
        let mut file = tokio::fs::File::open(&path).await.map_err(io(&path))?;
        // A reader task feeds the request stream, so the stream holds no borrowed state.
        let (mut tx, rx) = futures::channel::mpsc::channel::<pb::UploadArtifactRequest>(4);
        let (progress, name) = (progress.clone(), relative.clone());
        let reader = tokio::spawn(async move {
            use futures::SinkExt;
            loop {
                let mut buffer = vec![0u8; CHUNK];
                let read = file.read(&mut buffer).await?;
                if read == 0 {
                    return Ok::<(), std::io::Error>(());
                }
                buffer.truncate(read);
                progress(&name, size, read as u64);
                let chunk = pb::UploadArtifactRequest {
                    payload: Some(pb::upload_artifact_request::Payload::Chunk(buffer)),
                };
                if tx.send(chunk).await.is_err() {
                    return Ok(());
                }
            }
        });
        let chunks = rx;
        client
            .upload_artifact(futures::stream::iter([metadata]).chain(chunks))
            .await
            .map_err(|status| UploadError::Upload {
                path: relative.clone(),
                status,
            })?;
        reader
            .await
            .map_err(|e| io(&path)(std::io::Error::other(e)))?
            .map_err(io(&path))?;
    }
    let ready = client
        .finalize_model_version(pb::FinalizeModelVersionRequest {
            model_name: name,
            version: version.version,
            ..Default::default()
        })
        .await?
        .into_inner();
    Ok(ready)
}
