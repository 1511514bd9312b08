//! A cache of resolved model references, because resolving `name@production` is the hot
//! path (every inference load and hot-swap asks) while the answer changes rarely.
//!
//! Correctness rests on invalidation, not on the TTL: every change that can alter a
//! resolution (alias move or delete, finalize, version update or delete, model delete)
//! clears the cache at once in the replica that made it and, through Postgres
//! LISTEN/NOTIFY, in every other replica within milliseconds. A generation counter keeps a
//! resolution that raced with an invalidation from being cached. The TTL only bounds how
//! long a lost notification (listener reconnecting) could leave an entry stale.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::domain::Version;

/// How long an entry may live without any notification.
const TTL: Duration = Duration::from_secs(10);
/// Bound on entries; the cache is cleared when it is reached (refs are few in practice).
const MAX_ENTRIES: usize = 10_000;

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    entries: HashMap<String, (Version, Option<String>, Instant)>,
}

/// Shared by all handlers of one registry process.
#[derive(Debug, Clone, Default)]
pub struct ResolveCache {
    inner: Arc<Mutex<Inner>>,
}

impl ResolveCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding this lock cannot leave the map inconsistent (single
        // insert/clear operations), so a poisoned lock is still usable.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The cached resolution of `reference`, if fresh.
    pub fn get(&self, reference: &str) -> Option<(Version, Option<String>)> {
        let inner = self.lock();
        let (version, alias, at) = inner.entries.get(reference)?;
        (at.elapsed() < TTL).then(|| (version.clone(), alias.clone()))
    }

    /// The current generation; pass it to [`ResolveCache::insert`] after reading Postgres.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Caches a resolution read while `generation` was current; dropped if anything was
    /// invalidated since.
    pub fn insert(&self, generation: u64, reference: &str, value: (Version, Option<String>)) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            inner.entries.clear();
        }
        inner
            .entries
            .insert(reference.to_owned(), (value.0, value.1, Instant::now()));
    }

    /// Forgets everything (some resolution may have changed).
    pub fn invalidate(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version(number: u32) -> Version {
        Version {
            id: uuid::Uuid::nil(),
            model_name: "m".into(),
            version: number,
            status: crate::domain::VersionStatus::Ready,
            status_message: String::new(),
            format: "hf-safetensors".into(),
            digest: String::new(),
            files: vec![],
            lineage: Default::default(),
            hyperparameters: serde_json::json!({}),
            metrics: Default::default(),
            chat_template: String::new(),
            architecture: String::new(),
            context_length: 0,
            parameter_count: 0,
            description: String::new(),
            tags: Default::default(),
            aliases: vec![],
            created_by: String::new(),
            created_at: chrono::Utc::now(),
            finalized_at: None,
            updated_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn a_resolution_racing_an_invalidation_is_not_cached() {
        let cache = ResolveCache::default();
        let before = cache.generation();
        cache.invalidate(); // an alias moved while we were reading Postgres
        cache.insert(before, "m@production", (version(1), None));
        assert!(cache.get("m@production").is_none());

        let now = cache.generation();
        cache.insert(now, "m@production", (version(2), None));
        assert_eq!(cache.get("m@production").map(|(v, _)| v.version), Some(2));
        cache.invalidate();
        assert!(cache.get("m@production").is_none());
    }
}
