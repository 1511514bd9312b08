//! A job's inputs on local disk: the dataset version's train and eval splits (from the ingest
//! service) and the base model (from the registry), both cached by identity so a resumed or
//! repeated job downloads nothing again.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_client::DatasetServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use lmforge_registry_client::fetch::{self, FetchError};
use lmforge_telemetry::propagation::TracedChannel;
use tokio::io::AsyncWriteExt;
use tonic::Code;

use crate::run::BaseModel;

/// Why inputs could not be prepared: the failure code of job.proto and whether another
/// attempt might do better.
#[derive(Debug)]
pub struct InputError {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl InputError {
    fn from_status(code: &'static str, what: &str, status: &tonic::Status) -> Self {
        let retryable = matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Internal
        );
        InputError {
            code: if retryable { "INTERNAL" } else { code },
            message: format!("{what}: {}", status.message()),
            retryable,
        }
    }

    fn io(what: &str, error: impl std::fmt::Display) -> Self {
        InputError {
            code: "INTERNAL",
            message: format!("{what}: {error}"),
            retryable: true,
        }
    }
}

/// The local train and eval JSONL files of a dataset version.
pub async fn dataset(
    client: &mut DatasetServiceClient<TracedChannel>,
    cache_dir: &Path,
    version_id: &str,
) -> Result<(PathBuf, Option<PathBuf>), InputError> {
    let dir = cache_dir.join("datasets").join(version_id);
    let train = dir.join("train.jsonl");
    let eval = dir.join("eval.jsonl");
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| InputError::io("dataset cache", e))?;
    for (split, path) in [
        (pb::DatasetSplit::Train, &train),
        (pb::DatasetSplit::Eval, &eval),
    ] {
        if tokio::fs::try_exists(path).await.unwrap_or(false) {
            continue;
        }
        let what = format!("dataset version {version_id}");
        let mut stream = client
            .download_dataset_version(pb::DownloadDatasetVersionRequest {
                dataset_version: version_id.to_owned(),
                split: split as i32,
                mode: pb::DownloadMode::Raw as i32,
                offset: 0,
                max_records: 0,
            })
            .await
            .map_err(|s| InputError::from_status("DATASET_NOT_FOUND", &what, &s))?
            .into_inner();
        let partial = path.with_extension(format!("partial-{}", uuid::Uuid::new_v4()));
        let mut out = tokio::fs::File::create(&partial)
            .await
            .map_err(|e| InputError::io("dataset cache", e))?;
        while let Some(message) = stream.next().await {
            let message =
                message.map_err(|s| InputError::from_status("DATASET_NOT_FOUND", &what, &s))?;
            if let Some(pb::download_dataset_version_response::Payload::Chunk(chunk)) =
                message.payload
            {
                out.write_all(&chunk.data)
                    .await
                    .map_err(|e| InputError::io("dataset cache", e))?;
            }
        }
        out.flush()
            .await
            .map_err(|e| InputError::io("dataset cache", e))?;
        drop(out);
        tokio::fs::rename(&partial, path)
            .await
            .map_err(|e| InputError::io("dataset cache", e))?;
    }
    let has_eval = tokio::fs::metadata(&eval)
        .await
        .map(|m| m.len() > 0)
        .unwrap_or(false);
    Ok((train, has_eval.then_some(eval)))
}

fn fetch_error(what: &str, error: FetchError) -> InputError {
    match error {
        FetchError::Registry(status) => {
            InputError::from_status("BASE_MODEL_NOT_FOUND", what, &status)
        }
        other => InputError::io(what, other),
    }
}

/// The version `model` names, downloaded (or found in the cache).
async fn version_dir(
    registry: &mut RegistryServiceClient<TracedChannel>,
    cache_dir: &Path,
    model: &pb::ResolvedModel,
) -> Result<(pb::ModelVersion, PathBuf), InputError> {
    let what = format!("model {}/{}", model.name, model.version);
    let version = registry
        .get_model_version(pb::GetModelVersionRequest {
            model_name: model.name.clone(),
            version: model.version,
        })
        .await
        .map_err(|s| InputError::from_status("BASE_MODEL_NOT_FOUND", &what, &s))?
        .into_inner();
    let dir = fetch::fetch(registry, &cache_dir.join("models"), &version)
        .await
        .map_err(|e| fetch_error(&what, e))?;
    Ok((version, dir))
}

/// The base model of a job: an HF directory, an adapter with its parent's directory, or a
/// from-scratch config (with the directory of the model whose tokenizer it reuses).
pub async fn base_model(
    registry: &mut RegistryServiceClient<TracedChannel>,
    cache_dir: &Path,
    job: &pb::Job,
) -> Result<BaseModel, InputError> {
    let spec = job.spec.as_ref().cloned().unwrap_or_default();
    match spec.base {
        Some(pb::job_spec::Base::FromScratch(config)) => {
            let tokenizer_dir = match config.tokenizer.as_ref().and_then(|t| t.source.as_ref()) {
                Some(pb::tokenizer_spec::Source::FromModel(reference)) => {
                    let (version, _) = fetch::resolve(registry, reference)
                        .await
                        .map_err(|e| fetch_error(reference, e))?;
                    let dir = fetch::fetch(registry, &cache_dir.join("models"), &version)
                        .await
                        .map_err(|e| fetch_error(reference, e))?;
                    Some(dir)
                }
                _ => None,
            };
            Ok(BaseModel::FromScratch {
                config,
                tokenizer_dir,
            })
        }
        _ => {
            let base = job.resolved_base_model.as_ref().ok_or(InputError {
                code: "BASE_MODEL_NOT_FOUND",
                message: "the job has no resolved base model".into(),
                retryable: false,
            })?;
            let (version, dir) = version_dir(registry, cache_dir, base).await?;
            if version.format == pb::ModelFormat::PeftLora as i32 {
                let parent = version
                    .lineage
                    .as_ref()
                    .and_then(|l| l.parent_version.clone())
                    .ok_or(InputError {
                        code: "BASE_MODEL_NOT_FOUND",
                        message: format!(
                            "adapter {}/{} names no parent version",
                            version.model_name, version.version
                        ),
                        retryable: false,
                    })?;
                let (_, base_dir) = version_dir(registry, cache_dir, &parent).await?;
                Ok(BaseModel::Adapter {
                    base_dir,
                    adapter_dir: dir,
                })
            } else {
                Ok(BaseModel::Hf { dir })
            }
        }
    }
}
