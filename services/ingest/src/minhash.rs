//! MinHash signatures over character shingles and an LSH index over them.
//!
//! Signatures: every shingle (`shingle_size` consecutive characters) is hashed to 32 bits,
//! and permutation `i` maps a hash `x` to `mix(a_i·x + b_i)` (odd `a_i`, a bijection on u32
//! followed by an xor-shift); the signature keeps each permutation's minimum. The inner loop
//! runs over a fixed-size array of permutations, so the compiler vectorizes it.
//!
//! Index: the signature is cut into `bands` bands of `rows` values (chosen like datasketch's
//! `MinHashLSH`, minimizing the weighted false-positive and false-negative areas at the
//! threshold); each band's hash is a bucket key. A candidate sharing any bucket is then
//! verified by the fraction of equal signature values, so pairs estimated below the
//! threshold are never reported. Memory per kept record: one `u16` per permutation (the low
//! bits of each minimum; a chance collision of two different minima is 1/65536) plus one
//! bucket entry and one chain link per band.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// A hasher for keys that are already uniformly distributed hashes (band keys, content
/// hashes): it keeps the key's low 64 bits instead of hashing them again.
#[derive(Debug, Default, Clone, Copy)]
pub struct PrehashedKey(u64);

impl Hasher for PrehashedKey {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }

    fn write_u128(&mut self, n: u128) {
        self.0 ^= n as u64 ^ (n >> 64) as u64;
    }
}

/// A map keyed by hashes.
pub type PrehashedMap<K, V> = HashMap<K, V, BuildHasherDefault<PrehashedKey>>;

/// A MinHash configuration (permutations and shingle size).
#[derive(Debug, Clone)]
pub struct MinHasher {
    a: Vec<u32>,
    b: Vec<u32>,
    shingle: usize,
}

/// SplitMix64: the seeded stream behind permutations and every deterministic choice.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl MinHasher {
    /// `num_perm` permutations over `shingle`-character shingles (fixed seed: signatures are
    /// comparable across runs).
    pub fn new(num_perm: usize, shingle: usize) -> Self {
        let mut state = 0x5EED_u64;
        let mut next = || {
            state = splitmix64(state);
            state
        };
        let a = (0..num_perm).map(|_| (next() as u32) | 1).collect();
        let b = (0..num_perm).map(|_| next() as u32).collect();
        Self {
            a,
            b,
            shingle: shingle.max(1),
        }
    }

    /// Number of permutations.
    pub fn num_perm(&self) -> usize {
        self.a.len()
    }

    /// Hashes of the shingles of `text` (lowercased, whitespace runs as one space). A text
    /// shorter than a shingle is one shingle.
    pub fn shingle_hashes(&self, text: &str, out: &mut Vec<u32>) {
        out.clear();
        let mut chars: Vec<u32> = Vec::with_capacity(text.len());
        let mut prev_space = true;
        for c in text.chars() {
            if c.is_whitespace() {
                if !prev_space {
                    chars.push(' ' as u32);
                }
                prev_space = true;
            } else {
                let lower = if c.is_ascii() {
                    c.to_ascii_lowercase()
                } else {
                    c
                };
                chars.push(lower as u32);
                prev_space = false;
            }
        }
        if chars.last() == Some(&(' ' as u32)) {
            chars.pop();
        }
        let k = self.shingle;
        let hash = |w: &[u32]| {
            let mut h = 0xCBF2_9CE4_8422_2325_u64;
            for &c in w {
                h = (h ^ u64::from(c)).wrapping_mul(0x0000_0100_0000_01B3);
            }
            (splitmix64(h) >> 32) as u32
        };
        if chars.len() <= k {
            out.push(hash(&chars));
            return;
        }
        out.extend(chars.windows(k).map(hash));
    }

    /// The signature of a set of shingle hashes.
    pub fn signature(&self, hashes: &[u32]) -> Vec<u32> {
        let mut sig = vec![u32::MAX; self.a.len()];
        for chunk in (0..self.a.len()).step_by(LANES) {
            let end = (chunk + LANES).min(self.a.len());
            if end - chunk == LANES {
                let a: &[u32; LANES] = self.a[chunk..end].try_into().expect("LANES long");
                let b: &[u32; LANES] = self.b[chunk..end].try_into().expect("LANES long");
                let s: &mut [u32; LANES] = (&mut sig[chunk..end]).try_into().expect("LANES long");
                min_lanes(a, b, s, hashes);
            } else {
                for (i, value) in sig.iter_mut().enumerate().take(end).skip(chunk) {
                    for &x in hashes {
                        *value = (*value).min(permute(self.a[i], self.b[i], x));
                    }
                }
            }
        }
        sig
    }

    /// Signature of `text` (convenience for tests and tools).
    pub fn signature_of(&self, text: &str) -> Vec<u32> {
        let mut hashes = Vec::new();
        self.shingle_hashes(text, &mut hashes);
        self.signature(&hashes)
    }
}

