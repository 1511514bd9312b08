//! A `JobSpec` checked field by field and completed with the defaults job.proto documents, so
//! that the spec stored with the job (and echoed in `Job.spec`) is exactly what the worker
//! applies. Everything here is pure; references (dataset version, base model) are resolved by
//! the API against the ingest and registry services.

use lmforge_proto::v1 as pb;
use pb::hyperparameters::{TrainingLength, Warmup};
use pb::job_spec::{Base, Method};

/// A bad field: INVALID_ARGUMENT naming it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct SpecError {
    pub field: String,
    pub reason: String,
}

fn bad(field: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        reason: reason.into(),
    }
}

type Result<T> = std::result::Result<T, SpecError>;

/// Default LoRA rank, dropout and target modules (job.proto `LoraConfig`).
pub const LORA_RANK: u32 = 8;
pub const LORA_DROPOUT: f32 = 0.05;
pub const LORA_TARGETS: &[&str] = &["q_proj", "v_proj"];
/// Default max sequence length cap.
pub const MAX_SEQ_LEN: u32 = 2048;

/// `1–128 printable ASCII chars` (common.proto idempotency keys).
pub fn check_client_request_id(id: &str, field: &str) -> Result<()> {
    if id.len() > 128 || !id.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return Err(bad(field, "must be at most 128 printable ASCII characters"));
    }
    Ok(())
}

/// Registry names: 1–128 chars of `[A-Za-z0-9._/-]`, starting with a letter or digit.
pub fn check_model_name(name: &str, field: &str) -> Result<()> {
    if name.is_empty() {
        return Err(bad(field, "is required"));
    }
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
    if name.len() > 128 || !ok_chars || !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(bad(
            field,
            format!("`{name}` is not a model name (1-128 chars of A-Z a-z 0-9 . _ / -)"),
        ));
    }
    Ok(())
}

fn check_ref(reference: &str, field: &str) -> Result<()> {
    if reference.trim().is_empty() {
        return Err(bad(field, "is required"));
    }
    if reference.len() > 300 || reference.chars().any(char::is_whitespace) {
        return Err(bad(field, format!("`{reference}` is not a reference")));
    }
    Ok(())
}

fn check_tags(tags: &std::collections::HashMap<String, String>, field: &str) -> Result<()> {
    if tags.len() > 64 {
        return Err(bad(field, "at most 64 tags"));
    }
    for (k, v) in tags {
        let key_ok = !k.is_empty()
            && k.len() <= 64
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
        if !key_ok {
            return Err(bad(
                &format!("{field}[{k}]"),
                "keys are 1-64 chars of A-Z a-z 0-9 . _ -",
            ));
        }
        if v.chars().count() > 512 {
            return Err(bad(
                &format!("{field}[{k}]"),
                "values are at most 512 chars",
            ));
        }
    }
    Ok(())
}

