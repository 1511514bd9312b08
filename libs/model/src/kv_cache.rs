//! A paged KV cache: fixed-size blocks, a free-list block allocator, a block table per
//! sequence.
//!
//! Each layer's keys and values live in one tensor each of `num_blocks * block_size` slots
//! (`[slots, kv_heads, head_dim]`; an f32 CPU cache stores keys block by block, see
//! [`PagedKvCache::keys_by_block`]); a sequence's token at position `p` is stored in slot
//! `table.blocks[p / block_size] * block_size + p % block_size`. Sequences join by getting an
//! empty [`BlockTable`] and leave by [`PagedKvCache::release`]: no other sequence's cache is
//! copied or moved, and freed blocks are reused by the next sequence that needs one.

use candle_core::{DType, Device, Shape, Tensor};

use crate::config::ModelConfig;
use crate::error::{ModelError, Result};

/// Hands out block ids from a fixed pool.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
    total: usize,
}

impl BlockAllocator {
    pub fn new(total: usize) -> Self {
        // Reversed so blocks are handed out in ascending order, which keeps tests readable.
        Self {
            free: (0..total as u32).rev().collect(),
            total,
        }
    }
    pub fn allocate(&mut self) -> Option<u32> {
        self.free.pop()
    }
    pub fn free(&mut self, block: u32) {
        debug_assert!(!self.free.contains(&block), "block {block} freed twice");
        self.free.push(block);
    }
    pub fn num_free(&self) -> usize {
        self.free.len()
    }
    pub fn total(&self) -> usize {
        self.total
    }
}

/// The blocks holding one sequence's cached tokens, in position order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    pub blocks: Vec<u32>,
    /// Tokens already written to the cache (the next token's position).
    pub len: usize,
}

/// Per-layer K and V storage in blocks.
#[derive(Debug)]
pub struct PagedKvCache {
    pub block_size: usize,
    /// Keys: `[slots, kv_heads, head_dim]`, or with [`Self::keys_by_block`]
    /// `[blocks, kv_heads, head_dim, block_size]`.
    pub(crate) k: Vec<Tensor>,
    /// Values: `[slots, kv_heads, head_dim]`.
    pub(crate) v: Vec<Tensor>,
    /// An f32 CPU cache stores each block's keys transposed, one head's `[head_dim,
    /// block_size]` at a time, so the serving forward's attention kernel multiplies a query by
    /// a whole block of keys with vector loads and no horizontal sums (vLLM's CPU key layout
    /// is blocked the same way).
    pub(crate) keys_by_block: bool,
    allocator: BlockAllocator,
}

impl PagedKvCache {
    /// A cache of `num_blocks` blocks of `block_size` tokens for every layer of `cfg`.
    pub fn new(
        cfg: &ModelConfig,
        num_blocks: usize,
        block_size: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if block_size == 0 || num_blocks == 0 {
            return Err(ModelError::KvCache(
                "block_size and num_blocks must be positive".into(),
            ));
        }
        let (nkv, hd) = (cfg.num_key_value_heads, cfg.head_dim);
        let keys_by_block = device.is_cpu() && dtype == DType::F32;
        let rows = Shape::from((num_blocks * block_size, nkv, hd));
        let key_shape = if keys_by_block {
            Shape::from((num_blocks, nkv, hd, block_size))
        } else {
            rows.clone()
        };
        // Written through once on the CPU, so its pages are mapped now rather than faulted in
        // (and zeroed, 2 MiB at a time with huge pages) inside serving steps.
        let mk = |shape: &Shape| {
            let t = Tensor::zeros(shape, dtype, device)?;
            if device.is_cpu() {
                t.zero_set()?;
            }
            Ok(t)
        };
        let k = (0..cfg.num_hidden_layers)
            .map(|_| mk(&key_shape))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = (0..cfg.num_hidden_layers)
            .map(|_| mk(&rows))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            block_size,
            k,
            v,
            keys_by_block,
            allocator: BlockAllocator::new(num_blocks),
        })
    }

    /// Blocks still free.
    pub fn num_free_blocks(&self) -> usize {
        self.allocator.num_free()
    }

    /// Extra blocks `table` needs to take `new_tokens` more tokens.
    pub fn blocks_needed(&self, table: &BlockTable, new_tokens: usize) -> usize {
        (table.len + new_tokens)
            .div_ceil(self.block_size)
            .saturating_sub(table.blocks.len())
    }

    /// Allocate the blocks `table` needs for `new_tokens` more tokens, or fail leaving it as is.
    pub fn reserve(&mut self, table: &mut BlockTable, new_tokens: usize) -> Result<()> {
        let need = self.blocks_needed(table, new_tokens);
        if need > self.allocator.num_free() {
            return Err(ModelError::KvCache(format!(
                "need {need} blocks, {} free",
                self.allocator.num_free()
            )));
        }
        for _ in 0..need {
            table.blocks.push(
                self.allocator
                    .allocate()
                    .expect("free count checked just above"),
            );
        }
        Ok(())
    }

    /// Return a finished sequence's blocks to the pool.
    pub fn release(&mut self, table: BlockTable) {
        for b in table.blocks {
            self.allocator.free(b);
        }
    }

    /// The cache slot of position `pos` of the sequence with `table`.
    pub fn slot(&self, table: &BlockTable, pos: usize) -> usize {
        table.blocks[pos / self.block_size] as usize * self.block_size + pos % self.block_size
    }

    /// Keys and values `[ctx, kv_heads, head_dim]` at `slots` (a u32 tensor of slot ids);
    /// not for keys stored by block.
    pub(crate) fn gather(&self, layer: usize, slots: &Tensor) -> Result<(Tensor, Tensor)> {
        if self.keys_by_block {
            return Err(ModelError::KvCache(
                "an f32 CPU cache is read by the token attention kernel only".into(),
            ));
        }
        Ok((
            self.k[layer].index_select(slots, 0)?,
            self.v[layer].index_select(slots, 0)?,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_release_and_reuse_blocks() {
        let cfg = ModelConfig::tiny();
        let mut cache = PagedKvCache::new(&cfg, 4, 4, DType::F32, &Device::Cpu).expect("cache");
        let mut a = BlockTable::default();
        cache.reserve(&mut a, 5).expect("fits");
        assert_eq!(a.blocks, vec![0, 1]);
        let mut b = BlockTable::default();
        cache.reserve(&mut b, 8).expect("fits");
        assert_eq!(b.blocks, vec![2, 3]);
        let mut c = BlockTable::default();
        assert!(cache.reserve(&mut c, 1).is_err());
        assert!(c.blocks.is_empty(), "failed reserve must not hold blocks");
        cache.release(a);
        cache.reserve(&mut c, 3).expect("reuses a freed block");
        assert_eq!(c.blocks.len(), 1);
        assert!(c.blocks[0] <= 1);
        b.len = 7;
        assert_eq!(cache.blocks_needed(&b, 1), 0);
        assert_eq!(cache.blocks_needed(&b, 2), 1);
        assert_eq!(cache.slot(&b, 5), 3 * 4 + 1);
    }
}
