//! The models a replica serves: loading registry versions (download, verify, load, quantize,
//! start an engine), a memory budget over all of them, and hot swaps when a followed alias
//! moves — the new version is loaded beside the old one, new requests go to it, and requests
//! already running finish on the old engine, which stops once the last of them is done.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use candle_core::{DType, Device};
use futures::StreamExt;
use lmforge_model::chat::ChatTemplate;
use lmforge_model::tokenizer::TextTokenizer;
use lmforge_model::{Model, hf, quant};
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use tokio::task::JoinHandle;
use tonic::Status;
use tonic::transport::Channel;

use crate::engine::constrain::Grammars;
use crate::engine::{self, EngineConfig, EngineHandle};
use crate::fetch::{self, FetchError};

/// How models are loaded on this replica.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// Where downloaded versions are kept, one directory per digest.
    pub cache_dir: PathBuf,
    /// Engine limits; `num_blocks` is replaced by `kv_cache_bytes / block bytes` unless
    /// `fixed_kv_blocks` is set.
    pub engine: EngineConfig,
    /// KV cache per model, in bytes.
    pub kv_cache_bytes: usize,
    /// Use `engine.num_blocks` as is.
    pub fixed_kv_blocks: bool,
    /// Weights plus KV cache of all loaded models must fit in this many bytes.
    pub memory_budget_bytes: u64,
    /// Compute dtype.
    pub dtype: DType,
}

/// A version being served: its engine, tokenizer and template.
#[derive(Debug)]
pub struct Served {
    pub model_ref: String,
    pub resolved: pb::ResolvedModel,
    pub engine: EngineHandle,
    pub tokenizer: Arc<TextTokenizer>,
    pub chat_template: Option<ChatTemplate>,
    pub context_length: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// The vocabulary for `response_format` grammars, or why this tokenizer has none.
    pub grammars: Result<Arc<Grammars>, String>,
    /// Ids of the tokenizer's special tokens.
    pub special_ids: std::collections::HashSet<u32>,
    /// Weights and KV cache, as counted against the memory budget.
    pub bytes: u64,
    pub quantization: pb::Quantization,
    pub format: pb::ModelFormat,
    pub dtype: DType,
    pub loaded_at: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Options {
    quantization: pb::Quantization,
    follow_alias: bool,
    max_context: usize,
}

#[derive(Debug)]
struct Entry {
    model_ref: String,
    options: Options,
    state: pb::LoadedModelState,
    current: Option<Arc<Served>>,
    error: Option<String>,
    /// Bytes reserved against the budget while loading.
    reserved: u64,
    watcher: Option<JoinHandle<()>>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if let Some(w) = self.watcher.take() {
            w.abort();
        }
    }
}

#[derive(Debug, Default)]
struct State {
    entries: Vec<Entry>,
    default: Option<String>,
}

/// Every model of the replica.
#[derive(Debug)]
pub struct ModelManager {
    registry: RegistryServiceClient<Channel>,
    settings: LoadSettings,
    state: Mutex<State>,
}

fn fetch_status(e: FetchError) -> Status {
    match e {
        FetchError::Registry(s) => s,
        other => Status::internal(other.to_string()),
    }
}

impl ModelManager {
    pub fn new(registry: RegistryServiceClient<Channel>, settings: LoadSettings) -> Arc<Self> {
        Arc::new(Self {
            registry,
            settings,
            state: Mutex::new(State::default()),
        })
    }

