//! Gate features: hashed word unigrams and bigrams, L2-normalised (the "hashing trick"), and
//! optionally the base model's residual stream after a middle block, mean-pooled over the
//! prompt's tokens and standardised.
//!
//! The n-grams cost microseconds; the hidden states cost a pass through the first `layer`
//! blocks of the base model over the prompt (`layer / n_layer` of a prompt pass) and classify
//! far better. Measurements: `router-data/README.md`.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use crate::lora::{Adapter, ExpertSet};
use crate::model::{chatml_message, Model, Tokenizer};
use crate::{Error, Result};

/// N-gram feature settings, saved beside the gate's weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureConfig {
    /// Number of hash buckets (0: no n-gram features).
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

/// Everything a gate reads: n-grams (scaled) and optionally hidden states.
#[derive(Debug, Clone, PartialEq)]
pub struct GateFeatures {
    pub ngrams: FeatureConfig,
    /// Factor on the (unit-length) n-gram vector, to weigh it against the hidden states.
    pub ngram_scale: f32,
    /// The base model's hidden states, if the gate reads them.
    pub hidden: Option<HiddenFeatures>,
}

impl GateFeatures {
    /// N-grams only.
    pub fn ngrams(cfg: FeatureConfig) -> GateFeatures {
        GateFeatures {
            ngrams: cfg,
            ngram_scale: 1.0,
            hidden: None,
        }
    }

    /// Length of the feature vector: hash buckets, then hidden dimensions.
    pub fn input_dim(&self) -> usize {
        self.ngrams.dim + self.hidden.as_ref().map_or(0, |h| h.size)
    }
}

/// How the prompt is wrapped before the hidden-state pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Template {
    /// The prompt's text as is.
    Raw,
    /// A ChatML user turn, `<|im_start|>user\n{text}<|im_end|>\n` (no system prompt).
    User,
    /// The model asked what the text is about: `Message: {text}\nThe topic of this message is`.
    Topic,
}

/// Hidden-state features: which block, which wrapping, and the standardisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HiddenFeatures {
    /// The residual stream after this many blocks (1-based) is mean-pooled over the tokens.
    pub layer: usize,
    pub template: Template,
    /// Hidden size of the base model the gate was trained with.
    pub size: usize,
    /// Per-dimension mean over the training prompts (subtracted before the classifier).
    pub mean: Vec<f32>,
    /// Per-dimension standard deviation over the training prompts (divided out).
    pub std: Vec<f32>,
    /// Read at most the first this many tokens of the prompt (the template's own words are
    /// always read): bounds the routing pass whatever the prompt's length (`None`: every
    /// token, as gates before this setting did).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// A fine-tuned gate: the folder (beside `gate.json`) of a LoRA adapter applied to the
    /// blocks the gate reads (`router train --finetune-epochs`); none for the base's own states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<String>,
    /// That adapter, found by [`crate::router::Gate::load`] and read on first use.
    #[serde(skip)]
    pub reader: GateAdapter,
}

/// The adapter a fine-tuned gate reads its hidden states with: its folder, loaded on first use
/// (loading needs the model's configuration, which the gate file does not hold).
#[derive(Debug, Clone, Default)]
pub struct GateAdapter {
    dir: Option<PathBuf>,
    set: OnceLock<std::result::Result<Arc<ExpertSet>, String>>,
}

impl PartialEq for GateAdapter {
    fn eq(&self, other: &Self) -> bool {
        self.dir == other.dir
    }
}

impl GateAdapter {
    /// The adapter in `dir` (read when first needed).
    pub fn at(dir: PathBuf) -> GateAdapter {
        GateAdapter {
            dir: Some(dir),
            set: OnceLock::new(),
        }
    }

    /// The adapter as a one-expert set for `model`, loading it on the first call; `None` when
    /// there is no adapter.
    fn get(&self, model: &Model) -> Result<Option<Arc<ExpertSet>>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let loaded = self.set.get_or_init(|| {
            Adapter::load(dir, &model.config)
                .and_then(|a| ExpertSet::new(vec![a]))
                .map(Arc::new)
                .map_err(|e| e.to_string())
        });
        loaded
            .clone()
            .map(Some)
            .map_err(|msg| Error::adapter(dir, "the gate's adapter", msg))
    }
}

impl HiddenFeatures {
    /// `prompt` in the template.
    pub fn wrap(&self, prompt: &str) -> String {
        match self.template {
            Template::Raw => prompt.to_string(),
            Template::User => chatml_message("user", prompt),
            Template::Topic => format!("Message: {prompt}\nThe topic of this message is"),
        }
    }

    /// The text the model reads for `prompt`: the prompt cut to its first `max_tokens` tokens
    /// (when set), then wrapped. Routing and the gate's fine-tuning both read this.
    pub fn read_text(&self, tok: &Tokenizer, prompt: &str) -> Result<String> {
        if let Some(n) = self.max_tokens {
            let ids = tok.encode(prompt)?;
            if ids.len() > n {
                return Ok(self.wrap(&tok.decode(&ids[..n], false)?));
            }
        }
        Ok(self.wrap(prompt))
    }

