//! Reads: round trips, offsets, chunking, lookups and deletes.

use super::common::*;

#[tokio::test]
async fn put_then_get_round_trips_and_digest_is_sha256_of_the_bytes() {
    for (_dir, store) in stores() {
        let data = pattern(3 * MIB + 17, 1);
        let info = store
            .put_stream(chunks_of(&data, 100_000), Some(data.len() as u64), None)
            .await
            .expect("upload succeeds");
        assert_eq!(
            info,
            BlobInfo {
                sha256: sha256_hex(&data),
                size: data.len() as u64
            }
        );
        assert!(store.contains(&info.sha256).await.expect("lookup works"));
        assert_eq!(
            store.blob_size(&info.sha256).await.expect("stored"),
            info.size
        );
        let (size, _) = store
            .get_stream(&info.sha256, 0, MIB)
            .await
            .expect("stored");
        assert_eq!(size, info.size);
        assert_eq!(
            read_all(&store, &info.sha256, 0, MIB).await.concat(),
            data.to_vec()
        );
        assert!(
            store.blob_uri(&info.sha256).starts_with(store.url())
                && store
                    .blob_uri(&info.sha256)
                    .ends_with(&format!("/blobs/sha256/{}", info.sha256)),
            "{}",
            store.blob_uri(&info.sha256)
        );
    }
}

#[tokio::test]
async fn local_blobs_land_at_blobs_sha256_hex() {
    let (dir, store) = local_store();
    let info = store
        .put_bytes(Bytes::from_static(b"weights"))
        .await
        .expect("stored");
    let on_disk = dir.path().join("blobs/sha256").join(&info.sha256);
    assert_eq!(
        std::fs::read(on_disk).expect("the blob file exists"),
        b"weights"
    );
    assert_eq!(
        store.blob_uri(&info.sha256),
        format!(
            "file://{}/blobs/sha256/{}",
            dir.path().display(),
            info.sha256
        )
    );
}

#[tokio::test]
async fn get_from_an_offset_returns_the_tail() {
    for (_dir, store) in stores() {
        let data = pattern(MIB + 5, 2);
        let info = store.put_bytes(data.clone()).await.expect("stored");
        for offset in [1, 4096, MIB as u64, data.len() as u64 - 1] {
            let (size, _) = store
                .get_stream(&info.sha256, offset, 64 * 1024)
                .await
                .expect("stored");
            assert_eq!(
                size,
                data.len() as u64,
                "the total size, whatever the offset"
            );
            let tail = read_all(&store, &info.sha256, offset, 64 * 1024)
                .await
                .concat();
            assert_eq!(tail, data[offset as usize..].to_vec(), "offset {offset}");
        }
    }
}

#[tokio::test]
async fn offset_at_the_end_is_empty_and_past_it_is_an_error() {
    for (_dir, store) in stores() {
        let info = store
            .put_bytes(Bytes::from_static(b"0123456789"))
            .await
            .expect("stored");
        assert!(read_all(&store, &info.sha256, 10, 4).await.is_empty());
        let Err(err) = store.get_stream(&info.sha256, 11, 4).await else {
            panic!("an offset past the end must fail");
        };
        assert!(
            matches!(
                err,
                StoreError::OffsetPastEnd {
                    offset: 11,
                    size: 10
                }
            ),
            "{err}"
        );
    }
}

#[tokio::test]
async fn chunks_never_exceed_chunk_size() {
    for (_dir, store) in stores() {
        let data = pattern(2 * MIB + 333, 3);
        let info = store.put_bytes(data.clone()).await.expect("stored");
        for chunk_size in [1000, 64 * 1024, MIB, 4 * MIB - 1, usize::MAX] {
            for offset in [0, 7] {
                let chunks = read_all(&store, &info.sha256, offset, chunk_size).await;
                assert!(
                    chunks
                        .iter()
                        .all(|c| !c.is_empty() && c.len() <= chunk_size)
                );
                assert_eq!(chunks.concat(), data[offset as usize..].to_vec());
            }
        }
    }
}

#[tokio::test]
async fn empty_blob_round_trips() {
    for (_dir, store) in stores() {
        let info = store
            .put_stream(stream::empty::<Result<Bytes, Infallible>>(), Some(0), None)
            .await
            .expect("an empty upload succeeds");
        assert_eq!(info.sha256, sha256_hex(b""));
        assert_eq!(info.size, 0);
        assert_eq!(store.blob_size(&info.sha256).await.expect("stored"), 0);
        assert!(read_all(&store, &info.sha256, 0, 16).await.is_empty());
    }
}

#[tokio::test]
async fn missing_blobs_are_not_found_and_bad_digests_are_rejected() {
    for (_dir, store) in stores() {
        let absent = sha256_hex(b"never stored");
        assert!(!store.contains(&absent).await.expect("lookup works"));
        assert!(matches!(
            store.blob_size(&absent).await,
            Err(StoreError::NotFound(_))
        ));
        assert!(matches!(
            store.get_stream(&absent, 0, 10).await.map(|(size, _)| size),
            Err(StoreError::NotFound(_))
        ));
        store
            .delete_blob(&absent)
            .await
            .expect("deleting a missing blob is fine");
        for bad in ["", "ABC", "../../etc/passwd"] {
            assert!(matches!(
                store.contains(bad).await,
                Err(StoreError::BadDigest(_))
            ));
            assert!(matches!(
                store.delete_blob(bad).await,
                Err(StoreError::BadDigest(_))
            ));
            let err = store
                .put_stream(
                    stream::empty::<Result<Bytes, Infallible>>(),
                    None,
                    Some(bad),
                )
                .await
                .expect_err("a malformed expected digest must fail");
            assert!(matches!(err, StoreError::BadDigest(_)), "{err}");
        }
    }
}

#[tokio::test]
async fn delete_blob_removes_it() {
    for (dir, store) in stores() {
        let info = store
            .put_bytes(Bytes::from_static(b"garbage"))
            .await
            .expect("stored");
        store.delete_blob(&info.sha256).await.expect("deleted");
        assert_nothing_stored(&dir, &store, &info.sha256).await;
    }
}