    /// Load `req.model_ref` and return once it serves (or failed).
    pub async fn load(
        self: &Arc<Self>,
        req: pb::LoadModelRequest,
    ) -> Result<pb::LoadedModel, Status> {
        let model_ref = req.model_ref.trim().to_string();
        if model_ref.is_empty() {
            return Err(Status::invalid_argument("model_ref: required"));
        }
        let quantization = pb::Quantization::try_from(req.quantization)
            .map_err(|_| Status::invalid_argument("quantization: unknown value"))?;
        let is_alias = model_ref.contains('@') && !model_ref.ends_with("@latest");
        if req.follow_alias == Some(true) && !is_alias {
            return Err(Status::invalid_argument(
                "follow_alias: only `name@alias` references can follow an alias",
            ));
        }
        let options = Options {
            quantization,
            follow_alias: req.follow_alias.unwrap_or(is_alias),
            max_context: req.max_context_length as usize,
        };
        {
            let mut st = self.state.lock().expect("models");
            if let Some(e) = st.entries.iter().find(|e| e.model_ref == model_ref) {
                match e.state {
                    pb::LoadedModelState::Ready | pb::LoadedModelState::Loading => {
                        if req.set_default {
                            st.default = Some(model_ref.clone());
                        }
                        return Ok(self.describe_locked(&st, &model_ref).expect("present"));
                    }
                    _ => st.entries.retain(|e| e.model_ref != model_ref),
                }
            }
            st.entries.push(Entry {
                model_ref: model_ref.clone(),
                options,
                state: pb::LoadedModelState::Loading,
                current: None,
                error: None,
                reserved: 0,
                watcher: None,
            });
            if req.set_default || st.default.is_none() {
                st.default = Some(model_ref.clone());
            }
        }
        let mut registry = self.registry.clone();
        let result = async {
            let (version, _alias) = fetch::resolve(&mut registry, &model_ref)
                .await
                .map_err(fetch_status)?;
            self.reserve(&model_ref, &version, options)?;
            self.load_version(&model_ref, &version, options).await
        }
        .await;
        let mut st = self.state.lock().expect("models");
        let result = result.and_then(|served| {
            self.check_budget(&st, &model_ref, &served)?;
            Ok(served)
        });
        let Some(entry) = st.entries.iter_mut().find(|e| e.model_ref == model_ref) else {
            return Err(Status::aborted("model_ref: unloaded while loading"));
        };
        entry.reserved = 0;
        match result {
            Ok(served) => {
                tracing::info!(model = %model_ref, version = served.resolved.version, "model ready");
                entry.current = Some(Arc::new(served));
                entry.state = pb::LoadedModelState::Ready;
                if options.follow_alias {
                    entry.watcher = Some(tokio::spawn(self.clone().follow(model_ref.clone())));
                }
                Ok(self.describe_locked(&st, &model_ref).expect("present"))
            }
            Err(status) => {
                tracing::warn!(model = %model_ref, error = %status.message(), "model load failed");
                entry.state = pb::LoadedModelState::Failed;
                entry.error = Some(status.message().to_string());
                Err(status)
            }
        }
    }

    /// Estimated bytes of `version` once loaded: its weight files (twice for f32 serving
    /// without q8_0, which adds a packed copy of the projections and LM head, or with AMX
    /// two packed copies in place of the float weights, 2.5× as a tied embedding stays too)
    /// plus the KV cache.
    fn estimate(&self, version: &pb::ModelVersion, options: Options) -> u64 {
        let weights: u64 = version
            .files
            .iter()
            .filter(|f| f.path.ends_with(".safetensors"))
            .map(|f| f.size_bytes)
            .sum();
        let weights =
            if options.quantization != pb::Quantization::Q80 && self.settings.dtype == DType::F32 {
                // With AMX a tied LM head keeps the embedding beside its two packed copies.
                if lmforge_model::amx::available() {
                    weights * 5 / 2
                } else {
                    weights * 2
                }
            } else {
                weights
            };
        // With a fixed block count the KV size is only known once config.json is read; the
        // exact figure is checked after loading.
        let kv = if self.settings.fixed_kv_blocks {
            0
        } else {
            self.settings.kv_cache_bytes as u64
        };
        weights + kv
    }

    /// After loading: refuse `served` when, with its exact size, the budget is exceeded.
    fn check_budget(&self, st: &State, model_ref: &str, served: &Served) -> Result<(), Status> {
        let used: u64 = st
            .entries
            .iter()
            .filter(|e| e.model_ref != model_ref)
            .map(|e| e.reserved + e.current.as_ref().map_or(0, |s| s.bytes))
            .sum();
        if used + served.bytes > self.settings.memory_budget_bytes {
            served.engine.shutdown();
            return Err(Status::resource_exhausted(format!(
                "model_ref: {model_ref} takes {} KiB (weights and KV cache); {} KiB of the {} KiB memory budget are in use",
                served.bytes >> 10,
                used >> 10,
                self.settings.memory_budget_bytes >> 10
            )));
        }
        Ok(())
    }

