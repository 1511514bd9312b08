//! The write path: stream into `staging/<uuid>` while hashing, verify, then move the object to
//! `blobs/sha256/<hex>`.
//!
//! Memory stays flat whatever the input's size: the data goes to the backend as a multipart
//! upload (`WriteMultipart`) of `PART_SIZE` parts with at most `MAX_PARTS_IN_FLIGHT` of them
//! uploading while the next one fills, so an upload holds about
//! `(MAX_PARTS_IN_FLIGHT + 1) × PART_SIZE` bytes (48 MiB) plus the caller's current chunk, for
//! 1 MiB or 100 GiB alike. Verification failures are found before the upload is completed, so
//! they abort it and no object ever appears, at `staging/` or under `blobs/`.

use std::fmt::Display;

use bytes::Bytes;
use futures::{Stream, StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};

use crate::backend::backend_error;
use crate::read;
use crate::store::{ArtifactStore, blob_key};
use crate::{BlobInfo, StoreError, validate_sha256};

/// Size of one multipart part. S3 wants at least 5 MiB and at most 10,000 parts, so 16 MiB
/// parts allow objects up to 160 GiB.
pub(crate) const PART_SIZE: usize = 16 << 20;
/// Parts uploading at once while the next one fills.
const MAX_PARTS_IN_FLIGHT: usize = 2;
/// Chunks up to this size are hashed on the runtime (well under 0.5 ms); larger ones on the
/// blocking pool.
const HASH_INLINE_MAX: usize = 64 << 10;
/// Read size when copying an object within the store.
const COPY_CHUNK: usize = 1 << 20;

impl ArtifactStore {
    /// Streams `data` into the store and returns the blob's digest and size.
    ///
    /// The bytes are hashed as they arrive and uploaded to `staging/<uuid>` as a multipart
    /// upload (see the module doc for the memory bound), then moved to `blobs/sha256/<hex>`
    /// once complete and matching `expected_size` and `expected_sha256` (each checked when
    /// given). A mismatch is `SizeMismatch` (as soon as the stream runs past the expected size,
    /// or when it ends short) or `DigestMismatch`; an `Err` from the stream is `Upload`. On any
    /// failure the staged upload is aborted and nothing appears under `blobs/`. If the blob is
    /// already stored, the staged copy is dropped (dedup).
    pub async fn put_stream<S, E>(
        &self,
        data: S,
        expected_size: Option<u64>,
        expected_sha256: Option<&str>,
    ) -> Result<BlobInfo, StoreError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + Unpin,
        E: Display,
    {
        if let Some(expected) = expected_sha256 {
            validate_sha256(expected)?;
        }
        let staging = Path::from(format!("staging/{}", uuid::Uuid::new_v4().simple()));
        let upload = self
            .inner
            .store
            .put_multipart(&staging)
            .await
            .map_err(|e| backend_error("start upload", &staging, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);

        let verified = match write_all(&mut writer, &staging, data, expected_size).await {
            Ok(info) => check(info, expected_size, expected_sha256),
            Err(e) => Err(e),
        };
        let info = match verified {
            Ok(info) => info,
            Err(e) => {
                if let Err(abort) = writer.abort().await {
                    tracing::warn!(error = %abort, key = %staging, "could not abort a staged upload");
                }
                return Err(e);
            }
        };
        // `finish` aborts the upload itself when it fails.
        writer
            .finish()
            .await
            .map_err(|e| backend_error("complete upload", &staging, e))?;
        self.commit(&staging, info).await
    }

    /// Stores a small payload held in memory. Hashed first, then written straight to its blob
    /// key in one atomic put (no staging needed: the digest is known before the write).
    pub async fn put_bytes(&self, data: Bytes) -> Result<BlobInfo, StoreError> {
        let size = data.len() as u64;
        let sha256 = hex::encode(hash_chunk(Sha256::new(), data.clone()).await?.finalize());
        let key = blob_key(&sha256);
        if !self.exists(&key).await? {
            self.inner
                .store
                .put(&key, data.into())
                .await
                .map_err(|e| backend_error("write", &key, e))?;
            tracing::debug!(sha256, size, "blob stored");
        }
        Ok(BlobInfo { sha256, size })
    }

    /// Registers an object that already lies in this store, addressed by its absolute URI
    /// (`file:///abs/dir/some/file` for a store at `file:///abs/dir`, `s3://bucket/prefix/key`
    /// for one at `s3://bucket/prefix`): reads and hashes it, checking `expected_*` when given,
    /// and copies it to `blobs/sha256/<hex>` through the same path as `put_stream`. The
    /// original is left in place. A URI outside the store's root is `BadUrl`; a missing object
    /// is `NotFound` with the URI.
    ///
    /// The bytes are copied, never linked: a local source file that is later rewritten in
    /// place cannot change the blob.
    pub async fn import_uri(
        &self,
        uri: &str,
        expected_size: Option<u64>,
        expected_sha256: Option<&str>,
    ) -> Result<BlobInfo, StoreError> {
        if let Some(expected) = expected_sha256 {
            validate_sha256(expected)?;
        }
        let key = self.inner.root.key_of(uri)?;
        let source = self.inner.store.get(&key).await.map_err(|e| match e {
            object_store::Error::NotFound { .. } => StoreError::NotFound(uri.to_owned()),
            other => backend_error("read", &key, other),
        })?;
        let size = source.meta.size;
        if let Some(expected) = expected_size
            && expected != size
        {
            return Err(StoreError::SizeMismatch {
                expected,
                actual: size,
            });
        }
        // The size just read is the expectation, so a source that changes mid-read fails.
        let data = read::chunked(source, key, COPY_CHUNK);
        self.put_stream(data, Some(size), expected_sha256).await
    }

    async fn exists(&self, key: &Path) -> Result<bool, StoreError> {
        match self.inner.store.head(key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend_error("look up", key, e)),
        }
    }

