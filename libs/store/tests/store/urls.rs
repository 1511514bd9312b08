//! Store URLs, the manifest digest, and the shape of the API.

use super::common::*;

#[test]
fn manifest_digest_ignores_input_order_and_matches_a_hand_computed_value() {
    let a = (
        "a/config.json",
        "d4735e3a265e16eee03f59718b9b5d03019c07d8b6c51f90da3a666eec13ab35",
        2,
    );
    let b = (
        "b.txt",
        "3e23e8160039594a33894f6564e1b1348bbd7a0088d42c4acb73eeaed59c009d",
        1,
    );
    // printf '<sha a> 2 a/config.json\n<sha b> 1 b.txt\n' | sha256sum
    let expected = "5c13db435bb59e524dbccfa72f1871fb997b3b5accc9d76df9d7ff782108a559";
    assert_eq!(manifest_digest([a, b]), expected);
    assert_eq!(manifest_digest([b, a]), expected);
    assert_ne!(manifest_digest([a]), expected);
}

#[test]
fn from_url_rejects_bad_urls_naming_them() {
    for url in [
        "ftp://host/dir",
        "http://example.com/artifacts",
        "file:relative/dir",
        "file://relative/dir",
        "relative/dir",
        "",
        "memory://bucket",
        "file:///tmp/x?y=1",
    ] {
        let err = ArtifactStore::from_url(url).expect_err(url);
        assert!(
            matches!(err, StoreError::BadUrl { url: ref named, .. } if named == url),
            "{url}: {err}"
        );
        assert!(err.to_string().contains(&format!("`{url}`")), "{err}");
    }
}

#[test]
fn from_url_rejects_credentials_without_repeating_them() {
    let err = ArtifactStore::from_url("s3://key:secret@bucket/prefix").expect_err("credentials");
    assert!(matches!(err, StoreError::BadUrl { .. }), "{err}");
    assert!(!err.to_string().contains("secret"), "{err}");
    assert!(
        err.to_string().contains("s3://key:***@bucket/prefix"),
        "{err}"
    );
}

#[test]
fn from_url_creates_a_missing_directory() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let root = dir.path().join("nested/artifacts");
    let store = ArtifactStore::from_url(&format!("file://{}/", root.display())).expect("opens");
    assert!(root.is_dir());
    assert_eq!(store.url(), format!("file://{}", root.display()));
    assert!(format!("{store:?}").contains(store.url()));
}

#[test]
fn cloud_urls_open_without_contacting_the_cloud() {
    let store = ArtifactStore::from_url("s3://lmforge-artifacts/prod/").expect("an s3 URL opens");
    assert_eq!(store.url(), "s3://lmforge-artifacts/prod");
    let sha256 = sha256_hex(b"x");
    assert_eq!(
        store.blob_uri(&sha256),
        format!("s3://lmforge-artifacts/prod/blobs/sha256/{sha256}")
    );
}

#[test]
fn store_futures_are_send_and_the_store_is_cheap_to_clone() {
    fn assert_send<T: Send>(_: &T) {}
    let store = ArtifactStore::from_url("memory://").expect("memory:// opens");
    let data = stream::iter(vec![Ok::<_, std::io::Error>(Bytes::new())]);
    assert_send(&store.put_stream(data, None, None));
    assert_send(&store.put_bytes(Bytes::new()));
    assert_send(&store.get_stream("", 0, 1));
    assert_send(&store.import_uri("", None, None));
    assert_send(&store.contains(""));
    assert_send(&store.blob_size(""));
    assert_send(&store.delete_blob(""));
    let clone = store.clone();
    assert_eq!(clone.url(), store.url());
}