    /// Count `version` against the memory budget, or refuse it.
    fn reserve(
        &self,
        model_ref: &str,
        version: &pb::ModelVersion,
        options: Options,
    ) -> Result<(), Status> {
        let need = self.estimate(version, options);
        let mut st = self.state.lock().expect("models");
        let used: u64 = st
            .entries
            .iter()
            .map(|e| e.reserved + e.current.as_ref().map_or(0, |s| s.bytes))
            .sum();
        if used + need > self.settings.memory_budget_bytes {
            return Err(Status::resource_exhausted(format!(
                "model_ref: loading {model_ref} needs about {} MiB; {} MiB of the {} MiB memory budget are in use",
                need >> 20,
                used >> 20,
                self.settings.memory_budget_bytes >> 20
            )));
        }
        if let Some(e) = st.entries.iter_mut().find(|e| e.model_ref == model_ref) {
            e.reserved = need;
        }
        Ok(())
    }

    /// Download and load `version` and start its engine.
    async fn load_version(
        &self,
        model_ref: &str,
        version: &pb::ModelVersion,
        options: Options,
    ) -> Result<Served, Status> {
        let format =
            pb::ModelFormat::try_from(version.format).unwrap_or(pb::ModelFormat::Unspecified);
        if format != pb::ModelFormat::HfSafetensors {
            return Err(Status::failed_precondition(format!(
                "model_ref: {}/{} is stored as {}; this replica serves Hugging Face safetensors versions (merge adapters before serving)",
                version.model_name,
                version.version,
                format.as_str_name()
            )));
        }
        let mut registry = self.registry.clone();
        let dir = fetch::fetch(&mut registry, &self.settings.cache_dir, version)
            .await
            .map_err(fetch_status)?;
        let settings = self.settings.clone();
        let version = version.clone();
        let model_ref = model_ref.to_string();
        tokio::task::spawn_blocking(move || build(&dir, &version, &model_ref, options, &settings))
            .await
            .map_err(|e| Status::internal(format!("loading task failed: {e}")))?
    }

    /// Follow the alias of `model_ref`, swapping versions as it moves, until unloaded.
    async fn follow(self: Arc<Self>, model_ref: String) {
        let Some((name, alias)) = model_ref.split_once('@') else {
            return;
        };
        let mut registry = self.registry.clone();
        loop {
            let stream = registry
                .watch_alias(pb::WatchAliasRequest {
                    model_name: name.to_string(),
                    alias: alias.to_string(),
                })
                .await;
            if let Ok(stream) = stream {
                let mut stream = stream.into_inner();
                while let Some(Ok(msg)) = stream.next().await {
                    let Some(target) = msg.current else { continue };
                    let served = self.current(&model_ref);
                    if served.is_some_and(|s| s.resolved.version == target.version) {
                        continue;
                    }
                    if let Err(e) = self.swap(&model_ref, &target).await {
                        tracing::warn!(model = %model_ref, version = target.version, error = %e.message(), "alias moved but the new version could not be loaded; still serving the old one");
                    }
                }
            }
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        }
    }

    fn current(&self, model_ref: &str) -> Option<Arc<Served>> {
        let st = self.state.lock().expect("models");
        st.entries
            .iter()
            .find(|e| e.model_ref == model_ref)
            .and_then(|e| e.current.clone())
    }

    /// Load `target`'s version for `model_ref` and make it the one new requests get.
    async fn swap(&self, model_ref: &str, target: &pb::ModelAlias) -> Result<(), Status> {
        let mut registry = self.registry.clone();
        let (version, _) = fetch::resolve(
            &mut registry,
            &format!("{}/{}", target.model_name, target.version),
        )
        .await
        .map_err(fetch_status)?;
        let options = {
            let st = self.state.lock().expect("models");
            st.entries
                .iter()
                .find(|e| e.model_ref == model_ref)
                .map(|e| e.options)
                .ok_or_else(|| Status::not_found("model unloaded"))?
        };
        let mut served = self.load_version(model_ref, &version, options).await?;
        served.resolved.requested_ref = model_ref.to_string();
        let mut st = self.state.lock().expect("models");
        let entry = st
            .entries
            .iter_mut()
            .find(|e| e.model_ref == model_ref)
            .ok_or_else(|| Status::not_found("model unloaded"))?;
        let old = entry.current.replace(Arc::new(served));
        tracing::info!(
            model = %model_ref,
            from = old.as_ref().map(|o| o.resolved.version),
            to = version.version,
            "alias moved: swapped versions"
        );
        Ok(())
    }

