//! The gRPC handlers of `lmforge.v1.DatasetService`: validate, convert, call the pipeline
//! and the catalog, convert back.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::dataset_service_server::DatasetService;
use lmforge_store::ArtifactStore;
use sqlx::PgPool;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::augment::{RewriteSettings, SynonymDict, SynonymSettings};
use crate::catalog::{self, NewVersion, ShardRow, VersionRow};
use crate::error::{IngestError, Result};
use crate::parse;
use crate::peers::Peers;
use crate::pipeline::{self, PipelineOutput};
use crate::record::Record;
use crate::settings::{self, Plan};

type StreamOf<T> =
    std::pin::Pin<Box<dyn futures::Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// Largest chunk of an upload.
const MAX_CHUNK: usize = 4 << 20;
/// Largest upload.
const MAX_INPUT: u64 = 10 << 30;
/// Bytes per chunk of a raw download.
const DOWNLOAD_CHUNK: usize = 1 << 20;

/// `lmforge.v1.DatasetService` over Postgres, the artifact store and the peers.
#[derive(Debug, Clone)]
pub struct DatasetApi {
    pool: PgPool,
    store: ArtifactStore,
    peers: Peers,
    work_dir: PathBuf,
}

/// A raw input copied to local disk and stored.
struct RawInput {
    path: tempfile::TempPath,
    sha256: String,
    size: u64,
}

fn page(field_size: &str, page_size: i32, field_token: &str, token: &str) -> Result<(i64, i64)> {
    if page_size < 0 {
        return Err(IngestError::invalid(field_size, "must not be negative"));
    }
    let limit = if page_size == 0 {
        50
    } else {
        i64::from(page_size.min(1000))
    };
    let offset = if token.is_empty() {
        0
    } else {
        token
            .parse::<i64>()
            .ok()
            .filter(|o| *o >= 0)
            .ok_or_else(|| {
                IngestError::invalid(field_token, "not a token from a previous response")
            })?
    };
    Ok((limit, offset))
}

impl DatasetApi {
    /// The service over its dependencies; temporary files go to `work_dir`.
    pub fn new(pool: PgPool, store: ArtifactStore, peers: Peers, work_dir: PathBuf) -> Self {
        Self {
            pool,
            store,
            peers,
            work_dir,
        }
    }

    fn artifact_uri(&self) -> String {
        self.store.url().to_owned()
    }

