//! Per-route counters (requests, errors, tokens, cache hits, latency) of this replica, so
//! that the large-model calls saved by rules and the auto-router are visible.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// Latency samples kept per route for the percentiles.
const SAMPLES: usize = 1024;

/// Counters of one route.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteCounters {
    pub model: String,
    pub requests: u64,
    pub errors: u64,
    pub rate_limited: u64,
    pub cache_hits: u64,
    pub filtered: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub in_flight: u32,
    pub by_target: BTreeMap<String, u64>,
    latencies: VecDeque<Duration>,
}

impl RouteCounters {
    /// (p50, p95) of the recent latencies.
    pub fn percentiles(&self) -> Option<(Duration, Duration)> {
        if self.latencies.is_empty() {
            return None;
        }
        let mut sorted: Vec<Duration> = self.latencies.iter().copied().collect();
        sorted.sort();
        let at = |q: f64| sorted[((sorted.len() - 1) as f64 * q).round() as usize];
        Some((at(0.5), at(0.95)))
    }
}

/// How one request ended, for the counters.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub error: bool,
    pub rate_limited: bool,
    pub cache_hit: bool,
    pub filtered: bool,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub target: Option<String>,
    pub latency: Duration,
}

/// All routes' counters.
#[derive(Debug)]
pub struct RouteStats {
    inner: Mutex<(DateTime<Utc>, BTreeMap<String, RouteCounters>)>,
}

impl Default for RouteStats {
    fn default() -> Self {
        Self {
            inner: Mutex::new((Utc::now(), BTreeMap::new())),
        }
    }
}

impl RouteStats {
    /// A request entered `route` (for `model`).
    pub fn begin(&self, route: &str, model: &str) {
        let mut inner = self.inner.lock().expect("stats lock is never poisoned");
        let counters = inner.1.entry(route.to_owned()).or_default();
        counters.model = model.to_owned();
        counters.requests += 1;
        counters.in_flight += 1;
        metrics::counter!("gateway_route_requests_total", "route" => route.to_owned()).increment(1);
    }

    /// A request of `route` ended.
    pub fn end(&self, route: &str, outcome: Outcome) {
        let mut inner = self.inner.lock().expect("stats lock is never poisoned");
        let counters = inner.1.entry(route.to_owned()).or_default();
        counters.in_flight = counters.in_flight.saturating_sub(1);
        counters.errors += u64::from(outcome.error);
        counters.rate_limited += u64::from(outcome.rate_limited);
        counters.cache_hits += u64::from(outcome.cache_hit);
        counters.filtered += u64::from(outcome.filtered);
        counters.prompt_tokens += u64::from(outcome.prompt_tokens);
        counters.completion_tokens += u64::from(outcome.completion_tokens);
        if let Some(target) = outcome.target {
            *counters.by_target.entry(target).or_default() += 1;
        }
        if counters.latencies.len() == SAMPLES {
            counters.latencies.pop_front();
        }
        counters.latencies.push_back(outcome.latency);
        metrics::counter!("gateway_route_tokens_total", "route" => route.to_owned())
            .increment(u64::from(outcome.prompt_tokens + outcome.completion_tokens));
    }

    /// A request refused by a rate limit before it was routed.
    pub fn rate_limited(&self, route: &str) {
        let mut inner = self.inner.lock().expect("stats lock is never poisoned");
        inner.1.entry(route.to_owned()).or_default().rate_limited += 1;
    }

    /// The counters (optionally of one route), optionally resetting them.
    pub fn snapshot(
        &self,
        route: Option<&str>,
        reset: bool,
    ) -> (DateTime<Utc>, BTreeMap<String, RouteCounters>) {
        let mut inner = self.inner.lock().expect("stats lock is never poisoned");
        let since = inner.0;
        let routes: BTreeMap<String, RouteCounters> = inner
            .1
            .iter()
            .filter(|(name, _)| route.is_none_or(|r| r == name.as_str()))
            .map(|(n, c)| (n.clone(), c.clone()))
            .collect();
        if reset {
            inner.0 = Utc::now();
            for counters in inner.1.values_mut() {
                let in_flight = counters.in_flight;
                *counters = RouteCounters {
                    model: counters.model.clone(),
                    in_flight,
                    ..Default::default()
                };
            }
        }
        (since, routes)
    }
}
