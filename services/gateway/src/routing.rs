//! Routing, presets, filters and limits from one YAML file, swapped in atomically when the
//! file changes (polled: no platform watcher needed and no event storms from editors).
//!
//! Order of decisions: rules first (regex or keyword on the last user turn or the prompt →
//! a canned answer or a fixed model), then the requested public model: `auto` picks the
//! small or the large model by request features, a named model goes to its targets, and
//! a model reference goes straight to inference when `allow_model_refs`. Each decision lists
//! its targets best first; the others are the fallbacks when one is overloaded or down.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::classifier::RouteClassifier;
use crate::error::GatewayError;
use crate::filter::{FilterPolicy, FilterSpec};

/// The routing file as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingSpec {
    /// Public model names.
    #[serde(default)]
    pub models: Vec<ModelSpec>,
    /// Rules, tried in order before the model.
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// The `auto` model: small vs large by request features.
    #[serde(default)]
    pub auto: Option<AutoSpec>,
    /// Named presets (`"preset": "java-expert"`).
    #[serde(default)]
    pub presets: BTreeMap<String, PresetSpec>,
    /// Named compliance filters.
    #[serde(default)]
    pub filters: BTreeMap<String, FilterSpec>,
    /// Filter applied when neither the model nor the key names one.
    #[serde(default)]
    pub default_filter: Option<String>,
    /// Key name → filter name (per-key policy, wins over the model's).
    #[serde(default)]
    pub key_filters: BTreeMap<String, String>,
    /// Let a request name a registry model reference that is no public model; default true.
    #[serde(default = "yes")]
    pub allow_model_refs: bool,
    /// Input token budget for chat history trimming when the model sets none.
    #[serde(default)]
    pub max_input_tokens: Option<u32>,
}

fn yes() -> bool {
    true
}

/// A public model name and where it goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    /// Model references, best first (the later ones are fallbacks).
    pub targets: Vec<String>,
    #[serde(default)]
    pub filter: Option<String>,
    #[serde(default)]
    pub max_input_tokens: Option<u32>,
    #[serde(default)]
    pub context_length: u32,
}

/// A rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    pub name: String,
    /// Case-insensitive regex on the routing text.
    #[serde(default)]
    pub regex: Option<String>,
    /// Any of these substrings (case-insensitive).
    #[serde(default)]
    pub keywords: Vec<String>,
    /// Only for these public models (empty → all).
    #[serde(default)]
    pub models: Vec<String>,
    /// Answer with this text without calling a model.
    #[serde(default)]
    pub answer: Option<String>,
    /// Send to this model reference instead.
    #[serde(default)]
    pub model: Option<String>,
}

/// `auto`: small vs large.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AutoSpec {
    pub small: String,
    pub large: String,
    /// Inputs longer than this (characters) go to the large model.
    #[serde(default = "default_small_chars")]
    pub max_small_chars: usize,
    /// Any of these (case-insensitive) → large.
    #[serde(default)]
    pub large_keywords: Vec<String>,
    /// Any of these → small, unless a large keyword also matches.
    #[serde(default)]
    pub small_keywords: Vec<String>,
    /// Labelled examples (JSON lines `{"text", "label": "small" | "large"}`, relative to the
    /// routing file) for a classifier trained at load ([`crate::classifier`]); requests it
    /// scores at or above `classifier_threshold` go to the large model.
    #[serde(default)]
    pub classifier_examples: Option<PathBuf>,
    #[serde(default = "default_threshold")]
    pub classifier_threshold: f32,
}

fn default_threshold() -> f32 {
    0.5
}

fn default_small_chars() -> usize {
    400
}

/// A preset: a system prompt and few-shot examples put before the request's messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresetSpec {
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub examples: Vec<ExampleSpec>,
}

/// One few-shot exchange.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExampleSpec {
    pub user: String,
    pub assistant: String,
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Answer with this text.
    Canned(String),
    /// Model references to try in order.
    Targets(Vec<String>),
}

/// A routing decision.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Rule or route name (counters are kept per route).
    pub route: String,
    pub action: Action,
    pub filter: Option<Arc<FilterPolicy>>,
    pub max_input_tokens: Option<u32>,
}

struct CompiledRule {
    spec: RuleSpec,
    regex: Option<regex::Regex>,
    keywords: Vec<String>,
}

/// A loaded, validated routing file.
pub struct Routing {
    pub spec: RoutingSpec,
    /// Of the file and the classifier's examples: a change to either reloads.
    pub sha256: String,
    rules: Vec<CompiledRule>,
    filters: HashMap<String, Arc<FilterPolicy>>,
    classifier: Option<Arc<RouteClassifier>>,
}