    /// Decodes the raw input to UTF-8 (malformed bytes become U+FFFD; a BOM picks the
    /// encoding) into a new temporary file.
    async fn decode(
        &self,
        raw: &RawInput,
        encoding: &'static encoding_rs::Encoding,
    ) -> Result<tempfile::TempPath> {
        let source = raw.path.to_path_buf();
        let dir = self.work_dir.clone();
        tokio::task::spawn_blocking(move || -> std::io::Result<tempfile::TempPath> {
            let mut input =
                std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(source)?);
            let (file, path) = tempfile::NamedTempFile::new_in(dir)?.into_parts();
            let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
            let mut decoder = encoding.new_decoder();
            let mut buf = vec![0u8; 1 << 20];
            let mut text = String::with_capacity(3 << 20);
            loop {
                let n = input.read(&mut buf)?;
                text.clear();
                let last = n == 0;
                let needed = decoder.max_utf8_buffer_length(n).unwrap_or(4 * n + 16);
                text.reserve(needed);
                let (_, _, _) = decoder.decode_to_string(&buf[..n], &mut text, last);
                out.write_all(text.as_bytes())?;
                if last {
                    break;
                }
            }
            out.flush()?;
            Ok(path)
        })
        .await
        .map_err(|e| IngestError::Storage(e.to_string()))?
        .map_err(|e| IngestError::Storage(e.to_string()))
    }

    /// Resolves what the plan leaves to peers and runs the pipeline, stores the shards and
    /// commits the version.
    async fn ingest(
        &self,
        p: &str,
        spec: &pb::DatasetIngestSpec,
        mut plan: Plan,
        raw: RawInput,
        source: String,
    ) -> Result<(pb::Dataset, VersionRow, bool)> {
        let started_at = chrono::Utc::now();
        let decoded = self.decode(&raw, plan.encoding).await?;
        let format = match plan.format {
            Some(f) => f,
            None => {
                let mut head = vec![0u8; 64 << 10];
                let mut file = std::fs::File::open(&decoded)
                    .map_err(|e| IngestError::Storage(e.to_string()))?;
                let n = file
                    .read(&mut head)
                    .map_err(|e| IngestError::Storage(e.to_string()))?;
                head.truncate(n);
                let head = String::from_utf8_lossy(&head);
                parse::detect_format(
                    &plan.settings.source_name,
                    &head,
                    &plan.settings.parse.dialogue,
                )
                .map_err(|e| IngestError::invalid(format!("{p}.format"), e.to_string()))?
            }
        };
        plan.settings.format = format;
        if let Some(model) = &plan.tokenizer_model {
            let tokenizer = self
                .peers
                .tokenizer(
                    model,
                    &format!("{p}.config.cleaning.length.tokenizer_model"),
                )
                .await?;
            plan.settings.clean.tokenizer = Some(Arc::new(tokenizer));
        }
        if let Some(syn) = &plan.synonym {
            let text = if syn.dictionary_uri.is_empty() {
                crate::augment::BUILTIN_SYNONYMS.to_owned()
            } else {
                let field = format!("{p}.config.augmentation.synonym.dictionary_uri");
                let info = self
                    .store
                    .import_uri(&syn.dictionary_uri, None, None)
                    .await
                    .map_err(|e| IngestError::invalid(field.clone(), e.to_string()))?;
                let bytes = self.read_blob(&info.sha256).await?;
                String::from_utf8(bytes).map_err(|_| {
                    IngestError::invalid(field.clone(), "the dictionary is not UTF-8")
                })?
            };
            let dict = SynonymDict::parse(&text).map_err(|e| {
                IngestError::invalid(format!("{p}.config.augmentation.synonym.dictionary_uri"), e)
            })?;
            plan.settings.synonym = Some(SynonymSettings {
                dict,
                probability: syn.probability,
                copies: syn.copies,
            });
        }
        if let Some(rw) = &plan.rewrite {
            plan.settings.rewrite = Some(RewriteSettings {
                rewriter: self.peers.rewriter(&rw.config),
                copies: rw.copies,
                sample_fraction: rw.sample_fraction,
            });
        }
        let settings = plan.settings;
        let work_dir = self.work_dir.clone();
        let output: PipelineOutput =
            tokio::task::spawn_blocking(move || pipeline::run(&decoded, &settings, &work_dir))
                .await
                .map_err(|e| IngestError::Storage(e.to_string()))??;
        // Shards first; the version row only once every shard is stored.
        let mut shards = Vec::new();
        for split in &output.splits {
            for shard in &split.shards {
                let data = tokio::fs::read(&shard.path)
                    .await
                    .map_err(|e| IngestError::Storage(e.to_string()))?;
                let info = self.store.put_bytes(Bytes::from(data)).await?;
                shards.push(ShardRow {
                    split: split.split as i32,
                    sha256: info.sha256,
                    records: shard.records,
                    raw_size: shard.raw_size,
                });
            }
        }
        let mut report = output.report;
        report.format = settings::format_value(format);
        let new = NewVersion {
            dataset_name: plan.dataset_name,
            description: spec.description.clone(),
            tags: spec.tags.clone(),
            client_request_id: (!spec.client_request_id.is_empty())
                .then(|| spec.client_request_id.clone()),
            digest: output.digest,
            format: settings::format_value(format),
            config: plan.applied,
            records: output.records,
            source,
            source_sha256: raw.sha256,
            source_size: raw.size,
            splits: output.splits.iter().map(|s| s.info()).collect(),
            shards,
            report,
            started_at,
        };
        catalog::commit_version(&self.pool, new, &self.artifact_uri()).await
    }

    async fn read_blob(&self, sha256: &str) -> Result<Vec<u8>> {
        let (_, mut stream) = self.store.get_stream(sha256, 0, 1 << 20).await?;
        let mut out = Vec::new();
        while let Some(chunk) = stream.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    /// Receives the chunks of an upload into a local file and the store at once.
    async fn receive(
        &self,
        spec: &pb::DatasetIngestSpec,
        stream: &mut Streaming<pb::UploadDatasetRequest>,
    ) -> Result<RawInput> {
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))?;
        let (file, path) = tempfile::NamedTempFile::new_in(&self.work_dir)
            .map_err(|e| IngestError::Storage(e.to_string()))?
            .into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let (tx, rx) = mpsc::channel::<std::result::Result<Bytes, String>>(4);
        let store = self.store.clone();
        let expected_size = (spec.expected_size_bytes > 0).then_some(spec.expected_size_bytes);
        let expected_sha = (!spec.expected_sha256.is_empty()).then(|| spec.expected_sha256.clone());
        let put = tokio::spawn(async move {
            store
                .put_stream(
                    ReceiverStream::new(rx),
                    expected_size,
                    expected_sha.as_deref(),
                )
                .await
        });
        let mut total = 0u64;
        let result: Result<()> = async {
            while let Some(message) = stream.message().await.map_err(|s| {
                IngestError::invalid(
                    "chunk",
                    format!("the upload stream failed: {}", s.message()),
                )
            })? {
                match message.payload {
                    Some(pb::upload_dataset_request::Payload::Chunk(chunk)) => {
                        if chunk.len() > MAX_CHUNK {
                            return Err(IngestError::invalid(
                                "chunk",
                                format!("{} bytes is over the 4 MiB chunk limit", chunk.len()),
                            ));
                        }
                        total += chunk.len() as u64;
                        if total > MAX_INPUT {
                            return Err(IngestError::invalid("chunk", "the input is over 10 GiB"));
                        }
                        file.write_all(&chunk)
                            .await
                            .map_err(|e| IngestError::Storage(e.to_string()))?;
                        if tx.send(Ok(Bytes::from(chunk))).await.is_err() {
                            // The store stopped reading: its error is reported below.
                            break;
                        }
                    }
                    Some(pb::upload_dataset_request::Payload::Metadata(_)) => {
                        return Err(IngestError::invalid(
                            "metadata",
                            "sent twice: only the first message carries metadata",
                        ));
                    }
                    None => {
                        return Err(IngestError::invalid(
                            "payload",
                            "each message needs metadata or a chunk",
                        ));
                    }
                }
            }
            file.flush()
                .await
                .map_err(|e| IngestError::Storage(e.to_string()))?;
            Ok(())
        }
        .await;
        if let Err(e) = result {
            // An error item makes the store abort the staged upload instead of completing it.
            let _ = tx.send(Err(e.to_string())).await;
            drop(tx);
            let _ = put.await;
            return Err(e);
        }
        drop(tx);
        let info = put
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))??;
        Ok(RawInput {
            path,
            sha256: info.sha256,
            size: info.size,
        })
    }

    async fn download(
        &self,
        request: pb::DownloadDatasetVersionRequest,
        tx: mpsc::Sender<std::result::Result<pb::DownloadDatasetVersionResponse, Status>>,
    ) -> Result<()> {
        let version = catalog::resolve_version(
            &self.pool,
            &request.dataset_version,
            "dataset_version",
            &self.artifact_uri(),
        )
        .await?;
        if version.version.status != pb::DatasetVersionStatus::Ready as i32 {
            return Err(IngestError::FailedPrecondition(format!(
                "dataset version `{}` is not READY",
                request.dataset_version
            )));
        }
        let split = pb::DatasetSplit::try_from(request.split).map_err(|_| {
            IngestError::invalid("split", format!("unknown split {}", request.split))
        })?;
        let mode = pb::DownloadMode::try_from(request.mode)
            .map_err(|_| IngestError::invalid("mode", format!("unknown mode {}", request.mode)))?;
        let splits: Vec<pb::DatasetSplit> = match split {
            pb::DatasetSplit::Unspecified => {
                if mode == pb::DownloadMode::Raw {
                    return Err(IngestError::invalid("split", "RAW mode needs one split"));
                }
                vec![
                    pb::DatasetSplit::Train,
                    pb::DatasetSplit::Eval,
                    pb::DatasetSplit::Test,
                ]
            }
            one => vec![one],
        };
        let infos = &version.version.splits;
        let info_of = |s: pb::DatasetSplit| {
            infos
                .iter()
                .find(|i| i.split == s as i32)
                .cloned()
                .unwrap_or_default()
        };
        let send = |m: pb::download_dataset_version_response::Payload| {
            let tx = tx.clone();
            async move {
                tx.send(Ok(pb::DownloadDatasetVersionResponse { payload: Some(m) }))
                    .await
                    .is_ok()
            }
        };
        if mode == pb::DownloadMode::Raw {
            let info = info_of(splits[0]);
            if request.offset > info.size_bytes {
                return Err(IngestError::invalid(
                    "offset",
                    format!(
                        "{} is past the split's end ({} bytes)",
                        request.offset, info.size_bytes
                    ),
                ));
            }
            let mut position = 0u64;
            for shard in catalog::shards(&self.pool, version.id, splits[0] as i32).await? {
                let end = position + shard.raw_size;
                if end <= request.offset {
                    position = end;
                    continue;
                }
                let data = self.shard_bytes(&shard.sha256).await?;
                let skip = request.offset.saturating_sub(position) as usize;
                let mut at = skip;
                while at < data.len() {
                    let stop = (at + DOWNLOAD_CHUNK).min(data.len());
                    let chunk = pb::ByteChunk {
                        data: data[at..stop].to_vec(),
                        offset: position + at as u64,
                    };
                    if !send(pb::download_dataset_version_response::Payload::Chunk(chunk)).await {
                        return Ok(());
                    }
                    at = stop;
                }
                position = end;
            }
            send(pb::download_dataset_version_response::Payload::Summary(
                pb::DatasetDownloadSummary {
                    record_count: 0,
                    transfer: Some(pb::TransferSummary {
                        total_size_bytes: info.size_bytes,
                        sha256: info.sha256,
                    }),
                },
            ))
            .await;
            return Ok(());
        }
        let mut sent = 0u64;
        'splits: for s in &splits {
            for shard in catalog::shards(&self.pool, version.id, *s as i32).await? {
                let data = self.shard_bytes(&shard.sha256).await?;
                for line in data.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                    let record: Record = serde_json::from_slice(line).map_err(|e| {
                        IngestError::Storage(format!("corrupt shard {}: {e}", shard.sha256))
                    })?;
                    let message = pb::DatasetRecord {
                        id: record.id,
                        messages: record
                            .messages
                            .into_iter()
                            .map(|m| pb::ChatMessage {
                                role: match m.role {
                                    crate::record::Role::System => pb::ChatRole::System,
                                    crate::record::Role::User => pb::ChatRole::User,
                                    crate::record::Role::Assistant => pb::ChatRole::Assistant,
                                } as i32,
                                content: m.content,
                                name: None,
                            })
                            .collect(),
                        text: record.text,
                        labels: record.labels.into_iter().collect(),
                        source: record.source,
                        split: *s as i32,
                    };
                    if !send(pb::download_dataset_version_response::Payload::Record(
                        message,
                    ))
                    .await
                    {
                        return Ok(());
                    }
                    sent += 1;
                    if request.max_records > 0 && sent >= request.max_records {
                        break 'splits;
                    }
                }
            }
        }
        let transfer = if splits.len() == 1 {
            let info = info_of(splits[0]);
            pb::TransferSummary {
                total_size_bytes: info.size_bytes,
                sha256: info.sha256,
            }
        } else {
            pb::TransferSummary {
                total_size_bytes: infos.iter().map(|i| i.size_bytes).sum(),
                sha256: version.version.digest.clone(),
            }
        };
        send(pb::download_dataset_version_response::Payload::Summary(
            pb::DatasetDownloadSummary {
                record_count: sent,
                transfer: Some(transfer),
            },
        ))
        .await;
        Ok(())
    }

    /// A shard's uncompressed JSONL.
    async fn shard_bytes(&self, sha256: &str) -> Result<Vec<u8>> {
        let compressed = self.read_blob(sha256).await?;
        tokio::task::spawn_blocking(move || zstd::decode_all(compressed.as_slice()))
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))?
            .map_err(|e| IngestError::Storage(format!("corrupt shard: {e}")))
    }
}