/// Checks every field that needs no lookup. `None` spec → `spec` is required.
pub fn validate(spec: Option<&pb::JobSpec>) -> Result<&pb::JobSpec> {
    let spec = spec.ok_or_else(|| bad("spec", "is required"))?;
    check_client_request_id(&spec.client_request_id, "spec.client_request_id")?;
    match &spec.base {
        None => {
            return Err(bad(
                "spec.base",
                "one of base_model or from_scratch is required",
            ));
        }
        Some(Base::BaseModel(r)) => check_ref(r, "spec.base_model")?,
        Some(Base::FromScratch(fs)) => {
            validate_scratch(fs)?;
            if matches!(spec.method, Some(Method::Lora(_))) {
                return Err(bad(
                    "spec.lora",
                    "LoRA needs a base model; from-scratch training is full training",
                ));
            }
        }
    }
    check_ref(&spec.dataset_version, "spec.dataset_version")?;
    match &spec.method {
        Some(Method::Lora(l)) => validate_lora(l)?,
        Some(Method::Full(f)) => {
            for (i, m) in f.frozen_modules.iter().enumerate() {
                if m.trim().is_empty() {
                    return Err(bad(
                        &format!("spec.full.frozen_modules[{i}]"),
                        "must not be empty",
                    ));
                }
            }
        }
        None => {}
    }
    if let Some(h) = &spec.hyperparameters {
        validate_hyperparameters(h)?;
    }
    check_model_name(&spec.output_model_name, "spec.output_model_name")?;
    if !spec.output_alias.is_empty() {
        let a = &spec.output_alias;
        if a == "latest" {
            return Err(bad(
                "spec.output_alias",
                "`latest` is maintained by the registry and cannot be moved",
            ));
        }
        let ok = a.len() <= 64
            && a.as_bytes()[0].is_ascii_alphabetic()
            && a.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b));
        if !ok {
            return Err(bad(
                "spec.output_alias",
                format!(
                    "`{a}` is not an alias (1-64 chars of A-Z a-z 0-9 _ -, starting with a letter)"
                ),
            ));
        }
    }
    check_tags(&spec.output_tags, "spec.output_tags")?;
    if spec.description.chars().count() > 4096 {
        return Err(bad("spec.description", "at most 4096 characters"));
    }
    if !(-100..=100).contains(&spec.priority) {
        return Err(bad("spec.priority", "must be in [-100, 100]"));
    }
    if let Some(r) = &spec.resources {
        let device = pb::Device::try_from(r.device)
            .map_err(|_| bad("spec.resources.device", "unknown device"))?;
        if device == pb::Device::Cpu && r.gpu_count != 0 {
            return Err(bad("spec.resources.gpu_count", "must be 0 for CPU jobs"));
        }
        if r.gpu_count > 64 {
            return Err(bad("spec.resources.gpu_count", "at most 64"));
        }
    }
    if let Some(d) = &spec.max_duration
        && (d.seconds < 0 || (d.seconds == 0 && d.nanos <= 0))
    {
        return Err(bad("spec.max_duration", "must be positive"));
    }
    if spec.metadata.len() > 16 {
        return Err(bad("spec.metadata", "at most 16 entries"));
    }
    Ok(spec)
}

fn validate_scratch(fs: &pb::FromScratch) -> Result<()> {
    let a = fs
        .architecture
        .as_ref()
        .ok_or_else(|| bad("spec.from_scratch.architecture", "is required"))?;
    let arch = a.architecture.as_str();
    if !["llama", "mistral", "qwen2"].contains(&arch.to_ascii_lowercase().as_str())
        && !["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"].contains(&arch)
    {
        return Err(bad(
            "spec.from_scratch.architecture.architecture",
            format!("`{arch}` is not supported (llama, mistral, qwen2)"),
        ));
    }
    let f = |name: &str| format!("spec.from_scratch.architecture.{name}");
    if a.hidden_size == 0 {
        return Err(bad(&f("hidden_size"), "must be > 0"));
    }
    if a.num_hidden_layers == 0 {
        return Err(bad(&f("num_hidden_layers"), "must be > 0"));
    }
    if a.num_attention_heads == 0 || a.hidden_size % a.num_attention_heads != 0 {
        return Err(bad(
            &f("num_attention_heads"),
            "must be > 0 and divide hidden_size",
        ));
    }
    let kv = a.num_key_value_heads;
    if kv != 0 && a.num_attention_heads % kv != 0 {
        return Err(bad(
            &f("num_key_value_heads"),
            "must divide num_attention_heads",
        ));
    }
    if a.intermediate_size == 0 {
        return Err(bad(&f("intermediate_size"), "must be > 0"));
    }
    if a.max_position_embeddings < 16 {
        return Err(bad(&f("max_position_embeddings"), "must be at least 16"));
    }
    if a.rope_theta < 0.0 || a.rms_norm_eps < 0.0 {
        return Err(bad(&f("rope_theta"), "must not be negative"));
    }
    let tokenizer = fs
        .tokenizer
        .as_ref()
        .and_then(|t| t.source.as_ref())
        .ok_or_else(|| {
            bad(
                "spec.from_scratch.tokenizer",
                "one of from_model or train is required",
            )
        })?;
    match tokenizer {
        pb::tokenizer_spec::Source::FromModel(r) => {
            check_ref(r, "spec.from_scratch.tokenizer.from_model")?
        }
        pb::tokenizer_spec::Source::Train(t) => {
            if let Some(v) = t.vocab_size
                && !(256..=262_144).contains(&v)
            {
                return Err(bad(
                    "spec.from_scratch.tokenizer.train.vocab_size",
                    "must be in [256, 262144]",
                ));
            }
            if t.min_frequency == Some(0) {
                return Err(bad(
                    "spec.from_scratch.tokenizer.train.min_frequency",
                    "must be > 0",
                ));
            }
        }
    }
    Ok(())
}

