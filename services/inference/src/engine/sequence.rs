//! Requests and sequences inside the engine thread.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use lmforge_model::kv_cache::BlockTable;
use lmforge_model::sampling::{Sampler, SamplingParams};
use lmforge_model::stopping::{FinishReason, StopConfig, StreamState};
use lmforge_model::tokenizer::TextTokenizer;
use tokio::sync::mpsc as tmpsc;

use super::constrain::{CompiledFormat, Constraint};
use super::{EngineRequest, Event, Finish, metrics};

/// What every sequence of one request shares.
#[derive(Debug)]
pub(super) struct RequestShared {
    pub id: String,
    pub prompt: Vec<u32>,
    pub priority: i32,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    pub span: opentelemetry::trace::SpanContext,
    events: tmpsc::UnboundedSender<Event>,
    cancelled: AtomicBool,
    /// Choices not finished yet.
    open_choices: AtomicUsize,
    first_token: Mutex<Option<Instant>>,
}

impl RequestShared {
    pub fn send(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
    }

    /// Why this request must end now, if it must: aborted, its receiver dropped (client
    /// gone), or its deadline passed.
    pub fn end_reason(&self, now: Instant) -> Option<Finish> {
        if self.cancelled.load(Ordering::Acquire) || self.events.is_closed() {
            Some(Finish::Cancelled)
        } else if self.deadline.is_some_and(|d| now >= d) {
            Some(Finish::DeadlineExceeded)
        } else {
            None
        }
    }

    /// `k` choices ended; the last one records the request's end-to-end latency.
    pub fn done_choices(&self, k: usize, label: &str) {
        if self.open_choices.fetch_sub(k, Ordering::AcqRel) == k {
            metrics::e2e(label, self.arrived.elapsed());
        }
    }

    fn token_emitted(&self, label: &str, now: Instant) {
        let mut first = self.first_token.lock().expect("first token time");
        if first.is_none() {
            *first = Some(now);
            metrics::ttft(label, now - self.arrived);
        }
    }
}

/// A request not admitted yet.
#[derive(Debug)]
pub(super) struct NewRequest {
    pub request: Arc<RequestShared>,
    pub n: usize,
    sampling: SamplingParams,
    stop: StopConfig,
    min_tokens: usize,
    logit_bias: Vec<(u32, f32)>,
    format: Option<Arc<CompiledFormat>>,
}

impl NewRequest {
    /// One sequence per choice; choice `k` samples with seed `seed + k` and has its own
    /// grammar state.
    pub fn into_sequences(self) -> Vec<Sequence> {
        (0..self.n)
            .map(|k| {
                let mut params = self.sampling.clone();
                params.seed = params.seed.wrapping_add(k as u64);
                Sequence {
                    request: self.request.clone(),
                    choice: k as u32,
                    prompt_len: self.request.prompt.len(),
                    tokens: self.request.prompt.clone(),
                    table: BlockTable::default(),
                    hashes: Vec::new(),
                    sampler: Sampler::new(params),
                    stream: StreamState::new(self.stop.clone()),
                    stop_ids: self
                        .stop
                        .eos_token_ids
                        .iter()
                        .chain(&self.stop.stop_token_ids)
                        .copied()
                        .collect(),
                    min_tokens: self.min_tokens,
                    logit_bias: self.logit_bias.clone(),
                    constraint: self.format.as_ref().map(|f| f.start()),
                    order: 0,
                    last_token: None,
                }
            })
            .collect()
    }
}

/// Work waiting for admission.
#[derive(Debug)]
pub(super) enum Waiting {
    New(NewRequest),
    /// A running sequence whose blocks were taken back; recomputed on admission.
    Preempted(Box<Sequence>),
}

impl Waiting {
    pub fn new(r: EngineRequest, events: tmpsc::UnboundedSender<Event>) -> Self {
        Waiting::New(NewRequest {
            request: Arc::new(RequestShared {
                id: r.id,
                prompt: r.prompt,
                priority: r.priority,
                deadline: r.deadline,
                arrived: r.arrived,
                span: r.span,
                events,
                cancelled: AtomicBool::new(false),
                open_choices: AtomicUsize::new(r.n),
                first_token: Mutex::new(None),
            }),
            n: r.n,
            sampling: r.sampling,
            stop: r.stop,
            min_tokens: r.min_tokens,
            logit_bias: r.logit_bias,
            format: r.format,
        })
    }

    pub fn request(&self) -> &RequestShared {
        match self {
            Waiting::New(n) => &n.request,
            Waiting::Preempted(s) => &s.request,
        }
    }

    pub fn is_preempted(&self) -> bool {
        matches!(self, Waiting::Preempted(_))
    }

