//! Checkpoint directories in the artifact store: every file becomes a content-addressed blob,
//! and a JSON manifest (itself a blob) lists them. The manifest's sha256 identifies the
//! checkpoint; its blob URI is what `JobCheckpoint.uri` holds.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use futures::StreamExt;
use lmforge_store::ArtifactStore;
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    files: Vec<ManifestFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct ManifestFile {
    path: String,
    sha256: String,
    size: u64,
}

/// What an upload stored.
#[derive(Debug, Clone)]
pub struct Stored {
    pub manifest_sha256: String,
    pub uri: String,
    pub size_bytes: u64,
}

/// Stores every file of `dir` and its manifest.
pub async fn upload(store: &ArtifactStore, dir: &Path) -> anyhow::Result<Stored> {
    let paths = lmforge_registry_client::upload::list_files(dir)?;
    let mut files = Vec::with_capacity(paths.len());
    let mut total = 0;
    for path in paths {
        let bytes = tokio::fs::read(dir.join(&path)).await?;
        let info = store.put_bytes(Bytes::from(bytes)).await?;
        total += info.size;
        files.push(ManifestFile {
            path,
            sha256: info.sha256,
            size: info.size,
        });
    }
    let manifest = serde_json::to_vec(&Manifest { files })?;
    let info = store.put_bytes(Bytes::from(manifest)).await?;
    Ok(Stored {
        uri: store.blob_uri(&info.sha256),
        manifest_sha256: info.sha256,
        size_bytes: total,
    })
}

async fn read_blob(store: ArtifactStore, sha256: String) -> anyhow::Result<Vec<u8>> {
    let (size, mut stream) = store.get_stream(&sha256, 0, 1 << 20).await?;
    let mut out = Vec::with_capacity(size as usize);
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

/// Writes the checkpoint whose manifest is `manifest_sha256` into `dir` (created). Takes its
/// arguments by value so the future is `Send` for any caller.
pub async fn download(
    store: ArtifactStore,
    manifest_sha256: String,
    dir: PathBuf,
) -> anyhow::Result<PathBuf> {
    let manifest: Manifest =
        serde_json::from_slice(&read_blob(store.clone(), manifest_sha256).await?)?;
    tokio::fs::create_dir_all(&dir).await?;
    for file in manifest.files {
        anyhow::ensure!(
            !file
                .path
                .split('/')
                .any(|s| s.is_empty() || s == "." || s == ".."),
            "unsafe path `{}` in checkpoint manifest",
            file.path
        );
        let target = dir.join(&file.path);
        if let Some(parent) = target.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let bytes = read_blob(store.clone(), file.sha256.clone()).await?;
        anyhow::ensure!(
            bytes.len() as u64 == file.size,
            "{}: {} bytes, manifest says {}",
            file.path,
            bytes.len(),
            file.size
        );
        tokio::fs::write(&target, bytes).await?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_directory_round_trips_through_the_store() {
        let store = ArtifactStore::from_url("memory://").expect("store");
        let src = tempfile::tempdir().expect("dir");
        std::fs::create_dir_all(src.path().join("sub")).expect("mkdir");
        std::fs::write(src.path().join("a.json"), b"{\"x\":1}").expect("write");
        std::fs::write(src.path().join("sub/b.bin"), vec![7u8; 3000]).expect("write");
        let stored = upload(&store, src.path()).await.expect("upload");
        assert_eq!(stored.size_bytes, 3007);
        let dst = tempfile::tempdir().expect("dir");
        download(store, stored.manifest_sha256, dst.path().to_path_buf())
            .await
            .expect("download");
        assert_eq!(
            std::fs::read(dst.path().join("sub/b.bin")).expect("read"),
            vec![7u8; 3000]
        );
        assert_eq!(
            std::fs::read(dst.path().join("a.json")).expect("read"),
            b"{\"x\":1}"
        );
    }
}
