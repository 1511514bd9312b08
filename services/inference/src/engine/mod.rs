//! The continuous-batching engine, after TGI's v3 router and vLLM's scheduler.
//!
//! One engine per loaded model version, on its own OS thread, owning the model, the paged KV
//! cache and the block pool. The async side talks to it through an [`EngineHandle`]:
//! [`EngineHandle::submit`] applies admission control at once (bounded waiting queue, by
//! requests and by prompt tokens) and returns a channel of [`Event`]s; dropping that channel
//! or calling [`EngineHandle::abort`] cancels the request, and the engine frees its blocks at
//! the start of its next iteration.
//!
//! Each iteration: reap cancelled and expired sequences; schedule one token for every
//! decoding sequence, then prefill chunks of running prompts, then admit waiting requests
//! (highest priority first, FIFO within a priority) while the step's token budget
//! (`max_batch_tokens`), `max_running` and the free KV blocks allow; run one batched forward;
//! sample every sequence whose input is complete with its own sampler; stream the tokens out;
//! free finished sequences at once. Full blocks are hashed and reused by later prompts with the
//! same prefix ([`blocks`]). When a sequence needs a block and none is free, the newest running
//! sequence is preempted: its blocks are released and it waits at the head of the queue to be
//! recomputed (its full blocks usually still cached), keeping its sampler, so its output is the
//! same as if it had never been preempted.

pub mod blocks;
pub mod constrain;
pub mod json_mode;
mod metrics;
mod sequence;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use candle_core::DType;
use lmforge_model::Model;
use lmforge_model::infer::SeqInput;
use lmforge_model::kv_cache::PagedKvCache;
use lmforge_model::sampling::SamplingParams;
use lmforge_model::stopping::StopConfig;
use lmforge_model::tokenizer::TextTokenizer;
use tokio::sync::mpsc as tmpsc;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use blocks::BlockManager;
pub use metrics::{describe as describe_metrics, rejected as record_rejection};
use sequence::{Sequence, Waiting};

/// Engine sizing and scheduling limits.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Tokens (prefill chunks + decode tokens) per iteration.
    pub max_batch_tokens: usize,
    /// Sequences generating at once.
    pub max_running: usize,
    /// Requests allowed to wait for admission; more → rejected at once.
    pub max_waiting_requests: usize,
    /// Prompt tokens allowed to wait for admission; more → rejected at once.
    pub max_waiting_tokens: usize,
    /// Reuse cached full KV blocks across requests with a common prefix.
    pub prefix_caching: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: 1024,
            max_batch_tokens: 512,
            max_running: 64,
            max_waiting_requests: 512,
            max_waiting_tokens: 262_144,
            prefix_caching: true,
        }
    }
}

/// Bytes of KV cache one block takes for `model`.
pub fn block_bytes(model: &Model, block_size: usize) -> usize {
    let c = &model.config;
    2 * c.num_hidden_layers
        * c.num_key_value_heads
        * c.head_dim
        * block_size
        * model.dtype().size_in_bytes()
}

/// One request as the engine sees it: token ids in, `n` sequences out.
#[derive(Debug)]
pub struct EngineRequest {
    pub id: String,
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub stop: StopConfig,
    pub min_tokens: usize,
    pub logit_bias: Vec<(u32, f32)>,
    /// `response_format`: every choice's output follows this grammar ([`constrain`]).
    pub format: Option<Arc<constrain::CompiledFormat>>,
    /// Choices to generate (each its own sequence, seeded `seed + index`).
    pub n: usize,
    pub priority: i32,
    pub deadline: Option<Instant>,
    pub arrived: Instant,
    /// The request's trace span, linked from every engine step that serves it.
    pub span: opentelemetry::trace::SpanContext,
}

/// Why a choice finished.
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// EOS, a stop token (with its id) or a stop string (with the string).
    Stop {
        matched: Option<String>,
        token: Option<u32>,
    },
    Length,
    Cancelled,
    DeadlineExceeded,
    Error(String),
}

