//! A finished run into the registry: a new version of the output model with its full lineage
//! (base version, dataset version, job), hyperparameters, metrics and chat template; then the
//! requested alias moves to it only if its eval loss beats the alias's current version.

use std::sync::Arc;

use lmforge_proto::v1 as pb;
use prost_types::value::Kind;

use crate::run::RunResult;
use crate::worker::{Failure, Worker};

fn number(v: f64) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::NumberValue(v)),
    }
}

fn text(v: impl Into<String>) -> prost_types::Value {
    prost_types::Value {
        kind: Some(Kind::StringValue(v.into())),
    }
}

/// The hyperparameters as applied (JSON object in the registry).
pub fn hyperparameters(spec: &pb::JobSpec) -> prost_types::Struct {
    use pb::hyperparameters::{TrainingLength, Warmup};
    let mut fields = std::collections::BTreeMap::new();
    let h = spec.hyperparameters.unwrap_or_default();
    let mut put = |k: &str, v: prost_types::Value| {
        fields.insert(k.to_owned(), v);
    };
    if let Some(v) = h.learning_rate {
        put("learning_rate", number(v));
    }
    let schedule = pb::LrSchedule::try_from(h.schedule).unwrap_or(pb::LrSchedule::Cosine);
    put(
        "schedule",
        text(
            schedule
                .as_str_name()
                .trim_start_matches("LR_SCHEDULE_")
                .to_lowercase(),
        ),
    );
    match h.warmup {
        Some(Warmup::WarmupSteps(s)) => put("warmup_steps", number(f64::from(s))),
        Some(Warmup::WarmupRatio(r)) => put("warmup_ratio", number(r)),
        None => {}
    }
    match h.training_length {
        Some(TrainingLength::Epochs(e)) => put("epochs", number(f64::from(e))),
        Some(TrainingLength::MaxSteps(s)) => put("max_steps", number(s as f64)),
        None => {}
    }
    for (k, v) in [
        ("batch_size", h.batch_size.map(f64::from)),
        (
            "gradient_accumulation_steps",
            h.gradient_accumulation_steps.map(f64::from),
        ),
        ("max_seq_len", h.max_seq_len.map(f64::from)),
        ("weight_decay", h.weight_decay),
        ("dropout", h.dropout.map(f64::from)),
        ("max_grad_norm", h.max_grad_norm),
        ("seed", h.seed.map(|s| s as f64)),
    ] {
        if let Some(v) = v {
            put(k, number(v));
        }
    }
    match &spec.method {
        Some(pb::job_spec::Method::Lora(l)) => {
            put("method", text("lora"));
            if let Some(r) = l.rank {
                put("lora_rank", number(f64::from(r)));
            }
            if let Some(a) = l.alpha {
                put("lora_alpha", number(f64::from(a)));
            }
            if let Some(d) = l.dropout {
                put("lora_dropout", number(f64::from(d)));
            }
            put("lora_target_modules", text(l.target_modules.join(",")));
        }
        _ => put("method", text("full")),
    }
    prost_types::Struct {
        fields: fields.into_iter().collect(),
    }
}

fn registry_failure(what: &str, error: impl std::fmt::Display) -> Failure {
    Failure {
        code: "REGISTRY_ERROR",
        message: format!("{what}: {error}"),
        retryable: true,
    }
}

