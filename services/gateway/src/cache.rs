//! The response cache and request merging.
//!
//! Deterministic requests (temperature 0 or a fixed seed) are keyed by a sha256 of the
//! whole request (minus `user`/`stream`/`no_cache`) and the route's targets. Answers live in
//! a `moka` cache bounded by total text size and by a TTL. Concurrent identical requests
//! share one generation: the first starts it, the others wait on the same shared future.
//! The caller checks the key's model permission before either: the cache never decides who
//! may see an answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::types::{GenOutput, GenRequest};

type Flight = Shared<BoxFuture<'static, Result<Arc<GenOutput>, GatewayError>>>;

/// Cached answers and generations in flight.
#[derive(Clone)]
pub struct ResponseCache {
    answers: moka::future::Cache<String, Arc<GenOutput>>,
    flights: Arc<Mutex<HashMap<String, Flight>>>,
}

impl std::fmt::Debug for ResponseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseCache")
            .field("entries", &self.answers.entry_count())
            .finish()
    }
}

/// The cache key of `request` routed to `targets`.
pub fn cache_key(request: &GenRequest, route: &str, targets: &[String]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(
        serde_json::to_vec(&(request, route, targets))
            .expect("a request always serializes to JSON"),
    );
    hex::encode(hasher.finalize())
}

impl ResponseCache {
    /// At most `max_bytes` of answer text, each kept for `ttl`.
    pub fn new(max_bytes: u64, ttl: Duration) -> Self {
        Self {
            answers: moka::future::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &String, value: &Arc<GenOutput>| {
                    let text: usize = value.choices.iter().map(|c| c.text.len() + 64).sum();
                    u32::try_from(key.len() + text + 256).unwrap_or(u32::MAX)
                })
                .time_to_live(ttl)
                .build(),
            flights: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// A cached answer.
    pub async fn get(&self, key: &str) -> Option<Arc<GenOutput>> {
        let hit = self.answers.get(key).await;
        metrics::counter!("gateway_cache_requests_total", "result" => if hit.is_some() { "hit" } else { "miss" })
            .increment(1);
        hit
    }

    /// Stores an answer.
    pub async fn insert(&self, key: String, output: Arc<GenOutput>) {
        self.answers.insert(key, output).await;
    }

    /// Runs `generate` unless an identical generation is already in flight, in which case
    /// its result is shared. Returns the result and whether it was merged into another.
    pub async fn single_flight(
        &self,
        key: &str,
        generate: impl FnOnce() -> BoxFuture<'static, Result<GenOutput, GatewayError>>,
    ) -> (Result<Arc<GenOutput>, GatewayError>, bool) {
        let (flight, merged) = {
            let mut flights = self
                .flights
                .lock()
                .expect("flight map lock is never poisoned");
            match flights.get(key) {
                Some(flight) => (flight.clone(), true),
                None => {
                    let flights_map = self.flights.clone();
                    let owned_key = key.to_owned();
                    let work = generate();
                    let flight = async move {
                        let result = work.await.map(Arc::new);
                        flights_map
                            .lock()
                            .expect("flight map lock is never poisoned")
                            .remove(&owned_key);
                        result
                    }
                    .boxed()
                    .shared();
                    flights.insert(key.to_owned(), flight.clone());
                    (flight, false)
                }
            }
        };
        if merged {
            metrics::counter!("gateway_merged_requests_total").increment(1);
        }
        (flight.await, merged)
    }
}