    /// The residual stream of [`HiddenFeatures::read_text`] after `layer` blocks, each token's
    /// vector RMS-normalised
    /// (as the next block's input norm does, without its gain), mean-pooled; before
    /// standardisation. Normalising each token first keeps the first tokens' large residuals
    /// from dominating the mean.
    pub fn pooled(&self, model: &Model, prompt: &str) -> Result<Vec<f32>> {
        if model.config.hidden != self.size {
            return Err(Error::mismatch(
                "gate",
                format!(
                    "it reads hidden states of size {} but the model's hidden size is {}: \
                     use the base model the gate was trained with, or retrain it",
                    self.size, model.config.hidden
                ),
            ));
        }
        if self.layer == 0 || self.layer > model.config.n_layer {
            return Err(Error::mismatch(
                "gate",
                format!(
                    "it reads layer {} but the model has {} layers",
                    self.layer, model.config.n_layer
                ),
            ));
        }
        if prompt.trim().is_empty() {
            return Err(Error::no_data("routing", "the prompt is empty"));
        }
        let ids = model
            .tokenizer
            .encode(&self.read_text(&model.tokenizer, prompt)?)?;
        if ids.is_empty() {
            return Err(Error::no_data("routing", "the prompt has no tokens"));
        }
        let h = match (&self.adapter, self.reader.get(model)?) {
            (_, Some(set)) => {
                let rows = [vec![1.0f32]];
                let hook = set.hook(&rows)?;
                crate::model::features::layer_states_with(model, &ids, self.layer, &hook)?
            }
            (Some(name), None) => {
                return Err(Error::mismatch(
                    "gate",
                    format!(
                        "it reads its hidden states with the adapter '{name}', which was not \
                         loaded (load the gate with Gate::load)"
                    ),
                ))
            }
            (None, None) => crate::model::features::layer_states(model, &ids, self.layer)?,
        }; // (t, hidden)
        Ok(rms_pooled(&h.to_vec2::<f32>()?, model.config.rms_eps))
    }
}

/// Mean over rows of `rows[i] / rms(rows[i])`, `rms = sqrt(mean(x^2) + eps)`.
pub fn rms_pooled(rows: &[Vec<f32>], eps: f64) -> Vec<f32> {
    let n = rows.first().map_or(0, |r| r.len());
    let mut out = vec![0f64; n];
    for r in rows {
        let ms = r.iter().map(|v| (*v as f64) * (*v as f64)).sum::<f64>() / n.max(1) as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for (o, v) in out.iter_mut().zip(r) {
            *o += *v as f64 * inv;
        }
    }
    out.iter()
        .map(|v| (v / rows.len().max(1) as f64) as f32)
        .collect()
}

/// Sparse n-gram feature vector of `text`: (bucket, value) pairs, L2-normalised
/// (before `ngram_scale`). Empty when `cfg.dim` is 0.
pub fn features(text: &str, cfg: &FeatureConfig) -> Vec<(usize, f32)> {
    if cfg.dim == 0 {
        return Vec::new();
    }
    let w = crate::util::words(text);
    let mut grams: Vec<String> = w.clone();
    if cfg.bigrams {
        grams.extend(w.windows(2).map(|p| format!("{} {}", p[0], p[1])));
    }
    let mut counts: std::collections::BTreeMap<usize, f32> = Default::default();
    for g in &grams {
        let h = crate::util::fnv1a(g.as_bytes());
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

/// The dense feature vector (`cfg.input_dim()` long) of `text`, given its pooled hidden state
/// when `cfg` reads one.
pub fn assemble(text: &str, pooled: Option<&[f32]>, cfg: &GateFeatures) -> Result<Vec<f32>> {
    let mut x = vec![0f32; cfg.input_dim()];
    for (j, v) in features(text, &cfg.ngrams) {
        x[j] = v * cfg.ngram_scale;
    }
    match (&cfg.hidden, pooled) {
        (None, _) => {}
        (Some(h), Some(p)) => {
            if p.len() != h.size || h.mean.len() != h.size || h.std.len() != h.size {
                return Err(Error::mismatch(
                    "hidden features",
                    format!(
                        "expected {} values, mean and std, got {}, {} and {}",
                        h.size,
                        p.len(),
                        h.mean.len(),
                        h.std.len()
                    ),
                ));
            }
            for (i, v) in p.iter().enumerate() {
                x[cfg.ngrams.dim + i] = (v - h.mean[i]) / h.std[i];
            }
        }
        (Some(_), None) => {
            return Err(Error::setting(
                "model",
                "this gate reads the base model's hidden states: it needs the model",
            ))
        }
    }
    Ok(x)
}
