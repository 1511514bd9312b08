//! Steps 6 and 7: the same questions to the base and the fine-tuned model through the
//! gateway's OpenAI HTTP API, and where the traces and metrics are.

use std::time::Instant;

use anyhow::Context;
use lmforge_proto::v1 as pb;

use super::{Journey, url};
use crate::model_cmd::status_error;

/// One question answered by the base and the fine-tuned model.
#[derive(Debug, Clone)]
pub struct Comparison {
    /// The question.
    pub question: String,
    /// The base model's answer.
    pub before: Answer,
    /// The fine-tuned model's answer.
    pub after: Answer,
}

/// One chat completion through the gateway.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The model reference asked.
    pub model: String,
    /// The reply.
    pub text: String,
    /// The W3C trace id the request was sent with (look it up in Jaeger).
    pub trace_id: String,
}

impl Journey {
    /// Step 6: loads both versions and asks each question through the gateway's OpenAI HTTP
    /// API with an API key made for the purpose.
    pub async fn compare(
        &mut self,
        base: &pb::ModelVersion,
        tuned: &pb::ModelVersion,
    ) -> anyhow::Result<Vec<Comparison>> {
        self.header("the same questions before and after fine-tuning, via the gateway");
        let before = format!("{}/{}", base.model_name, base.version);
        let after = format!("{}@production", tuned.model_name);
        for model in [&before, &after] {
            self.inference
                .load_model(pb::LoadModelRequest {
                    model_ref: model.clone(),
                    ..Default::default()
                })
                .await
                .map_err(status_error)
                .with_context(|| format!("loading {model}"))?;
        }
        let mut admin =
            crate::key_cmd::connect(&url(self.endpoints.gateway), &self.options.admin_key).await?;
        let key = admin
            .create_api_key(pb::CreateApiKeyRequest {
                name: format!("{}-demo", self.options.prefix),
                ..Default::default()
            })
            .await
            .map_err(status_error)?
            .into_inner();
        println!(
            "POST http://{}/v1/chat/completions  (API key {})",
            self.endpoints.gateway_http,
            key.key.as_ref().map(|k| k.id.as_str()).unwrap_or("-")
        );
        self.api_key = Some(key.secret.clone());
        let mut answers = Vec::new();
        for question in self.options.questions.clone() {
            let before = self.ask(&key.secret, &before, &question).await?;
            let after = self.ask(&key.secret, &after, &question).await?;
            println!("\nQ: {question}");
            println!("  before ({}): {}", before.model, one_line(&before.text));
            println!("  after  ({}): {}", after.model, one_line(&after.text));
            answers.push(Comparison {
                question,
                before,
                after,
            });
        }
        Ok(answers)
    }

    /// One greedy chat completion through the gateway, sent with a fresh W3C trace id.
    pub async fn ask(&self, secret: &str, model: &str, question: &str) -> anyhow::Result<Answer> {
        let trace_id = random_hex(16);
        let response = self
            .http
            .post(format!(
                "http://{}/v1/chat/completions",
                self.endpoints.gateway_http
            ))
            .bearer_auth(secret)
            .header("traceparent", format!("00-{trace_id}-{}-01", random_hex(8)))
            .json(&serde_json::json!({
                "model": model,
                "messages": [{"role": "user", "content": question}],
                "max_tokens": self.options.max_tokens,
                "temperature": 0,
            }))
            .send()
            .await
            .context("calling the gateway")?;
        let status = response.status();
        let body = response.text().await.context("the gateway's answer")?;
        anyhow::ensure!(status.is_success(), "the gateway answered {status}: {body}");
        let body: serde_json::Value =
            serde_json::from_str(&body).context("the gateway's answer is not JSON")?;
        let text = body["choices"][0]["message"]["content"]
            .as_str()
            .context("no choices[0].message.content in the gateway's answer")?
            .to_owned();
        Ok(Answer {
            model: model.to_owned(),
            text,
            trace_id,
        })
    }

    /// Step 7: where the traces and metrics of what just happened are.
    pub fn where_to_look(&mut self, answers: &[Comparison]) {
        self.header("where to look next");
        match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
            Ok(endpoint) if !endpoint.trim().is_empty() => {
                println!("traces were exported to {endpoint}; in Jaeger (http://127.0.0.1:16686):");
                for answer in answers.iter().flat_map(|c| [&c.before, &c.after]) {
                    println!("  trace {}  ({})", answer.trace_id, answer.model);
                }
            }
            _ => println!(
                "traces: start Jaeger (`docker compose -f deploy/docker-compose.yml up -d jaeger`), \
                 set OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4317 and run again; each \
                 answer above is one trace gateway → inference, each job one trace jobs → \
                 NATS → trainer → registry"
            ),
        }
        println!("metrics (Prometheus text):");
        for (name, admin) in &self.endpoints.admin {
            println!("  {name:<10} http://{admin}/metrics");
        }
    }
}

fn one_line(text: &str) -> String {
    let flat: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.is_empty() {
        "(empty)".to_owned()
    } else {
        flat
    }
}

/// `n` unpredictable bytes as hex (trace and span ids, demo keys; never all zero): a
/// SHA-256 of the clock, the process id, a counter and the address of a fresh allocation.
pub fn random_hex(n: usize) -> String {
    use sha2::Digest;
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let fresh = Box::new(0u8);
    let seed = format!(
        "{:?}{}{}{:p}",
        Instant::now(),
        std::process::id(),
        COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        &*fresh
    );
    let digest = sha2::Sha256::digest(format!("{seed}{:?}", std::time::SystemTime::now()));
    let mut bytes = digest[..n].to_vec();
    bytes[0] |= 1;
    hex::encode(bytes)
}
