//! Paged KV-cache bookkeeping, shared by every backend: which fixed-size block of the pool
//! holds each sequence's keys and values, and which blocks may be reused by a later prompt
//! that starts with the same tokens (the prefix cache).
//!
//! Layers are split into *groups* that share one block table per sequence: all
//! full-attention layers form one group, the sliding-window layers of one window another.
//! A sliding-window group gives back the blocks that fall out of its window as the
//! sequence grows, so a long sequence holds only about a window's worth of them.
//!
//! A full block carries a hash of every token up to its end. When no sequence references
//! it any more it stays in the pool, findable by that hash, until the pool needs the space
//! (least recently used first). Backends store the values; this module only hands out
//! block ids.

use crate::model::Batch;
use crate::EngineError;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// Tokens per block.
pub const BLOCK_TOKENS: usize = 16;

/// A block-table entry for a block a sliding-window group has given back.
pub const NO_BLOCK: u32 = u32::MAX;

/// What the cache of one model looks like, from its architecture.
#[derive(Clone, Debug)]
pub struct KvLayout {
    /// Values per token, for keys and for values (n_kv_heads · head_dim).
    pub kv_dim: usize,
    /// Per layer, its sliding window in tokens (None: full attention).
    pub windows: Vec<Option<u32>>,
    /// Values are not stored: each token's value is the leading part of its key
    /// (multi-head latent attention caches one compressed latent per token).
    pub shared_v: bool,
}

/// How the cache stores keys and values (`OLLAMA_KV_CACHE_TYPE`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum KvType {
    /// llama.cpp's and Ollama's default: half the memory, attention rounded as llama.cpp's
    /// flash attention rounds it.
    #[default]
    F16,
    /// Full precision: twice the memory, attention in f32 throughout (the strict
    /// comparison of F32 models with llama.cpp).
    F32,
}

impl KvType {
    /// `f16` or `f32` (Ollama's names); the error lists what is accepted.
    pub fn parse(name: &str) -> Result<KvType, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "" | "f16" => Ok(KvType::F16),
            "f32" => Ok(KvType::F32),
            other => Err(format!("KV cache type {other:?} is not supported: use f16 or f32")),
        }
    }

    pub fn bytes_per_value(self) -> usize {
        match self {
            KvType::F16 => 2,
            KvType::F32 => 4,
        }
    }
}

/// Layers sharing one block table.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvGroup {
    pub layers: Vec<usize>,
    pub window: Option<usize>,
    pub n_blocks: usize,
}

/// The size of a paged cache.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct KvSpec {
    pub n_layers: usize,
    pub kv_dim: usize,
    /// Values live inside the keys ([`KvLayout::shared_v`]).
    pub shared_v: bool,
    pub groups: Vec<KvGroup>,
    /// Per layer: its group and its index within that group.
    pub layer_slot: Vec<(usize, usize)>,
    /// Most tokens one sequence may hold.
    pub max_tokens: usize,
    /// Number of sequence slots.
    pub n_seqs: usize,
    pub dtype: KvType,
}

impl KvSpec {
    /// A pool where `n_seqs` sequences can each hold `max_tokens` at once, when no step
    /// adds more than `max_step_tokens` to one sequence (a sliding-window group then needs
    /// only its window plus one step per sequence).
    pub fn for_sequences(layout: &KvLayout, max_tokens: usize, n_seqs: usize, max_step_tokens: usize) -> KvSpec {
        let full_blocks = max_tokens.div_ceil(BLOCK_TOKENS);
        let per_seq = |window: Option<usize>| match window {
            None => full_blocks,
            Some(w) => full_blocks.min((w + max_step_tokens).div_ceil(BLOCK_TOKENS) + 1),
        };
        KvSpec::with_blocks(layout, max_tokens, n_seqs, |w| n_seqs.saturating_mul(per_seq(w)))
    }