const LANES: usize = 32;

#[inline(always)]
fn permute(a: u32, b: u32, x: u32) -> u32 {
    let v = a.wrapping_mul(x).wrapping_add(b);
    v ^ (v >> 15)
}

#[inline(always)]
fn min_lanes(a: &[u32; LANES], b: &[u32; LANES], sig: &mut [u32; LANES], hashes: &[u32]) {
    let mut acc = *sig;
    for &x in hashes {
        for i in 0..LANES {
            acc[i] = acc[i].min(permute(a[i], b[i], x));
        }
    }
    *sig = acc;
}

/// Estimated Jaccard similarity of two full signatures.
pub fn jaccard(a: &[u32], b: &[u32]) -> f64 {
    let equal = a.iter().zip(b).filter(|(x, y)| x == y).count();
    equal as f64 / a.len().max(1) as f64
}

/// `(bands, rows)` minimizing 0.5·false-positive + 0.5·false-negative area (datasketch).
pub fn optimal_bands(threshold: f64, num_perm: usize) -> (usize, usize) {
    let integrate = |f: &dyn Fn(f64) -> f64, lo: f64, hi: f64| {
        let steps = 200;
        let h = (hi - lo) / steps as f64;
        (0..steps)
            .map(|i| f(lo + (i as f64 + 0.5) * h) * h)
            .sum::<f64>()
    };
    let mut best = (1, num_perm);
    let mut best_err = f64::MAX;
    for bands in 1..=num_perm {
        let max_rows = num_perm / bands;
        for rows in 1..=max_rows {
            let p = |s: f64| 1.0 - (1.0 - s.powi(rows as i32)).powi(bands as i32);
            let fp = integrate(&p, 0.0, threshold);
            let fneg = integrate(&|s| 1.0 - p(s), threshold, 1.0);
            let err = 0.5 * fp + 0.5 * fneg;
            if err < best_err {
                best_err = err;
                best = (bands, rows);
            }
        }
    }
    best
}

/// Band keys of a signature cut into `bands` bands of `rows` values.
pub fn band_keys(sig: &[u32], bands: usize, rows: usize) -> Vec<u64> {
    (0..bands)
        .map(|band| {
            let mut h = band as u64;
            for &v in &sig[band * rows..(band + 1) * rows] {
                h = splitmix64(h ^ u64::from(v));
            }
            h
        })
        .collect()
}

/// A near-duplicate index of kept records (dense ids 0, 1, 2… in insertion order).
#[derive(Debug)]
pub struct LshIndex {
    bands: usize,
    rows: usize,
    num_perm: usize,
    threshold: f64,
    heads: Vec<PrehashedMap<u64, u32>>,
    /// `chain[band][id]`: the previous id in the same bucket, `u32::MAX` at the end.
    chain: Vec<Vec<u32>>,
    /// Low 16 bits of every kept signature, `num_perm` per id.
    sigs: Vec<u16>,
}

impl LshIndex {
    /// An empty index for signatures of `num_perm` values at `threshold`.
    pub fn new(num_perm: usize, threshold: f64) -> Self {
        let (bands, rows) = optimal_bands(threshold, num_perm);
        Self {
            bands,
            rows,
            num_perm,
            threshold,
            heads: vec![PrehashedMap::default(); bands],
            chain: vec![Vec::new(); bands],
            sigs: Vec::new(),
        }
    }

