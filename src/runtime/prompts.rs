//! Whole prompts kept with their KV caches: a prompt seen before under the same blend rows skips
//! its prefill.
//!
//! A server sees the same prompt again and again (retries, several samples of one question, an
//! evaluation harness, a benchmark); llama.cpp's server keeps each slot's last prompt for the
//! same reason. The store here is exact: an entry is used only for the very same tokens under
//! the very same gate rows, and holds the caches and last-position logits that feeding the whole
//! prompt at once gave, so an answer from a hit is bit for bit the answer computed afresh. A
//! shared prefix (the same system prompt, another question) is not reused: the prompt's tokens
//! are computed in one pass whose kernels depend on its length, so a prefix's cache plus the rest
//! fed after it would differ from the whole prompt in the last bits of the logits.
//!
//! Bounded by bytes; the least recently used entries go first.

use std::sync::Mutex;

use crate::model::KvCache;
use crate::Result;

/// The store: shared by the sessions of one engine (e.g. a server's), safe across threads.
pub struct PromptCache {
    budget: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    entries: Vec<Entry>,
    bytes: usize,
    clock: u64,
    hits: u64,
    misses: u64,
}

struct Entry {
    rows: Vec<Vec<f32>>,
    tokens: Vec<u32>,
    cache: KvCache,
    /// Next-token logits of each row after the prompt.
    logits: Vec<Vec<f32>>,
    bytes: usize,
    used: u64,
}

/// What the store holds and how often it was used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PromptCacheStats {
    pub entries: usize,
    pub bytes: usize,
    pub hits: u64,
    pub misses: u64,
}

impl PromptCache {
    /// A store of at most `budget` bytes of caches and logits (0: keeps nothing).
    pub fn new(budget: usize) -> PromptCache {
        PromptCache {
            budget,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// A copy of the caches and per-row logits kept for `tokens` under `rows`, if any (counted
    /// as a hit or a miss).
    pub fn get(
        &self,
        rows: &[Vec<f32>],
        tokens: &[u32],
    ) -> Result<Option<(KvCache, Vec<Vec<f32>>)>> {
        if self.budget == 0 {
            return Ok(None);
        }
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        let found = g
            .entries
            .iter_mut()
            .find(|e| e.tokens == tokens && e.rows == rows)
            .map(|e| {
                e.used = now;
                (e.cache.fork(), e.logits.clone())
            });
        match found {
            Some((cache, logits)) => {
                g.hits += 1;
                Ok(Some((cache?, logits)))
            }
            None => {
                g.misses += 1;
                Ok(None)
            }
        }
    }

    /// Keep a compact copy of `cache`, just computed from `tokens` alone under `rows`, with its
    /// per-row next-token `logits`; the least recently used entries make room. An entry larger
    /// than the whole budget is not kept.
    pub fn put(
        &self,
        rows: &[Vec<f32>],
        tokens: &[u32],
        cache: &KvCache,
        logits: &[Vec<f32>],
    ) -> Result<()> {
        if self.budget == 0 {
            return Ok(());
        }
        let cache = cache.compact()?;
        let size =
            cache.bytes() + logits.iter().map(|z| z.len() * 4).sum::<usize>() + tokens.len() * 4;
        if size > self.budget {
            return Ok(());
        }
        let mut g = self.lock();
        if g.entries
            .iter()
            .any(|e| e.tokens == tokens && e.rows == rows)
        {
            return Ok(()); // another session computed it meanwhile
        }
        while g.bytes + size > self.budget {
            let Some(oldest) = (0..g.entries.len()).min_by_key(|&i| g.entries[i].used) else {
                break;
            };
            let e = g.entries.swap_remove(oldest);
            g.bytes -= e.bytes;
        }
        g.clock += 1;
        let used = g.clock;
        g.bytes += size;
        g.entries.push(Entry {
            rows: rows.to_vec(),
            tokens: tokens.to_vec(),
            cache,
            logits: logits.to_vec(),
            bytes: size,
            used,
        });
        Ok(())
    }

    /// Entries, bytes, hits and misses so far.
    pub fn stats(&self) -> PromptCacheStats {
        let g = self.lock();
        PromptCacheStats {
            entries: g.entries.len(),
            bytes: g.bytes,
            hits: g.hits,
            misses: g.misses,
        }
    }

    /// The store's state. Nothing that can panic runs between a change and its byte count,
    /// so a lock poisoned by a panicking request still guards a consistent store.
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}