    /// Moves a complete, verified staged object to its blob key, or drops it when that blob is
    /// already stored. The staged object is gone afterwards either way.
    async fn commit(&self, staging: &Path, info: BlobInfo) -> Result<BlobInfo, StoreError> {
        let blob = blob_key(&info.sha256);
        match self.exists(&blob).await {
            Ok(false) => self.move_object(staging, &blob, info.size).await?,
            Ok(true) => {
                tracing::debug!(sha256 = %info.sha256, "blob already stored, dropping the upload");
                self.discard(staging).await;
                return Ok(info);
            }
            Err(e) => {
                self.discard(staging).await;
                return Err(e);
            }
        }
        tracing::debug!(sha256 = %info.sha256, size = info.size, "blob stored");
        Ok(info)
    }

    /// Renames `from` to `to` (atomic on a local directory; copy and delete on cloud stores).
    /// Where the server-side copy is refused (S3 copies at most 5 GiB in one request) the
    /// object is copied through this process instead, again as a multipart upload. `from` is
    /// gone afterwards, whatever the outcome.
    async fn move_object(&self, from: &Path, to: &Path, size: u64) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let Err(e) = store.rename(from, to).await else {
            return Ok(());
        };
        // A rename that copied but failed to delete the source has done its job.
        let moved = match store.head(to).await {
            Ok(meta) if meta.size == size => Ok(()),
            _ => {
                tracing::warn!(error = %e, %from, %to, "server-side move failed, copying");
                self.copy_by_streaming(from, to).await
            }
        };
        self.discard(from).await;
        moved
    }

    /// Copies `from` to `to` through this process with bounded memory.
    pub(crate) async fn copy_by_streaming(&self, from: &Path, to: &Path) -> Result<(), StoreError> {
        let store = &self.inner.store;
        let source = store
            .get(from)
            .await
            .map_err(|e| backend_error("read", from, e))?;
        let mut data = read::chunked(source, from.clone(), COPY_CHUNK);
        let upload = store
            .put_multipart(to)
            .await
            .map_err(|e| backend_error("start upload", to, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let copied: Result<(), StoreError> = async {
            while let Some(chunk) = data.try_next().await? {
                writer
                    .wait_for_capacity(MAX_PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| backend_error("upload", to, e))?;
                writer.put(chunk);
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            if let Err(abort) = writer.abort().await {
                tracing::warn!(error = %abort, key = %to, "could not abort a copy");
            }
            return Err(e);
        }
        writer
            .finish()
            .await
            .map(drop)
            .map_err(|e| backend_error("complete upload", to, e))
    }

    /// Best-effort delete of a staged object; what is left is garbage, not an error.
    async fn discard(&self, staging: &Path) {
        match self.inner.store.delete(staging).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => {
                tracing::warn!(error = %e, key = %staging, "could not delete a staged upload")
            }
        }
    }
}

/// Feeds `data` into `writer`, hashing as it goes; stops at the first stream error or as soon
/// as more than `expected_size` bytes have arrived.
async fn write_all<S, E>(
    writer: &mut WriteMultipart,
    staging: &Path,
    mut data: S,
    expected_size: Option<u64>,
) -> Result<BlobInfo, StoreError>
where
    S: Stream<Item = Result<Bytes, E>> + Unpin,
    E: Display,
{
    let mut hasher = Sha256::new();
    let mut size: u64 = 0;
    while let Some(item) = data.next().await {
        let chunk = item.map_err(|e| StoreError::Upload(e.to_string()))?;
        if chunk.is_empty() {
            continue;
        }
        size += chunk.len() as u64;
        if let Some(expected) = expected_size
            && size > expected
        {
            return Err(StoreError::SizeMismatch {
                expected,
                actual: size,
            });
        }
        writer
            .wait_for_capacity(MAX_PARTS_IN_FLIGHT)
            .await
            .map_err(|e| backend_error("upload", staging, e))?;
        // The part upload (spawned by `put` once a part fills) overlaps with the hashing.
        writer.put(chunk.clone());
        hasher = hash_chunk(hasher, chunk).await?;
    }
    Ok(BlobInfo {
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

/// Checks a finished stream against what the caller declared.
fn check(
    info: BlobInfo,
    expected_size: Option<u64>,
    expected_sha256: Option<&str>,
) -> Result<BlobInfo, StoreError> {
    if let Some(expected) = expected_size
        && info.size != expected
    {
        return Err(StoreError::SizeMismatch {
            expected,
            actual: info.size,
        });
    }
    if let Some(expected) = expected_sha256
        && info.sha256 != expected
    {
        return Err(StoreError::DigestMismatch {
            expected: expected.to_owned(),
            actual: info.sha256,
        });
    }
    Ok(info)
}

/// Adds `chunk` to `hasher`, off the runtime when the chunk is large.
async fn hash_chunk(mut hasher: Sha256, chunk: Bytes) -> Result<Sha256, StoreError> {
    if chunk.len() <= HASH_INLINE_MAX {
        hasher.update(&chunk);
        return Ok(hasher);
    }
    match tokio::task::spawn_blocking(move || {
        hasher.update(&chunk);
        hasher
    })
    .await
    {
        Ok(hasher) => Ok(hasher),
        Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
        Err(_) => Err(StoreError::Upload(
            "hashing was cancelled: the runtime is shutting down".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copy_by_streaming_copies_large_objects_exactly() {
        let store = ArtifactStore::from_url("memory://").expect("memory:// is valid");
        let data: Bytes = (0..(PART_SIZE + 12_345))
            .map(|i| (i % 251) as u8)
            .collect::<Vec<_>>()
            .into();
        let (from, to) = (Path::from("staging/a"), Path::from("blobs/sha256/b"));
        store
            .inner
            .store
            .put(&from, data.clone().into())
            .await
            .expect("memory put");
        store
            .copy_by_streaming(&from, &to)
            .await
            .expect("copy succeeds");
        let copied = store
            .inner
            .store
            .get(&to)
            .await
            .expect("copy exists")
            .bytes()
            .await
            .expect("memory read");
        assert_eq!(copied, data);
    }

    #[tokio::test]
    async fn hash_chunk_matches_one_shot_hashing_on_both_paths() {
        let big = Bytes::from(vec![7u8; HASH_INLINE_MAX + 1]);
        let small = Bytes::from_static(b"lmforge");
        let mut hasher = Sha256::new();
        hasher = hash_chunk(hasher, small.clone()).await.expect("hashes");
        hasher = hash_chunk(hasher, big.clone()).await.expect("hashes");
        let one_shot = Sha256::new()
            .chain_update(&small)
            .chain_update(&big)
            .finalize();
        assert_eq!(hasher.finalize(), one_shot);
    }
}
