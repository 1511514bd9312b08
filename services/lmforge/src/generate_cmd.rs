//! `lmforge generate`: one generation against an inference service, streamed to the
//! terminal as it is sampled (`GenerateStream`).
//!
//! Choice 0 is printed as it arrives; with `--n` the other choices are printed after it, each
//! under a header. A one-line summary (finish reason, tokens, time to first token, tokens/s)
//! goes to stderr, so stdout holds only the generated text. Ctrl-C drops the stream, which
//! cancels the call and frees the sequence on the server, and asks the server to `Abort` the
//! request id as well in case the disconnect is noticed late.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use lmforge_proto::v1 as pb;
use lmforge_proto::v1::inference_service_client::InferenceServiceClient;
use tokio::time::Instant;
use tonic::transport::Channel;

use crate::model_cmd::status_error;

/// Flags of `lmforge generate`.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Address of the inference service.
    #[arg(
        long = "inference",
        env = "LMFORGE_INFERENCE_URL",
        default_value = "http://127.0.0.1:50054"
    )]
    pub inference_url: String,
    /// Model reference of a loaded model (`name@alias`, `name/3`); empty → the replica's
    /// default model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Raw prompt text (`-` reads it from stdin). Give --user/--system instead for chat.
    #[arg(conflicts_with_all = ["user", "system"], required_unless_present = "user")]
    pub prompt: Option<String>,
    /// System message of a chat prompt (rendered with the model's chat template).
    #[arg(long, requires = "user")]
    pub system: Option<String>,
    /// User message of a chat prompt; repeat for several user turns.
    #[arg(long)]
    pub user: Vec<String>,
    /// Maximum tokens to generate per choice (server default 256).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Softmax temperature in [0, 2]; 0 is greedy.
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Nucleus sampling mass in (0, 1].
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep only the k most likely tokens (0 disables).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Drop tokens below min_p × the top token's probability.
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Multiplicative penalty on tokens already in prompt or output (1.0 = none).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    /// Additive penalty on tokens already in the output, in [-2, 2].
    #[arg(long, allow_negative_numbers = true)]
    pub presence_penalty: Option<f32>,
    /// Additive penalty proportional to a token's count in the output, in [-2, 2].
    #[arg(long, allow_negative_numbers = true)]
    pub frequency_penalty: Option<f32>,
    /// Stop string (repeatable); generation ends before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// RNG seed for reproducible sampling.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Number of independent choices, 1–16.
    #[arg(long)]
    pub n: Option<u32>,
    /// Print each generated token's log-probability after the text.
    #[arg(long)]
    pub logprobs: bool,
    /// With --logprobs, also print this many most likely alternatives per token (0–20).
    #[arg(long, requires = "logprobs")]
    pub top_logprobs: Option<u32>,
}

/// An inference client on `url` (`http://host:port`).
pub async fn connect(url: &str) -> anyhow::Result<InferenceServiceClient<Channel>> {
    let endpoint = lmforge_runtime::args::parse_endpoint(url).map_err(anyhow::Error::msg)?;
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("cannot reach the inference service at {url}"))?;
    Ok(InferenceServiceClient::new(channel))
}

/// A request id unique enough for `Abort`: the process id and the time.
fn request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("cli-{}-{nanos:x}", std::process::id())
}