/// Registers the run's output and moves the alias when it is better.
pub async fn register(
    worker: &Worker,
    job: &pb::Job,
    result: &RunResult,
) -> Result<pb::WorkerSucceeded, Failure> {
    let spec = job.spec.clone().unwrap_or_default();
    let mut registry = worker.registry.clone();
    let adapter = result.format == pb::ModelFormat::PeftLora;
    // An adapter needs the weights it applies to: the base model (itself merged from its own
    // parent when the base was an adapter, so the parent of the new adapter is that parent).
    let parent = if adapter {
        match &job.resolved_base_model {
            Some(base) => {
                let version = registry
                    .get_model_version(pb::GetModelVersionRequest {
                        model_name: base.name.clone(),
                        version: base.version,
                    })
                    .await
                    .map_err(|s| registry_failure("base version", s.message()))?
                    .into_inner();
                if version.format == pb::ModelFormat::PeftLora as i32 {
                    version.lineage.and_then(|l| l.parent_version)
                } else {
                    Some(base.clone())
                }
            }
            None => None,
        }
    } else {
        None
    };
    let request = pb::CreateModelVersionRequest {
        model_name: spec.output_model_name.clone(),
        create_model_if_missing: true,
        client_request_id: format!("job:{}", job.id),
        format: result.format as i32,
        lineage: Some(pb::Lineage {
            base_model_version: job.resolved_base_model.clone(),
            dataset_version_id: job.resolved_dataset_version_id.clone(),
            training_job_id: job.id.clone(),
            parent_version: parent,
        }),
        hyperparameters: Some(hyperparameters(&spec)),
        metrics: result
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        description: spec.description.clone(),
        tags: spec.output_tags.clone(),
        created_by: format!("job:{}", job.id),
        ..Default::default()
    };
    let version = lmforge_registry_client::upload::register_dir(
        &mut registry,
        &result.output_dir,
        request,
        Arc::new(|_: &str, _: u64, _: u64| {}),
    )
    .await
    .map_err(|e| registry_failure("registering the result", e))?;
    let resolved = pb::ResolvedModel {
        name: version.model_name.clone(),
        version: version.version,
        digest: version.digest.clone(),
        requested_ref: String::new(),
    };
    let alias_note = if spec.output_alias.is_empty() {
        String::new()
    } else {
        move_alias(
            &mut registry,
            job,
            &spec.output_alias,
            &version,
            result.best_eval_loss,
        )
        .await?
    };
    Ok(pb::WorkerSucceeded {
        result_model_version: Some(resolved),
        metrics: result
            .metrics
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        trained_tokens: result.trained_tokens,
        alias_note,
    })
}

/// Moves `alias` to `version` when it is better than the alias's current target (compare and
/// set, so a concurrent move is never overwritten). Returns what happened, for the job's log.
async fn move_alias(
    registry: &mut pb::registry_service_client::RegistryServiceClient<
        lmforge_telemetry::propagation::TracedChannel,
    >,
    job: &pb::Job,
    alias: &str,
    version: &pb::ModelVersion,
    eval_loss: Option<f64>,
) -> Result<String, Failure> {
    let name = &version.model_name;
    let current = registry
        .resolve_model_ref(pb::ResolveModelRefRequest {
            model_ref: format!("{name}@{alias}"),
        })
        .await;
    let (expected, reason) = match current {
        Err(s) if s.code() == tonic::Code::NotFound => (0, "new alias".to_owned()),
        Err(s) => return Err(registry_failure("alias lookup", s.message())),
        Ok(r) => {
            let current = r.into_inner().version.unwrap_or_default();
            if current.version == version.version {
                return Ok(format!(
                    "{alias} already points to version {}",
                    version.version
                ));
            }
            let old = current.metrics.get("eval_loss").copied();
            match (eval_loss, old) {
                (Some(new), Some(old)) if new < old => (
                    current.version,
                    format!(
                        "eval_loss {new:.4} < {old:.4} of version {}",
                        current.version
                    ),
                ),
                (Some(new), None) => (
                    current.version,
                    format!("eval_loss {new:.4}; version {} has none", current.version),
                ),
                (Some(new), Some(old)) => {
                    return Ok(format!(
                        "{alias} stays on version {} (eval_loss {old:.4} ≤ {new:.4})",
                        current.version
                    ));
                }
                (None, _) => {
                    return Ok(format!(
                        "{alias} stays on version {}: this run has no eval loss to compare",
                        current.version
                    ));
                }
            }
        }
    };
    let moved = registry
        .set_alias(pb::SetAliasRequest {
            model_name: name.clone(),
            alias: alias.to_owned(),
            version: version.version,
            expected_current_version: Some(expected),
            actor: format!("job:{}", job.id),
            reason: reason.clone(),
        })
        .await;
    match moved {
        Ok(_) => Ok(format!(
            "moved {alias} to version {} ({reason})",
            version.version
        )),
        Err(s) if s.code() == tonic::Code::FailedPrecondition => Ok(format!(
            "{alias} not moved: it moved concurrently ({})",
            s.message()
        )),
        Err(s) => Err(registry_failure("moving the alias", s.message())),
    }
}
