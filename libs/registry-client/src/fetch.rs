//! Model versions from the registry to local disk: resolve a reference, download every file
//! of the version once into `cache_dir/<digest>/`, verifying each file's sha256, and publish
//! the directory with one rename so a crash never leaves a half-written cache entry.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

/// Why a version could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("registry: {0}")]
    Registry(#[from] tonic::Status),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Corrupt(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Resolve `reference` (`name@alias`, `name/3`, `name@latest`, `name`) to a READY version and
/// the alias it followed (empty for versions and `latest`).
pub async fn resolve<T: crate::Transport>(
    registry: &mut RegistryServiceClient<T>,
    reference: &str,
) -> Result<(pb::ModelVersion, String), FetchError> {
    let r = registry
        .resolve_model_ref(pb::ResolveModelRefRequest {
            model_ref: reference.to_string(),
        })
        .await?
        .into_inner();
    let version = r
        .version
        .ok_or_else(|| FetchError::Corrupt("the registry answered without a version".into()))?;
    Ok((version, r.alias))
}

/// The local directory holding `version`'s files, downloading them when not cached yet.
pub async fn fetch<T: crate::Transport>(
    registry: &mut RegistryServiceClient<T>,
    cache_dir: &Path,
    version: &pb::ModelVersion,
) -> Result<PathBuf, FetchError> {
    if version.digest.len() != 64 || !version.digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(FetchError::Corrupt(format!(
            "version {}/{} has no valid digest",
            version.model_name, version.version
        )));
    }
    let done = cache_dir.join(&version.digest);
    if tokio::fs::try_exists(&done).await.map_err(io(&done))? {
        return Ok(done);
    }
    tokio::fs::create_dir_all(cache_dir)
        .await
        .map_err(io(cache_dir))?;
    let staging = cache_dir.join(format!(".partial-{}", uuid::Uuid::new_v4()));
    let result = download_all(registry, &staging, version, &mut |_, _| {}).await;
    if let Err(e) = result {
        let _ = tokio::fs::remove_dir_all(&staging).await;
        return Err(e);
    }
    match tokio::fs::rename(&staging, &done).await {
        Ok(()) => Ok(done),
        // Another load of the same version finished first: keep its copy.
        Err(_) if done.exists() => {
            let _ = tokio::fs::remove_dir_all(&staging).await;
            Ok(done)
        }
        Err(e) => Err(io(&done)(e)),
    }
}

/// Download every file of `version` into `dir`, each checked against its sha256 and renamed
/// into place only when complete; `progress` hears of every chunk (file, bytes).
pub async fn download_all<T: crate::Transport>(
    registry: &mut RegistryServiceClient<T>,
    dir: &Path,
    version: &pb::ModelVersion,
    progress: &mut (dyn FnMut(&pb::ArtifactFile, u64) + Send),
) -> Result<(), FetchError> {
    for file in &version.files {
        if file
            .path
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        {
            return Err(FetchError::Corrupt(format!(
                "unsafe file path `{}`",
                file.path
            )));
        }
        let target = dir.join(&file.path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(io(parent))?;
        }
        let partial = target.with_extension("lmforge-partial");
        let mut out = tokio::fs::File::create(&partial)
            .await
            .map_err(io(&partial))?;
        let mut hasher = Sha256::new();
        let mut stream = registry
            .download_artifact(pb::DownloadArtifactRequest {
                model_name: version.model_name.clone(),
                version: version.version,
                path: file.path.clone(),
                offset: 0,
            })
            .await?
            .into_inner();
        let mut summary = None;
        while let Some(message) = stream.next().await {
            match message?.payload {
                Some(pb::download_artifact_response::Payload::Chunk(chunk)) => {
                    hasher.update(&chunk.data);
                    out.write_all(&chunk.data).await.map_err(io(&partial))?;
                    progress(file, chunk.data.len() as u64);
                }
                Some(pb::download_artifact_response::Payload::Summary(s)) => summary = Some(s),
                None => {}
            }
        }
        out.flush().await.map_err(io(&partial))?;
        drop(out);
        let actual = hex::encode(hasher.finalize());
        let summary = summary.ok_or_else(|| {
            FetchError::Corrupt(format!(
                "{}: the download ended without its summary",
                file.path
            ))
        })?;
        if actual != file.sha256 || summary.sha256 != file.sha256 {
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(FetchError::Corrupt(format!(
                "{}: received sha256 {actual}, expected {}",
                file.path, file.sha256
            )));
        }
        tokio::fs::rename(&partial, &target)
            .await
            .map_err(io(&target))?;
    }
    Ok(())
}
