//! Helpers shared by the test modules.

pub use std::convert::Infallible;
pub use std::path::Path;

pub use bytes::Bytes;
pub use futures::stream::{self, BoxStream, StreamExt};
pub use lmforge_store::{ArtifactStore, BlobInfo, StoreError, manifest_digest};
pub use sha2::{Digest, Sha256};
pub use tempfile::TempDir;

pub const MIB: usize = 1 << 20;

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Deterministic, not very compressible test bytes.
pub fn pattern(len: usize, seed: u8) -> Bytes {
    (0..len)
        .map(|i| ((i as u64).wrapping_mul(2_654_435_761) >> 13) as u8 ^ seed)
        .collect::<Vec<_>>()
        .into()
}

pub fn local_store() -> (TempDir, ArtifactStore) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let store = ArtifactStore::from_url(&format!("file://{}", dir.path().display()))
        .expect("a file:// URL with an absolute path opens");
    (dir, store)
}

/// Both backends; the temp dir is `None` for memory.
pub fn stores() -> Vec<(Option<TempDir>, ArtifactStore)> {
    let (dir, local) = local_store();
    let memory = ArtifactStore::from_url("memory://").expect("memory:// opens");
    vec![(Some(dir), local), (None, memory)]
}

/// Splits `data` into a stream of `piece` sized chunks.
pub fn chunks_of(
    data: &Bytes,
    piece: usize,
) -> impl futures::Stream<Item = Result<Bytes, Infallible>> + Send + Unpin + 'static {
    let pieces: Vec<Result<Bytes, Infallible>> = data
        .chunks(piece)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    stream::iter(pieces)
}

pub async fn read_all(
    store: &ArtifactStore,
    sha256: &str,
    offset: u64,
    chunk: usize,
) -> Vec<Bytes> {
    let (_, chunks) = store
        .get_stream(sha256, offset, chunk)
        .await
        .expect("the blob is stored");
    chunks
        .map(|c| c.expect("reading a stored blob succeeds"))
        .collect()
        .await
}

/// Every regular file under `dir`, recursively.
pub fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries {
        let path = entry.expect("a readable directory entry").path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Nothing under `blobs/` or `staging/` (local), and no blob with `sha256` (both backends).
pub async fn assert_nothing_stored(dir: &Option<TempDir>, store: &ArtifactStore, sha256: &str) {
    assert!(!store.contains(sha256).await.expect("lookup works"));
    if let Some(dir) = dir {
        let files = files_under(dir.path());
        assert!(files.is_empty(), "left behind: {files:?}");
    }
}