#[tonic::async_trait]
impl DatasetService for DatasetApi {
    #[tracing::instrument(skip_all)]
    async fn upload_dataset(
        &self,
        request: Request<Streaming<pb::UploadDatasetRequest>>,
    ) -> std::result::Result<Response<pb::UploadDatasetResponse>, Status> {
        let mut stream = request.into_inner();
        let first = stream.message().await?.ok_or_else(|| {
            IngestError::invalid(
                "metadata",
                "the stream is empty: the first message must be metadata",
            )
        })?;
        let spec = match first.payload {
            Some(pb::upload_dataset_request::Payload::Metadata(spec)) => spec,
            _ => {
                return Err(
                    IngestError::invalid("metadata", "the first message must be metadata").into(),
                );
            }
        };
        let plan = settings::plan("metadata", &spec)?;
        tracing::info!(dataset = %spec.dataset_name, "upload started");
        let raw = self.receive(&spec, &mut stream).await?;
        let source = if spec.filename.is_empty() {
            "upload".to_owned()
        } else {
            spec.filename.clone()
        };
        let (dataset, version, reused) = self.ingest("metadata", &spec, plan, raw, source).await?;
        tracing::info!(dataset = %dataset.name, version = version.version.version, reused, "upload ingested");
        Ok(Response::new(pb::UploadDatasetResponse {
            dataset: Some(dataset),
            version: Some(version.version),
            reused,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn create_dataset_from_uri(
        &self,
        request: Request<pb::CreateDatasetFromUriRequest>,
    ) -> std::result::Result<Response<pb::CreateDatasetFromUriResponse>, Status> {
        let pb::CreateDatasetFromUriRequest { spec, uri } = request.into_inner();
        let spec = spec.ok_or_else(|| IngestError::invalid("spec", "required"))?;
        if uri.trim().is_empty() {
            return Err(IngestError::invalid("uri", "required").into());
        }
        let plan = settings::plan("spec", &spec)?;
        let expected_size = (spec.expected_size_bytes > 0).then_some(spec.expected_size_bytes);
        let expected_sha =
            (!spec.expected_sha256.is_empty()).then_some(spec.expected_sha256.as_str());
        let info = self
            .store
            .import_uri(uri.trim(), expected_size, expected_sha)
            .await
            .map_err(|e| match e {
                lmforge_store::StoreError::NotFound(what) => {
                    IngestError::invalid("uri", format!("no object at {what}"))
                }
                lmforge_store::StoreError::SizeMismatch { .. } => {
                    IngestError::invalid("spec.expected_size_bytes", e.to_string())
                }
                lmforge_store::StoreError::DigestMismatch { .. } => {
                    IngestError::invalid("spec.expected_sha256", e.to_string())
                }
                other => IngestError::from(other),
            })?;
        tokio::fs::create_dir_all(&self.work_dir)
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))?;
        let (file, path) = tempfile::NamedTempFile::new_in(&self.work_dir)
            .map_err(|e| IngestError::Storage(e.to_string()))?
            .into_parts();
        let mut file = tokio::fs::File::from_std(file);
        let (_, mut blob) = self
            .store
            .get_stream(&info.sha256, 0, 1 << 20)
            .await
            .map_err(IngestError::from)?;
        while let Some(chunk) = blob.next().await {
            let chunk = chunk.map_err(IngestError::from)?;
            file.write_all(&chunk)
                .await
                .map_err(|e| IngestError::Storage(e.to_string()))?;
        }
        file.flush()
            .await
            .map_err(|e| IngestError::Storage(e.to_string()))?;
        let raw = RawInput {
            path,
            sha256: info.sha256,
            size: info.size,
        };
        let mut plan = plan;
        if spec.filename.is_empty() {
            plan.settings.source_name = uri.rsplit('/').next().unwrap_or("input").to_owned();
        }
        let (dataset, version, reused) = self
            .ingest("spec", &spec, plan, raw, uri.trim().to_owned())
            .await?;
        Ok(Response::new(pb::CreateDatasetFromUriResponse {
            dataset: Some(dataset),
            version: Some(version.version),
            reused,
        }))
    }

    async fn get_dataset(
        &self,
        request: Request<pb::GetDatasetRequest>,
    ) -> std::result::Result<Response<pb::Dataset>, Status> {
        let name = request.into_inner().name;
        if name.trim().is_empty() {
            return Err(IngestError::invalid("name", "required").into());
        }
        Ok(Response::new(
            catalog::get_dataset(&self.pool, name.trim()).await?,
        ))
    }

    async fn list_datasets(
        &self,
        request: Request<pb::ListDatasetsRequest>,
    ) -> std::result::Result<Response<pb::ListDatasetsResponse>, Status> {
        let r = request.into_inner();
        let (limit, offset) = page("page_size", r.page_size, "page_token", &r.page_token)?;
        let (datasets, more) =
            catalog::list_datasets(&self.pool, &r.name_prefix, &r.tags, limit, offset).await?;
        Ok(Response::new(pb::ListDatasetsResponse {
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
            datasets,
        }))
    }

    async fn get_dataset_version(
        &self,
        request: Request<pb::GetDatasetVersionRequest>,
    ) -> std::result::Result<Response<pb::DatasetVersion>, Status> {
        let r = request.into_inner();
        let v = catalog::resolve_version(
            &self.pool,
            &r.dataset_version,
            "dataset_version",
            &self.artifact_uri(),
        )
        .await?;
        Ok(Response::new(v.version))
    }

    async fn list_dataset_versions(
        &self,
        request: Request<pb::ListDatasetVersionsRequest>,
    ) -> std::result::Result<Response<pb::ListDatasetVersionsResponse>, Status> {
        let r = request.into_inner();
        if r.dataset_name.trim().is_empty() {
            return Err(IngestError::invalid("dataset_name", "required").into());
        }
        let (limit, offset) = page("page_size", r.page_size, "page_token", &r.page_token)?;
        let statuses = r
            .statuses
            .iter()
            .map(|s| match pb::DatasetVersionStatus::try_from(*s) {
                Ok(pb::DatasetVersionStatus::Ready) => Ok("ready".to_owned()),
                Ok(pb::DatasetVersionStatus::Processing) => Ok("processing".to_owned()),
                Ok(pb::DatasetVersionStatus::Failed) => Ok("failed".to_owned()),
                _ => Err(IngestError::invalid(
                    "statuses",
                    format!("unknown status {s}"),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let (versions, more) = catalog::list_versions(
            &self.pool,
            r.dataset_name.trim(),
            &statuses,
            limit,
            offset,
            &self.artifact_uri(),
        )
        .await?;
        Ok(Response::new(pb::ListDatasetVersionsResponse {
            next_page_token: if more {
                (offset + limit).to_string()
            } else {
                String::new()
            },
            versions,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn download_dataset_version(
        &self,
        request: Request<pb::DownloadDatasetVersionRequest>,
    ) -> std::result::Result<Response<StreamOf<pb::DownloadDatasetVersionResponse>>, Status> {
        let request = request.into_inner();
        if request.dataset_version.trim().is_empty() {
            return Err(IngestError::invalid("dataset_version", "required").into());
        }
        // Validate and resolve before the stream starts, so errors are the call's status.
        catalog::resolve_version(
            &self.pool,
            &request.dataset_version,
            "dataset_version",
            &self.artifact_uri(),
        )
        .await?;
        if pb::DownloadMode::try_from(request.mode) == Ok(pb::DownloadMode::Raw)
            && request.split == 0
        {
            return Err(IngestError::invalid("split", "RAW mode needs one split").into());
        }
        let (tx, rx) = mpsc::channel(64);
        let api = self.clone();
        tokio::spawn(async move {
            if let Err(e) = api.download(request, tx.clone()).await {
                let _ = tx.send(Err(e.into())).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_dataset_report(
        &self,
        request: Request<pb::GetDatasetReportRequest>,
    ) -> std::result::Result<Response<pb::DatasetReport>, Status> {
        let r = request.into_inner();
        let v = catalog::resolve_version(
            &self.pool,
            &r.dataset_version,
            "dataset_version",
            &self.artifact_uri(),
        )
        .await?;
        Ok(Response::new(catalog::report(&v)?))
    }

    async fn delete_dataset(
        &self,
        request: Request<pb::DeleteDatasetRequest>,
    ) -> std::result::Result<Response<()>, Status> {
        let name = request.into_inner().name;
        settings::check_name("name", name.trim())?;
        let unused = catalog::delete_dataset(&self.pool, name.trim()).await?;
        for sha in unused {
            if let Err(e) = self.store.delete_blob(&sha).await {
                tracing::warn!(error = %e, sha256 = %sha, "could not delete an unused shard");
            }
        }
        Ok(Response::new(()))
    }
}