    /// A pool of `n_blocks(window)` blocks per group.
    pub fn with_blocks(
        layout: &KvLayout,
        max_tokens: usize,
        n_seqs: usize,
        n_blocks: impl Fn(Option<usize>) -> usize,
    ) -> KvSpec {
        let mut groups: Vec<KvGroup> = Vec::new();
        let mut layer_slot = Vec::with_capacity(layout.windows.len());
        for (layer, w) in layout.windows.iter().enumerate() {
            let window = w.map(|w| w as usize);
            let g = match groups.iter().position(|g| g.window == window) {
                Some(g) => g,
                None => {
                    groups.push(KvGroup { layers: Vec::new(), window, n_blocks: n_blocks(window) });
                    groups.len() - 1
                }
            };
            layer_slot.push((g, groups[g].layers.len()));
            groups[g].layers.push(layer);
        }
        let n_layers = layout.windows.len();
        let (kv_dim, shared_v) = (layout.kv_dim, layout.shared_v);
        KvSpec { n_layers, kv_dim, shared_v, groups, layer_slot, max_tokens, n_seqs, dtype: KvType::F16 }
    }

    /// The same pool storing `dtype`.
    pub fn with_type(mut self, dtype: KvType) -> KvSpec {
        self.dtype = dtype;
        self
    }

    /// Bytes of keys and values the pool holds when every block is in use.
    pub fn pool_bytes(&self) -> usize {
        let arrays = if self.shared_v { 1 } else { 2 };
        let per_block_layer = BLOCK_TOKENS * self.kv_dim * arrays * self.dtype.bytes_per_value();
        self.groups.iter().map(|g| g.n_blocks * g.layers.len() * per_block_layer).sum()
    }
}

/// Identity of a full block's contents: a 64-bit chain hash of everything before it and
/// its own tokens, compared in full (two different prefixes alias only if their earlier
/// blocks' 64-bit chain hashes collide).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct BlockKey {
    parent: u64,
    tokens: [u32; BLOCK_TOKENS],
}

impl BlockKey {
    fn chain_hash(&self) -> u64 {
        let mut h = DefaultHasher::new();
        self.hash(&mut h);
        h.finish()
    }
}

/// The chain keys of every full block of `tokens`.
fn block_keys(tokens: &[u32]) -> Vec<BlockKey> {
    let mut parent = 0u64;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .map(|chunk| {
            let mut t = [0u32; BLOCK_TOKENS];
            t.copy_from_slice(chunk);
            let key = BlockKey { parent, tokens: t };
            parent = key.chain_hash();
            key
        })
        .collect()
}

/// The blocks of one group.
#[derive(Debug)]
struct Pool {
    window: Option<usize>,
    /// Sequences referencing each block.
    refs: Vec<u32>,
    /// The prefix a full block holds, if registered.
    key_of: Vec<Option<BlockKey>>,
    by_key: HashMap<BlockKey, u32>,
    /// Unreferenced, unregistered blocks (lowest id first, so the memory in use stays
    /// compact).
    free: BTreeSet<u32>,
    /// Unreferenced registered blocks by last use, oldest first.
    evictable: BTreeSet<(u64, u32)>,
    last_use: Vec<u64>,
}

impl Pool {
    fn new(window: Option<usize>, n_blocks: usize) -> Pool {
        Pool {
            window,
            refs: vec![0; n_blocks],
            key_of: vec![None; n_blocks],
            by_key: HashMap::new(),
            free: (0..n_blocks as u32).collect(),
            evictable: BTreeSet::new(),
            last_use: vec![0; n_blocks],
        }
    }

    fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    /// A block for new contents: a free one, else the least recently used cached one.
    fn take(&mut self) -> Option<u32> {
        let b = match self.free.pop_first() {
            Some(b) => b,
            None => {
                let (_, b) = self.evictable.pop_first()?;
                if let Some(key) = self.key_of[b as usize].take() {
                    self.by_key.remove(&key);
                }
                b
            }
        };
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// Takes a reference to a cached block.
    fn share(&mut self, b: u32) {
        if self.refs[b as usize] == 0 {
            self.evictable.remove(&(self.last_use[b as usize], b));
        }
        self.refs[b as usize] += 1;
    }

    fn release(&mut self, b: u32, tick: u64) {
        let i = b as usize;
        self.refs[i] = self.refs[i].saturating_sub(1);
        if self.refs[i] > 0 {
            return;
        }
        match self.key_of[i] {
            Some(_) => {
                self.last_use[i] = tick;
                self.evictable.insert((tick, b));
            }
            None => {
                self.free.insert(b);
            }
        }
    }

    /// First block index a query at position `len` (or later) still reads.
    fn first_needed(&self, len: usize) -> usize {
        match self.window {
            Some(w) => len.saturating_sub(w) / BLOCK_TOKENS,
            None => 0,
        }
    }
}

/// One sequence slot.
#[derive(Debug, Default)]
struct SeqBlocks {
    tokens: Vec<u32>,
    /// Per group, the block holding each BLOCK_TOKENS-long stretch (NO_BLOCK once given
    /// back by a sliding window).
    tables: Vec<Vec<u32>>,
    /// How many leading full blocks are registered in the prefix cache.
    registered: usize,
}

/// A change to a cache's blocks made between forward passes (the scheduler's), as the
/// cache of rank 0 of a tensor-parallel group records it for the other ranks' caches to
/// make too: the bookkeeping is deterministic, so the same changes and the same batches
/// give every rank the same block tables.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockOp {
    Clear { seq: usize },
    Grow { seq: usize, len: usize },
    AttachPrefix { seq: usize, prompt: Vec<u32> },
}

/// Block tables, reference counts and the prefix cache of a paged KV cache.
#[derive(Debug)]
pub struct BlockManager {
    spec: KvSpec,
    pools: Vec<Pool>,
    seqs: Vec<SeqBlocks>,
    /// Logical clock for least-recently-used eviction.
    tick: u64,
    /// Unique among the caches of this process; alive while the cache is.
    id: u64,
    alive: Arc<()>,
    /// The [`BlockOp`]s since the last [`BlockManager::take_journal`], when recording.
    journal: Option<Vec<BlockOp>>,
}

