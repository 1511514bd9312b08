//! Content-addressed artifact storage for lmforge: model files and datasets, stored once per
//! sha256 on top of the [`object_store`] crate.
//!
//! An [`ArtifactStore`] is opened from a URL — `file:///abs/dir` (the default, a local
//! directory), `memory://` (tests), `s3://bucket/prefix`, `gs://bucket/prefix` or
//! `az://container/prefix` — and lays out its objects under that root as:
//!
//! - `blobs/sha256/<hex>`: the blobs, each named by the lowercase hex sha256 of its bytes;
//! - `staging/<uuid>`: uploads in progress. A blob is written here first, hashed as it
//!   streams, and moved under `blobs/` only once complete and verified, so a blob key always
//!   holds exactly the bytes its name promises. Anything left here by a crashed process is
//!   garbage (on S3, also add a lifecycle rule that aborts incomplete multipart uploads).
//!
//! Where the parts are:
//! - `backend`: URL parsing, the `object_store` backend for each scheme, mapping a URI in
//!   the store to its key, and error mapping that keeps internal paths out of messages;
//! - `read`: objects as streams of evenly sized chunks (downloads, imports);
//! - `store`: [`ArtifactStore`] and its reads (`contains`, `blob_size`, `get_stream`, …);
//! - `upload`: the streaming write path (`put_stream`, `put_bytes`, `import_uri`).
//!
//! A model version's digest is the [`manifest_digest`] of its files.

mod backend;
mod read;
mod store;
mod upload;

use sha2::{Digest, Sha256};

pub use store::ArtifactStore;

/// A stored blob: its lowercase hex sha256 and its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobInfo {
    /// Lowercase hex sha256 of the blob's bytes (64 characters).
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// Everything that can go wrong in the artifact store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL, or a URI given to [`ArtifactStore::import_uri`], is unusable.
    #[error("artifact store URL `{url}`: {reason}")]
    BadUrl { url: String, reason: String },
    /// The upload's length differs from the size it was declared with.
    #[error("size mismatch: expected {expected} bytes, received {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
    /// The upload's sha256 differs from the digest it was declared with.
    #[error("sha256 mismatch: expected {expected}, received {actual}")]
    DigestMismatch { expected: String, actual: String },
    /// No blob (or object, for imports) at that name.
    #[error("not found: {0}")]
    NotFound(String),
    /// A read asked to start past the blob's end.
    #[error("offset {offset} is past the end ({size} bytes)")]
    OffsetPastEnd { offset: u64, size: u64 },
    /// A sha256 argument that is not 64 lowercase hex characters.
    #[error("invalid sha256 `{0}`: expected 64 lowercase hex characters")]
    BadDigest(String),
    /// The caller's data stream yielded an error.
    #[error("the upload stream failed: {0}")]
    Upload(String),
    /// The storage backend failed; the message names the operation and the key only (the
    /// full backend error, with its paths, is logged).
    #[error("storage backend: {0}")]
    Backend(String),
}

/// Checks that `s` is a sha256 as this crate spells it: 64 lowercase hex characters.
pub fn validate_sha256(s: &str) -> Result<(), StoreError> {
    let well_formed = s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if well_formed {
        Ok(())
    } else {
        Err(StoreError::BadDigest(s.to_owned()))
    }
}

/// The digest of a model version: the lowercase hex sha256 of its manifest, one line per file
/// `<sha256> <size> <path>\n`, sorted by path (byte order), so the order the files are given in
/// does not matter. Paths are taken as they are; callers reject paths containing a newline.
pub fn manifest_digest<'a>(files: impl IntoIterator<Item = (&'a str, &'a str, u64)>) -> String {
    let mut files: Vec<(&str, &str, u64)> = files.into_iter().collect();
    // Ties on the path (a caller bug) still sort deterministically.
    files.sort_unstable();
    let mut hasher = Sha256::new();
    for (path, sha256, size) in files {
        hasher.update(format!("{sha256} {size} {path}\n").as_bytes());
    }
    hex::encode(hasher.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn validate_sha256_accepts_only_lowercase_hex_of_64_chars() {
        assert!(validate_sha256(EMPTY_SHA256).is_ok());
        for bad in [
            "",
            &EMPTY_SHA256[1..],
            &EMPTY_SHA256.to_uppercase(),
            &format!("{}0", EMPTY_SHA256),
            &EMPTY_SHA256.replace('e', "g"),
            "../../etc/passwd",
        ] {
            let err = validate_sha256(bad).unwrap_err();
            assert!(
                matches!(err, StoreError::BadDigest(ref s) if s == bad),
                "{err}"
            );
        }
    }

    #[test]
    fn manifest_digest_of_nothing_is_the_empty_sha256() {
        assert_eq!(manifest_digest([]), EMPTY_SHA256);
    }
}