fn validate_lora(l: &pb::LoraConfig) -> Result<()> {
    if let Some(r) = l.rank
        && !(1..=256).contains(&r)
    {
        return Err(bad("spec.lora.rank", "must be in [1, 256]"));
    }
    if let Some(a) = l.alpha
        && !(a.is_finite() && a > 0.0)
    {
        return Err(bad("spec.lora.alpha", "must be > 0"));
    }
    if let Some(d) = l.dropout
        && !(0.0..1.0).contains(&d)
    {
        return Err(bad("spec.lora.dropout", "must be in [0, 1)"));
    }
    for (i, m) in l.target_modules.iter().enumerate() {
        let ok = !m.is_empty()
            && m.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._".contains(&b));
        if !ok {
            return Err(bad(
                &format!("spec.lora.target_modules[{i}]"),
                format!("`{m}` is not a module name"),
            ));
        }
    }
    Ok(())
}

fn validate_hyperparameters(h: &pb::Hyperparameters) -> Result<()> {
    let f = |name: &str| format!("spec.hyperparameters.{name}");
    if let Some(lr) = h.learning_rate
        && !(lr.is_finite() && lr > 0.0)
    {
        return Err(bad(&f("learning_rate"), "must be > 0"));
    }
    pb::LrSchedule::try_from(h.schedule).map_err(|_| bad(&f("schedule"), "unknown schedule"))?;
    match h.warmup {
        Some(Warmup::WarmupRatio(r)) if !(0.0..1.0).contains(&r) => {
            return Err(bad(&f("warmup_ratio"), "must be in [0, 1)"));
        }
        _ => {}
    }
    match h.training_length {
        Some(TrainingLength::Epochs(0)) => return Err(bad(&f("epochs"), "must be > 0")),
        Some(TrainingLength::MaxSteps(0)) => return Err(bad(&f("max_steps"), "must be > 0")),
        _ => {}
    }
    if let Some(b) = h.batch_size
        && !(1..=1024).contains(&b)
    {
        return Err(bad(&f("batch_size"), "must be in [1, 1024]"));
    }
    if let Some(g) = h.gradient_accumulation_steps
        && !(1..=1024).contains(&g)
    {
        return Err(bad(
            &f("gradient_accumulation_steps"),
            "must be in [1, 1024]",
        ));
    }
    if let Some(m) = h.max_seq_len
        && m < 16
    {
        return Err(bad(&f("max_seq_len"), "must be at least 16"));
    }
    if let Some(w) = h.weight_decay
        && !(w.is_finite() && w >= 0.0)
    {
        return Err(bad(&f("weight_decay"), "must be >= 0"));
    }
    if let Some(d) = h.dropout
        && !(0.0..1.0).contains(&d)
    {
        return Err(bad(&f("dropout"), "must be in [0, 1)"));
    }
    if let Some(c) = h.max_grad_norm
        && !(c.is_finite() && c >= 0.0)
    {
        return Err(bad(
            &f("max_grad_norm"),
            "must be >= 0 (0 disables clipping)",
        ));
    }
    pb::Precision::try_from(h.precision).map_err(|_| bad(&f("precision"), "unknown precision"))?;
    if h.keep_checkpoints == Some(0) {
        return Err(bad(&f("keep_checkpoints"), "must be at least 1"));
    }
    Ok(())
}

