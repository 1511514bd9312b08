//! Exact and near-duplicate removal, in input order (the first record of a cluster is kept).
//! Features (content hash, MinHash signature, band keys) are computed in parallel by
//! [`DedupSettings::features`]; [`Deduper::check`] then runs sequentially.

use sha2::{Digest, Sha256};

use crate::minhash::{LshIndex, MinHasher, PrehashedMap, band_keys};
use crate::record::Record;

/// Near-duplicate settings.
#[derive(Debug, Clone, PartialEq)]
pub struct NearSettings {
    /// Estimated Jaccard at or above which records are duplicates.
    pub threshold: f64,
    /// Permutations.
    pub num_perm: usize,
    /// Shingle size in characters.
    pub shingle: usize,
}

impl Default for NearSettings {
    fn default() -> Self {
        Self {
            threshold: 0.8,
            num_perm: 128,
            shingle: 5,
        }
    }
}

/// Deduplication settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DedupSettings {
    /// Exact dedup on.
    pub exact: bool,
    /// Near dedup; `None` → off.
    pub near: Option<NearSettings>,
}

impl Default for DedupSettings {
    fn default() -> Self {
        Self {
            exact: true,
            near: Some(NearSettings::default()),
        }
    }
}

/// What dedup needs of one record, computed in parallel.
#[derive(Debug)]
pub struct Features {
    /// sha256 (first 128 bits) of the normalized conversation: roles and contents.
    pub content_hash: u128,
    /// MinHash signature and band keys, when near dedup is on.
    pub near: Option<(Vec<u32>, Vec<u64>)>,
}

/// Computes [`Features`]; thread-safe and independent of what has been kept.
#[derive(Debug, Clone)]
pub struct FeatureHasher {
    near: Option<(MinHasher, usize, usize)>,
}

impl FeatureHasher {
    /// Content hash, and signature and band keys when near dedup is on.
    pub fn features(&self, record: &Record, scratch: &mut Vec<u32>) -> Features {
        let content_hash = content_hash(record);
        let near = self.near.as_ref().map(|(hasher, bands, rows)| {
            hasher.shingle_hashes(&record.joined_text(), scratch);
            let sig = hasher.signature(scratch);
            let keys = band_keys(&sig, *bands, *rows);
            (sig, keys)
        });
        Features { content_hash, near }
    }
}

/// The content hash of a record (also the split key).
pub fn content_hash(record: &Record) -> u128 {
    let mut hasher = Sha256::new();
    for m in &record.messages {
        hasher.update(m.role.as_str().as_bytes());
        hasher.update([0]);
        hasher.update(m.content.as_bytes());
        hasher.update([1]);
    }
    hasher.update(record.text.as_bytes());
    let digest = hasher.finalize();
    u128::from_le_bytes(digest[..16].try_into().expect("sha256 has 32 bytes"))
}

/// Deduplication state: what has been kept so far.
#[derive(Debug)]
pub struct Deduper {
    settings: DedupSettings,
    hasher: Option<MinHasher>,
    exact: PrehashedMap<u128, u64>,
    index: Option<LshIndex>,
    /// Kept sequence number of each LSH id.
    lsh_kept: Vec<u64>,
    /// `(id, line)` of each kept record, by kept sequence number.
    kept: Vec<(String, u64)>,
}

/// The verdict on one record.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// New content; its kept sequence number.
    Unique(u64),
    /// Same content as kept record `seq`.
    Exact { seq: u64 },
    /// Near-duplicate of kept record `seq`.
    Near { seq: u64, similarity: f64 },
}

impl Deduper {
    /// An empty state.
    pub fn new(settings: DedupSettings) -> Self {
        let hasher = settings
            .near
            .as_ref()
            .map(|n| MinHasher::new(n.num_perm, n.shingle));
        let index = settings
            .near
            .as_ref()
            .map(|n| LshIndex::new(n.num_perm, n.threshold));
        Self {
            settings,
            hasher,
            exact: PrehashedMap::default(),
            index,
            lsh_kept: Vec::new(),
            kept: Vec::new(),
        }
    }

    /// What computes features, detached from the state so that it runs while the state
    /// takes verdicts on the previous batch.
    pub fn feature_hasher(&self) -> FeatureHasher {
        FeatureHasher {
            near: match (&self.hasher, &self.index) {
                (Some(hasher), Some(index)) => {
                    let (bands, rows) = index.shape();
                    Some((hasher.clone(), bands, rows))
                }
                _ => None,
            },
        }
    }

    /// Features of one record (see [`FeatureHasher::features`]).
    pub fn features(&self, record: &Record, scratch: &mut Vec<u32>) -> Features {
        self.feature_hasher().features(record, scratch)
    }

    /// `(id, line)` of kept record `seq`.
    pub fn kept(&self, seq: u64) -> (&str, u64) {
        let (id, line) = &self.kept[seq as usize];
        (id, *line)
    }

    /// Decides on one record and remembers it when kept.
    pub fn check(&mut self, record: &Record, features: &Features) -> Verdict {
        if self.settings.exact
            && let Some(seq) = self.exact.get(&features.content_hash)
        {
            return Verdict::Exact { seq: *seq };
        }
        if let (Some(index), Some((sig, keys))) = (&self.index, &features.near)
            && let Some((id, similarity)) = index.query(sig, keys)
        {
            return Verdict::Near {
                seq: self.lsh_kept[id as usize],
                similarity,
            };
        }
        let seq = self.kept.len() as u64;
        self.kept.push((record.id.clone(), record.line));
        if self.settings.exact {
            self.exact.insert(features.content_hash, seq);
        }
        if let (Some(index), Some((sig, keys))) = (&mut self.index, &features.near) {
            index.insert(sig, keys);
            self.lsh_kept.push(seq);
        }
        Verdict::Unique(seq)
    }
}