impl GenerateArgs {
    /// The `GenerateRequest` these flags describe (`prompt` already read from stdin).
    pub fn request(&self, prompt: Option<String>, request_id: String) -> pb::GenerateRequest {
        let input = match prompt {
            Some(text) => pb::generate_request::Input::Prompt(text),
            None => {
                let system = self.system.iter().map(|content| pb::ChatMessage {
                    role: pb::ChatRole::System as i32,
                    content: content.clone(),
                    name: None,
                });
                let users = self.user.iter().map(|content| pb::ChatMessage {
                    role: pb::ChatRole::User as i32,
                    content: content.clone(),
                    name: None,
                });
                pb::generate_request::Input::Chat(pb::ChatInput {
                    messages: system.chain(users).collect(),
                    add_generation_prompt: None,
                    chat_template: String::new(),
                })
            }
        };
        pb::GenerateRequest {
            request_id,
            model: self.model.clone(),
            input: Some(input),
            sampling: Some(pb::SamplingParams {
                max_tokens: self.max_tokens,
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                min_p: self.min_p,
                repetition_penalty: self.repetition_penalty,
                presence_penalty: self.presence_penalty,
                frequency_penalty: self.frequency_penalty,
                stop: self.stop.clone(),
                seed: self.seed,
                n: self.n,
                logprobs: self.logprobs,
                top_logprobs: self.top_logprobs,
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What one choice produced, kept for the choices printed after choice 0 and the summary.
#[derive(Debug, Default)]
struct ChoiceOutput {
    text: String,
    tokens: Vec<pb::TokenInfo>,
    finish: Option<pb::FinishReason>,
    error: Option<pb::Failure>,
}

/// Runs `lmforge generate`.
pub async fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let prompt = match args.prompt.as_deref() {
        Some("-") => Some(
            tokio::task::spawn_blocking(|| std::io::read_to_string(std::io::stdin()))
                .await
                .context("reading the prompt from stdin")?
                .context("reading the prompt from stdin")?,
        ),
        other => other.map(str::to_owned),
    };
    let mut client = connect(&args.inference_url).await?;
    let id = request_id();
    let request = args.request(prompt, id.clone());
    let mut stdout = std::io::stdout();
    let outcome = tokio::select! {
        outcome = stream(&mut client, request, &mut stdout) => Some(outcome),
        () = lmforge_runtime::shutdown::signal() => None,
    };
    let Some(outcome) = outcome else {
        // The call was dropped with the select, which is what frees the sequence on the
        // server; Abort covers a disconnect noticed late.
        let abort = client.abort(pb::AbortRequest { request_id: id });
        let _ = tokio::time::timeout(Duration::from_secs(2), abort).await;
        println!();
        anyhow::bail!("cancelled (Ctrl-C)");
    };
    match outcome {
        Ok(summary) => {
            eprintln!("{summary}");
            if summary.failed() {
                anyhow::bail!("generation failed");
            }
            Ok(())
        }
        Err(error) => {
            // Text may have been printed without its newline before the stream broke.
            println!();
            Err(error)
        }
    }
}

/// What a finished `GenerateStream` call produced.
#[derive(Debug)]
pub struct StreamSummary {
    choices: BTreeMap<u32, ChoiceOutput>,
    usage: Option<pb::Usage>,
    /// Time from sending the request to the first message carrying tokens.
    pub first_token: Option<Duration>,
    /// Time from sending the request to the end of the stream.
    pub elapsed: Duration,
}

impl StreamSummary {
    /// Finish reason per choice, in index order (`None`: the stream ended without one).
    pub fn finish_reasons(&self) -> Vec<Option<pb::FinishReason>> {
        self.choices.values().map(|c| c.finish).collect()
    }

    /// Generated tokens over all choices (the server's usage when it sent one).
    pub fn completion_tokens(&self) -> usize {
        self.usage.as_ref().map_or_else(
            || self.choices.values().map(|c| c.tokens.len()).sum(),
            |u| u.completion_tokens as usize,
        )
    }

    /// True when a choice ended in error or without a finish reason.
    pub fn failed(&self) -> bool {
        self.choices
            .values()
            .any(|c| c.error.is_some() || matches!(c.finish, None | Some(pb::FinishReason::Error)))
            || self.choices.is_empty()
    }
}

/// Streams one request: choice 0 to `out` as it arrives (flushed per message), the other
/// choices after it, then the logprobs when they were asked for.
pub async fn stream(
    client: &mut InferenceServiceClient<Channel>,
    request: pb::GenerateRequest,
    out: &mut impl Write,
) -> anyhow::Result<StreamSummary> {
    let want_logprobs = request.sampling.as_ref().is_some_and(|s| s.logprobs);
    let start = Instant::now();
    let mut stream = client
        .generate_stream(request)
        .await
        .map_err(status_error)?
        .into_inner();
    let mut choices: BTreeMap<u32, ChoiceOutput> = BTreeMap::new();
    let mut first_token = None;
    let mut usage = None;
    while let Some(message) = stream.message().await.map_err(status_error)? {
        if first_token.is_none() && !message.tokens.is_empty() {
            first_token = Some(start.elapsed());
        }
        if message.index == 0 && !message.text.is_empty() {
            out.write_all(message.text.as_bytes())?;
            out.flush()?;
        }
        let choice = choices.entry(message.index).or_default();
        choice.text.push_str(&message.text);
        choice.tokens.extend(message.tokens);
        if let Some(reason) = finish_reason(message.finish_reason) {
            choice.finish = Some(reason);
        }
        if message.error.is_some() {
            choice.error = message.error;
        }
        if message.usage.is_some() {
            usage = message.usage;
        }
    }
    let elapsed = start.elapsed();
    let multiple = choices.len() > 1;
    for (index, choice) in &choices {
        if *index > 0 {
            write!(out, "\n--- choice {index} ---\n{}", choice.text)?;
        }
    }
    writeln!(out)?;
    for (index, choice) in &choices {
        if let Some(error) = &choice.error {
            eprintln!("choice {index} failed: {}: {}", error.code, error.message);
        }
        if want_logprobs {
            write_logprobs(out, *index, choice, multiple)?;
        }
    }
    out.flush()?;
    Ok(StreamSummary {
        choices,
        usage,
        first_token,
        elapsed,
    })
}

fn finish_reason(value: i32) -> Option<pb::FinishReason> {
    match pb::FinishReason::try_from(value) {
        Ok(pb::FinishReason::Unspecified) => None,
        Ok(reason) => Some(reason),
        Err(_) => Some(pb::FinishReason::Unspecified),
    }
}

/// `stop`, `length`, … as the issue names them.
pub fn finish_name(reason: pb::FinishReason) -> &'static str {
    match reason {
        pb::FinishReason::Unspecified => "unknown",
        pb::FinishReason::Stop => "stop",
        pb::FinishReason::Length => "length",
        pb::FinishReason::Cancelled => "cancelled",
        pb::FinishReason::ContentFilter => "content_filter",
        pb::FinishReason::Error => "error",
        pb::FinishReason::DeadlineExceeded => "deadline_exceeded",
    }
}

fn write_logprobs(
    out: &mut impl Write,
    index: u32,
    choice: &ChoiceOutput,
    multiple: bool,
) -> std::io::Result<()> {
    if multiple {
        writeln!(out, "logprobs of choice {index}:")?;
    } else {
        writeln!(out, "logprobs:")?;
    }
    for token in &choice.tokens {
        let logprob = token
            .logprob
            .map_or_else(|| "-".to_owned(), |l| format!("{l:.4}"));
        let alternatives: Vec<String> = token
            .top_logprobs
            .iter()
            .map(|alt| format!("{:?} {:.4}", alt.text, alt.logprob))
            .collect();
        writeln!(
            out,
            "{:>8} {:<20} {:>9}  {}",
            token.id,
            format!("{:?}", token.text),
            logprob,
            alternatives.join(", ")
        )?;
    }
    Ok(())
}

/// `finish length · 12 prompt + 64 completion tokens · TTFT 41ms · 52.3 tok/s · 1.27s total`.
impl std::fmt::Display for StreamSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let finishes: Vec<&str> = self
            .choices
            .values()
            .map(|c| c.finish.map_or("none", finish_name))
            .collect();
        let completion = self.completion_tokens();
        let tokens = match &self.usage {
            Some(u) => format!(
                "{} prompt + {completion} completion tokens",
                u.prompt_tokens
            ),
            None => format!("{completion} completion tokens"),
        };
        let ttft = self
            .first_token
            .map_or_else(|| "no token".to_owned(), |t| format!("TTFT {t:.0?}"));
        // The rate after the first token: the figure that does not depend on the prompt.
        let rate = match self.first_token {
            Some(first) if completion > 1 && self.elapsed > first => format!(
                "{:.1} tok/s",
                (completion - 1) as f64 / (self.elapsed - first).as_secs_f64()
            ),
            _ => "- tok/s".to_owned(),
        };
        write!(
            f,
            "finish {} · {tokens} · {ttft} · {rate} · {:.2?} total",
            finishes.join(","),
            self.elapsed
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: GenerateArgs,
    }

    #[test]
    fn flags_become_a_chat_request_with_sampling() {
        let cli = Cli::try_parse_from([
            "generate",
            "--model",
            "bank@production",
            "--system",
            "be brief",
            "--user",
            "hello",
            "--max-tokens",
            "16",
            "--temperature",
            "0.5",
            "--stop",
            "\n",
            "--stop",
            "User:",
            "--presence-penalty",
            "-0.5",
            "--logprobs",
            "--top-logprobs",
            "3",
        ])
        .expect("valid flags");
        let request = cli.args.request(None, "id-1".to_owned());
        assert_eq!(request.model, "bank@production");
        let Some(pb::generate_request::Input::Chat(chat)) = request.input else {
            panic!("chat input expected");
        };
        let roles: Vec<i32> = chat.messages.iter().map(|m| m.role).collect();
        assert_eq!(
            roles,
            [pb::ChatRole::System as i32, pb::ChatRole::User as i32]
        );
        let sampling = request.sampling.expect("sampling set");
        assert_eq!(sampling.max_tokens, Some(16));
        assert_eq!(sampling.temperature, Some(0.5));
        assert_eq!(sampling.stop, ["\n", "User:"]);
        assert_eq!(sampling.presence_penalty, Some(-0.5));
        assert!(sampling.logprobs);
        assert_eq!(sampling.top_logprobs, Some(3));
    }

    #[test]
    fn a_prompt_and_chat_messages_exclude_each_other() {
        assert!(Cli::try_parse_from(["generate", "hi", "--user", "hello"]).is_err());
        assert!(Cli::try_parse_from(["generate"]).is_err());
        let cli = Cli::try_parse_from(["generate", "hi", "--logprobs"]).expect("valid");
        let request = cli.args.request(Some("hi".into()), String::new());
        let sampling = request.sampling.expect("sampling set");
        assert!(sampling.logprobs);
        assert_eq!(sampling.top_logprobs, None);
    }
}