/// Fills every unset field with its documented default. `context_length` is the base model's
/// (or the from-scratch architecture's) context, which caps `max_seq_len`.
pub fn fill_defaults(spec: &mut pb::JobSpec, context_length: u32) -> Result<()> {
    let scratch = matches!(spec.base, Some(Base::FromScratch(_)));
    let method = spec
        .method
        .get_or_insert_with(|| Method::Full(pb::FullFineTune::default()));
    let lora = match method {
        Method::Lora(l) => {
            let rank = *l.rank.get_or_insert(LORA_RANK);
            l.alpha.get_or_insert(2.0 * rank as f32);
            l.dropout.get_or_insert(LORA_DROPOUT);
            if l.target_modules.is_empty() {
                l.target_modules = LORA_TARGETS.iter().map(|s| s.to_string()).collect();
            }
            true
        }
        Method::Full(_) => false,
    };
    let h = spec.hyperparameters.get_or_insert_with(Default::default);
    h.learning_rate.get_or_insert(if lora {
        2e-4
    } else if scratch {
        3e-4
    } else {
        2e-5
    });
    if h.schedule == pb::LrSchedule::Unspecified as i32 {
        h.schedule = pb::LrSchedule::Cosine as i32;
    }
    h.training_length.get_or_insert(TrainingLength::Epochs(3));
    h.batch_size.get_or_insert(8);
    h.gradient_accumulation_steps.get_or_insert(1);
    let cap = if context_length == 0 {
        MAX_SEQ_LEN
    } else {
        context_length.min(MAX_SEQ_LEN)
    };
    let max_len = *h.max_seq_len.get_or_insert(cap);
    if context_length > 0 && max_len > context_length {
        return Err(bad(
            "spec.hyperparameters.max_seq_len",
            format!("{max_len} exceeds the model's context length {context_length}"),
        ));
    }
    h.weight_decay.get_or_insert(0.0);
    h.dropout.get_or_insert(0.0);
    h.max_grad_norm.get_or_insert(1.0);
    h.seed.get_or_insert(42);
    h.loss_on_assistant_only.get_or_insert(true);
    h.keep_checkpoints.get_or_insert(3);
    spec.resources.get_or_insert_with(Default::default);
    Ok(())
}