    /// Sequences admitting this takes.
    pub fn width(&self) -> usize {
        match self {
            Waiting::New(n) => n.n,
            Waiting::Preempted(_) => 1,
        }
    }

    /// The tokens to compute on admission.
    pub fn tokens(&self) -> &[u32] {
        match self {
            Waiting::New(n) => &n.request.prompt,
            Waiting::Preempted(s) => &s.tokens,
        }
    }
}

/// One choice being generated.
#[derive(Debug)]
pub(super) struct Sequence {
    pub request: Arc<RequestShared>,
    pub choice: u32,
    pub prompt_len: usize,
    /// Prompt followed by the generated tokens; `table.len` of them are in the KV cache.
    pub tokens: Vec<u32>,
    pub table: BlockTable,
    /// Chained hashes of the full blocks at the start of `table`.
    pub hashes: Vec<u64>,
    sampler: Sampler,
    stream: StreamState,
    /// EOS and stop token ids, suppressed until `min_tokens` are generated.
    stop_ids: Vec<u32>,
    min_tokens: usize,
    logit_bias: Vec<(u32, f32)>,
    /// `response_format`'s grammar state, when set.
    constraint: Option<Constraint>,
    /// Admission order; the highest is the newest (preempted first).
    pub order: u64,
    last_token: Option<Instant>,
}

impl Sequence {
    /// Sample the next token from `row` (this sequence's logits), send it, and say whether
    /// the sequence is finished.
    pub fn sample_and_stream(
        &mut self,
        row: &[f32],
        tokenizer: &TextTokenizer,
        max_context: usize,
        label: &str,
    ) -> lmforge_model::Result<Option<Finish>> {
        let generated = self.tokens.len() - self.prompt_len;
        let suppress_stops = generated < self.min_tokens;
        if self.logit_bias.is_empty() && !suppress_stops && self.constraint.is_none() {
            // Nothing to adjust: sample from the forward's row as it is.
            return self.sample_row(row, tokenizer, max_context, label);
        }
        let mut row = row.to_vec();
        for &(id, bias) in &self.logit_bias {
            if let Some(x) = row.get_mut(id as usize) {
                *x += bias;
            }
        }
        if suppress_stops {
            for &id in &self.stop_ids {
                if let Some(x) = row.get_mut(id as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
        }
        if let Some(constraint) = &mut self.constraint {
            let by_length = self
                .stream
                .config
                .max_tokens
                .map_or(usize::MAX, |m| m.saturating_sub(generated));
            let remaining = by_length.min(max_context.saturating_sub(self.tokens.len()));
            constraint.mask(&mut row, remaining, &self.stop_ids);
        }
        self.sample_row(&row, tokenizer, max_context, label)
    }

    /// Sample from `row` (biases, stop suppression and the constraint's mask applied), send
    /// the token, and say whether the sequence is finished.
    fn sample_row(
        &mut self,
        row: &[f32],
        tokenizer: &TextTokenizer,
        max_context: usize,
        label: &str,
    ) -> lmforge_model::Result<Option<Finish>> {
        let (prompt, output) = self.tokens.split_at(self.prompt_len);
        let sampled = self.sampler.sample(row, prompt, output)?;
        if let Some(constraint) = &mut self.constraint {
            constraint.accept(sampled.token, &self.stop_ids);
        }
        self.tokens.push(sampled.token);
        let now = Instant::now();
        match self.last_token {
            None => self.request.token_emitted(label, now),
            Some(prev) => metrics::itl(label, now - prev),
        }
        self.last_token = Some(now);
        metrics::generated(label);
        let mut step = self.stream.push(sampled.token, tokenizer)?;
        // A complete constrained output ends the choice at once, as EOS would (min_tokens
        // cannot extend it, and the model need not be asked for the EOS).
        if step.finished.is_none() && self.constraint.as_ref().is_some_and(|c| c.is_complete()) {
            let rest = self.stream.end(FinishReason::Eos);
            step.text.push_str(&rest.text);
            step.finished = rest.finished;
        }
        self.request.send(Event::Token {
            choice: self.choice,
            id: sampled.token,
            text: step.text,
            logprob: sampled.logprob,
            top: sampled.top,
        });
        Ok(match step.finished {
            Some(FinishReason::Eos) => Some(Finish::Stop {
                matched: None,
                token: None,
            }),
            Some(FinishReason::StopToken(t)) => Some(Finish::Stop {
                matched: None,
                token: Some(t),
            }),
            Some(FinishReason::StopString(s)) => Some(Finish::Stop {
                matched: Some(s),
                token: None,
            }),
            Some(FinishReason::Length) => Some(Finish::Length),
            None if self.tokens.len() >= max_context => Some(Finish::Length),
            None => None,
        })
    }
}
