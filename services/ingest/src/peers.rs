//! Calls to other services: the registry (a model's `tokenizer.json`, for token length
//! bounds) and inference (`Generate`, for paraphrase and back-translation).

use std::sync::Arc;

use futures::StreamExt;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use lmforge_proto::v1::registry_service_client::RegistryServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::augment::Rewriter;
use crate::error::{IngestError, Result};

/// Largest `tokenizer.json` accepted (real ones are a few MiB).
const MAX_TOKENIZER_BYTES: usize = 64 << 20;

/// Lazily connected clients of the peers.
#[derive(Debug, Clone)]
pub struct Peers {
    registry: Channel,
    inference: Channel,
}

fn unavailable(what: &str, status: &tonic::Status) -> IngestError {
    IngestError::Unavailable(format!(
        "{what} ({:?}: {})",
        status.code(),
        status.message()
    ))
}

impl Peers {
    /// Clients on the configured addresses (connected on first use).
    pub fn new(registry: Endpoint, inference: Endpoint) -> Self {
        Self {
            registry: registry.connect_lazy(),
            inference: inference.connect_lazy(),
        }
    }

    /// The tokenizer of a registered model (`name@alias`, `name/3`, `name`): resolves the
    /// reference and downloads the version's `tokenizer.json`. `field` names the request
    /// field holding the reference.
    pub async fn tokenizer(&self, model_ref: &str, field: &str) -> Result<tokenizers::Tokenizer> {
        let mut client = RegistryServiceClient::new(self.registry.clone());
        let resolved = client
            .resolve_model_ref(pb::ResolveModelRefRequest {
                model_ref: model_ref.to_owned(),
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound
                | tonic::Code::InvalidArgument
                | tonic::Code::FailedPrecondition => {
                    IngestError::invalid(field, format!("model `{model_ref}`: {}", s.message()))
                }
                _ => unavailable("the registry", &s),
            })?
            .into_inner();
        let version = resolved.version.ok_or_else(|| {
            IngestError::Unavailable("the registry (resolve answered no version)".into())
        })?;
        let mut stream = client
            .download_artifact(pb::DownloadArtifactRequest {
                model_name: version.model_name.clone(),
                version: version.version,
                path: "tokenizer.json".into(),
                offset: 0,
            })
            .await
            .map_err(|s| match s.code() {
                tonic::Code::NotFound => IngestError::invalid(
                    field,
                    format!("model `{model_ref}` has no tokenizer.json"),
                ),
                _ => unavailable("the registry", &s),
            })?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(message) = stream.next().await {
            let message = message.map_err(|s| unavailable("the registry", &s))?;
            if let Some(pb::download_artifact_response::Payload::Chunk(chunk)) = message.payload {
                bytes.extend_from_slice(&chunk.data);
                if bytes.len() > MAX_TOKENIZER_BYTES {
                    return Err(IngestError::invalid(
                        field,
                        "tokenizer.json is larger than 64 MiB",
                    ));
                }
            }
        }
        tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| {
            IngestError::invalid(
                field,
                format!("model `{model_ref}`: tokenizer.json does not load: {e}"),
            )
        })
    }

    /// A rewriter calling `Generate` on the inference service.
    pub fn rewriter(&self, config: &pb::ModelRewrite) -> Arc<dyn Rewriter> {
        let back_translation = config.mode == pb::RewriteMode::BackTranslation as i32;
        let template = if config.prompt_template.trim().is_empty() {
            if back_translation {
                "Translate the following text into {language}. Reply with the translation only.\n\n{text}".to_owned()
            } else {
                "Paraphrase the following text, keeping its meaning and language. Reply with the paraphrase only.\n\n{text}".to_owned()
            }
        } else {
            config.prompt_template.clone()
        };
        let sampling = config.sampling.clone().unwrap_or(pb::SamplingParams {
            temperature: Some(0.7),
            max_tokens: Some(512),
            ..Default::default()
        });
        Arc::new(InferenceRewriter {
            client: InferenceServiceClient::new(self.inference.clone()),
            model: config.model.clone(),
            template,
            pivot: config.pivot_language.clone(),
            back_translation,
            sampling,
            runtime: tokio::runtime::Handle::current(),
        })
    }
}

/// Rewrites through `InferenceService.Generate` (blocking: called from the pipeline thread).
#[derive(Debug)]
struct InferenceRewriter {
    client: InferenceServiceClient<Channel>,
    model: String,
    template: String,
    pivot: String,
    back_translation: bool,
    sampling: pb::SamplingParams,
    runtime: tokio::runtime::Handle,
}

fn is_mostly_cjk(text: &str) -> bool {
    let cjk = text
        .chars()
        .filter(|c| ('\u{4E00}'..='\u{9FFF}').contains(c))
        .count();
    cjk * 2 > text.chars().filter(|c| !c.is_whitespace()).count()
}

impl InferenceRewriter {
    fn generate(&self, prompt: String) -> std::result::Result<String, String> {
        let mut client = self.client.clone();
        let request = pb::GenerateRequest {
            model: self.model.clone(),
            input: Some(pb::generate_request::Input::Chat(pb::ChatInput {
                messages: vec![pb::ChatMessage {
                    role: pb::ChatRole::User as i32,
                    content: prompt,
                    name: None,
                }],
                add_generation_prompt: Some(true),
                chat_template: String::new(),
            })),
            sampling: Some(self.sampling.clone()),
            ..Default::default()
        };
        let response = self
            .runtime
            .block_on(client.generate(request))
            .map_err(|s| format!("model `{}`: {:?}: {}", self.model, s.code(), s.message()))?
            .into_inner();
        response
            .choices
            .into_iter()
            .next()
            .map(|c| c.text.trim().to_owned())
            .ok_or_else(|| format!("model `{}` returned no choice", self.model))
    }
}

impl Rewriter for InferenceRewriter {
    fn rewrite(&self, text: &str) -> std::result::Result<String, String> {
        if !self.back_translation {
            return self.generate(
                self.template
                    .replace("{text}", text)
                    .replace("{language}", ""),
            );
        }
        let source = if is_mostly_cjk(text) { "zh" } else { "en" };
        let pivot = if self.pivot.is_empty() {
            if source == "zh" { "en" } else { "zh" }
        } else {
            self.pivot.as_str()
        };
        let there = self.generate(
            self.template
                .replace("{language}", pivot)
                .replace("{text}", text),
        )?;
        self.generate(
            self.template
                .replace("{language}", source)
                .replace("{text}", &there),
        )
    }
}