/// The context length a from-scratch spec declares (0 when absent).
pub fn scratch_context(spec: &pb::JobSpec) -> u32 {
    match &spec.base {
        Some(Base::FromScratch(fs)) => fs
            .architecture
            .as_ref()
            .map_or(0, |a| a.max_position_embeddings),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> pb::JobSpec {
        pb::JobSpec {
            base: Some(Base::BaseModel("tiny@prod".into())),
            dataset_version: "faq/1".into(),
            output_model_name: "tiny-faq".into(),
            ..Default::default()
        }
    }

    fn field_of(spec: pb::JobSpec) -> String {
        validate(Some(&spec)).expect_err("invalid").field
    }

    #[test]
    fn a_minimal_spec_passes_and_gets_documented_defaults() {
        let mut spec = good();
        validate(Some(&spec)).expect("valid");
        fill_defaults(&mut spec, 4096).expect("defaults");
        let h = spec.hyperparameters.expect("filled");
        assert_eq!(h.learning_rate, Some(2e-5));
        assert_eq!(h.schedule, pb::LrSchedule::Cosine as i32);
        assert_eq!(h.training_length, Some(TrainingLength::Epochs(3)));
        assert_eq!(h.batch_size, Some(8));
        assert_eq!(h.max_seq_len, Some(2048));
        assert_eq!(h.seed, Some(42));
        assert_eq!(h.max_grad_norm, Some(1.0));
        assert!(matches!(spec.method, Some(Method::Full(_))));

        let mut lora = good();
        lora.method = Some(Method::Lora(pb::LoraConfig {
            rank: Some(4),
            ..Default::default()
        }));
        fill_defaults(&mut lora, 64).expect("defaults");
        let Some(Method::Lora(l)) = &lora.method else {
            panic!("lora")
        };
        assert_eq!((l.alpha, l.dropout), (Some(8.0), Some(0.05)));
        assert_eq!(l.target_modules, ["q_proj", "v_proj"]);
        let h = lora.hyperparameters.expect("filled");
        assert_eq!((h.learning_rate, h.max_seq_len), (Some(2e-4), Some(64)));
    }

    #[test]
    fn every_bad_field_is_named() {
        let hp = |h: pb::Hyperparameters| pb::JobSpec {
            hyperparameters: Some(h),
            ..good()
        };
        let cases: Vec<(pb::JobSpec, &str)> = vec![
            (
                pb::JobSpec {
                    base: None,
                    ..good()
                },
                "spec.base",
            ),
            (
                pb::JobSpec {
                    dataset_version: String::new(),
                    ..good()
                },
                "spec.dataset_version",
            ),
            (
                pb::JobSpec {
                    output_model_name: "bad name".into(),
                    ..good()
                },
                "spec.output_model_name",
            ),
            (
                pb::JobSpec {
                    output_alias: "latest".into(),
                    ..good()
                },
                "spec.output_alias",
            ),
            (
                pb::JobSpec {
                    priority: 101,
                    ..good()
                },
                "spec.priority",
            ),
            (
                hp(pb::Hyperparameters {
                    learning_rate: Some(0.0),
                    ..Default::default()
                }),
                "spec.hyperparameters.learning_rate",
            ),
            (
                hp(pb::Hyperparameters {
                    learning_rate: Some(-1e-4),
                    ..Default::default()
                }),
                "spec.hyperparameters.learning_rate",
            ),
            (
                hp(pb::Hyperparameters {
                    batch_size: Some(0),
                    ..Default::default()
                }),
                "spec.hyperparameters.batch_size",
            ),
            (
                hp(pb::Hyperparameters {
                    training_length: Some(TrainingLength::Epochs(0)),
                    ..Default::default()
                }),
                "spec.hyperparameters.epochs",
            ),
            (
                hp(pb::Hyperparameters {
                    warmup: Some(Warmup::WarmupRatio(1.5)),
                    ..Default::default()
                }),
                "spec.hyperparameters.warmup_ratio",
            ),
            (
                hp(pb::Hyperparameters {
                    max_seq_len: Some(4),
                    ..Default::default()
                }),
                "spec.hyperparameters.max_seq_len",
            ),
            (
                hp(pb::Hyperparameters {
                    dropout: Some(1.0),
                    ..Default::default()
                }),
                "spec.hyperparameters.dropout",
            ),
            (
                pb::JobSpec {
                    method: Some(Method::Lora(pb::LoraConfig {
                        rank: Some(0),
                        ..Default::default()
                    })),
                    ..good()
                },
                "spec.lora.rank",
            ),
            (
                pb::JobSpec {
                    resources: Some(pb::Resources {
                        device: pb::Device::Cpu as i32,
                        gpu_count: 2,
                    }),
                    ..good()
                },
                "spec.resources.gpu_count",
            ),
        ];
        for (spec, field) in cases {
            assert_eq!(field_of(spec), field);
        }
        assert_eq!(validate(None).expect_err("missing").field, "spec");
        let mut long = good();
        long.hyperparameters = Some(pb::Hyperparameters {
            max_seq_len: Some(512),
            ..Default::default()
        });
        assert_eq!(
            fill_defaults(&mut long, 128).expect_err("too long").field,
            "spec.hyperparameters.max_seq_len"
        );
    }
}