impl std::fmt::Debug for Routing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Routing")
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl Default for Routing {
    fn default() -> Self {
        Self::parse("{}").expect("the empty routing file is valid")
    }
}

impl Routing {
    /// Parses and validates a routing file; relative paths in it are taken from the
    /// current directory.
    pub fn parse(source: &str) -> Result<Self, GatewayError> {
        Self::parse_in(source, None)
    }

    /// Parses and validates a routing file read from `dir`.
    pub fn parse_in(source: &str, dir: Option<&Path>) -> Result<Self, GatewayError> {
        let spec = parse_spec(source)?;
        let (sha256, examples) = digest(source, &spec, dir)?;
        let mut rules = Vec::new();
        for (i, rule) in spec.rules.iter().enumerate() {
            let field = format!("rules[{i}]");
            if rule.answer.is_some() == rule.model.is_some() {
                return Err(GatewayError::invalid(
                    field,
                    "a rule needs exactly one of `answer` or `model`",
                ));
            }
            if rule.regex.is_none() && rule.keywords.is_empty() {
                return Err(GatewayError::invalid(
                    field,
                    "a rule needs `regex` or `keywords`",
                ));
            }
            let regex = rule
                .regex
                .as_deref()
                .map(|r| {
                    regex::RegexBuilder::new(r)
                        .case_insensitive(true)
                        .build()
                        .map_err(|e| GatewayError::invalid(format!("{field}.regex"), e.to_string()))
                })
                .transpose()?;
            rules.push(CompiledRule {
                spec: rule.clone(),
                regex,
                keywords: rule.keywords.iter().map(|k| k.to_lowercase()).collect(),
            });
        }
        let mut filters = HashMap::new();
        for (name, filter) in &spec.filters {
            filters.insert(name.clone(), Arc::new(FilterPolicy::compile(name, filter)?));
        }
        let known = |name: &Option<String>, field: &str| match name {
            Some(n) if !filters.contains_key(n) => Err(GatewayError::invalid(
                field.to_owned(),
                format!("unknown filter `{n}`"),
            )),
            _ => Ok(()),
        };
        known(&spec.default_filter, "default_filter")?;
        for (i, model) in spec.models.iter().enumerate() {
            known(&model.filter, &format!("models[{i}].filter"))?;
            if model.targets.is_empty() {
                return Err(GatewayError::invalid(
                    format!("models[{i}].targets"),
                    "at least one target",
                ));
            }
        }
        for (key, filter) in &spec.key_filters {
            known(&Some(filter.clone()), &format!("key_filters.{key}"))?;
        }
        let mut classifier = None;
        if let Some(auto) = &spec.auto {
            if !(0.0..=1.0).contains(&auto.classifier_threshold) {
                return Err(GatewayError::invalid(
                    "auto.classifier_threshold",
                    "must be in [0, 1]",
                ));
            }
            if let Some(text) = examples {
                let trained = RouteClassifier::from_jsonl(&text, CLASSIFIER_FIELD)?;
                tracing::info!(
                    examples = trained.examples,
                    large = trained.large_examples,
                    train_accuracy = trained.train_accuracy,
                    "auto-routing classifier trained"
                );
                classifier = Some(Arc::new(trained));
            }
        }
        Ok(Self {
            sha256,
            spec,
            rules,
            filters,
            classifier,
        })
    }

    /// Public model names (for `/v1/models`).
    pub fn public_models(&self) -> Vec<(String, u32)> {
        let mut names: Vec<(String, u32)> = self
            .spec
            .models
            .iter()
            .map(|m| (m.name.clone(), m.context_length))
            .collect();
        if self.spec.auto.is_some() {
            names.push(("auto".to_owned(), 0));
        }
        names
    }

    /// A preset by name.
    pub fn preset(&self, name: &str) -> Option<&PresetSpec> {
        self.spec.presets.get(name)
    }