    /// The served version for a request's `model` field: a loaded reference, `name/version`
    /// or `name` of a served version, or the default model when empty.
    pub fn get(&self, model: &str) -> Result<Arc<Served>, Status> {
        let st = self.state.lock().expect("models");
        let model = model.trim();
        let key = if model.is_empty() {
            st.default
                .clone()
                .ok_or_else(|| Status::not_found("model: no model is loaded on this replica"))?
        } else {
            model.to_string()
        };
        let ready = |e: &&Entry| e.state == pb::LoadedModelState::Ready;
        let found = st
            .entries
            .iter()
            .filter(ready)
            .find(|e| e.model_ref == key)
            .or_else(|| {
                st.entries.iter().filter(ready).find(|e| {
                    e.current.as_ref().is_some_and(|s| {
                        key == format!("{}/{}", s.resolved.name, s.resolved.version)
                            || key == s.resolved.name
                    })
                })
            });
        found.and_then(|e| e.current.clone()).ok_or_else(|| {
            Status::not_found(format!("model: `{key}` is not loaded on this replica"))
        })
    }

    /// Every entry, as ListModels reports it.
    pub fn list(&self) -> Vec<pb::LoadedModel> {
        let st = self.state.lock().expect("models");
        st.entries
            .iter()
            .filter_map(|e| self.describe_locked(&st, &e.model_ref))
            .collect()
    }

    /// Stop serving `model_ref`: with `drain`, running requests finish first; otherwise they
    /// end cancelled.
    pub fn unload(&self, model_ref: &str, drain: bool) -> Result<(), Status> {
        let mut st = self.state.lock().expect("models");
        let pos = st
            .entries
            .iter()
            .position(|e| e.model_ref == model_ref)
            .ok_or_else(|| Status::not_found(format!("model_ref: `{model_ref}` is not loaded")))?;
        let entry = st.entries.remove(pos);
        if !drain && let Some(s) = &entry.current {
            s.engine.shutdown();
        }
        if st.default.as_deref() == Some(model_ref) {
            st.default = st.entries.first().map(|e| e.model_ref.clone());
        }
        Ok(())
    }

    /// Stop every engine (service shutdown).
    pub fn shutdown(&self) {
        let mut st = self.state.lock().expect("models");
        for e in st.entries.drain(..) {
            if let Some(s) = &e.current {
                s.engine.shutdown();
            }
        }
    }

    fn describe_locked(&self, st: &State, model_ref: &str) -> Option<pb::LoadedModel> {
        let e = st.entries.iter().find(|e| e.model_ref == model_ref)?;
        let mut m = pb::LoadedModel {
            model_ref: e.model_ref.clone(),
            state: e.state as i32,
            follow_alias: e.options.follow_alias,
            is_default: st.default.as_deref() == Some(model_ref),
            error: e.error.as_ref().map(|msg| pb::Failure {
                code: "LOAD_FAILED".into(),
                message: msg.clone(),
                details: Default::default(),
            }),
            quantization: e.options.quantization as i32,
            device: "cpu".into(),
            ..Default::default()
        };
        if let Some(s) = &e.current {
            let stats = s.engine.stats();
            m.resolved = Some(s.resolved.clone());
            m.context_length = s.context_length as u32;
            m.quantization = s.quantization as i32;
            m.format = s.format as i32;
            m.dtype = dtype_name(s.dtype).into();
            m.loaded_at = Some(prost_types::Timestamp::from(s.loaded_at));
            m.running_requests = stats.running as u32;
            m.waiting_requests = stats.waiting as u32;
            m.kv_blocks_used = stats.kv_blocks_used as u32;
            m.kv_blocks_total = stats.kv_blocks_total as u32;
        }
        Some(m)
    }
}

pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        _ => "f32",
    }
}

