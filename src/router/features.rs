//! Gate features: hashed word unigrams and bigrams, L2-normalised (the "hashing trick").
//!
//! Cheap (microseconds, no forward pass); hidden states of the base model classify better but
//! cost a forward pass per prompt. Measurements: `router-data/README.md`.

use serde::{Deserialize, Serialize};

/// Feature settings, saved beside the gate's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Number of hash buckets.
    pub dim: usize,
    /// Use word bigrams as well as unigrams.
    pub bigrams: bool,
}

impl Default for FeatureConfig {
    fn default() -> Self {
        FeatureConfig {
            dim: 1 << 14,
            bigrams: true,
        }
    }
}

/// Lower-cased words (letters, digits, apostrophes inside words).
pub fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_alphanumeric() || c == '\''))
        .map(|w| w.trim_matches('\'').to_lowercase())
        .filter(|w| !w.is_empty())
        .collect()
}

/// FNV-1a, stable across platforms and releases (unlike `std`'s hasher).
fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in s.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// Sparse feature vector of `text`: (bucket, value) pairs, L2-normalised.
pub fn features(text: &str, cfg: &FeatureConfig) -> Vec<(usize, f32)> {
    let w = words(text);
    let mut grams: Vec<String> = w.clone();
    if cfg.bigrams {
        grams.extend(w.windows(2).map(|p| format!("{} {}", p[0], p[1])));
    }
    let mut counts: std::collections::BTreeMap<usize, f32> = Default::default();
    for g in &grams {
        let h = fnv1a(g);
        let sign = if (h >> 63) == 0 { 1.0 } else { -1.0 };
        *counts.entry((h % cfg.dim as u64) as usize).or_default() += sign;
    }
    let norm: f32 = counts.values().map(|v| v * v).sum::<f32>().sqrt();
    counts
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(k, v)| (k, v / norm.max(1e-6)))
        .collect()
}