/// Source of [`BlockManager`] ids.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl BlockManager {
    pub fn new(spec: &KvSpec) -> BlockManager {
        let pools: Vec<Pool> = spec.groups.iter().map(|g| Pool::new(g.window, g.n_blocks)).collect();
        let seqs = (0..spec.n_seqs)
            .map(|_| SeqBlocks { tables: vec![Vec::new(); pools.len()], ..SeqBlocks::default() })
            .collect();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        BlockManager { spec: spec.clone(), pools, seqs, tick: 0, id, alive: Arc::new(()), journal: None }
    }

    /// [`BlockManager::new`], recording its [`BlockOp`]s.
    pub fn recording(spec: &KvSpec) -> BlockManager {
        BlockManager { journal: Some(Vec::new()), ..BlockManager::new(spec) }
    }

    /// This cache's id, and a handle that dies with it.
    pub fn identity(&self) -> (u64, Weak<()>) {
        (self.id, Arc::downgrade(&self.alive))
    }

    /// Whether this cache records its block changes.
    pub fn is_recording(&self) -> bool {
        self.journal.is_some()
    }

    /// The changes recorded since the last call (none when not recording).
    pub fn take_journal(&mut self) -> Vec<BlockOp> {
        self.journal.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Makes the changes another cache recorded. Each does what it did there, since both
    /// caches have had the same changes and batches so far.
    pub fn apply(&mut self, ops: &[BlockOp]) -> Result<(), EngineError> {
        for op in ops {
            match op {
                BlockOp::Clear { seq } => self.clear(*seq),
                BlockOp::Grow { seq, len } => self.grow(*seq, *len)?,
                BlockOp::AttachPrefix { seq, prompt } => {
                    self.attach_prefix(*seq, prompt);
                }
            }
        }
        Ok(())
    }

    fn record(&mut self, op: impl FnOnce() -> BlockOp) {
        if let Some(j) = &mut self.journal {
            j.push(op());
        }
    }

    pub fn spec(&self) -> &KvSpec {
        &self.spec
    }

    pub fn n_seqs(&self) -> usize {
        self.spec.n_seqs
    }

    pub fn max_tokens(&self) -> usize {
        self.spec.max_tokens
    }

    /// Tokens stored for `seq`.
    pub fn seq_len(&self, seq: usize) -> usize {
        self.seqs.get(seq).map_or(0, |s| s.tokens.len())
    }

    /// The block table of `seq` in `group`.
    pub fn table(&self, seq: usize, group: usize) -> &[u32] {
        &self.seqs[seq].tables[group]
    }

    /// Blocks in use by sequences, and blocks free or holding only cached prefixes, summed
    /// over groups.
    pub fn usage(&self) -> (usize, usize) {
        let free: usize = self.pools.iter().map(Pool::available).sum();
        let total: usize = self.pools.iter().map(|p| p.refs.len()).sum();
        (total - free, free)
    }

    /// Forgets every token of `seq`, giving its blocks back (registered ones stay cached).
    pub fn clear(&mut self, seq: usize) {
        self.record(|| BlockOp::Clear { seq });
        let Some(s) = self.seqs.get_mut(seq) else { return };
        // Last block first, so eviction takes a cached prefix's tail before its head (a
        // head evicted first would strand the rest).
        for (pool, table) in self.pools.iter_mut().zip(&mut s.tables) {
            for b in table.drain(..).rev().filter(|&b| b != NO_BLOCK) {
                self.tick += 1;
                pool.release(b, self.tick);
            }
        }
        s.tokens.clear();
        s.registered = 0;
    }

    /// New blocks `seq` needs to hold `new_len` tokens: the same number in every group
    /// (a windowed group's table keeps NO_BLOCK entries for what it gave back).
    fn blocks_needed(&self, seq: usize, new_len: usize) -> usize {
        let have = self.seqs.get(seq).map_or(0, |s| s.tables.first().map_or(0, Vec::len));
        new_len.div_ceil(BLOCK_TOKENS).saturating_sub(have)
    }

    /// The first group with fewer than `n` blocks to give, as the error to report.
    fn short_of(&self, n: usize) -> Result<(), EngineError> {
        match self.pools.iter().enumerate().find(|(_, p)| n > p.available()) {
            Some((group, p)) => Err(EngineError::KvCacheFull { group, needed: n, free: p.available() }),
            None => Ok(()),
        }
    }

    /// Makes room for `seq` to hold `new_len` tokens; nothing changes when the pool cannot.
    pub fn grow(&mut self, seq: usize, new_len: usize) -> Result<(), EngineError> {
        self.grow_blocks(seq, new_len)?;
        self.record(|| BlockOp::Grow { seq, len: new_len });
        Ok(())
    }

    fn grow_blocks(&mut self, seq: usize, new_len: usize) -> Result<(), EngineError> {
        if seq >= self.seqs.len() {
            return Err(EngineError::BadBatch(format!("sequence slot {seq} ≥ {}", self.seqs.len())));
        }
        if new_len > self.spec.max_tokens {
            return Err(EngineError::ContextFull { needed: new_len, limit: self.spec.max_tokens });
        }
        let n = self.blocks_needed(seq, new_len);
        self.short_of(n)?;
        let s = &mut self.seqs[seq];
        for (pool, table) in self.pools.iter_mut().zip(&mut s.tables) {
            for _ in 0..n {
                // Checked above: available() ≥ n.
                table.push(pool.take().unwrap_or(NO_BLOCK));
            }
        }
        Ok(())
    }

    /// Checks that each sequence's tokens in `batch` continue it exactly, makes room for
    /// them and records them. Nothing changes on an error.
    pub fn begin_batch(&mut self, batch: &Batch) -> Result<(), EngineError> {
        let mut next: HashMap<usize, usize> = HashMap::new();
        for (&seq, &pos) in batch.layout.seqs.iter().zip(&batch.layout.positions) {
            if seq >= self.seqs.len() {
                return Err(EngineError::BadBatch(format!("sequence slot {seq} ≥ {}", self.seqs.len())));
            }
            let expected = next.get(&seq).copied().unwrap_or_else(|| self.seq_len(seq));
            if pos as usize != expected {
                return Err(EngineError::BadBatch(format!("sequence {seq}: position {pos}, expected {expected}")));
            }
            if expected >= self.spec.max_tokens {
                return Err(EngineError::ContextFull { needed: expected + 1, limit: self.spec.max_tokens });
            }
            next.insert(seq, expected + 1);
        }
        self.short_of(next.iter().map(|(&s, &len)| self.blocks_needed(s, len)).sum())?;
        for (&seq, &len) in &next {
            self.grow_blocks(seq, len)?;
        }
        for (&seq, &t) in batch.layout.seqs.iter().zip(&batch.tokens) {
            self.seqs[seq].tokens.push(t);
        }
        Ok(())
    }

    /// After a batch's keys and values are stored: registers the sequences' newly full
    /// blocks in the prefix cache and gives back blocks that left a sliding window.
    pub fn end_batch(&mut self, batch: &Batch) {
        let mut seqs = batch.layout.seqs.clone();
        seqs.sort_unstable();
        seqs.dedup();
        self.tick += 1;
        for seq in seqs {
            self.register_full_blocks(seq);
            let s = &mut self.seqs[seq];
            let len = s.tokens.len();
            for (pool, table) in self.pools.iter_mut().zip(&mut s.tables) {
                let first = pool.first_needed(len).min(table.len());
                for b in &mut table[..first] {
                    if *b != NO_BLOCK {
                        pool.release(*b, self.tick);
                        *b = NO_BLOCK;
                    }
                }
            }
        }
    }

    /// After a forward pass over `batch` failed (its keys and values may never have been
    /// stored, as when a GPU fails mid-pass): forgets the batch's tokens and gives back
    /// the blocks made for them, registering nothing, so no later prompt finds unwritten
    /// blocks in the prefix cache and the cache is as before `begin_batch`. Computed from
    /// the batch alone, as `begin_batch` is, so a mirror that failed the same pass does
    /// the same.
    pub fn abort_batch(&mut self, batch: &Batch) {
        let mut added: HashMap<usize, usize> = HashMap::new();
        for &seq in &batch.layout.seqs {
            *added.entry(seq).or_default() += 1;
        }
        for (seq, n) in added {
            let Some(s) = self.seqs.get_mut(seq) else { continue };
            let len = s.tokens.len().saturating_sub(n);
            s.tokens.truncate(len);
            let keep = len.div_ceil(BLOCK_TOKENS);
            for (pool, table) in self.pools.iter_mut().zip(&mut s.tables) {
                while table.len() > keep {
                    if let Some(b) = table.pop().filter(|&b| b != NO_BLOCK) {
                        self.tick += 1;
                        pool.release(b, self.tick);
                    }
                }
            }
        }
    }

    fn register_full_blocks(&mut self, seq: usize) {
        let s = &mut self.seqs[seq];
        let full = s.tokens.len() / BLOCK_TOKENS;
        if full <= s.registered {
            return;
        }
        let keys = block_keys(&s.tokens[..full * BLOCK_TOKENS]);
        for (i, key) in keys.iter().enumerate().skip(s.registered) {
            for (pool, table) in self.pools.iter_mut().zip(&s.tables) {
                let b = table[i];
                // A block already cached under another id stays unregistered: it is freed,
                // not cached, when released.
                if b != NO_BLOCK && pool.key_of[b as usize].is_none() && !pool.by_key.contains_key(key) {
                    pool.key_of[b as usize] = Some(key.clone());
                    pool.by_key.insert(key.clone(), b);
                }
            }
        }
        s.registered = full;
    }

    /// Starts the empty slot `seq` with the longest cached prefix of `prompt` (whole blocks,
    /// leaving at least one token to compute so the prompt's last logits exist). Returns
    /// how many tokens came from the cache.
    pub fn attach_prefix(&mut self, seq: usize, prompt: &[u32]) -> usize {
        if self.seq_len(seq) != 0 || seq >= self.seqs.len() {
            return 0;
        }
        self.record(|| BlockOp::AttachPrefix { seq, prompt: prompt.to_vec() });
        let limit = prompt.len().saturating_sub(1).min(self.spec.max_tokens) / BLOCK_TOKENS;
        let keys = block_keys(&prompt[..limit * BLOCK_TOKENS]);
        let cached = |pool: &Pool, i: usize| pool.by_key.get(&keys[i]).copied();
        // Full-attention groups need every block; windowed ones only those still in view.
        let mut n = (0..keys.len())
            .take_while(|&i| self.pools.iter().all(|p| p.window.is_some() || cached(p, i).is_some()))
            .count();
        while n > 0 {
            let in_view = |p: &Pool| (p.first_needed(n * BLOCK_TOKENS)..n).all(|i| cached(p, i).is_some());
            if self.pools.iter().all(in_view) {
                break;
            }
            n -= 1;
        }
        if n == 0 {
            return 0;
        }
        let s = &mut self.seqs[seq];
        for (pool, table) in self.pools.iter_mut().zip(&mut s.tables) {
            let first = pool.first_needed(n * BLOCK_TOKENS);
            for i in 0..n {
                let b = match i >= first {
                    true => cached(pool, i).unwrap_or(NO_BLOCK),
                    false => NO_BLOCK,
                };
                if b != NO_BLOCK {
                    pool.share(b);
                }
                table.push(b);
            }
        }
        s.tokens.extend_from_slice(&prompt[..n * BLOCK_TOKENS]);
        s.registered = n;
        n * BLOCK_TOKENS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = BLOCK_TOKENS;

    fn layout() -> KvLayout {
        // Layers 0 and 2 full, 1 and 3 with a 32-token window.
        KvLayout { kv_dim: 4, windows: vec![None, Some(32), None, Some(32)], shared_v: false }
    }

    fn feed(m: &mut BlockManager, seq: usize, tokens: &[u32]) -> Result<(), EngineError> {
        let start = m.seq_len(seq);
        let batch = Batch::for_sequence(seq, start, tokens, false);
        m.begin_batch(&batch)?;
        m.end_batch(&batch);
        Ok(())
    }

    #[test]
    fn kv_types_parse_and_size_the_pool() {
        assert_eq!(KvType::parse("F32"), Ok(KvType::F32));
        assert_eq!(KvType::parse(" f16 "), Ok(KvType::F16));
        assert_eq!(KvType::parse(""), Ok(KvType::F16));
        let err = KvType::parse("q4_0").unwrap_err();
        assert!(err.contains("\"q4_0\"") && err.contains("f16 or f32"), "{err}");
        let spec = KvSpec::for_sequences(&layout(), 64, 2, 64);
        assert_eq!(spec.clone().with_type(KvType::F32).pool_bytes(), 2 * spec.pool_bytes());
    }

    fn tokens(n: usize, salt: u32) -> Vec<u32> {
        (0..n as u32).map(|i| i * 7 + salt).collect()
    }

    #[test]
    fn groups_follow_windows() {
        let spec = KvSpec::for_sequences(&layout(), 256, 2, 16);
        assert_eq!(spec.groups.len(), 2);
        assert_eq!(spec.groups[0].layers, vec![0, 2]);
        assert_eq!(spec.groups[1].layers, vec![1, 3]);
        assert_eq!(spec.layer_slot, vec![(0, 0), (1, 0), (0, 1), (1, 1)]);
        assert_eq!(spec.groups[0].n_blocks, 2 * 16);
        // (32 + 16) / 16 + 1 = 4 blocks per sequence.
        assert_eq!(spec.groups[1].n_blocks, 2 * 4);
    }

    #[test]
    fn sliding_window_gives_blocks_back() {
        let spec = KvSpec::for_sequences(&layout(), 256, 1, 16);
        let mut m = BlockManager::new(&spec);
        for chunk in tokens(200, 1).chunks(16) {
            feed(&mut m, 0, chunk).unwrap();
        }
        let held = |g: usize| m.table(0, g).iter().filter(|&&b| b != NO_BLOCK).count();
        assert_eq!(held(0), 200usize.div_ceil(B));
        // Keys from position 200 - 32 = 168 on: blocks 10..=12.
        assert_eq!(held(1), 3);
        assert!(m.table(0, 1)[..10].iter().all(|&b| b == NO_BLOCK));
    }

    #[test]
    fn batches_are_checked_and_atomic() {
        let spec = KvSpec::for_sequences(&layout(), 64, 1, 16);
        let mut m = BlockManager::new(&spec);
        feed(&mut m, 0, &tokens(10, 1)).unwrap();
        let gap = Batch::for_sequence(0, 11, &[1], false);
        assert!(matches!(m.begin_batch(&gap), Err(EngineError::BadBatch(_))));
        let slot = Batch::for_sequence(3, 0, &[1], false);
        assert!(matches!(m.begin_batch(&slot), Err(EngineError::BadBatch(_))));
        let long = Batch::for_sequence(0, 10, &tokens(60, 2), false);
        assert!(matches!(m.begin_batch(&long), Err(EngineError::ContextFull { limit: 64, .. })));
        assert_eq!(m.seq_len(0), 10);
    }

    #[test]
    fn full_pool_refuses_without_changing_anything() {
        let spec = KvSpec::with_blocks(&layout(), 1024, 2, |_| 4);
        let mut m = BlockManager::new(&spec);
        feed(&mut m, 0, &tokens(3 * B, 1)).unwrap();
        let before = m.usage();
        let batch = Batch::for_sequence(1, 0, &tokens(2 * B, 2), false);
        assert!(matches!(m.begin_batch(&batch), Err(EngineError::KvCacheFull { .. })));
        assert_eq!(m.usage(), before);
        assert_eq!(m.seq_len(1), 0);
        assert!(matches!(m.grow(1, B + 1), Err(EngineError::KvCacheFull { needed: 2, free: 1, .. })));
        assert_eq!(m.usage(), before, "a refused grow changes nothing");
        m.grow(1, B).unwrap();
    }

    /// A failed pass leaves the cache as before it, and its blocks out of the prefix cache.
    #[test]
    fn an_aborted_batch_leaves_nothing_behind() {
        let spec = KvSpec::for_sequences(&layout(), 256, 2, 256);
        let mut m = BlockManager::new(&spec);
        let a = tokens(3 * B, 1);
        feed(&mut m, 0, &a[..B + 3]).expect("first part");
        let before = (m.seq_len(0), m.usage(), m.table(0, 0).to_vec(), m.table(0, 1).to_vec());
        let rest = Batch::for_sequence(0, B + 3, &a[B + 3..], false);
        m.begin_batch(&rest).expect("room");
        assert!(m.usage().0 > before.1 .0);
        m.abort_batch(&rest);
        assert_eq!((m.seq_len(0), m.usage(), m.table(0, 0).to_vec(), m.table(0, 1).to_vec()), before);
        // Only the first block, full before the failed pass, is a cached prefix.
        assert_eq!(m.attach_prefix(1, &a), B);
        // And the sequence goes on from where it was.
        feed(&mut m, 0, &a[B + 3..]).expect("the rest, again");
        assert_eq!(m.seq_len(0), 3 * B);
    }

    #[test]
    fn prefix_is_reused_and_evicted_least_recently_used_first() {
        let spec = KvSpec::with_blocks(&layout(), 1024, 2, |_| 8);
        let mut m = BlockManager::new(&spec);
        let a = tokens(3 * B + 5, 1);
        feed(&mut m, 0, &a).unwrap();
        let a_blocks = m.table(0, 0).to_vec();
        m.clear(0);
        // The same prompt plus more: three full blocks come from the cache.
        let mut longer = a.clone();
        longer.extend(tokens(20, 9));
        assert_eq!(m.attach_prefix(1, &longer), 3 * B);
        assert_eq!(&m.table(1, 0)[..3], &a_blocks[..3]);
        // Exactly the cached prompt: the last block is recomputed so logits exist.
        m.clear(1);
        assert_eq!(m.attach_prefix(0, &a[..3 * B]), 2 * B);
        m.clear(0);
        // A different first token shares nothing.
        let mut other = a.clone();
        other[0] += 1;
        assert_eq!(m.attach_prefix(0, &other), 0);
        // Filling the pool with other tokens evicts the cached blocks.
        feed(&mut m, 0, &tokens(8 * B, 3)).unwrap();
        m.clear(0);
        assert_eq!(m.attach_prefix(1, &longer), 0);
    }

    #[test]
    fn eviction_takes_a_cached_prefix_tail_first() {
        let spec = KvSpec::with_blocks(&KvLayout { kv_dim: 4, windows: vec![None], shared_v: false }, 1024, 2, |_| 4);
        let mut m = BlockManager::new(&spec);
        let p = tokens(4 * B, 8);
        feed(&mut m, 0, &p).unwrap();
        m.clear(0);
        // One new block evicts one cached block: the prefix keeps its first three (head
        // first would have stranded all four).
        feed(&mut m, 1, &tokens(1, 99)).unwrap();
        let longer = [p.clone(), tokens(5, 7)].concat();
        assert_eq!(m.attach_prefix(0, &longer), 3 * B);
    }

    #[test]
    fn windowed_prefix_needs_only_blocks_in_view() {
        let spec = KvSpec::with_blocks(&layout(), 1024, 2, |_| 16);
        let mut m = BlockManager::new(&spec);
        let a = tokens(10 * B, 4);
        for chunk in a.chunks(B) {
            feed(&mut m, 0, chunk).unwrap();
        }
        m.clear(0);
        let mut next = a.clone();
        next.extend(tokens(7, 5));
        assert_eq!(m.attach_prefix(1, &next), 10 * B);
        // The window group holds only the blocks a query at 160 reads (from 128 on).
        let held: Vec<usize> = (0..10).filter(|&i| m.table(1, 1)[i] != NO_BLOCK).collect();
        assert_eq!(held, vec![8, 9]);
        feed(&mut m, 1, &next[10 * B..]).unwrap();
        assert_eq!(m.seq_len(1), next.len());
    }

    #[test]
    fn shared_blocks_stay_until_the_last_user_leaves() {
        let spec = KvSpec::with_blocks(&layout(), 1024, 3, |_| 8);
        let mut m = BlockManager::new(&spec);
        let p = tokens(2 * B + 1, 6);
        feed(&mut m, 0, &p).unwrap();
        assert_eq!(m.attach_prefix(1, &p), 2 * B);
        m.clear(0);
        assert_eq!(m.attach_prefix(2, &p), 2 * B);
        assert_eq!(m.table(1, 0)[..2], m.table(2, 0)[..2]);
        let (used, _) = m.usage();
        assert_eq!(used, 2 * 2, "two shared blocks in each of two groups");
    }
}