/// EOS ids from `config.json`, `generation_config.json` and the tokenizer, deduplicated.
fn eos_ids(ckpt: &hf::HfCheckpoint, tok: &TextTokenizer) -> Vec<u32> {
    let mut ids = ckpt.config.eos_token_ids.clone();
    if let Some(g) = ckpt
        .generation_config
        .as_ref()
        .and_then(|g| g.get("eos_token_id"))
    {
        match g {
            serde_json::Value::Number(n) => ids.extend(n.as_u64().map(|v| v as u32)),
            serde_json::Value::Array(a) => {
                ids.extend(a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32))
            }
            _ => {}
        }
    }
    ids.extend(tok.eos_token_id());
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Load the checkpoint in `dir` and start its engine (blocking).
fn build(
    dir: &Path,
    version: &pb::ModelVersion,
    model_ref: &str,
    options: Options,
    settings: &LoadSettings,
) -> Result<Served, Status> {
    let bad = |e: lmforge_model::ModelError| {
        Status::failed_precondition(format!(
            "model_ref: {}/{} cannot be loaded: {e}",
            version.model_name, version.version
        ))
    };
    let ckpt = hf::load_checkpoint(dir, settings.dtype, &Device::Cpu).map_err(bad)?;
    let mut model = Model::new(&ckpt.config, &ckpt.weights).map_err(bad)?;
    if options.quantization == pb::Quantization::Q80 {
        quant::quantize_q8_0(&mut model).map_err(bad)?;
    } else {
        // Decode steps (and with AMX every step) multiply by packed copies of each projection
        // (libs/model `packed`, `amx`).
        model.pack_for_serving().map_err(bad)?;
    }
    // The float copies serving no longer reads go (those of q8_0 weights, and of packed ones
    // where the packed copies take every row); what stays is counted exactly: q8_0 and packed
    // copies, embeddings, norms, the float weights still multiplied.
    let mut bytes = quant::release_float_weights(&mut model).map_err(bad)?;
    let tokenizer = TextTokenizer::from_dir(dir).map_err(bad)?;
    let eos_token_ids = eos_ids(&ckpt, &tokenizer);
    let chat_template = if version.chat_template.is_empty() {
        ChatTemplate::from_tokenizer(&tokenizer)
    } else {
        Some(ChatTemplate::new(&version.chat_template, &tokenizer))
    };
    let mut context_length = ckpt.config.max_position_embeddings;
    if options.max_context > 0 {
        context_length = context_length.min(options.max_context);
    }
    let vocab_size = ckpt.config.vocab_size;
    drop(ckpt);
    let mut engine_config = settings.engine.clone();
    let block = engine::block_bytes(&model, engine_config.block_size);
    if !settings.fixed_kv_blocks {
        engine_config.num_blocks = (settings.kv_cache_bytes / block).max(1);
    }
    bytes += (engine_config.num_blocks * block) as u64;
    let special_ids = tokenizer
        .inner
        .get_added_tokens_decoder()
        .into_iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| id)
        .collect();
    let grammars =
        Grammars::new(&tokenizer, vocab_size, eos_token_ids.first().copied()).map(Arc::new);
    if let Err(e) = &grammars {
        tracing::warn!(model = model_ref, error = %e, "no constrained decoding for this model");
    }
    let tokenizer = Arc::new(tokenizer);
    let engine = engine::spawn(model, tokenizer.clone(), engine_config, model_ref)
        .map_err(|e| Status::internal(format!("engine thread: {e}")))?;
    Ok(Served {
        model_ref: model_ref.to_string(),
        resolved: pb::ResolvedModel {
            name: version.model_name.clone(),
            version: version.version,
            digest: version.digest.clone(),
            requested_ref: model_ref.to_string(),
        },
        engine,
        tokenizer,
        chat_template,
        context_length,
        vocab_size,
        eos_token_ids,
        grammars,
        special_ids,
        bytes,
        quantization: if options.quantization == pb::Quantization::Q80 {
            pb::Quantization::Q80
        } else {
            pb::Quantization::None
        },
        format: pb::ModelFormat::HfSafetensors,
        dtype: settings.dtype,
        loaded_at: SystemTime::now(),
    })
}
