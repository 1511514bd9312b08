//! Reading an object as a stream of evenly sized chunks.
//!
//! `object_store` reads a local file in 8 KiB pieces, one blocking-pool task each, and a remote
//! object in whatever pieces the HTTP body arrives in. Neither suits a download that becomes
//! one gRPC message per chunk, so a local file is read here in `chunk` sized blocking reads,
//! and any other stream is re-chunked: pieces at least `chunk` long are sliced without copying,
//! smaller ones are gathered into one buffer of `chunk` bytes. Either way no chunk exceeds
//! `chunk` and at most one chunk is buffered.

use std::io::{Read, Seek, SeekFrom};

use bytes::{Bytes, BytesMut};
use futures::stream::{self, BoxStream, StreamExt};
use object_store::path::Path;
use object_store::{GetResult, GetResultPayload};

use crate::StoreError;
use crate::backend::backend_error;

/// The largest chunk ever read or buffered, whatever the caller asks for.
pub(crate) const MAX_CHUNK: usize = 8 << 20;

/// The object behind `result` (a read of `key`) as chunks of at most `chunk` bytes (clamped to
/// `1..=MAX_CHUNK`); all of them `chunk` long but the last.
pub(crate) fn chunked(
    result: GetResult,
    key: Path,
    chunk: usize,
) -> BoxStream<'static, Result<Bytes, StoreError>> {
    let chunk = chunk.clamp(1, MAX_CHUNK);
    match result.payload {
        GetResultPayload::File(file, _path) => read_file(file, key, result.range, chunk),
        GetResultPayload::Stream(pieces) => {
            let pieces = pieces
                .map(move |piece| piece.map_err(|e| backend_error("read", &key, e)))
                .boxed();
            rechunk(pieces, chunk)
        }
    }
}

/// Reads `range` of a local file in blocking reads of `chunk` bytes.
fn read_file(
    file: std::fs::File,
    key: Path,
    range: std::ops::Range<u64>,
    chunk: usize,
) -> BoxStream<'static, Result<Bytes, StoreError>> {
    let io_error = |key: &Path, e: std::io::Error| {
        tracing::warn!(error = %e, %key, "artifact store local read failed");
        StoreError::Backend(format!("read `{key}`: {}", e.kind()))
    };
    let state = (Some(file), range.start, range.end);
    stream::try_unfold(state, move |(file, position, end)| {
        let key = key.clone();
        async move {
            let Some(mut file) = file else {
                return Ok(None);
            };
            if position >= end {
                return Ok(None);
            }
            let want = (end - position).min(chunk as u64);
            let read = tokio::task::spawn_blocking(move || {
                file.seek(SeekFrom::Start(position))?;
                let mut buffer = Vec::with_capacity(want as usize);
                (&mut file).take(want).read_to_end(&mut buffer)?;
                Ok::<_, std::io::Error>((file, buffer))
            })
            .await;
            let (file, buffer) = match read {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => return Err(io_error(&key, e)),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => return Err(StoreError::Backend(format!("read `{key}`: cancelled"))),
            };
            if buffer.is_empty() {
                // The file shrank under us: a blob file is never rewritten, so this is damage.
                return Err(StoreError::Backend(format!(
                    "read `{key}`: object ended early"
                )));
            }
            let next = position + buffer.len() as u64;
            Ok(Some((Bytes::from(buffer), (Some(file), next, end))))
        }
    })
    .boxed()
}

/// Re-chunks `pieces` into chunks of exactly `chunk` bytes (the last may be shorter). The
/// stream ends after the first error.
pub(crate) fn rechunk(
    pieces: BoxStream<'static, Result<Bytes, StoreError>>,
    chunk: usize,
) -> BoxStream<'static, Result<Bytes, StoreError>> {
    debug_assert!(chunk > 0);
    struct State {
        pieces: BoxStream<'static, Result<Bytes, StoreError>>,
        /// The unconsumed rest of the last piece.
        pending: Bytes,
        /// Small pieces gathered into the next chunk.
        gathered: BytesMut,
        finished: bool,
    }
    let state = State {
        pieces,
        pending: Bytes::new(),
        gathered: BytesMut::new(),
        finished: false,
    };
    stream::unfold(state, move |mut s| async move {
        loop {
            if s.gathered.is_empty() && s.pending.len() >= chunk {
                let out = s.pending.split_to(chunk);
                return Some((Ok(out), s));
            }
            if !s.pending.is_empty() {
                let take = (chunk - s.gathered.len()).min(s.pending.len());
                s.gathered.extend_from_slice(&s.pending.split_to(take));
                if s.gathered.len() == chunk {
                    let out = s.gathered.split().freeze();
                    return Some((Ok(out), s));
                }
                continue;
            }
            if s.finished {
                if s.gathered.is_empty() {
                    return None;
                }
                let out = s.gathered.split().freeze();
                return Some((Ok(out), s));
            }
            match s.pieces.next().await {
                Some(Ok(piece)) => s.pending = piece,
                Some(Err(e)) => {
                    s.finished = true;
                    s.gathered.clear();
                    return Some((Err(e), s));
                }
                None => s.finished = true,
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(sizes: &[usize]) -> (Vec<u8>, BoxStream<'static, Result<Bytes, StoreError>>) {
        let mut all = Vec::new();
        let mut out = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let piece: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            all.extend_from_slice(&piece);
            out.push(Ok(Bytes::from(piece)));
        }
        (all, stream::iter(out).boxed())
    }

    #[tokio::test]
    async fn rechunk_gives_full_chunks_but_the_last() {
        for chunk in [1, 3, 10, 64, 1000] {
            let (all, input) = pieces(&[0, 5, 1, 17, 64, 3, 0, 200, 9]);
            let out: Vec<Bytes> = rechunk(input, chunk)
                .map(|c| c.expect("no errors in the input"))
                .collect()
                .await;
            let (last, full) = out.split_last().expect("input is not empty");
            assert!(full.iter().all(|c| c.len() == chunk), "chunk {chunk}");
            assert!(!last.is_empty() && last.len() <= chunk);
            assert_eq!(out.concat(), all);
        }
    }

    #[tokio::test]
    async fn rechunk_ends_after_an_error() {
        let input = stream::iter(vec![
            Ok(Bytes::from_static(b"abc")),
            Err(StoreError::Backend("boom".into())),
            Ok(Bytes::from_static(b"never")),
        ])
        .boxed();
        let out: Vec<_> = rechunk(input, 2).collect().await;
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].as_ref().expect("first chunk is data"), "ab");
        assert!(matches!(out[1], Err(StoreError::Backend(_))));
    }

    #[tokio::test]
    async fn rechunk_of_nothing_is_nothing() {
        let (_, input) = pieces(&[0, 0]);
        assert_eq!(rechunk(input, 4).count().await, 0);
    }
}
