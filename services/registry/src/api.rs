//! `lmforge.v1.RegistryService`: validates each request, converts it into domain calls and
//! converts the answers back. Domain modules never see tonic types.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_server::RegistryService;
use lmforge_store::ArtifactStore;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status, Streaming};

use crate::aliases::{self, AliasMove, AliasWatcher};
use crate::catalog;
use crate::convert;
use crate::domain::{FileEntry, NewVersion};
use crate::error::RegistryError;
use crate::names::{parse_model_ref, validate_alias, validate_artifact_path, validate_model_name};

/// Largest chunk sent in a download message (gRPC's default message limit is 4 MiB).
const DOWNLOAD_CHUNK: usize = 1024 * 1024;

type StreamOf<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The registry's gRPC API over its Postgres schema and the artifact store.
#[derive(Debug, Clone)]
pub struct RegistryApi {
    pool: PgPool,
    store: ArtifactStore,
    schema: String,
    watcher: AliasWatcher,
    cache: crate::cache::ResolveCache,
}

impl RegistryApi {
    /// An API over `pool` (scoped to `schema`) and `store`.
    pub fn new(
        pool: PgPool,
        store: ArtifactStore,
        schema: String,
        watcher: AliasWatcher,
        cache: crate::cache::ResolveCache,
    ) -> Self {
        Self {
            pool,
            store,
            schema,
            watcher,
            cache,
        }
    }

    /// After a change that may alter resolutions: clear this replica's cache now and tell
    /// the others.
    async fn changed(&self) {
        self.cache.invalidate();
        aliases::announce_change(&self.pool, &self.schema).await;
    }
}

fn version_number(field: &'static str, version: u32) -> Result<u32, RegistryError> {
    if version == 0 {
        Err(RegistryError::invalid(field, "versions start at 1"))
    } else {
        Ok(version)
    }
}

#[tonic::async_trait]
impl RegistryService for RegistryApi {
    #[tracing::instrument(skip_all, fields(model = %request.get_ref().name))]
    async fn create_model(
        &self,
        request: Request<pb::CreateModelRequest>,
    ) -> Result<Response<pb::RegisteredModel>, Status> {
        let pb::CreateModelRequest {
            name,
            description,
            tags,
        } = request.into_inner();
        validate_model_name("name", &name)?;
        let model =
            catalog::create_model(&self.pool, &name, &description, &convert::tags(tags)).await?;
        Ok(Response::new(convert::model(model)))
    }

    async fn get_model(
        &self,
        request: Request<pb::GetModelRequest>,
    ) -> Result<Response<pb::RegisteredModel>, Status> {
        let pb::GetModelRequest { name } = request.into_inner();
        validate_model_name("name", &name)?;
        Ok(Response::new(convert::model(
            catalog::get_model(&self.pool, &name).await?,
        )))
    }

    async fn list_models(
        &self,
        request: Request<pb::ListRegisteredModelsRequest>,
    ) -> Result<Response<pb::ListRegisteredModelsResponse>, Status> {
        let pb::ListRegisteredModelsRequest {
            page_size,
            page_token,
            filter,
            order_by,
        } = request.into_inner();
        let (limit, offset) = convert::page(page_size, &page_token)?;
        let clauses = crate::search::parse(&filter)?;
        crate::search::check_model_keys(&clauses)?;
        let mut parts = order_by.split_whitespace();
        let column = parts.next().unwrap_or("name");
        if !matches!(column, "name" | "created_at" | "updated_at") {
            return Err(RegistryError::invalid(
                "order_by",
                format!("`{column}`: use name, created_at or updated_at"),
            )
            .into());
        }
        let descending = match parts.next().map(str::to_ascii_uppercase).as_deref() {
            None | Some("ASC") => false,
            Some("DESC") => true,
            Some(other) => {
                return Err(RegistryError::invalid(
                    "order_by",
                    format!("`{other}`: expected ASC or DESC"),
                )
                .into());
            }
        };
        let (models, more) =
            catalog::list_models(&self.pool, &clauses, (column, descending), limit, offset).await?;
        Ok(Response::new(pb::ListRegisteredModelsResponse {
            models: models.into_iter().map(convert::model).collect(),
            next_page_token: convert::next_token(more, limit, offset),
        }))
    }

