//! A file cache of pooled hidden states for gate training: the pass through the base model is
//! the slow part (minutes for the ~2,500 training prompts on 2 cores), and retraining with other
//! classifier settings needs the same states again.
//!
//! One file per (model file, weight format, layer, template) under the cache directory; records
//! of `u64` FNV-1a of the wrapped text followed by `size` `f32`s, little-endian.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::features::{fnv1a, HiddenFeatures};
use crate::model::Model;
use crate::{Error, Result};

/// Pooled hidden states by text.
pub struct PooledCache {
    path: PathBuf,
    size: usize,
    map: HashMap<u64, Vec<f32>>,
    fresh: Vec<u64>,
}

impl PooledCache {
    /// The cache file for `model` and `h` under `dir` (created on [`PooledCache::save`]).
    pub fn path_for(dir: &Path, model: &Model, h: &HiddenFeatures) -> PathBuf {
        let stem = model
            .path
            .file_stem()
            .map_or("model".into(), |s| s.to_string_lossy().into_owned());
        dir.join(format!(
            "{stem}-{:?}-L{}-{:?}.bin",
            model.format, h.layer, h.template
        ))
    }

    /// Open (or start) the cache for `model` and `h` under `dir`.
    pub fn open(dir: &Path, model: &Model, h: &HiddenFeatures) -> Result<PooledCache> {
        let path = Self::path_for(dir, model, h);
        let size = h.size;
        let mut map = HashMap::new();
        if path.exists() {
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let rec = 8 + 4 * size;
            if bytes.len() % rec != 0 {
                return Err(Error::Invalid(format!(
                    "{}: not a cache of {size}-value states ({} bytes); delete it",
                    path.display(),
                    bytes.len()
                )));
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
            fresh: Vec::new(),
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
        let key = fnv1a(&h.wrap(text));
        if let Some(v) = self.map.get(&key) {
            return Ok(v.clone());
        }
        let v = h.pooled(model, text)?;
        self.map.insert(key, v.clone());
        self.fresh.push(key);
        Ok(v)
    }

    /// Append the states computed since opening to the file.
    pub fn save(&mut self) -> Result<()> {
        if self.fresh.is_empty() {
            return Ok(());
        }
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let mut bytes = Vec::with_capacity(self.fresh.len() * (8 + 4 * self.size));
        for k in &self.fresh {
            bytes.extend_from_slice(&k.to_le_bytes());
            for v in &self.map[k] {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        f.write_all(&bytes).map_err(|e| Error::io(&self.path, e))?;
        self.fresh.clear();
        Ok(())
    }
}