/// What the engine tells a request.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The request left the queue: how long it waited, and prompt tokens found in the
    /// prefix cache (over all choices' first admission).
    Admitted {
        queue: Duration,
        cached_tokens: usize,
    },
    /// One generated token of a choice, with the text it releases.
    Token {
        choice: u32,
        id: u32,
        text: String,
        /// When the request asked for log-probabilities.
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    /// A choice ended.
    Finished { choice: u32, reason: Finish },
    /// The request's deadline passed before it was admitted.
    Expired,
}

/// Why `submit` refused a request.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full ({0})")]
    QueueFull(String),
    #[error("the engine has stopped")]
    Stopped,
}

/// Live figures of one engine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub waiting_tokens: usize,
    pub kv_blocks_used: usize,
    pub kv_blocks_total: usize,
    pub preemptions: usize,
    pub prefix_cache_queried_tokens: usize,
    pub prefix_cache_hit_tokens: usize,
}

enum Command {
    Submit(Box<Waiting>),
    Abort(String),
    /// Cancel everything and stop the thread.
    Shutdown,
}

#[derive(Debug, Default)]
struct Shared {
    /// (requests, prompt tokens) waiting, counted at submit and uncounted at admission.
    queue: Mutex<(usize, usize)>,
    running: AtomicUsize,
    kv_used: AtomicUsize,
    preemptions: AtomicUsize,
    prefix_queried: AtomicUsize,
    prefix_hits: AtomicUsize,
    stopped: AtomicBool,
}

/// The async side's handle on an engine thread; cheap to clone. The thread ends once every
/// handle is dropped and its work is done, or at [`EngineHandle::shutdown`].
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
    label: Arc<str>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Submit(_) => f.write_str("Submit"),
            Command::Abort(id) => write!(f, "Abort({id})"),
            Command::Shutdown => f.write_str("Shutdown"),
        }
    }
}

impl EngineHandle {
    /// Queue `request`, or refuse it at once when the waiting queue is full.
    pub fn submit(
        &self,
        request: EngineRequest,
    ) -> Result<tmpsc::UnboundedReceiver<Event>, SubmitError> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Err(SubmitError::Stopped);
        }
        let tokens = request.prompt.len() * request.n;
        {
            let mut q = self.shared.queue.lock().expect("queue counters");
            if q.0 + 1 > self.config.max_waiting_requests {
                metrics::rejected(&self.label, "queue_requests");
                return Err(SubmitError::QueueFull(format!(
                    "{} requests waiting, limit {}",
                    q.0, self.config.max_waiting_requests
                )));
            }
            if q.1 + tokens > self.config.max_waiting_tokens {
                metrics::rejected(&self.label, "queue_tokens");
                return Err(SubmitError::QueueFull(format!(
                    "{} prompt tokens waiting, limit {}",
                    q.1, self.config.max_waiting_tokens
                )));
            }
            q.0 += 1;
            q.1 += tokens;
        }
        let (events, rx) = tmpsc::unbounded_channel();
        let waiting = Waiting::new(request, events);
        if self.tx.send(Command::Submit(Box::new(waiting))).is_err() {
            let mut q = self.shared.queue.lock().expect("queue counters");
            q.0 -= 1;
            q.1 -= tokens;
            return Err(SubmitError::Stopped);
        }
        Ok(rx)
    }

    /// Cancel the request `id` if this engine has it (its choices end `Cancelled`).
    pub fn abort(&self, id: &str) {
        let _ = self.tx.send(Command::Abort(id.to_string()));
    }

    /// Cancel everything and stop the engine thread.
    pub fn shutdown(&self) {
        self.shared.stopped.store(true, Ordering::Release);
        let _ = self.tx.send(Command::Shutdown);
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn stats(&self) -> EngineStats {
        let q = *self.shared.queue.lock().expect("queue counters");
        EngineStats {
            running: self.shared.running.load(Ordering::Relaxed),
            waiting: q.0,
            waiting_tokens: q.1,
            kv_blocks_used: self.shared.kv_used.load(Ordering::Relaxed),
            kv_blocks_total: self.config.num_blocks,
            preemptions: self.shared.preemptions.load(Ordering::Relaxed),
            prefix_cache_queried_tokens: self.shared.prefix_queried.load(Ordering::Relaxed),
            prefix_cache_hit_tokens: self.shared.prefix_hits.load(Ordering::Relaxed),
        }
    }
}

