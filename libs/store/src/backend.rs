//! The `object_store` backend behind a store URL: one per scheme, rooted at the URL's path so
//! that every key the rest of the crate uses (`blobs/…`, `staging/…`) is relative to the root.
//! Also maps a URI inside the store to its key, and backend errors to [`StoreError`]s whose
//! messages carry the key but never a filesystem path or an endpoint.

use std::sync::Arc;

use object_store::ObjectStore;
use object_store::aws::AmazonS3Builder;
use object_store::azure::MicrosoftAzureBuilder;
use object_store::gcp::GoogleCloudStorageBuilder;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::prefix::PrefixStore;
use url::Url;

use crate::StoreError;

/// Where a store is rooted, to tell whether a URI lies inside it.
#[derive(Debug)]
pub(crate) struct Root {
    /// The store URL, normalized: no trailing `/`.
    pub(crate) url: String,
    scheme: String,
    host: Option<String>,
    /// The root's path within the bucket (or filesystem), as an object_store path.
    prefix: Path,
}

impl Root {
    /// `<root>/<key>` as a URI.
    pub(crate) fn uri_of(&self, key: &str) -> String {
        format!("{}/{key}", self.url)
    }

    /// The key (relative to the root) of the object that `uri` names; `BadUrl` unless `uri` is
    /// an absolute URI strictly below the root, in the same scheme and bucket.
    pub(crate) fn key_of(&self, uri: &str) -> Result<Path, StoreError> {
        let bad = |reason: &str| bad_url(uri, reason);
        let parsed = Url::parse(uri).map_err(|e| bad(&format!("not an absolute URI: {e}")))?;
        if parsed.scheme() != self.scheme || host_of(&parsed) != self.host {
            return Err(bad(&format!(
                "not inside this artifact store ({})",
                self.url
            )));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("query strings and fragments are not supported"));
        }
        let path = Path::from_url_path(parsed.path())
            .map_err(|e| bad(&format!("not a valid object path: {e}")))?;
        let key: Path = match path.prefix_match(&self.prefix) {
            Some(rest) => rest.collect(),
            None => {
                return Err(bad(&format!(
                    "not inside this artifact store ({})",
                    self.url
                )));
            }
        };
        if key.as_ref().is_empty() {
            return Err(bad("names the store's root, not an object in it"));
        }
        Ok(key)
    }
}

fn bad_url(url: &str, reason: &str) -> StoreError {
    StoreError::BadUrl {
        url: url.to_owned(),
        reason: reason.to_owned(),
    }
}

