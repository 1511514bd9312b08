//! [`ArtifactStore`]: the handle, and everything that reads or removes blobs. Writes live in
//! [`crate::upload`].

use std::sync::Arc;

use bytes::Bytes;
use futures::stream::{self, BoxStream, StreamExt};

use object_store::path::Path;
use object_store::{GetOptions, ObjectStore, ObjectStoreExt};

use crate::backend::{self, Root, backend_error};
use crate::read;
use crate::{StoreError, validate_sha256};

/// Content-addressed blob storage over one `object_store` backend. Cheap to clone: clones
/// share the backend.
#[derive(Clone)]
pub struct ArtifactStore {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) store: Arc<dyn ObjectStore>,
    pub(crate) root: Root,
}

impl std::fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArtifactStore")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

/// The key of the blob with this (already validated) digest.
pub(crate) fn blob_key(sha256: &str) -> Path {
    Path::from(format!("blobs/sha256/{sha256}"))
}

impl ArtifactStore {
    /// Opens the store at `url`:
    /// - `file:///abs/dir`: a local directory, created if missing (the default);
    /// - `memory://`: in process memory, for tests;
    /// - `s3://bucket/prefix`, `gs://bucket/prefix`, `az://container/prefix`: cloud object
    ///   storage, configured and authenticated from the standard environment variables
    ///   (`AWS_*`, `GOOGLE_*`, `AZURE_*`) through `object_store`'s builders.
    ///
    /// Nothing is contacted over the network here. A malformed URL, an unknown scheme, a
    /// relative file path or a cloud configuration the builder rejects is `BadUrl`.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let (store, root) = backend::open(url)?;
        Ok(Self {
            inner: Arc::new(Inner { store, root }),
        })
    }

    /// The store's URL, normalized (no trailing `/`).
    pub fn url(&self) -> &str {
        &self.inner.root.url
    }

    /// The URI of the blob with this digest, for display (`file:///…/blobs/sha256/<hex>`).
    pub fn blob_uri(&self, sha256: &str) -> String {
        self.inner.root.uri_of(&format!("blobs/sha256/{sha256}"))
    }

    /// Whether the blob is stored.
    pub async fn contains(&self, sha256: &str) -> Result<bool, StoreError> {
        validate_sha256(sha256)?;
        let key = blob_key(sha256);
        match self.inner.store.head(&key).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(backend_error("look up", &key, e)),
        }
    }

    /// The size of a stored blob; `NotFound` when it is not stored.
    pub async fn blob_size(&self, sha256: &str) -> Result<u64, StoreError> {
        validate_sha256(sha256)?;
        let key = blob_key(sha256);
        match self.inner.store.head(&key).await {
            Ok(meta) => Ok(meta.size),
            Err(e) => Err(read_error("look up", sha256, &key, e)),
        }
    }

    /// Streams the blob from byte `offset` (to resume a download) in chunks of at most
    /// `chunk_size` bytes: every chunk is exactly `min(chunk_size, 8 MiB)` bytes but the last
    /// (a `chunk_size` of 0 is taken as 1). Returns the blob's total size with the stream; an
    /// offset equal to the size gives an empty stream, a larger one is `OffsetPastEnd`.
    pub async fn get_stream(
        &self,
        sha256: &str,
        offset: u64,
        chunk_size: usize,
    ) -> Result<(u64, BoxStream<'static, Result<Bytes, StoreError>>), StoreError> {
        validate_sha256(sha256)?;
        let key = blob_key(sha256);
        let size = self.blob_size(sha256).await?;
        if offset > size {
            return Err(StoreError::OffsetPastEnd { offset, size });
        }
        if offset == size {
            return Ok((size, stream::empty().boxed()));
        }
        let options = GetOptions::new().with_range(Some(offset..size));
        let result = self
            .inner
            .store
            .get_opts(&key, options)
            .await
            .map_err(|e| read_error("read", sha256, &key, e))?;
        Ok((size, read::chunked(result, key, chunk_size)))
    }

    /// Removes a blob (garbage collection); a blob that is not there is not an error.
    ///
    /// Callers serialize this with their own bookkeeping: a `put_*` racing with the delete of
    /// the same digest may report the blob as stored just before it goes.
    pub async fn delete_blob(&self, sha256: &str) -> Result<(), StoreError> {
        validate_sha256(sha256)?;
        let key = blob_key(sha256);
        match self.inner.store.delete(&key).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(backend_error("delete", &key, e)),
        }
    }
}

/// A read's error: `NotFound` names the blob, anything else is the backend's.
fn read_error(op: &str, sha256: &str, key: &Path, err: object_store::Error) -> StoreError {
    match err {
        object_store::Error::NotFound { .. } => StoreError::NotFound(format!("blob {sha256}")),
        other => backend_error(op, key, other),
    }
}