/// Start an engine thread for `model`. `label` names it in metrics (the model reference).
pub fn spawn(
    model: Model,
    tokenizer: Arc<TextTokenizer>,
    config: EngineConfig,
    label: &str,
) -> std::io::Result<EngineHandle> {
    let cache = PagedKvCache::new(
        &model.config,
        config.num_blocks,
        config.block_size,
        model.dtype(),
        model.device(),
    )
    .map_err(|e| std::io::Error::other(e.to_string()))?;
    let (tx, rx) = mpsc::channel();
    let shared = Arc::new(Shared::default());
    let config = Arc::new(config);
    let label: Arc<str> = label.into();
    let engine = Engine {
        blocks: BlockManager::new(config.num_blocks, config.block_size),
        model,
        cache,
        tokenizer,
        rx,
        shared: shared.clone(),
        config: config.clone(),
        label: label.clone(),
        waiting: VecDeque::new(),
        running: Vec::new(),
        next_order: 0,
    };
    std::thread::Builder::new()
        .name(format!("engine-{label}"))
        .spawn(move || engine.run())?;
    Ok(EngineHandle {
        tx,
        shared,
        config,
        label,
    })
}

/// Sequences from which a step samples on the rayon pool rather than on the engine thread
/// (a rayon round trip costs more than a few samples).
const PARALLEL_SAMPLING: usize = 8;

struct Engine {
    model: Model,
    cache: PagedKvCache,
    blocks: BlockManager,
    tokenizer: Arc<TextTokenizer>,
    rx: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    config: Arc<EngineConfig>,
    label: Arc<str>,
    /// Requests not admitted yet and preempted sequences (at the front), in admission order.
    waiting: VecDeque<Waiting>,
    /// Sequences holding KV blocks, oldest admission first.
    running: Vec<Sequence>,
    next_order: u64,
}

impl Engine {
    fn run(mut self) {
        tracing::debug!(model = %self.label, blocks = self.config.num_blocks, "engine started");
        loop {
            let idle = self.running.is_empty() && self.waiting.is_empty();
            let first = if idle {
                match self.rx.recv() {
                    Ok(c) => Some(c),
                    Err(_) => break,
                }
            } else {
                None
            };
            if !self.drain_commands(first) {
                break;
            }
            self.reap();
            self.step();
            self.publish();
        }
        self.cancel_all();
        self.shared.stopped.store(true, Ordering::Release);
        self.publish();
        tracing::debug!(model = %self.label, "engine stopped");
    }

