//! Writes: verification failures leave nothing behind, dedup, and large streaming uploads.

use super::common::*;

#[tokio::test]
async fn corrupted_stream_is_a_digest_mismatch_and_stores_nothing() {
    for (dir, store) in stores() {
        let data = pattern(MIB, 4);
        let expected = sha256_hex(&data);
        let mut corrupted = data.to_vec();
        corrupted[MIB / 2] ^= 0xff;
        let corrupted = Bytes::from(corrupted);
        let err = store
            .put_stream(
                chunks_of(&corrupted, 4096),
                Some(MIB as u64),
                Some(&expected),
            )
            .await
            .expect_err("a corrupted stream must fail");
        match err {
            StoreError::DigestMismatch {
                expected: e,
                actual,
            } => {
                assert_eq!(e, expected);
                assert_eq!(actual, sha256_hex(&corrupted));
            }
            other => panic!("expected DigestMismatch, got {other}"),
        }
        assert_nothing_stored(&dir, &store, &expected).await;
        assert_nothing_stored(&dir, &store, &sha256_hex(&corrupted)).await;
    }
}

#[tokio::test]
async fn truncated_stream_is_a_size_mismatch_and_stores_nothing() {
    for (dir, store) in stores() {
        let data = pattern(MIB, 5);
        let truncated = data.slice(..MIB - 10);
        let err = store
            .put_stream(chunks_of(&truncated, 50_000), Some(MIB as u64), None)
            .await
            .expect_err("a truncated stream must fail");
        assert!(
            matches!(err, StoreError::SizeMismatch { expected, actual } if expected == MIB as u64 && actual == MIB as u64 - 10),
            "{err}"
        );
        assert_nothing_stored(&dir, &store, &sha256_hex(&truncated)).await;
    }
}

#[tokio::test]
async fn oversized_stream_is_a_size_mismatch_and_stores_nothing() {
    for (dir, store) in stores() {
        let data = pattern(MIB, 6);
        let err = store
            .put_stream(chunks_of(&data, 1000), Some(5000), None)
            .await
            .expect_err("a stream longer than declared must fail");
        // It stops reading at the first chunk past the declared size.
        assert!(
            matches!(
                err,
                StoreError::SizeMismatch {
                    expected: 5000,
                    actual: 6000
                }
            ),
            "{err}"
        );
        assert_nothing_stored(&dir, &store, &sha256_hex(&data)).await;
    }
}

#[tokio::test]
async fn stream_error_midway_is_an_upload_error_and_stores_nothing() {
    for (dir, store) in stores() {
        let data = pattern(2 * MIB, 7);
        let failing = stream::iter(vec![
            Ok(data.slice(..MIB)),
            Err("client went away"),
            Ok(data.slice(MIB..)),
        ]);
        let err = store
            .put_stream(failing, None, None)
            .await
            .expect_err("a failing stream must fail the upload");
        assert!(
            matches!(err, StoreError::Upload(ref msg) if msg == "client went away"),
            "{err}"
        );
        assert_nothing_stored(&dir, &store, &sha256_hex(&data)).await;
        assert_nothing_stored(&dir, &store, &sha256_hex(&data[..MIB])).await;
    }
}

#[tokio::test]
async fn same_bytes_twice_are_stored_once() {
    for (dir, store) in stores() {
        let data = pattern(300_000, 8);
        let first = store
            .put_stream(chunks_of(&data, 7000), None, None)
            .await
            .expect("stored");
        let second = store
            .put_stream(
                chunks_of(&data, 9000),
                Some(data.len() as u64),
                Some(&first.sha256),
            )
            .await
            .expect("stored again");
        let third = store
            .put_bytes(data.clone())
            .await
            .expect("stored a third time");
        assert_eq!(first, second);
        assert_eq!(first, third);
        if let Some(dir) = dir {
            let files = files_under(dir.path());
            assert_eq!(
                files,
                vec![dir.path().join("blobs/sha256").join(&first.sha256)],
                "one blob and no staging leftovers"
            );
        }
    }
}

/// 64 MiB, generated lazily in 1 MiB chunks. Memory stays flat by construction (the upload
/// holds at most three 16 MiB parts; see `upload.rs`); what this checks from outside is that
/// the bytes reach the backend as multipart parts while the stream is still being read: by
/// the 41st chunk at least one whole part is on disk in the staged upload, and no blob exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_stream_is_uploaded_in_parts_while_it_streams() {
    const CHUNKS: usize = 64;
    let (dir, store) = local_store();
    let staging = dir.path().join("staging");
    let generator = {
        let staging = staging.clone();
        move |i: usize| {
            if i == 40 {
                let staged: u64 = files_under(&staging)
                    .iter()
                    .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
                    .sum();
                assert!(
                    staged >= 16 * MIB as u64,
                    "only {staged} bytes staged after 40 MiB streamed"
                );
                assert!(files_under(&staging.with_file_name("blobs")).is_empty());
            }
            Ok::<_, Infallible>(pattern(MIB, i as u8))
        }
    };
    let data: BoxStream<'static, Result<Bytes, Infallible>> =
        stream::iter(0..CHUNKS).map(generator).boxed();
    let info = store
        .put_stream(data, Some((CHUNKS * MIB) as u64), None)
        .await
        .expect("a large upload succeeds");

    let mut expected = Sha256::new();
    for i in 0..CHUNKS {
        expected.update(pattern(MIB, i as u8));
    }
    assert_eq!(info.sha256, hex::encode(expected.finalize()));
    assert_eq!(info.size, (CHUNKS * MIB) as u64);

    // Read it back chunk by chunk, comparing without holding the whole blob.
    let (_, mut chunks) = store
        .get_stream(&info.sha256, 0, MIB)
        .await
        .expect("stored");
    let mut i = 0;
    while let Some(chunk) = chunks.next().await {
        assert_eq!(chunk.expect("readable"), pattern(MIB, i as u8), "chunk {i}");
        i += 1;
    }
    assert_eq!(i, CHUNKS);
    assert!(files_under(&staging).is_empty(), "no staging leftovers");
}
