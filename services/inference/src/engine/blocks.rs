//! KV block accounting with prefix caching, after vLLM's block pool.
//!
//! The engine, not [`lmforge_model::kv_cache::PagedKvCache`], decides which block a sequence
//! gets: every block has a reference count; a block that is full gets a hash of its tokens
//! chained with its prefix's hash, so that a later sequence whose prompt starts with the same
//! tokens reuses the block instead of recomputing it. A block nobody references but whose
//! content is hashed stays cached and is evicted least-recently-freed first, only when a free
//! block is needed.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Hash of a full block: its tokens and the hash of everything before it.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable within the process, which is all a cache needs.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The pool of KV blocks of one engine.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    refs: Vec<u32>,
    hash_of: Vec<Option<u64>>,
    /// Full blocks by content hash (referenced or evictable).
    by_hash: HashMap<u64, u32>,
    /// Blocks without cached content, ready to hand out.
    free: Vec<u32>,
    /// Unreferenced blocks with cached content, by the time they were released.
    evictable: BTreeMap<u64, u32>,
    evict_tick: Vec<u64>,
    tick: u64,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            block_size,
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            free: (0..num_blocks as u32).rev().collect(),
            evictable: BTreeMap::new(),
            evict_tick: vec![0; num_blocks],
            tick: 0,
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn total(&self) -> usize {
        self.refs.len()
    }

    /// Blocks that can be handed out now (free plus evictable cached ones).
    pub fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// Blocks referenced by some sequence.
    pub fn used(&self) -> usize {
        self.total() - self.available()
    }

    /// A block for new content, evicting the least recently released cached block when no
    /// plain free block is left.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(h) = self.hash_of[b as usize].take() {
                    self.by_hash.remove(&h);
                }
                b
            }
        };
        self.refs[block as usize] = 1;
        Some(block)
    }

    /// Drop one reference to `block`.
    pub fn release(&mut self, block: u32) {
        let i = block as usize;
        debug_assert!(
            self.refs[i] > 0,
            "block {block} released while unreferenced"
        );
        self.refs[i] -= 1;
        if self.refs[i] == 0 {
            if self.hash_of[i].is_some() {
                self.tick += 1;
                self.evict_tick[i] = self.tick;
                self.evictable.insert(self.tick, block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// The cached blocks holding the longest run of full blocks at the start of `tokens`,
    /// each now referenced once more. At most `max_blocks` are returned.
    pub fn lookup_prefix(&mut self, tokens: &[u32], max_blocks: usize) -> (Vec<u32>, Vec<u64>) {
        let mut blocks = Vec::new();
        let mut hashes = Vec::new();
        let mut parent = None;
        for chunk in tokens.chunks_exact(self.block_size).take(max_blocks) {
            let h = block_hash(parent, chunk);
            let Some(&b) = self.by_hash.get(&h) else {
                break;
            };
            let i = b as usize;
            if self.refs[i] == 0 {
                self.evictable.remove(&self.evict_tick[i]);
            }
            self.refs[i] += 1;
            blocks.push(b);
            hashes.push(h);
            parent = Some(h);
        }
        (blocks, hashes)
    }

    /// Record that `block` now holds the full block of content `hash`. When another block
    /// already holds that content this one stays unhashed (it is freed, not cached, later).
    pub fn register_full(&mut self, block: u32, hash: u64) {
        if self.hash_of[block as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hash_of[block as usize] = Some(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_prefix_is_shared_then_evicted_least_recent_first() {
        let mut m = BlockManager::new(4, 2);
        let tokens = [1, 2, 3, 4, 5];
        let a = m.allocate().expect("a");
        let b = m.allocate().expect("b");
        let h0 = block_hash(None, &tokens[..2]);
        let h1 = block_hash(Some(h0), &tokens[2..4]);
        m.register_full(a, h0);
        m.register_full(b, h1);
        // A second sequence with the same start shares both blocks.
        let (hit, hashes) = m.lookup_prefix(&tokens, 8);
        assert_eq!(hit, vec![a, b]);
        assert_eq!(hashes, vec![h0, h1]);
        // A different second block: only the first is shared.
        let (hit, _) = m.lookup_prefix(&[1, 2, 9, 9], 8);
        assert_eq!(hit, vec![a]);
        assert_eq!(m.available(), 2);
        for blk in [a, b, a, a, b] {
            m.release(blk);
        }
        // Both cached and unreferenced: still available, and still hits.
        assert_eq!(m.available(), 4);
        let (hit, _) = m.lookup_prefix(&tokens, 1);
        assert_eq!(hit, vec![a]);
        m.release(a);
        // Allocation takes the plain free blocks first, then evicts b (released before a).
        let c = m.allocate().expect("c");
        let d = m.allocate().expect("d");
        assert!(![c, d].contains(&a) && ![c, d].contains(&b));
        assert_eq!(m.allocate(), Some(b));
        assert_eq!(
            m.lookup_prefix(&tokens, 8).0,
            vec![a],
            "b's content is gone"
        );
        assert_eq!(m.available(), 0);
        assert_eq!(m.allocate(), None);
    }
}