    /// Apply queued commands; false when the engine must stop.
    fn drain_commands(&mut self, first: Option<Command>) -> bool {
        let mut next = first;
        loop {
            let cmd = match next.take() {
                Some(c) => c,
                None => match self.rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::TryRecvError::Empty) => return true,
                    // Every handle is gone: finish what runs (its receivers decide), then stop.
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return !(self.running.is_empty() && self.waiting.is_empty());
                    }
                },
            };
            match cmd {
                Command::Submit(w) => self.enqueue(*w),
                Command::Abort(id) => {
                    for s in &self.running {
                        if s.request.id == id {
                            s.request.cancel();
                        }
                    }
                    for w in &self.waiting {
                        if w.request().id == id {
                            w.request().cancel();
                        }
                    }
                }
                Command::Shutdown => return false,
            }
        }
    }

    /// Insert a new request behind every request of equal or higher priority.
    fn enqueue(&mut self, w: Waiting) {
        let p = w.request().priority;
        let at = self
            .waiting
            .iter()
            .position(|x| !x.is_preempted() && x.request().priority < p)
            .unwrap_or(self.waiting.len());
        self.waiting.insert(at, w);
    }

    /// Drop cancelled, disconnected and expired work, freeing blocks at once.
    fn reap(&mut self) {
        let now = Instant::now();
        let mut i = 0;
        while i < self.running.len() {
            let reason = self.running[i].request.end_reason(now);
            if let Some(reason) = reason {
                let seq = self.running.remove(i);
                self.finish(seq, reason);
            } else {
                i += 1;
            }
        }
        let mut kept = VecDeque::with_capacity(self.waiting.len());
        while let Some(w) = self.waiting.pop_front() {
            match w.request().end_reason(now) {
                None => kept.push_back(w),
                Some(reason) => match w {
                    Waiting::Preempted(seq) => self.finish(*seq, reason),
                    Waiting::New(new) => {
                        self.unqueue(&new.request.prompt, new.n);
                        if reason == Finish::DeadlineExceeded {
                            new.request.send(Event::Expired);
                        } else {
                            for c in 0..new.n as u32 {
                                new.request.send(Event::Finished {
                                    choice: c,
                                    reason: reason.clone(),
                                });
                            }
                        }
                        new.request.done_choices(new.n, &self.label);
                    }
                },
            }
        }
        self.waiting = kept;
    }

    fn unqueue(&self, prompt: &[u32], n: usize) {
        let mut q = self.shared.queue.lock().expect("queue counters");
        q.0 = q.0.saturating_sub(1);
        q.1 = q.1.saturating_sub(prompt.len() * n);
    }

    /// End `seq` (already out of `running`): free its blocks, tell its request.
    fn finish(&mut self, mut seq: Sequence, reason: Finish) {
        self.release_blocks(&mut seq);
        seq.request.send(Event::Finished {
            choice: seq.choice,
            reason: reason.clone(),
        });
        metrics::finished(&self.label, &reason);
        seq.request.done_choices(1, &self.label);
    }

    fn release_blocks(&mut self, seq: &mut Sequence) {
        for &b in &seq.table.blocks {
            self.blocks.release(b);
        }
        seq.table = Default::default();
        seq.hashes.clear();
    }

    fn cancel_all(&mut self) {
        for seq in std::mem::take(&mut self.running) {
            self.finish(seq, Finish::Cancelled);
        }
        for w in std::mem::take(&mut self.waiting) {
            match w {
                Waiting::Preempted(seq) => self.finish(*seq, Finish::Cancelled),
                Waiting::New(new) => {
                    self.unqueue(&new.request.prompt, new.n);
                    for c in 0..new.n as u32 {
                        new.request.send(Event::Finished {
                            choice: c,
                            reason: Finish::Cancelled,
                        });
                    }
                }
            }
        }
    }

    /// Blocks `seq` needs beyond its table to hold `tokens` more tokens.
    fn blocks_needed(&self, seq: &Sequence, tokens: usize) -> usize {
        (seq.table.len + tokens)
            .div_ceil(self.config.block_size)
            .saturating_sub(seq.table.blocks.len())
    }

    /// Preempt the newest running sequence: free its blocks and queue it for recompute.
    fn preempt_newest(
        &mut self,
        scheduled: &mut Vec<(u64, usize)>,
        budget: &mut usize,
    ) -> Option<u64> {
        let mut seq = self.running.pop()?;
        if let Some(pos) = scheduled.iter().position(|(o, _)| *o == seq.order) {
            *budget += scheduled.remove(pos).1;
        }
        self.release_blocks(&mut seq);
        self.shared.preemptions.fetch_add(1, Ordering::Relaxed);
        metrics::preempted(&self.label);
        tracing::debug!(model = %self.label, request = %seq.request.id, "preempted for recompute");
        let order = seq.order;
        self.waiting.push_front(Waiting::Preempted(Box::new(seq)));
        Some(order)
    }

    /// One iteration: schedule, forward, sample, stream.
    fn step(&mut self) {
        let mut budget = self.config.max_batch_tokens;
        // (sequence order, tokens this step)
        let mut scheduled: Vec<(u64, usize)> = Vec::new();
        // Running sequences: decode tokens first, then prefill chunks, oldest first.
        for decode_pass in [true, false] {
            let mut i = 0;
            while i < self.running.len() && budget > 0 {
                let seq = &self.running[i];
                let remaining = seq.tokens.len() - seq.table.len;
                if (remaining == 1) != decode_pass {
                    i += 1;
                    continue;
                }
                let n = remaining.min(budget);
                let order = seq.order;
                let mut need = self.blocks_needed(seq, n);
                let mut self_preempted = false;
                while need > self.blocks.available() {
                    let victim = self.preempt_newest(&mut scheduled, &mut budget);
                    if victim == Some(order) || victim.is_none() {
                        self_preempted = true;
                        break;
                    }
                    need = self.blocks_needed(&self.running[i], n);
                }
                if self_preempted {
                    break;
                }
                let seq = &mut self.running[i];
                for _ in 0..need {
                    seq.table
                        .blocks
                        .push(self.blocks.allocate().expect("availability checked above"));
                }
                scheduled.push((order, n));
                budget -= n;
                i += 1;
            }
        }
        self.admit(&mut scheduled, &mut budget);
        if scheduled.is_empty() {
            return;
        }
        self.run_batch(&scheduled);
    }

    /// Move waiting work into `running` while budget, `max_running` and blocks allow.
    fn admit(&mut self, scheduled: &mut Vec<(u64, usize)>, budget: &mut usize) {
        let bs = self.config.block_size;
        while *budget > 0 && !self.waiting.is_empty() {
            let width = self.waiting[0].width();
            if self.running.len() + width > self.config.max_running && !self.running.is_empty() {
                break;
            }
            // Blocks for the whole remaining input plus the first generated token of every
            // choice, so an admitted prompt is not preempted by its own growth right away.
            let tokens = self.waiting[0].tokens().len();
            let cached_max = if self.config.prefix_caching {
                (tokens - 1) / bs
            } else {
                0
            };
            let (hit, hashes) = self
                .blocks
                .lookup_prefix(self.waiting[0].tokens(), cached_max);
            let per_choice = (tokens + 1).div_ceil(bs) - hit.len();
            if per_choice * width > self.blocks.available() {
                for b in hit {
                    self.blocks.release(b);
                }
                break;
            }
            let w = self.waiting.pop_front().expect("checked non-empty");
            let resumed = w.is_preempted();
            let mut seqs = match w {
                Waiting::Preempted(seq) => vec![*seq],
                Waiting::New(new) => {
                    self.unqueue(&new.request.prompt, new.n);
                    new.into_sequences()
                }
            };
            let queried = tokens * seqs.len();
            let first_cached = hit.len() * bs;
            let mut cached = 0;
            for (k, seq) in seqs.iter_mut().enumerate() {
                // The first choice takes the looked-up references; the others add their own.
                let blocks = if k == 0 {
                    hit.clone()
                } else {
                    self.blocks.lookup_prefix(&seq.tokens, hit.len()).0
                };
                seq.table.len = blocks.len() * bs;
                seq.table.blocks = blocks;
                seq.hashes = hashes.clone();
                cached += seq.table.len;
                seq.order = self.next_order;
                self.next_order += 1;
            }
            self.shared
                .prefix_queried
                .fetch_add(queried, Ordering::Relaxed);
            self.shared.prefix_hits.fetch_add(cached, Ordering::Relaxed);
            metrics::prefix_cache(&self.label, queried, cached);
            let first = &seqs[0];
            if !resumed {
                let queue = first.request.arrived.elapsed();
                metrics::queue_time(&self.label, queue);
                first.request.send(Event::Admitted {
                    queue,
                    cached_tokens: first_cached,
                });
            }
            for mut seq in seqs {
                if *budget == 0 {
                    self.running.push(seq);
                    continue;
                }
                let n = (seq.tokens.len() - seq.table.len).min(*budget);
                let need = self.blocks_needed(&seq, n);
                for _ in 0..need {
                    seq.table.blocks.push(
                        self.blocks
                            .allocate()
                            .expect("admission checked availability"),
                    );
                }
                scheduled.push((seq.order, n));
                *budget -= n;
                self.running.push(seq);
            }
        }
    }

    /// Forward the scheduled chunks, then sample and stream every completed sequence.
    fn run_batch(&mut self, scheduled: &[(u64, usize)]) {
        let span = tracing::info_span!(
            "engine.step",
            model = %self.label,
            sequences = scheduled.len(),
            tokens = scheduled.iter().map(|s| s.1).sum::<usize>(),
        );
        let mut linked = Vec::new();
        for seq in &self.running {
            if scheduled.iter().any(|(o, _)| *o == seq.order)
                && !linked.contains(&seq.request.span.span_id())
            {
                linked.push(seq.request.span.span_id());
                span.add_link(seq.request.span.clone());
            }
        }
        let _enter = span.enter();
        let started = Instant::now();
        let idx: Vec<(usize, usize)> = self
            .running
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                scheduled
                    .iter()
                    .find(|(o, _)| *o == s.order)
                    .map(|&(_, n)| (i, n))
            })
            .collect();
        let result = {
            let mut inputs: Vec<SeqInput<'_>> = Vec::with_capacity(idx.len());
            let mut it = idx.iter().peekable();
            for (i, seq) in self.running.iter_mut().enumerate() {
                if let Some(&&(j, n)) = it.peek()
                    && j == i
                {
                    let start = seq.table.len;
                    inputs.push(SeqInput {
                        tokens: &seq.tokens[start..start + n],
                        table: &mut seq.table,
                    });
                    it.next();
                }
            }
            self.model
                .forward_batch(&mut self.cache, &mut inputs)
                .and_then(|t| Ok(t.to_dtype(DType::F32)?.to_vec2::<f32>()?))
        };
        let logits = match result {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(model = %self.label, error = %e, "batch forward failed");
                let failed: Vec<u64> = idx.iter().map(|&(i, _)| self.running[i].order).collect();
                let mut i = 0;
                while i < self.running.len() {
                    if failed.contains(&self.running[i].order) {
                        let seq = self.running.remove(i);
                        self.finish(seq, Finish::Error(e.to_string()));
                    } else {
                        i += 1;
                    }
                }
                return;
            }
        };
        metrics::step(&self.label, idx.len(), started.elapsed());
        let bs = self.config.block_size;
        // Cache every block this step filled, chained to its prefix.
        for &(i, _) in &idx {
            let seq = &mut self.running[i];
            while seq.hashes.len() < seq.table.len / bs {
                let k = seq.hashes.len();
                let h = blocks::block_hash(
                    seq.hashes.last().copied(),
                    &seq.tokens[k * bs..(k + 1) * bs],
                );
                self.blocks.register_full(seq.table.blocks[k], h);
                seq.hashes.push(h);
            }
        }
        // Sample and stream every sequence whose input is complete (a prefill chunk that does
        // not finish its prompt has nothing to sample). Each has its own sampler, stream and
        // channel, so a large batch is shared out over the pool's threads, which are idle
        // between forwards.
        let (tokenizer, label) = (&*self.tokenizer, &*self.label);
        let max_context = self.model.config.max_position_embeddings;
        let mut ready: Vec<(&mut Sequence, &[f32])> = Vec::with_capacity(idx.len());
        let mut rows = logits.iter().zip(&idx).peekable();
        for (i, seq) in self.running.iter_mut().enumerate() {
            if let Some(&(row, &(j, _))) = rows.peek()
                && j == i
            {
                rows.next();
                if seq.table.len == seq.tokens.len() {
                    ready.push((seq, row));
                }
            }
        }
        let sample = |(seq, row): (&mut Sequence, &[f32])| {
            let end = match seq.sample_and_stream(row, tokenizer, max_context, label) {
                Ok(end) => end,
                Err(e) => Some(Finish::Error(e.to_string())),
            };
            end.map(|reason| (seq.order, reason))
        };
        let done: Vec<(u64, Finish)> = if ready.len() >= PARALLEL_SAMPLING {
            use rayon::prelude::*;
            ready.into_par_iter().filter_map(sample).collect()
        } else {
            ready.into_iter().filter_map(sample).collect()
        };
        for (order, reason) in done {
            let pos = self
                .running
                .iter()
                .position(|s| s.order == order)
                .expect("sequence still running");
            let seq = self.running.remove(pos);
            self.finish(seq, reason);
        }
    }

    fn publish(&self) {
        self.shared
            .running
            .store(self.running.len(), Ordering::Relaxed);
        self.shared
            .kv_used
            .store(self.blocks.used(), Ordering::Relaxed);
        let waiting = self.shared.queue.lock().expect("queue counters").0
            + self.waiting.iter().filter(|w| w.is_preempted()).count();
        metrics::gauges(
            &self.label,
            self.running.len(),
            waiting,
            self.blocks.used(),
            self.blocks.total(),
        );
    }
}