    /// `(bands, rows)` in use.
    pub fn shape(&self) -> (usize, usize) {
        (self.bands, self.rows)
    }

    /// Band keys of a signature.
    pub fn band_keys(&self, sig: &[u32]) -> Vec<u64> {
        band_keys(sig, self.bands, self.rows)
    }

    /// The kept record most similar to `sig` at or above the threshold, with its estimated
    /// similarity.
    pub fn query(&self, sig: &[u32], keys: &[u64]) -> Option<(u32, f64)> {
        let mut best: Option<(u32, f64)> = None;
        let mut checked: Vec<u32> = Vec::new();
        for (band, key) in keys.iter().enumerate() {
            let mut id = self.heads[band].get(key).copied().unwrap_or(u32::MAX);
            while id != u32::MAX {
                if !checked.contains(&id) {
                    checked.push(id);
                    let stored =
                        &self.sigs[id as usize * self.num_perm..(id as usize + 1) * self.num_perm];
                    let equal = stored
                        .iter()
                        .zip(sig)
                        .filter(|(s, v)| **s == **v as u16)
                        .count();
                    let sim = equal as f64 / self.num_perm as f64;
                    if sim >= self.threshold && best.is_none_or(|(_, b)| sim > b) {
                        best = Some((id, sim));
                    }
                }
                id = self.chain[band][id as usize];
            }
        }
        best
    }

    /// Adds a kept record; returns its id.
    pub fn insert(&mut self, sig: &[u32], keys: &[u64]) -> u32 {
        let id = (self.sigs.len() / self.num_perm) as u32;
        self.sigs.extend(sig.iter().map(|v| *v as u16));
        for (band, key) in keys.iter().enumerate() {
            let prev = self.heads[band].insert(*key, id).unwrap_or(u32::MAX);
            self.chain[band].push(prev);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shingles(text: &str, k: usize) -> std::collections::HashSet<Vec<char>> {
        let chars: Vec<char> = text.chars().collect();
        chars.windows(k).map(|w| w.to_vec()).collect()
    }

    fn true_jaccard(a: &str, b: &str) -> f64 {
        let (sa, sb) = (shingles(a, 5), shingles(b, 5));
        sa.intersection(&sb).count() as f64 / sa.union(&sb).count() as f64
    }

    #[test]
    fn estimate_tracks_true_jaccard() {
        let m = MinHasher::new(256, 5);
        let base: String = (0..60).map(|i| format!("w{i} ")).collect();
        for cut in [5, 15, 30] {
            let other: String = (cut..60 + cut).map(|i| format!("w{i} ")).collect();
            let truth = true_jaccard(base.trim(), other.trim());
            let est = jaccard(&m.signature_of(base.trim()), &m.signature_of(other.trim()));
            assert!(
                (truth - est).abs() < 0.08,
                "cut {cut}: true {truth:.3} estimated {est:.3}"
            );
        }
    }

    #[test]
    fn bands_match_datasketch_choice() {
        // datasketch's MinHashLSH(threshold=0.8, num_perm=128) picks b=9, r=13.
        assert_eq!(optimal_bands(0.8, 128), (9, 13));
    }

    #[test]
    fn index_finds_near_duplicates_only() {
        let m = MinHasher::new(128, 5);
        let mut index = LshIndex::new(128, 0.8);
        let a =
            "What are the early symptoms of type 2 diabetes and how is it diagnosed by doctors?";
        let sig = m.signature_of(a);
        let keys = index.band_keys(&sig);
        assert_eq!(index.query(&sig, &keys), None);
        assert_eq!(index.insert(&sig, &keys), 0);
        let near =
            "What are the early symptoms of type 2 diabetes and how is it diagnosed by doctor?";
        let s2 = m.signature_of(near);
        let hit = index
            .query(&s2, &index.band_keys(&s2))
            .expect("near duplicate");
        assert_eq!(hit.0, 0);
        let far = "How should a bank adviser explain investment risk to a retired customer?";
        let s3 = m.signature_of(far);
        assert_eq!(index.query(&s3, &index.band_keys(&s3)), None);
    }
}
