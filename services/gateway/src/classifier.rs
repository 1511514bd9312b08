//! `model: auto`'s optional request classifier: logistic regression over hashed character
//! n-grams (1–3 characters, so Chinese and English alike need no tokenizer), words and the
//! length class (log₂ of the character count) of the routing text, trained when the routing file is loaded from labelled examples
//! (`{"text": …, "label": "small" | "large"}` per line), the way a fastText-style router is
//! trained from logged requests. It answers the probability that a request needs the large
//! model; [`crate::routing`] sends it there at or above the file's threshold. Training is
//! deterministic (fixed example order and step sizes), so the same files give the same
//! decisions on every replica.

use crate::error::GatewayError;

/// Hash buckets of the feature space.
const BUCKETS: usize = 1 << 18;
/// Passes over the examples.
const EPOCHS: usize = 30;
/// Most examples read from a file.
pub const MAX_EXAMPLES: usize = 100_000;

/// A trained classifier.
#[derive(Debug, Clone)]
pub struct RouteClassifier {
    weights: Vec<f32>,
    bias: f32,
    /// Examples it was trained on, and their labels' split.
    pub examples: usize,
    pub large_examples: usize,
    /// Share of the training examples it labels right.
    pub train_accuracy: f64,
}

/// FNV-1a, 64-bit: stable across processes and releases (the std hasher is not).
fn fnv(bytes: impl IntoIterator<Item = u8>, seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The text's features: hashed buckets, each with weight `1/√count`.
fn features(text: &str) -> Vec<(usize, f32)> {
    let lower = text.to_lowercase();
    let chars: Vec<char> = std::iter::once(' ')
        .chain(
            lower
                .split_whitespace()
                .flat_map(|w| w.chars().chain([' '])),
        )
        .collect();
    let mut buckets = Vec::new();
    for n in 1..=3 {
        for gram in chars.windows(n) {
            let bytes = gram.iter().flat_map(|c| u32::from(*c).to_le_bytes());
            buckets.push(fnv(bytes, n as u64) as usize % BUCKETS);
        }
    }
    for word in lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
    {
        buckets.push(fnv(word.bytes(), 0x77) as usize % BUCKETS);
    }
    if buckets.is_empty() {
        return Vec::new();
    }
    let value = 1.0 / (buckets.len() as f32).sqrt();
    let mut features: Vec<(usize, f32)> = buckets.into_iter().map(|b| (b, value)).collect();
    // Length on a log scale, at full weight: short requests lean small in any language.
    let length_class = usize::BITS - lower.chars().count().leading_zeros();
    features.push((
        fnv(length_class.to_le_bytes(), 0x1e) as usize % BUCKETS,
        1.0,
    ));
    features
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

impl RouteClassifier {
    /// Trains on `(text, needs_large)` pairs.
    pub fn train(examples: &[(String, bool)]) -> Self {
        let data: Vec<(Vec<(usize, f32)>, f32)> = examples
            .iter()
            .map(|(text, large)| (features(text), if *large { 1.0 } else { 0.0 }))
            .collect();
        let mut weights = vec![0f32; BUCKETS];
        let mut bias = 0f32;
        // A fixed pseudo-random order per epoch (an LCG), so training is reproducible.
        let mut order: Vec<usize> = (0..data.len()).collect();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for epoch in 0..EPOCHS {
            for i in (1..order.len()).rev() {
                state = state
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                order.swap(i, (state >> 33) as usize % (i + 1));
            }
            let lr = 1.0 / (1.0 + epoch as f32 * 0.2);
            for &i in &order {
                let (x, y) = &data[i];
                let z = bias + x.iter().map(|&(b, v)| weights[b] * v).sum::<f32>();
                let g = sigmoid(z) - y;
                bias -= lr * g;
                for &(b, v) in x {
                    weights[b] -= lr * (g * v + 1e-4 * weights[b]);
                }
            }
        }
        let mut model = Self {
            weights,
            bias,
            examples: examples.len(),
            large_examples: examples.iter().filter(|(_, l)| *l).count(),
            train_accuracy: 0.0,
        };
        let right = examples
            .iter()
            .filter(|(text, large)| (model.p_large(text) >= 0.5) == *large)
            .count();
        model.train_accuracy = right as f64 / examples.len().max(1) as f64;
        model
    }

    /// Reads labelled examples (JSON lines) and trains. Malformed lines are skipped and
    /// reported with their line numbers in the log; `field` names the setting in errors.
    pub fn from_jsonl(text: &str, field: &str) -> Result<Self, GatewayError> {
        #[derive(serde::Deserialize)]
        struct Example {
            text: String,
            label: String,
        }
        let mut examples = Vec::new();
        let mut bad = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            match serde_json::from_str::<Example>(line) {
                Ok(e) if e.label == "small" || e.label == "large" => {
                    examples.push((e.text, e.label == "large"));
                }
                Ok(e) => bad.push(format!("line {}: label `{}`", i + 1, e.label)),
                Err(e) => bad.push(format!("line {}: {e}", i + 1)),
            }
            if examples.len() > MAX_EXAMPLES {
                return Err(GatewayError::invalid(
                    field,
                    format!("more than {MAX_EXAMPLES} examples"),
                ));
            }
        }
        if !bad.is_empty() {
            tracing::warn!(
                field,
                skipped = bad.len(),
                first = %bad.iter().take(5).cloned().collect::<Vec<_>>().join("; "),
                "malformed classifier examples skipped (want {{\"text\", \"label\": small|large}})"
            );
        }
        let large = examples.iter().filter(|(_, l)| *l).count();
        if large < 2 || examples.len() - large < 2 {
            return Err(GatewayError::invalid(
                field,
                format!(
                    "needs at least 2 `small` and 2 `large` examples; read {} small, {large} large{}",
                    examples.len() - large,
                    if bad.is_empty() {
                        String::new()
                    } else {
                        format!(" ({} malformed, first: {})", bad.len(), bad[0])
                    }
                ),
            ));
        }
        Ok(Self::train(&examples))
    }

    /// Probability that `text` needs the large model.
    pub fn p_large(&self, text: &str) -> f32 {
        let z = self.bias
            + features(text)
                .iter()
                .map(|&(b, v)| self.weights[b] * v)
                .sum::<f32>();
        sigmoid(z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests a team would label: quick lookups and small talk vs analysis and writing.
    fn examples() -> Vec<(String, bool)> {
        let small = [
            "what is my balance",
            "hi",
            "thank you",
            "opening hours of the branch",
            "reset my password",
            "what time is it",
            "card activation",
            "你好",
            "谢谢",
            "营业时间",
            "how do I log in",
            "change my phone number",
        ];
        let large = [
            "compare these two mortgage offers and explain the trade-offs over ten years",
            "write a detailed report on my spending habits with recommendations",
            "explain why the bond price falls when interest rates rise, step by step",
            "draft a letter disputing this charge, citing the consumer protection rules",
            "请详细分析这两种理财产品的风险和收益",
            "帮我写一份关于家庭预算的完整计划",
            "evaluate the tax implications of selling my shares this year versus next",
            "summarize this contract and list every clause that could cost me money",
            "design a savings strategy for a family with two children and one income",
            "请比较定期存款和基金定投的长期回报",
            "reason through whether refinancing makes sense given these numbers",
            "create a step by step plan to pay off three credit cards",
        ];
        small
            .iter()
            .map(|s| (s.to_string(), false))
            .chain(large.iter().map(|s| (s.to_string(), true)))
            .collect()
    }

    #[test]
    fn learns_the_split_and_generalises_to_unseen_requests() {
        let c = RouteClassifier::train(&examples());
        assert_eq!(c.train_accuracy, 1.0);
        for (text, large) in [
            ("hello, what are your hours", false),
            ("thanks!", false),
            (
                "please compare these loan offers and explain which is cheaper",
                true,
            ),
            ("请详细比较这两种贷款的利率和风险", true),
        ] {
            let p = c.p_large(text);
            assert_eq!(p >= 0.5, large, "{text}: p_large {p}");
        }
    }

    #[test]
    fn training_is_deterministic() {
        let a = RouteClassifier::train(&examples());
        let b = RouteClassifier::train(&examples());
        assert_eq!(
            a.p_large("explain my statement"),
            b.p_large("explain my statement")
        );
    }

    #[test]
    fn example_files_are_checked() {
        let lines: String = examples()
            .iter()
            .map(|(t, l)| {
                let label = if *l { "large" } else { "small" };
                format!("{}\n", serde_json::json!({"text": t, "label": label}))
            })
            .collect();
        let with_bad = format!("{lines}not json\n{{\"text\": \"x\", \"label\": \"huge\"}}\n");
        let c = RouteClassifier::from_jsonl(&with_bad, "auto.classifier_examples")
            .expect("malformed lines are skipped");
        assert_eq!(c.examples, 24);
        let err = RouteClassifier::from_jsonl(
            "{\"text\": \"a\", \"label\": \"small\"}\n",
            "auto.classifier_examples",
        )
        .expect_err("one label only");
        assert_eq!(err.param(), Some("auto.classifier_examples"));
    }
}
