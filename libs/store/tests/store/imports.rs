//! `import_uri`: registering an object already in the store.

use super::common::*;

#[tokio::test]
async fn import_uri_of_a_file_under_the_root_verifies_and_stores_it() {
    let (dir, store) = local_store();
    let data = pattern(MIB + 3, 9);
    std::fs::create_dir_all(dir.path().join("uploads/run 1")).expect("mkdir");
    let source = dir.path().join("uploads/run 1/model.safetensors");
    std::fs::write(&source, &data).expect("write the source file");
    let uri = format!("{}/uploads/run%201/model.safetensors", store.url());
    let sha256 = sha256_hex(&data);

    let err = store
        .import_uri(&uri, Some(data.len() as u64 + 1), None)
        .await
        .expect_err("a wrong expected size must fail");
    assert!(matches!(err, StoreError::SizeMismatch { .. }), "{err}");
    let wrong = sha256_hex(b"something else");
    let err = store
        .import_uri(&uri, None, Some(&wrong))
        .await
        .expect_err("a wrong expected digest must fail");
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(!store.contains(&sha256).await.expect("lookup works"));

    let info = store
        .import_uri(&uri, Some(data.len() as u64), Some(&sha256))
        .await
        .expect("import succeeds");
    assert_eq!(
        info,
        BlobInfo {
            sha256: sha256.clone(),
            size: data.len() as u64
        }
    );
    assert_eq!(
        read_all(&store, &sha256, 0, MIB).await.concat(),
        data.to_vec()
    );
    assert_eq!(
        std::fs::read(&source).expect("the source stays"),
        data.to_vec()
    );

    // A copy, not a link: rewriting the source does not touch the blob.
    std::fs::write(&source, b"rewritten").expect("rewrite the source");
    assert_eq!(
        read_all(&store, &sha256, 0, MIB).await.concat(),
        data.to_vec()
    );
}

#[tokio::test]
async fn import_uri_works_on_memory_stores() {
    let store = ArtifactStore::from_url("memory://").expect("memory:// opens");
    let info = store
        .put_bytes(Bytes::from_static(b"abc"))
        .await
        .expect("stored");
    let again = store
        .import_uri(&store.blob_uri(&info.sha256), Some(3), Some(&info.sha256))
        .await
        .expect("a blob's own URI imports");
    assert_eq!(info, again);
}

#[tokio::test]
async fn import_uri_outside_the_root_or_missing_is_rejected() {
    let (dir, store) = local_store();
    let outside_dir = tempfile::tempdir().expect("a temp dir");
    let outside = outside_dir.path().join("model.bin");
    std::fs::write(&outside, b"elsewhere").expect("write");
    let inside_prefix = format!("{}x/model.bin", store.url()); // a sibling sharing the prefix
    for uri in [
        format!("file://{}", outside.display()),
        format!("{}/../{}", store.url(), "model.bin"),
        inside_prefix,
        "s3://bucket/model.bin".to_owned(),
        "relative/model.bin".to_owned(),
        store.url().to_owned(),
    ] {
        let err = store
            .import_uri(&uri, None, None)
            .await
            .expect_err("outside the root must fail");
        assert!(
            matches!(err, StoreError::BadUrl { ref url, .. } if *url == uri),
            "{uri}: {err}"
        );
    }
    let missing = format!("{}/uploads/missing.bin", store.url());
    let err = store
        .import_uri(&missing, None, None)
        .await
        .expect_err("missing");
    assert!(
        matches!(err, StoreError::NotFound(ref what) if *what == missing),
        "{err}"
    );
    assert!(files_under(dir.path()).is_empty());
}
