//! Per-key rate limits: two token buckets per key (requests per minute, tokens per minute),
//! refilled continuously. A request takes one request token up front; its tokens are charged
//! when it has finished (prompt + completion), so a key that overdraws waits until the bucket
//! is positive again. Time comes from `tokio::time`, so tests can pause it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;
use uuid::Uuid;

use crate::error::GatewayError;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn refill(&mut self, per_minute: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.level = (self.level + elapsed * per_minute / 60.0).min(per_minute);
        self.at = now;
    }

    /// Time until the level reaches `want`.
    fn wait_for(&self, want: f64, per_minute: f64) -> Duration {
        let missing = (want - self.level).max(0.0);
        Duration::from_secs_f64(missing * 60.0 / per_minute)
    }
}

#[derive(Debug, Default)]
struct KeyBuckets {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
}

/// Every key's buckets on this replica.
#[derive(Debug, Default)]
pub struct RateLimiter {
    keys: Mutex<HashMap<Uuid, KeyBuckets>>,
}

impl RateLimiter {
    /// Takes one request from `key`'s buckets, or says how long to wait. Limits of 0 are
    /// unlimited.
    pub fn admit(&self, key: Uuid, rpm: u32, tpm: u32) -> Result<(), GatewayError> {
        if rpm == 0 && tpm == 0 {
            return Ok(());
        }
        let now = Instant::now();
        let mut keys = self
            .keys
            .lock()
            .expect("rate limiter lock is never poisoned");
        let buckets = keys.entry(key).or_default();
        if tpm > 0 {
            let per_minute = f64::from(tpm);
            let bucket = buckets.tokens.get_or_insert(Bucket {
                level: per_minute,
                at: now,
            });
            bucket.refill(per_minute, now);
            if bucket.level < 1.0 {
                return Err(GatewayError::RateLimited {
                    limit: "tokens per minute",
                    retry_after: bucket.wait_for(1.0, per_minute),
                });
            }
        }
        if rpm > 0 {
            let per_minute = f64::from(rpm);
            let bucket = buckets.requests.get_or_insert(Bucket {
                level: per_minute,
                at: now,
            });
            bucket.refill(per_minute, now);
            if bucket.level < 1.0 {
                return Err(GatewayError::RateLimited {
                    limit: "requests per minute",
                    retry_after: bucket.wait_for(1.0, per_minute),
                });
            }
            bucket.level -= 1.0;
        }
        Ok(())
    }

    /// Charges `tokens` used by a finished request.
    pub fn charge_tokens(&self, key: Uuid, tpm: u32, tokens: u32) {
        if tpm == 0 {
            return;
        }
        let now = Instant::now();
        let per_minute = f64::from(tpm);
        let mut keys = self
            .keys
            .lock()
            .expect("rate limiter lock is never poisoned");
        let bucket = keys.entry(key).or_default().tokens.get_or_insert(Bucket {
            level: per_minute,
            at: now,
        });
        bucket.refill(per_minute, now);
        bucket.level -= f64::from(tokens);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_refuse_then_refill() {
        let limiter = RateLimiter::default();
        let key = Uuid::new_v4();
        for _ in 0..3 {
            limiter.admit(key, 3, 0).expect("within the limit");
        }
        let Err(GatewayError::RateLimited { retry_after, .. }) = limiter.admit(key, 3, 0) else {
            panic!("fourth request must be refused");
        };
        assert_eq!(retry_after, Duration::from_secs(20));
        tokio::time::advance(Duration::from_secs(20)).await;
        limiter.admit(key, 3, 0).expect("refilled");
        // Another key has its own bucket.
        limiter.admit(Uuid::new_v4(), 3, 0).expect("own bucket");
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_per_minute_are_charged_after_the_fact() {
        let limiter = RateLimiter::default();
        let key = Uuid::new_v4();
        limiter.admit(key, 0, 600).expect("full bucket");
        limiter.charge_tokens(key, 600, 610);
        let Err(GatewayError::RateLimited { limit, retry_after }) = limiter.admit(key, 0, 600)
        else {
            panic!("overdrawn bucket must refuse");
        };
        assert_eq!(limit, "tokens per minute");
        assert_eq!(retry_after, Duration::from_millis(1100));
    }
}