    async fn update_model(
        &self,
        request: Request<pb::UpdateModelRequest>,
    ) -> Result<Response<pb::RegisteredModel>, Status> {
        let pb::UpdateModelRequest {
            name,
            description,
            set_tags,
            delete_tags,
        } = request.into_inner();
        validate_model_name("name", &name)?;
        let model = catalog::update_model(
            &self.pool,
            &name,
            description.as_deref(),
            &convert::tags(set_tags),
            &delete_tags,
        )
        .await?;
        Ok(Response::new(convert::model(model)))
    }

    async fn delete_model(
        &self,
        request: Request<pb::DeleteModelRequest>,
    ) -> Result<Response<()>, Status> {
        let pb::DeleteModelRequest { name } = request.into_inner();
        validate_model_name("name", &name)?;
        catalog::delete_model(&self.pool, &name).await?;
        self.changed().await;
        Ok(Response::new(()))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_name))]
    async fn create_model_version(
        &self,
        request: Request<pb::CreateModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let pb::CreateModelVersionRequest {
            model_name,
            create_model_if_missing,
            client_request_id,
            format,
            lineage,
            hyperparameters,
            metrics,
            chat_template,
            architecture,
            context_length,
            description,
            tags,
            created_by,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        if client_request_id.len() > 256 {
            return Err(RegistryError::invalid(
                "client_request_id",
                "must be at most 256 characters",
            )
            .into());
        }
        let format = convert::format_name("format", format)?;
        let lineage = lineage.unwrap_or_default();
        let as_ref = |pin: Option<pb::ResolvedModel>| {
            pin.map(|p| {
                if p.requested_ref.is_empty() {
                    format!("{}/{}", p.name, p.version)
                } else {
                    p.requested_ref
                }
            })
        };
        if let Some((key, value)) = metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(RegistryError::invalid(
                "metrics",
                format!("`{key}` is {value}; metrics must be finite"),
            )
            .into());
        }
        let new = NewVersion {
            model_name: model_name.clone(),
            create_model_if_missing,
            client_request_id,
            format: format.to_owned(),
            base_model_ref: as_ref(lineage.base_model_version),
            parent_ref: as_ref(lineage.parent_version),
            dataset_version_id: lineage.dataset_version_id,
            training_job_id: lineage.training_job_id,
            hyperparameters: hyperparameters
                .as_ref()
                .map_or_else(|| serde_json::json!({}), convert::struct_to_json),
            metrics: metrics.into_iter().collect(),
            chat_template,
            architecture,
            context_length,
            description,
            tags: convert::tags(tags),
            created_by,
        };
        if format == "peft-lora" && new.parent_ref.is_none() {
            return Err(RegistryError::invalid(
                "lineage.parent_version",
                "a PEFT_LORA adapter needs the version of its base weights",
            )
            .into());
        }
        let version = catalog::create_version(&self.pool, &new).await?;
        Ok(Response::new(convert::version(version, &self.store)))
    }

    async fn upload_artifact(
        &self,
        request: Request<Streaming<pb::UploadArtifactRequest>>,
    ) -> Result<Response<pb::ArtifactFile>, Status> {
        let mut messages = request.into_inner();
        let first = messages
            .message()
            .await?
            .ok_or_else(|| RegistryError::invalid("metadata", "the stream is empty"))?;
        let Some(pb::upload_artifact_request::Payload::Metadata(metadata)) = first.payload else {
            return Err(RegistryError::invalid(
                "metadata",
                "the first message must carry metadata",
            )
            .into());
        };
        let pb::UploadArtifactMetadata {
            model_name,
            version,
            path,
            size_bytes,
            sha256,
            content_type,
        } = metadata;
        validate_model_name("metadata.model_name", &model_name)?;
        version_number("metadata.version", version)?;
        validate_artifact_path("metadata.path", &path)?;
        let expected_sha = (!sha256.is_empty()).then_some(sha256.as_str());
        if let Some(sha) = expected_sha {
            lmforge_store::validate_sha256(sha)
                .map_err(|e| RegistryError::invalid("metadata.sha256", e.to_string()))?;
        }
        // Refuse early (before streaming gigabytes) when the version cannot take files.
        let target = catalog::get_version(&self.pool, &model_name, version).await?;
        if target.status != crate::domain::VersionStatus::Pending {
            return Err(RegistryError::FailedPrecondition(format!(
                "version `{model_name}/{version}` is not PENDING"
            ))
            .into());
        }
        let chunks = messages.map(|message| match message {
            Ok(pb::UploadArtifactRequest {
                payload: Some(pb::upload_artifact_request::Payload::Chunk(bytes)),
            }) => Ok(bytes::Bytes::from(bytes)),
            Ok(_) => Err("every message after the first must be a chunk".to_owned()),
            Err(status) => Err(status.message().to_owned()),
        });
        let blob = self
            .store
            .put_stream(Box::pin(chunks), Some(size_bytes), expected_sha)
            .await
            .map_err(RegistryError::from)?;
        let entry = FileEntry {
            path,
            size_bytes: blob.size,
            sha256: blob.sha256,
            content_type,
        };
        catalog::add_file(&self.pool, &model_name, version, &entry).await?;
        Ok(Response::new(convert::file(entry)))
    }

    async fn register_artifact_uri(
        &self,
        request: Request<pb::RegisterArtifactUriRequest>,
    ) -> Result<Response<pb::ArtifactFile>, Status> {
        let pb::RegisterArtifactUriRequest {
            model_name,
            version,
            path,
            uri,
            expected_sha256,
            expected_size_bytes,
            copy: _,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        validate_artifact_path("path", &path)?;
        if uri.is_empty() {
            return Err(RegistryError::invalid("uri", "required").into());
        }
        let expected_sha = (!expected_sha256.is_empty()).then_some(expected_sha256.as_str());
        let expected_size = (expected_size_bytes > 0).then_some(expected_size_bytes);
        let blob = self
            .store
            .import_uri(&uri, expected_size, expected_sha)
            .await
            .map_err(RegistryError::from)?;
        let entry = FileEntry {
            path,
            size_bytes: blob.size,
            sha256: blob.sha256,
            content_type: String::new(),
        };
        catalog::add_file(&self.pool, &model_name, version, &entry).await?;
        Ok(Response::new(convert::file(entry)))
    }

    async fn finalize_model_version(
        &self,
        request: Request<pb::FinalizeModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let pb::FinalizeModelVersionRequest {
            model_name,
            version,
            failure_message,
            expected_digest,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        let finalized = catalog::finalize(
            &self.pool,
            &model_name,
            version,
            failure_message.as_deref(),
            &expected_digest,
        )
        .await?;
        self.changed().await;
        Ok(Response::new(convert::version(finalized, &self.store)))
    }

    async fn get_model_version(
        &self,
        request: Request<pb::GetModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let pb::GetModelVersionRequest {
            model_name,
            version,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        let found = catalog::get_version(&self.pool, &model_name, version).await?;
        Ok(Response::new(convert::version(found, &self.store)))
    }

    async fn list_model_versions(
        &self,
        request: Request<pb::ListModelVersionsRequest>,
    ) -> Result<Response<pb::ListModelVersionsResponse>, Status> {
        let pb::ListModelVersionsRequest {
            model_name,
            page_size,
            page_token,
            statuses,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        let (limit, offset) = convert::page(page_size, &page_token)?;
        let wanted = convert::statuses("statuses", statuses)?;
        let (versions, more) =
            catalog::list_versions(&self.pool, &model_name, &wanted, limit, offset).await?;
        Ok(Response::new(pb::ListModelVersionsResponse {
            versions: convert::versions(versions, &self.store),
            next_page_token: convert::next_token(more, limit, offset),
        }))
    }

    async fn download_artifact(
        &self,
        request: Request<pb::DownloadArtifactRequest>,
    ) -> Result<Response<StreamOf<pb::DownloadArtifactResponse>>, Status> {
        let pb::DownloadArtifactRequest {
            model_name,
            version,
            path,
            offset,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        validate_artifact_path("path", &path)?;
        let entry = catalog::file(&self.pool, &model_name, version, &path).await?;
        let (total, chunks) = self
            .store
            .get_stream(&entry.sha256, offset, DOWNLOAD_CHUNK)
            .await
            .map_err(RegistryError::from)?;
        let expected = entry.sha256.clone();
        // From offset 0 the server re-hashes what it sends, so corruption at rest ends the
        // stream with DATA_LOSS instead of a summary that would contradict the bytes.
        let verify = offset == 0;
        Ok(Response::new(download_stream(
            chunks, offset, total, expected, verify,
        )))
    }

    async fn search_model_versions(
        &self,
        request: Request<pb::SearchModelVersionsRequest>,
    ) -> Result<Response<pb::SearchModelVersionsResponse>, Status> {
        let pb::SearchModelVersionsRequest {
            filter,
            statuses,
            created,
            order_by,
            page_size,
            page_token,
        } = request.into_inner();
        let clauses = crate::search::parse(&filter)?;
        let order = crate::search::parse_order(&order_by)?;
        let (limit, offset) = convert::page(page_size, &page_token)?;
        let wanted = convert::statuses("statuses", statuses)?;
        let time = |t: Option<prost_types::Timestamp>, field: &'static str| {
            t.map(|t| {
                chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
                    .ok_or_else(|| RegistryError::invalid(field, "out of range"))
            })
            .transpose()
        };
        let created = created.unwrap_or_default();
        let range = (
            time(created.start, "created.start")?,
            time(created.end, "created.end")?,
        );
        let (versions, more) =
            catalog::search_versions(&self.pool, &clauses, &wanted, range, &order, limit, offset)
                .await?;
        Ok(Response::new(pb::SearchModelVersionsResponse {
            versions: convert::versions(versions, &self.store),
            next_page_token: convert::next_token(more, limit, offset),
        }))
    }

    async fn update_model_version(
        &self,
        request: Request<pb::UpdateModelVersionRequest>,
    ) -> Result<Response<pb::ModelVersion>, Status> {
        let pb::UpdateModelVersionRequest {
            model_name,
            version,
            description,
            set_tags,
            delete_tags,
            set_metrics,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        if let Some((key, value)) = set_metrics.iter().find(|(_, v)| !v.is_finite()) {
            return Err(RegistryError::invalid(
                "set_metrics",
                format!("`{key}` is {value}; metrics must be finite"),
            )
            .into());
        }
        let updated = catalog::update_version(
            &self.pool,
            &model_name,
            version,
            description.as_deref(),
            &convert::tags(set_tags),
            &delete_tags,
            &set_metrics.into_iter().collect(),
        )
        .await?;
        self.changed().await;
        Ok(Response::new(convert::version(updated, &self.store)))
    }

    async fn delete_model_version(
        &self,
        request: Request<pb::DeleteModelVersionRequest>,
    ) -> Result<Response<()>, Status> {
        let pb::DeleteModelVersionRequest {
            model_name,
            version,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        version_number("version", version)?;
        catalog::delete_version(&self.pool, &model_name, version).await?;
        self.changed().await;
        Ok(Response::new(()))
    }

    async fn resolve_model_ref(
        &self,
        request: Request<pb::ResolveModelRefRequest>,
    ) -> Result<Response<pb::ResolveModelRefResponse>, Status> {
        let pb::ResolveModelRefRequest { model_ref } = request.into_inner();
        let reference = parse_model_ref("model_ref", &model_ref)?;
        let key = model_ref.trim();
        let (version, alias) = match self.cache.get(key) {
            Some(hit) => hit,
            None => {
                let generation = self.cache.generation();
                let resolved = catalog::resolve(&self.pool, &reference).await?;
                self.cache.insert(generation, key, resolved.clone());
                resolved
            }
        };
        Ok(Response::new(pb::ResolveModelRefResponse {
            version: Some(convert::version(version, &self.store)),
            alias: alias.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model = %request.get_ref().model_name, alias = %request.get_ref().alias))]
    async fn set_alias(
        &self,
        request: Request<pb::SetAliasRequest>,
    ) -> Result<Response<pb::SetAliasResponse>, Status> {
        let pb::SetAliasRequest {
            model_name,
            alias,
            version,
            expected_current_version,
            actor,
            reason,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        validate_alias("alias", &alias)?;
        version_number("version", version)?;
        let change = AliasMove {
            model: &model_name,
            alias: &alias,
            to_version: Some(version),
            expected_current: expected_current_version,
            actor: &actor,
            reason: &reason,
        };
        let (moved, previous) = aliases::apply(&self.pool, &self.schema, &change).await?;
        // Other replicas learn of the move through its notification.
        self.cache.invalidate();
        Ok(Response::new(pb::SetAliasResponse {
            alias: moved.map(convert::alias),
            previous_version: previous,
        }))
    }

    async fn delete_alias(
        &self,
        request: Request<pb::DeleteAliasRequest>,
    ) -> Result<Response<()>, Status> {
        let pb::DeleteAliasRequest {
            model_name,
            alias,
            expected_current_version,
            actor,
            reason,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        validate_alias("alias", &alias)?;
        let change = AliasMove {
            model: &model_name,
            alias: &alias,
            to_version: None,
            expected_current: expected_current_version,
            actor: &actor,
            reason: &reason,
        };
        aliases::apply(&self.pool, &self.schema, &change).await?;
        self.cache.invalidate();
        Ok(Response::new(()))
    }

    async fn list_aliases(
        &self,
        request: Request<pb::ListAliasesRequest>,
    ) -> Result<Response<pb::ListAliasesResponse>, Status> {
        let pb::ListAliasesRequest {
            model_name,
            page_size,
            page_token,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        let (limit, offset) = convert::page(page_size, &page_token)?;
        let all = aliases::list(&self.pool, &model_name, None).await?;
        let more = all.len() as i64 > offset + limit;
        Ok(Response::new(pb::ListAliasesResponse {
            aliases: all
                .into_iter()
                .skip(offset as usize)
                .take(limit as usize)
                .map(convert::alias)
                .collect(),
            next_page_token: convert::next_token(more, limit, offset),
        }))
    }

    async fn get_alias_history(
        &self,
        request: Request<pb::GetAliasHistoryRequest>,
    ) -> Result<Response<pb::GetAliasHistoryResponse>, Status> {
        let pb::GetAliasHistoryRequest {
            model_name,
            alias,
            page_size,
            page_token,
        } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        if !alias.is_empty() {
            validate_alias("alias", &alias)?;
        }
        let (limit, offset) = convert::page(page_size, &page_token)?;
        let (events, more) =
            aliases::history(&self.pool, &model_name, &alias, limit, offset).await?;
        Ok(Response::new(pb::GetAliasHistoryResponse {
            events: events.into_iter().map(convert::event).collect(),
            next_page_token: convert::next_token(more, limit, offset),
        }))
    }

    async fn watch_alias(
        &self,
        request: Request<pb::WatchAliasRequest>,
    ) -> Result<Response<StreamOf<pb::WatchAliasResponse>>, Status> {
        let pb::WatchAliasRequest { model_name, alias } = request.into_inner();
        validate_model_name("model_name", &model_name)?;
        validate_alias("alias", &alias)?;
        // Subscribe before reading the current value so that no move falls in between.
        let moves = self.watcher.subscribe();
        let current = match aliases::get(&self.pool, &model_name, &alias).await {
            Ok(found) => Some(convert::alias(found)),
            Err(RegistryError::NotFound(what)) if what.starts_with("alias") => None,
            Err(other) => return Err(other.into()),
        };
        Ok(Response::new(watch_stream(
            self.pool.clone(),
            model_name,
            alias,
            current,
            moves,
        )))
    }
}

/// Streams a blob as chunks with their offsets, then a summary; from offset 0 it re-hashes
/// and ends with DATA_LOSS if the stored bytes no longer match their digest.
fn download_stream(
    mut chunks: futures::stream::BoxStream<
        'static,
        Result<bytes::Bytes, lmforge_store::StoreError>,
    >,
    offset: u64,
    total: u64,
    expected: String,
    verify: bool,
) -> StreamOf<pb::DownloadArtifactResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        let mut hasher = Sha256::new();
        let mut position = offset;
        while let Some(chunk) = chunks.next().await {
            let data = match chunk {
                Ok(data) => data,
                Err(error) => {
                    let _ = tx.send(Err(Status::from(RegistryError::from(error)))).await;
                    return;
                }
            };
            if verify {
                hasher.update(&data);
            }
            let length = data.len() as u64;
            let message = pb::DownloadArtifactResponse {
                payload: Some(pb::download_artifact_response::Payload::Chunk(
                    pb::ByteChunk {
                        data: data.to_vec(),
                        offset: position,
                    },
                )),
            };
            if tx.send(Ok(message)).await.is_err() {
                return; // the client went away
            }
            position += length;
        }
        if verify {
            let actual = hex::encode(hasher.finalize());
            if actual != expected {
                tracing::error!(%expected, %actual, "stored artifact does not match its digest");
                let _ = tx
                    .send(Err(Status::data_loss("the stored artifact is corrupted")))
                    .await;
                return;
            }
        }
        let summary = pb::DownloadArtifactResponse {
            payload: Some(pb::download_artifact_response::Payload::Summary(
                pb::TransferSummary {
                    total_size_bytes: total,
                    sha256: expected,
                },
            )),
        };
        let _ = tx.send(Ok(summary)).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// The current value of an alias, then one message per move of it, until the client leaves.
fn watch_stream(
    pool: PgPool,
    model: String,
    alias: String,
    current: Option<pb::ModelAlias>,
    mut moves: broadcast::Receiver<crate::domain::AliasEvent>,
) -> StreamOf<pb::WatchAliasResponse> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    // The move the snapshot already shows can still arrive from the notification channel
    // (it was committed just before the watch subscribed): it is not news, so it is skipped.
    let shown = current
        .as_ref()
        .and_then(|c| c.updated_at.map(|t| (c.version, (t.seconds, t.nanos))));
    tokio::spawn(async move {
        let initial = pb::WatchAliasResponse {
            current,
            initial: true,
            event: None,
        };
        if tx.send(Ok(initial)).await.is_err() {
            return;
        }
        loop {
            let received = tokio::select! {
                received = moves.recv() => received,
                () = tx.closed() => return,
            };
            let event = match received {
                Ok(event) if event.model_name == model && event.alias == alias => {
                    let at = (
                        event.at.timestamp(),
                        event.at.timestamp_subsec_nanos() as i32,
                    );
                    if shown.is_some_and(|(v, t)| event.to_version == Some(v) && at <= t) {
                        continue;
                    }
                    Some(event)
                }
                Ok(_) => continue,
                // Missed some moves: send the current value so the watcher resynchronises.
                Err(broadcast::error::RecvError::Lagged(_)) => None,
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let current = match aliases::get(&pool, &model, &alias).await {
                Ok(found) => Some(convert::alias(found)),
                Err(RegistryError::NotFound(_)) => None,
                Err(error) => {
                    let _ = tx.send(Err(Status::from(error))).await;
                    return;
                }
            };
            let message = pb::WatchAliasResponse {
                current,
                initial: false,
                event: event.map(convert::event),
            };
            if tx.send(Ok(message)).await.is_err() {
                return;
            }
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