    /// Where a request for `model` with routing text `text` (and `chars` input characters)
    /// goes, for a caller whose key is named `key_name`.
    pub fn decide(
        &self,
        model: &str,
        text: &str,
        chars: usize,
        key_name: &str,
    ) -> Result<Decision, GatewayError> {
        let public = self.spec.models.iter().find(|m| m.name == model);
        let filter_name = self
            .spec
            .key_filters
            .get(key_name)
            .cloned()
            .or_else(|| public.and_then(|m| m.filter.clone()))
            .or_else(|| self.spec.default_filter.clone());
        let filter = filter_name.and_then(|n| self.filters.get(&n).cloned());
        let max_input_tokens = public
            .and_then(|m| m.max_input_tokens)
            .or(self.spec.max_input_tokens);
        let lower = text.to_lowercase();
        for rule in &self.rules {
            if !rule.spec.models.is_empty() && !rule.spec.models.iter().any(|m| m == model) {
                continue;
            }
            let hit = rule.regex.as_ref().is_some_and(|r| r.is_match(text))
                || rule.keywords.iter().any(|k| lower.contains(k));
            if !hit {
                continue;
            }
            let action = match (&rule.spec.answer, &rule.spec.model) {
                (Some(answer), _) => Action::Canned(answer.clone()),
                (None, Some(target)) => Action::Targets(vec![target.clone()]),
                (None, None) => unreachable!("validated at parse: a rule has answer or model"),
            };
            return Ok(Decision {
                route: rule.spec.name.clone(),
                action,
                filter,
                max_input_tokens,
            });
        }
        if model == "auto"
            && let Some(auto) = &self.spec.auto
        {
            let large = chars > auto.max_small_chars
                || auto
                    .large_keywords
                    .iter()
                    .any(|k| lower.contains(&k.to_lowercase()));
            let large = large
                || self
                    .classifier
                    .as_ref()
                    .is_some_and(|c| c.p_large(text) >= auto.classifier_threshold);
            let small_hint = auto
                .small_keywords
                .iter()
                .any(|k| lower.contains(&k.to_lowercase()));
            let (route, targets) = if large && !(small_hint && chars <= auto.max_small_chars) {
                ("auto:large", vec![auto.large.clone(), auto.small.clone()])
            } else {
                ("auto:small", vec![auto.small.clone(), auto.large.clone()])
            };
            return Ok(Decision {
                route: route.to_owned(),
                action: Action::Targets(targets),
                filter,
                max_input_tokens,
            });
        }
        if let Some(public) = public {
            return Ok(Decision {
                route: public.name.clone(),
                action: Action::Targets(public.targets.clone()),
                filter,
                max_input_tokens,
            });
        }
        if self.spec.allow_model_refs && !model.is_empty() && model != "auto" {
            return Ok(Decision {
                route: "direct".to_owned(),
                action: Action::Targets(vec![model.to_owned()]),
                filter,
                max_input_tokens,
            });
        }
        Err(GatewayError::ModelNotFound(model.to_owned()))
    }
}

/// The rules in effect, shared by every request; swapped whole on reload.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    current: Arc<RwLock<Arc<Routing>>>,
    source: Option<PathBuf>,
}

impl RoutingTable {
    /// Loads `source` (or empty rules when none).
    pub fn load(source: Option<PathBuf>) -> Result<Self, GatewayError> {
        let routing = match &source {
            Some(path) => read(path)?,
            None => Routing::default(),
        };
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(routing))),
            source,
        })
    }

    /// Fixed rules (tests, benches).
    pub fn fixed(routing: Routing) -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(routing))),
            source: None,
        }
    }

    /// The rules in effect.
    pub fn get(&self) -> Arc<Routing> {
        self.current
            .read()
            .expect("routing lock is never poisoned")
            .clone()
    }

    /// Re-reads the file; swaps the rules in unless `dry_run`. Returns the rules read and
    /// whether they differ from those in effect.
    pub fn reload(&self, dry_run: bool) -> Result<(Arc<Routing>, bool), GatewayError> {
        let Some(path) = &self.source else {
            return Ok((self.get(), false));
        };
        // Compare digests before compiling: polling must not retrain the classifier.
        let source = read_source(path)?;
        let (sha256, _) = digest(&source, &parse_spec(&source)?, path.parent())?;
        let current = self.get();
        if sha256 == current.sha256 {
            return Ok((current, false));
        }
        let routing = Arc::new(Routing::parse_in(&source, path.parent())?);
        let changed = routing.sha256 != current.sha256;
        if changed && !dry_run {
            *self
                .current
                .write()
                .expect("routing lock is never poisoned") = routing.clone();
            tracing::info!(sha256 = %routing.sha256, "routing rules reloaded");
        }
        Ok((routing, changed))
    }

    /// Polls the file every `interval` and reloads it when its content changed; invalid
    /// content is logged and the old rules stay. Ends when `stop` resolves.
    pub async fn watch(self, interval: Duration, stop: impl std::future::Future<Output = ()>) {
        if self.source.is_none() {
            return;
        }
        tokio::pin!(stop);
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = &mut stop => return,
                _ = ticker.tick() => {}
            }
            // Reading files and training the classifier block: off the async workers.
            let table = self.clone();
            match tokio::task::spawn_blocking(move || table.reload(false)).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::warn!(%error, "routing file invalid, keeping the rules in effect");
                }
                Err(error) => tracing::warn!(%error, "routing reload task failed"),
            }
        }
    }
}