/// Opens the backend for a store URL (see [`crate::ArtifactStore::from_url`]).
pub(crate) fn open(url: &str) -> Result<(Arc<dyn ObjectStore>, Root), StoreError> {
    let bad = |reason: &str| bad_url(url, reason);
    let parsed = Url::parse(url).map_err(|e| bad(&format!("not a URL: {e}")))?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(bad("query strings and fragments are not supported"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        // Name the URL without the secret: errors end up in logs and RPC replies.
        let mut redacted = parsed.clone();
        if redacted.password().is_some() {
            // Setting a password cannot fail on a URL that already has one.
            let _ = redacted.set_password(Some("***"));
        }
        return Err(bad_url(
            redacted.as_str(),
            "credentials do not belong in the URL; use the backend's standard environment variables",
        ));
    }
    let prefix = Path::from_url_path(parsed.path())
        .map_err(|e| bad(&format!("not a valid object path: {e}")))?;
    let scheme = parsed.scheme().to_owned();

    let store: Arc<dyn ObjectStore> = match scheme.as_str() {
        "file" => {
            // `file:relative/dir` parses, as `file:///relative/dir`: insist on the `//`.
            let after_scheme = &url[scheme.len() + 1..];
            if !after_scheme.starts_with("//") {
                return Err(bad("needs an absolute path, as in file:///abs/dir"));
            }
            if let Some(host) = host_of(&parsed) {
                return Err(bad(&format!(
                    "`{host}` reads as a host; an absolute path needs three slashes, as in file:///abs/dir"
                )));
            }
            let dir = parsed
                .to_file_path()
                .map_err(|()| bad("not a local absolute path"))?;
            std::fs::create_dir_all(&dir)
                .map_err(|e| bad(&format!("cannot create the directory: {e}")))?;
            let local = LocalFileSystem::new_with_prefix(&dir)
                .map_err(|e| bad(&format!("cannot open the directory: {e}")))?;
            // The local store is rooted at `dir` itself: no PrefixStore on top.
            return Ok((
                Arc::new(local),
                Root {
                    url: normalized(&parsed),
                    scheme,
                    host: None,
                    prefix,
                },
            ));
        }
        "memory" => {
            if host_of(&parsed).is_some() || !prefix.as_ref().is_empty() {
                return Err(bad("a memory store takes no bucket or path: use memory://"));
            }
            Arc::new(InMemory::new())
        }
        "s3" => Arc::new(
            AmazonS3Builder::from_env()
                .with_url(url)
                .build()
                .map_err(|e| bad(&e.to_string()))?,
        ),
        "gs" => Arc::new(
            GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .build()
                .map_err(|e| bad(&e.to_string()))?,
        ),
        "az" => Arc::new(
            MicrosoftAzureBuilder::from_env()
                .with_url(url)
                .build()
                .map_err(|e| bad(&e.to_string()))?,
        ),
        other => {
            return Err(bad(&format!(
                "unsupported scheme `{other}`: use file, memory, s3, gs or az"
            )));
        }
    };
    // The cloud builders address the bucket; the URL's path becomes a key prefix.
    let store: Arc<dyn ObjectStore> = if prefix.as_ref().is_empty() {
        store
    } else {
        Arc::new(PrefixStore::new(store, prefix.clone()))
    };
    Ok((
        store,
        Root {
            url: normalized(&parsed),
            host: host_of(&parsed),
            scheme,
            prefix,
        },
    ))
}

/// The URL's host (the bucket or container), where it has a non-empty one.
fn host_of(url: &Url) -> Option<String> {
    url.host_str().filter(|h| !h.is_empty()).map(str::to_owned)
}

/// The URL without trailing `/`s (`memory:///` becomes `memory://`), so that `<url>/<key>`
/// is always the URI of a key.
fn normalized(url: &Url) -> String {
    let before_path = &url[..url::Position::BeforePath];
    format!("{before_path}{}", url.path().trim_end_matches('/'))
}

/// Maps a backend error for `op` on `key`. The full error can name filesystem paths or
/// endpoints, so it goes to the log; the returned message names the operation and key only.
pub(crate) fn backend_error(op: &str, key: &Path, err: object_store::Error) -> StoreError {
    tracing::warn!(error = %err, %key, op, "artifact store backend error");
    let what = match &err {
        object_store::Error::NotFound { .. } => "not found".to_owned(),
        object_store::Error::AlreadyExists { .. } => "already exists".to_owned(),
        object_store::Error::Precondition { .. } => "precondition failed".to_owned(),
        object_store::Error::PermissionDenied { .. } => "permission denied".to_owned(),
        object_store::Error::Unauthenticated { .. } => "not authenticated".to_owned(),
        object_store::Error::NotSupported { .. } | object_store::Error::NotImplemented { .. } => {
            "not supported by this backend".to_owned()
        }
        object_store::Error::Generic { store, .. } => format!("{store} request failed"),
        _ => "request failed".to_owned(),
    };
    StoreError::Backend(format!("{op} `{key}`: {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root(url: &str) -> Root {
        open(url).expect("a valid store URL").1
    }

    #[test]
    fn urls_are_normalized_without_a_trailing_slash() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let url = format!("file://{}/", dir.path().display());
        assert_eq!(root(&url).url, url.trim_end_matches('/'));
        assert_eq!(root("memory://").url, "memory://");
        assert_eq!(root("memory:///").url, "memory://");
        assert_eq!(root("memory:///").uri_of("blobs/x"), "memory:///blobs/x");
        assert_eq!(root("memory://").uri_of("blobs/x"), "memory:///blobs/x");
    }

    #[test]
    fn key_of_accepts_only_uris_below_the_root() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let base = format!("file://{}", dir.path().display());
        let root = root(&format!("{base}/store"));
        let key = root.key_of(&format!("{base}/store/some/file.bin")).unwrap();
        assert_eq!(key.as_ref(), "some/file.bin");
        for outside in [
            format!("{base}/other/file.bin"),
            format!("{base}/storefront/file.bin"),
            format!("{base}/store/../elsewhere"),
            format!("{base}/store"),
            format!("{base}/store/"),
            "memory:///some/file.bin".to_owned(),
            "some/file.bin".to_owned(),
        ] {
            let err = root.key_of(&outside).unwrap_err();
            assert!(
                matches!(err, StoreError::BadUrl { ref url, .. } if *url == outside),
                "{outside}: {err}"
            );
        }
    }

    #[test]
    fn backend_errors_keep_filesystem_paths_out() {
        let err = object_store::Error::NotFound {
            path: "/srv/secret/blobs/x".to_owned(),
            source: "no such file /srv/secret/blobs/x".into(),
        };
        let msg = backend_error("read", &Path::from("blobs/x"), err).to_string();
        assert_eq!(msg, "storage backend: read `blobs/x`: not found");
    }
}
