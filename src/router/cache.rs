//! A file cache of pooled hidden states for gate training: the pass through the base model is
//! the slow part (minutes for the ~2,500 training prompts on 2 cores), and retraining with other
//! classifier settings needs the same states again.
//!
//! One file per (model file, weight format, layer, template, token cap) under the cache directory; records
//! of `u64` FNV-1a of the wrapped text followed by `size` `f32`s, little-endian.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::features::HiddenFeatures;
use crate::model::Model;
use crate::util::fnv1a;
use crate::{Error, Result};

/// Pooled hidden states by text.
pub struct PooledCache {
    path: PathBuf,
    size: usize,
    map: HashMap<u64, Vec<f32>>,
    /// Whether states were computed since the file was last written.
    dirty: bool,
}

impl PooledCache {
    /// The cache file for `model` and `h` under `dir` (created on [`PooledCache::save`]).
    pub fn path_for(dir: &Path, model: &Model, h: &HiddenFeatures) -> PathBuf {
        let stem = model
            .path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        let cap = h.max_tokens.map_or(String::new(), |n| format!("-T{n}"));
        dir.join(format!(
            "{stem}-{:?}-L{}-{:?}{cap}.bin",
            model.format, h.layer, h.template
        ))
    }

    /// Open (or start) the cache for `model` and `h` under `dir`.
    pub fn open(dir: &Path, model: &Model, h: &HiddenFeatures) -> Result<PooledCache> {
        if h.adapter.is_some() {
            // The file name keys the base's own states; an adapter's would be mixed in.
            return Err(Error::mismatch(
                "pooled-state cache",
                "it holds the base's own states: a gate that reads through an adapter is not \
                 cached",
            ));
        }
        let path = Self::path_for(dir, model, h);
        let size = h.size;
        let mut map = HashMap::new();
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let rec = 8 + 4 * size;
            if bytes.len() % rec != 0 {
                return Err(Error::data(
                    &path,
                    0,
                    "states",
                    format!(
                        "not a cache of {size}-value states ({} bytes); delete it",
                        bytes.len()
                    ),
                ));
            }
            for r in bytes.chunks_exact(rec) {
                let key = u64::from_le_bytes(std::array::from_fn(|i| r[i]));
                let v = r[8..]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                map.insert(key, v);
            }
        }
        Ok(PooledCache {
            path,
            size,
            map,
            dirty: false,
        })
    }

    /// How many states the cache holds.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the cache holds no state.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The pooled state of `text`, from the cache or computed (and remembered).
    pub fn pooled(&mut self, model: &Model, h: &HiddenFeatures, text: &str) -> Result<Vec<f32>> {
        let key = fnv1a(h.wrap(text).as_bytes());
        if let Some(v) = self.map.get(&key) {
            return Ok(v.clone());
        }
        let v = h.pooled(model, text)?;
        self.map.insert(key, v.clone());
        self.dirty = true;
        Ok(v)
    }

    /// Write the file again with every state, if any were computed since opening. The whole
    /// file is replaced atomically, so an interrupted save never leaves a partial record.
    pub fn save(&mut self) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let mut bytes = Vec::with_capacity(self.map.len() * (8 + 4 * self.size));
        for (k, v) in &self.map {
            bytes.extend_from_slice(&k.to_le_bytes());
            for x in v {
                bytes.extend_from_slice(&x.to_le_bytes());
            }
        }
        crate::error::write_atomic(&self.path, &bytes)?;
        self.dirty = false;
        Ok(())
    }
}