const CLASSIFIER_FIELD: &str = "auto.classifier_examples";

fn parse_spec(source: &str) -> Result<RoutingSpec, GatewayError> {
    serde_yaml::from_str(source).map_err(|e| GatewayError::invalid("routing", e.to_string()))
}

/// SHA-256 of the file and of the classifier's examples (so a change to either reloads),
/// and the examples' text.
fn digest(
    source: &str,
    spec: &RoutingSpec,
    dir: Option<&Path>,
) -> Result<(String, Option<String>), GatewayError> {
    let mut digest = Sha256::new();
    digest.update(source.as_bytes());
    let examples = match spec
        .auto
        .as_ref()
        .and_then(|a| a.classifier_examples.as_ref())
    {
        Some(examples) => {
            let path = dir.map_or_else(|| examples.clone(), |d| d.join(examples));
            let text = std::fs::read_to_string(&path).map_err(|e| {
                GatewayError::invalid(
                    CLASSIFIER_FIELD,
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            digest.update(text.as_bytes());
            Some(text)
        }
        None => None,
    };
    Ok((hex::encode(digest.finalize()), examples))
}

fn read_source(path: &Path) -> Result<String, GatewayError> {
    std::fs::read_to_string(path).map_err(|e| {
        GatewayError::invalid(
            "routing_file",
            format!("cannot read {}: {e}", path.display()),
        )
    })
}

fn read(path: &Path) -> Result<Routing, GatewayError> {
    Routing::parse_in(&read_source(path)?, path.parent())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
models:
  - name: bank
    targets: ["bank@production", "bank@previous"]
rules:
  - name: order-status
    regex: "where is my order|order status"
    answer: "Track your order at https://shop.example/orders."
  - name: refunds
    keywords: ["refund"]
    model: "refunds@production"
auto:
  small: "tiny@latest"
  large: "big@latest"
  max_small_chars: 40
  large_keywords: ["analyze", "证明"]
filters:
  finance:
    phrases: ["guaranteed return"]
"#;

    #[test]
    fn rules_then_auto_then_public_models() {
        let r = Routing::parse(YAML).expect("valid");
        let d = r
            .decide("bank", "What is my ORDER STATUS?", 20, "k")
            .expect("route");
        assert_eq!(d.route, "order-status");
        assert!(matches!(d.action, Action::Canned(ref a) if a.contains("shop.example")));
        let d = r.decide("auto", "I want a Refund", 20, "k").expect("route");
        assert_eq!(d.action, Action::Targets(vec!["refunds@production".into()]));

        let small = r.decide("auto", "hi there", 8, "k").expect("route");
        assert_eq!(small.route, "auto:small");
        assert_eq!(
            small.action,
            Action::Targets(vec!["tiny@latest".into(), "big@latest".into()])
        );
        let long = r.decide("auto", "x", 500, "k").expect("route");
        assert_eq!(long.route, "auto:large");
        let keyword = r
            .decide("auto", "please analyze this", 19, "k")
            .expect("route");
        assert_eq!(keyword.route, "auto:large");
        assert_eq!(
            keyword.action,
            Action::Targets(vec!["big@latest".into(), "tiny@latest".into()])
        );

        let bank = r.decide("bank", "hello", 5, "k").expect("route");
        assert_eq!(
            bank.action,
            Action::Targets(vec!["bank@production".into(), "bank@previous".into()])
        );
        let direct = r
            .decide("acme/tiny@latest", "hello", 5, "k")
            .expect("route");
        assert_eq!(direct.route, "direct");
    }

    #[test]
    fn invalid_files_are_refused_naming_the_field() {
        let err =
            Routing::parse("rules:\n  - name: x\n    keywords: [a]\n").expect_err("no action");
        assert_eq!(err.param(), Some("rules[0]"));
        let err = Routing::parse("models:\n  - name: x\n    targets: [a]\n    filter: nope\n")
            .expect_err("unknown filter");
        assert_eq!(err.param(), Some("models[0].filter"));
        let err = Routing::parse("allow_model_refs: false\nmodels: []\n").expect("valid");
        assert!(matches!(
            err.decide("other", "", 0, "k"),
            Err(GatewayError::ModelNotFound(_))
        ));
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gateway");
        let example = std::fs::read_to_string(dir.join("routing.example.yaml")).expect("read");
        let r = Routing::parse_in(&example, Some(&dir)).expect("the example parses");
        let d = r
            .decide("auto", "please analyze my portfolio", 27, "k")
            .expect("route");
        assert_eq!(d.route, "auto:large");
        assert!(d.filter.is_some());
        // No keyword and short: the classifier trained on the shipped examples decides.
        for (text, route) in [
            ("write a plan to pay off my car loan early", "auto:large"),
            ("请帮我详细比较两种保险", "auto:large"),
            ("my card is blocked", "auto:small"),
        ] {
            let d = r
                .decide("auto", text, text.chars().count(), "k")
                .expect("route");
            assert_eq!(d.route, route, "{text}");
        }
    }

    #[test]
    fn the_classifier_routes_what_keywords_and_length_miss() {
        let dir = tempfile::tempdir().expect("temp dir");
        let examples = [
            ("hi", "small"),
            ("thanks", "small"),
            ("reset my password", "small"),
            ("opening hours", "small"),
            ("explain the risks of this fund in detail", "large"),
            ("write a detailed plan for my retirement savings", "large"),
            ("explain step by step how compound interest works", "large"),
            ("write a detailed comparison of two pension plans", "large"),
        ];
        let lines: String = examples
            .iter()
            .map(|(t, l)| format!("{}\n", serde_json::json!({"text": t, "label": l})))
            .collect();
        std::fs::write(dir.path().join("ex.jsonl"), lines).expect("write");
        let yaml = "auto:\n  small: s\n  large: l\n  classifier_examples: ex.jsonl\n";
        let r = Routing::parse_in(yaml, Some(dir.path())).expect("valid");
        let text = "write a detailed explanation of my fund fees";
        assert_eq!(
            r.decide("auto", text, 43, "k").expect("route").route,
            "auto:large"
        );
        assert_eq!(
            r.decide("auto", "hi there", 8, "k").expect("route").route,
            "auto:small"
        );
        // Without the classifier the same request stays small (no keyword, short).
        let plain = Routing::parse("auto:\n  small: s\n  large: l\n").expect("valid");
        assert_eq!(
            plain.decide("auto", text, 43, "k").expect("route").route,
            "auto:small"
        );
        // A missing file or threshold out of range names the field.
        let err = Routing::parse_in(
            yaml.replace("ex.jsonl", "nope.jsonl").as_str(),
            Some(dir.path()),
        )
        .expect_err("missing");
        assert_eq!(err.param(), Some("auto.classifier_examples"));
        let err = Routing::parse("auto:\n  small: s\n  large: l\n  classifier_threshold: 2\n")
            .expect_err("threshold");
        assert_eq!(err.param(), Some("auto.classifier_threshold"));
        // Polling an unchanged file keeps the compiled rules (no retraining); a change to the
        // examples alone is a change to reload.
        std::fs::write(dir.path().join("routing.yaml"), yaml).expect("write");
        let table = RoutingTable::load(Some(dir.path().join("routing.yaml"))).expect("load");
        let before = table.get();
        let (same, changed) = table.reload(false).expect("reload");
        assert!(!changed && Arc::ptr_eq(&same, &before));
        std::fs::write(
            dir.path().join("ex.jsonl"),
            format!(
                "{}\n{}\n",
                serde_json::json!({"text": "a", "label": "small"}),
                serde_json::json!({"text": "b", "label": "large"})
            )
            .repeat(2),
        )
        .expect("write");
        let again = Routing::parse_in(yaml, Some(dir.path())).expect("valid");
        assert_ne!(again.sha256, r.sha256);
        let (_, changed) = table.reload(false).expect("reload");
        assert!(changed);
        assert_eq!(table.get().sha256, again.sha256);
    }

    #[tokio::test]
    async fn the_file_is_reloaded_when_it_changes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("routing.yaml");
        std::fs::write(&path, "models:\n  - name: a\n    targets: [one]\n").expect("write");
        let table = RoutingTable::load(Some(path.clone())).expect("load");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(table.clone().watch(Duration::from_millis(10), async {
            let _ = stop_rx.await;
        }));
        assert_eq!(table.get().public_models()[0].0, "a");
        // An invalid file keeps the old rules.
        std::fs::write(&path, "models: [[[").expect("write");
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(table.get().public_models()[0].0, "a");
        std::fs::write(&path, "models:\n  - name: b\n    targets: [two]\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while table.get().public_models()[0].0 != "b" {
            assert!(std::time::Instant::now() < deadline, "not reloaded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let _ = stop_tx.send(());
    }
}
