//! The open-ended stance judge: p(conservative) of an answer from a linfa logistic regression
//! over features of the answer, trained on the stance pairs' answers (train split by hashed id,
//! measured on the dev split).
//!
//! Features (set by [`JudgeConfig`]): the base model's residual stream after chosen blocks,
//! RMS-normalised per token and mean-pooled over the answer's tokens (read with the question
//! before it in the chat template, or alone), standardised with the train answers' mean and
//! spread; and/or hashed word n-grams (the gate's features). The trained judge is saved as JSON
//! (`adapters/judge/judge.json`, under 1 MB) and loaded by `stancemix eval --open-ended`;
//! `cargo run --release --example train_judge` retrains it. Measured accuracies: docs/EVAL.md.

use std::path::Path;
use std::sync::Mutex;

use candle_core::{Device, Tensor};
use linfa::prelude::*;
use linfa_logistic::LogisticRegression;
use ndarray::{Array1, Array2};
use serde::{Deserialize, Serialize};

use crate::data::{StancePair, STANCE_OPENINGS};
use crate::model::{
    chatml_message, HookResult, LinearHook, Logits, Model, Pass, Target, CHATML_ASSISTANT,
};
use crate::router::{features, FeatureConfig};
use crate::{Error, Result};

/// The shipped judge, relative to the repository root.
pub const DEFAULT_JUDGE: &str = "adapters/judge/judge.json";
/// The `format` field of a judge file.
pub const JUDGE_FORMAT: &str = "stancemix-judge/1";

/// What the judge reads of an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Context {
    /// The answer alone (its opening "I agree." stripped).
    Answer,
    /// The question as a user turn, then the answer as the assistant's turn (chat template);
    /// pooled over the answer's tokens only.
    Chat,
}

/// How to build and train a judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeConfig {
    /// Hidden-state features: the residual stream after these many blocks (1 .. n_layer - 1),
    /// RMS-normalised, mean-pooled; all read in one forward pass. Empty: none.
    pub layers: Vec<usize>,
    pub context: Context,
    /// Hashed word n-gram features, if any.
    pub ngrams: Option<FeatureConfig>,
    /// Weight of the n-gram block next to the standardised hidden features.
    pub ngram_scale: f32,
    /// L2 penalty (linfa's `alpha`, on the summed log-loss).
    pub alpha: f64,
    /// L-BFGS iterations per round, and rounds restarted from the last parameters (linfa's
    /// solver stops early; restarts continue until the loss settles).
    pub max_iter: u64,
    pub restarts: usize,
}

impl Default for JudgeConfig {
    /// The shipped judge's settings (docs/EVAL.md compares the others).
    fn default() -> Self {
        JudgeConfig {
            layers: vec![4, 8, 12],
            context: Context::Answer,
            ngrams: None,
            ngram_scale: 1.0,
            alpha: 1000.0,
            max_iter: 200,
            restarts: 20,
        }
    }
}

/// How the judge was trained and how well it does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    pub train_answers: usize,
    pub dev_answers: usize,
    pub train_accuracy: f64,
    /// Accuracy on the answers of the dev pairs (held out by hashed id).
    pub dev_accuracy: f64,
    /// Dev pairs whose conservative answer scored above its progressive one.
    #[serde(default)]
    pub dev_pair_accuracy: f64,
    /// Wall time of training (features and fit), seconds.
    #[serde(default)]
    pub train_seconds: f64,
}

/// A trained judge: `p(conservative) = sigmoid(w . x + b)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Judge {
    pub format: String,
    pub config: JudgeConfig,
    /// Standardisation of the hidden features (train answers' mean and standard deviation).
    mean: Vec<f32>,
    scale: Vec<f32>,
    /// Hidden weights, then n-gram weights.
    weight: Vec<f32>,
    bias: f32,
    /// Base model the hidden features were read from (file name), for the record.
    pub model: String,
    pub report: JudgeReport,
}

/// An answer without its opening stance sentence ("I agree."): the openings are balanced
/// across sides by design and carry no stance of their own.
pub fn strip_opening(answer: &str) -> &str {
    let a = answer.trim_start();
    STANCE_OPENINGS
        .iter()
        .find_map(|o| a.strip_prefix(o))
        .unwrap_or(a)
        .trim_start()
}

/// Captures the mean over positions `from..` of each block's attention input (the residual
/// stream after that many blocks, RMS-normalised).
struct Capture {
    from: usize,
    layers: Vec<usize>,
    out: Mutex<Vec<Option<Vec<f32>>>>,
}

impl LinearHook for Capture {
    fn after_linear(&self, layer: usize, target: Target, x: &Tensor, y: Tensor) -> HookResult {
        if target == Target::Q {
            if let Some(k) = self.layers.iter().position(|&l| l == layer) {
                let t = x.dim(1)?;
                let m: Vec<f32> = x
                    .narrow(1, self.from, t - self.from)?
                    .mean(1)?
                    .squeeze(0)?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1()?;
                if let Ok(mut out) = self.out.lock() {
                    out[k] = Some(m);
                }
            }
        }
        Ok(y)
    }
}

/// The raw hidden features of one answer (before standardisation): for each of `layers`, the
/// RMS-normalised residual stream after that many blocks, mean-pooled over the answer's tokens.
pub fn hidden_features(
    model: &Model,
    layers: &[usize],
    context: Context,
    prompt: &str,
    answer: &str,
) -> Result<Vec<f32>> {
    if layers.is_empty() {
        return Ok(Vec::new());
    }
    let n_layer = model.config.n_layer;
    if let Some(&bad) = layers.iter().find(|&&l| l == 0 || l >= n_layer) {
        return Err(Error::setting(
            "layers",
            format!(
                "judge layer {bad}: the model has {n_layer} blocks (1-{} allowed)",
                n_layer - 1
            ),
        ));
    }
    let (prefix, body) = match context {
        Context::Answer => (String::new(), strip_opening(answer).trim()),
        Context::Chat => (
            format!(
                "{}{CHATML_ASSISTANT}",
                chatml_message("user", prompt.trim())
            ),
            answer.trim(),
        ),
    };
    if body.is_empty() {
        return Err(Error::no_data("judge", "the answer is empty"));
    }
    let from = if prefix.is_empty() {
        0
    } else {
        model.tokenizer.encode(&prefix)?.len()
    };
    let ids = model.tokenizer.encode(&format!("{prefix}{body}"))?;
    // Long texts keep their start (the answer's opening carries most stance).
    let ids = &ids[..ids.len().min(model.config.context_len)];
    if ids.len() <= from {
        return Err(Error::no_data(
            "judge",
            "the question fills the context: no room for the answer",
        ));
    }
    let top = layers.iter().copied().max().unwrap_or(1);
    let cap = Capture {
        from,
        layers: layers.to_vec(),
        out: Mutex::new(vec![None; layers.len()]),
    };
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    // The attention input of block `top` (0-based) is the stream after `top` blocks.
    model.forward(
        &x,
        None,
        &Pass {
            hook: &cap,
            logits: Logits::Layer(top + 1),
            differentiable: false,
        },
    )?;
    let out = cap
        .out
        .into_inner()
        .map_err(|_| Error::Internal("judge feature capture poisoned".into()))?;
    let mut v = Vec::with_capacity(layers.len() * model.config.hidden);
    for (k, o) in out.into_iter().enumerate() {
        v.extend(o.ok_or_else(|| {
            Error::Internal(format!("judge: block {} was not reached", layers[k]))
        })?);
    }
    Ok(v)
}

/// One answer of a stance pair: `(prompt, answer, is_conservative)`.
type Example<'a> = (&'a str, &'a str, bool);

fn examples<'a>(pairs: &[&'a StancePair]) -> Vec<Example<'a>> {
    pairs
        .iter()
        .flat_map(|p| {
            [
                (p.prompt.as_str(), p.progressive.as_str(), false),
                (p.prompt.as_str(), p.conservative.as_str(), true),
            ]
        })
        .collect()
}

/// Split stance pairs into (train, dev) by hashed id.
pub fn split(pairs: &[StancePair]) -> (Vec<&StancePair>, Vec<&StancePair>) {
    let (dev, train): (Vec<&StancePair>, Vec<&StancePair>) = pairs.iter().partition(|p| p.is_dev());
    (train, dev)
}

impl Judge {
    /// Train on the train split of `pairs` (both answers of each pair) and measure on the dev
    /// split. `progress(done, total)` follows the feature pass.
    pub fn train(
        model: &Model,
        pairs: &[StancePair],
        cfg: &JudgeConfig,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<(Judge, JudgeReport)> {
        let t0 = std::time::Instant::now();
        if cfg.layers.is_empty() && cfg.ngrams.is_none() {
            return Err(Error::setting(
                "layers",
                "the judge needs hidden-state layers or n-grams",
            ));
        }
        if !(cfg.alpha.is_finite() && cfg.alpha >= 0.0) {
            return Err(Error::setting(
                "alpha",
                format!("judge alpha {} is not a finite number >= 0", cfg.alpha),
            ));
        }
        let (train, dev) = split(pairs);
        if train.is_empty() {
            return Err(Error::no_data(
                "judge training",
                "no stance pairs to train on",
            ));
        }
        let train_ex = examples(&train);
        let dev_ex = examples(&dev);
        let total = train_ex.len() + dev_ex.len();
        let mut raw = Vec::with_capacity(train_ex.len());
        for (k, (p, a, _)) in train_ex.iter().enumerate() {
            raw.push(hidden_features(model, &cfg.layers, cfg.context, p, a)?);
            progress(k + 1, total);
        }
        let hd = cfg.layers.len() * model.config.hidden;
        let nd = cfg.ngrams.as_ref().map_or(0, |c| c.dim);
        let (mut mean, mut scale) = (vec![0f32; hd], vec![1f32; hd]);
        let n = raw.len() as f64;
        for j in 0..hd {
            let m = raw.iter().map(|r| r[j] as f64).sum::<f64>() / n;
            let var = raw.iter().map(|r| (r[j] as f64 - m).powi(2)).sum::<f64>() / n;
            mean[j] = m as f32;
            scale[j] = var.sqrt().max(1e-6) as f32;
        }
        let mut judge = Judge {
            format: JUDGE_FORMAT.into(),
            config: cfg.clone(),
            mean,
            scale,
            weight: vec![0.0; hd + nd],
            bias: 0.0,
            model: String::new(),
            report: JudgeReport {
                train_answers: train_ex.len(),
                dev_answers: dev_ex.len(),
                train_accuracy: 0.0,
                dev_accuracy: 0.0,
                dev_pair_accuracy: 0.0,
                train_seconds: 0.0,
            },
        };
        let mut x = Array2::<f64>::zeros((train_ex.len(), hd + nd));
        let mut y = Array1::<bool>::from_elem(train_ex.len(), false);
        for (i, ((_, a, con), r)) in train_ex.iter().zip(&raw).enumerate() {
            for (j, v) in judge.vector(r, a).into_iter().enumerate() {
                x[[i, j]] = v as f64;
            }
            y[i] = *con;
        }
        let (w, b) = fit(&x, &y, cfg)?;
        judge.weight = w.iter().map(|&v| v as f32).collect();
        judge.bias = b as f32;
        let train_z: Vec<f64> = (0..x.nrows()).map(|i| x.row(i).dot(&w) + b).collect();
        let train_acc = accuracy_of(&train_z, &train_ex);
        let mut dev_z = Vec::with_capacity(dev_ex.len());
        for (k, (p, a, _)) in dev_ex.iter().enumerate() {
            dev_z.push(judge.logit(model, p, a)?);
            progress(train_ex.len() + k + 1, total);
        }
        judge.report.train_accuracy = train_acc;
        judge.report.dev_accuracy = accuracy_of(&dev_z, &dev_ex);
        judge.report.dev_pair_accuracy = pair_accuracy(&dev_z);
        judge.report.train_seconds = t0.elapsed().as_secs_f64();
        Ok((judge.clone(), judge.report))
    }

    /// The full feature vector (standardised hidden, then scaled n-grams) from raw hidden
    /// features and the answer.
    fn vector(&self, raw: &[f32], answer: &str) -> Vec<f32> {
        let mut v: Vec<f32> = raw
            .iter()
            .zip(self.mean.iter().zip(&self.scale))
            .map(|(&r, (&m, &s))| (r - m) / s)
            .collect();
        if let Some(c) = &self.config.ngrams {
            let base = v.len();
            v.resize(base + c.dim, 0.0);
            for (j, f) in features(strip_opening(answer), c) {
                v[base + j] += f * self.config.ngram_scale;
            }
        }
        v
    }

    fn logit(&self, model: &Model, prompt: &str, answer: &str) -> Result<f64> {
        // What the judge reads must not be empty, whichever features it reads.
        let read = match self.config.context {
            Context::Answer => strip_opening(answer),
            Context::Chat => answer,
        };
        if read.trim().is_empty() {
            return Err(Error::no_data("judge", "the answer is empty"));
        }
        let raw = hidden_features(
            model,
            &self.config.layers,
            self.config.context,
            prompt,
            answer,
        )?;
        if raw.len() != self.mean.len() {
            return Err(Error::mismatch(
                "judge",
                format!(
                    "it expects {} hidden features, the model gives {} (another base model?)",
                    self.mean.len(),
                    raw.len()
                ),
            ));
        }
        let v = self.vector(&raw, answer);
        Ok(self.bias as f64
            + v.iter()
                .zip(&self.weight)
                .map(|(&a, &w)| a as f64 * w as f64)
                .sum::<f64>())
    }

    /// Probability that `answer` (to `prompt`) argues the conservative side. `model` must be
    /// the base model the judge was trained on (any weight format; see [`Judge::reads_with`]),
    /// whichever model wrote the answer.
    pub fn p_conservative(&self, model: &Model, prompt: &str, answer: &str) -> Result<f64> {
        let z = self.logit(model, prompt, answer)?;
        Ok(1.0 / (1.0 + (-z).exp()))
    }

    /// Whether `model` can give this judge its features: any model when it reads n-grams only,
    /// else the base its hidden features were read from (same file name).
    pub fn reads_with(&self, model: &Model) -> bool {
        self.config.layers.is_empty()
            || model.path.file_name().map(|f| f.to_string_lossy())
                == Some(self.model.as_str().into())
    }

    /// The model that reads answers written by `answering` for this judge: `answering` itself
    /// when [`Judge::reads_with`] it, else the judge's own base from the models cache (fetched
    /// if it is one of [`crate::model::fetch::BASES`]). The judge is an instrument that reads
    /// text: answers from another base (Qwen's experts) are read with the judge's base.
    pub fn reader_for(
        &self,
        answering: &std::sync::Arc<Model>,
        paths: &crate::util::Paths,
    ) -> Result<std::sync::Arc<Model>> {
        use crate::model::fetch;
        if self.reads_with(answering) {
            return Ok(answering.clone());
        }
        let path = match fetch::BASES.iter().find(|b| b.file_name == self.model) {
            Some(base) => fetch::ensure(base, paths, &mut |_| {})?,
            None => paths.models.join(&self.model),
        };
        if !path.exists() {
            return Err(Error::no_data(
                "judge",
                format!(
                    "it reads with '{}', not found in {}",
                    self.model,
                    paths.models.display()
                ),
            ));
        }
        // Trained on f32 features (docs/EVAL.md); the reader is small.
        Model::load(
            &path,
            &crate::model::LoadOptions {
                format: crate::model::WeightFormat::F32,
            },
        )
    }

    /// Load a judge file, checking its format and shapes.
    pub fn load(path: &Path) -> Result<Judge> {
        let bad = |msg: String| Error::Model {
            path: path.to_path_buf(),
            msg: format!("not a usable stance judge: {msg}"),
        };
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let j: Judge = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        if j.format != JUDGE_FORMAT {
            return Err(bad(format!(
                "format '{}', expected '{JUDGE_FORMAT}'",
                j.format
            )));
        }
        let hd = j.mean.len();
        let nd = j.config.ngrams.as_ref().map_or(0, |c| c.dim);
        if j.config.ngrams.as_ref().is_some_and(|c| c.dim == 0) {
            return Err(bad("n-gram dim 0".into()));
        }
        if j.scale.len() != hd || j.weight.len() != hd + nd {
            return Err(bad(format!(
                "{} means, {} scales and {} weights for {hd} hidden and {nd} n-gram features",
                j.mean.len(),
                j.scale.len(),
                j.weight.len()
            )));
        }
        if j.config.layers.is_empty() != (hd == 0)
            || (!j.config.layers.is_empty() && !hd.is_multiple_of(j.config.layers.len()))
        {
            return Err(bad(format!(
                "{hd} hidden features for layers {:?}",
                j.config.layers
            )));
        }
        let finite = j
            .mean
            .iter()
            .chain(&j.weight)
            .chain([&j.bias, &j.config.ngram_scale])
            .all(|v| v.is_finite())
            && j.scale.iter().all(|s| s.is_finite() && *s > 0.0);
        if !finite {
            return Err(bad("non-finite or non-positive values".into()));
        }
        Ok(j)
    }

    /// Save as JSON (atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            serde_json::to_string(self).map_err(|e| Error::Internal(format!("judge: {e}")))?;
        crate::error::write_atomic(path, text.as_bytes())
    }
}

/// Logistic regression with linfa, restarted from its own last parameters until the loss
/// settles (linfa's L-BFGS stops early on these problems). Returns `(weights, bias)` of
/// `logit p(conservative)`.
fn fit(x: &Array2<f64>, y: &Array1<bool>, cfg: &JudgeConfig) -> Result<(Array1<f64>, f64)> {
    if !(y.iter().any(|&c| c) && y.iter().any(|&c| !c)) {
        return Err(Error::no_data("judge training", "it saw only one stance"));
    }
    let ds = Dataset::new(x.clone(), y.clone());
    let d = x.ncols();
    let mut init: Option<Array1<f64>> = None;
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..cfg.restarts.max(1) {
        let mut p = LogisticRegression::default()
            .alpha(cfg.alpha)
            .max_iterations(cfg.max_iter)
            .gradient_tolerance(1e-6);
        if let Some(i) = init.take() {
            p = p.initial_params(i);
        }
        let f = p
            .fit(&ds)
            .map_err(|e| Error::Internal(format!("judge training failed: {e}")))?;
        // linfa's positive class is whichever it met (or counted) first.
        let sign = if f.labels().pos.class { 1.0 } else { -1.0 };
        let w = f.params().mapv(|v| v * sign);
        let b = f.intercept() * sign;
        let z = x.dot(&w) + b;
        let loss = z
            .iter()
            .zip(y)
            .map(|(z, &t)| {
                let m = if t { *z } else { -z };
                (1.0 + (-m).exp()).ln()
            })
            .sum::<f64>()
            + 0.5 * cfg.alpha * w.dot(&w);
        let mut next = Array1::zeros(d + 1);
        next.slice_mut(ndarray::s![..d]).assign(f.params());
        next[d] = f.intercept();
        init = Some(next);
        out = Some((w, b));
        if best - loss < 1e-4 * best.abs().max(1.0) {
            break;
        }
        best = loss;
    }
    out.ok_or_else(|| Error::Internal("judge training ran no round".into()))
}

fn accuracy_of(z: &[f64], ex: &[Example]) -> f64 {
    if ex.is_empty() {
        return 0.0;
    }
    let right = z
        .iter()
        .zip(ex)
        .filter(|(z, (_, _, con))| (**z > 0.0) == *con)
        .count();
    right as f64 / ex.len() as f64
}

/// Logits come in (progressive, conservative) order per pair.
fn pair_accuracy(z: &[f64]) -> f64 {
    let n = z.len() / 2;
    if n == 0 {
        return 0.0;
    }
    (0..n).filter(|&k| z[2 * k + 1] > z[2 * k]).count() as f64 / n as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openings_are_stripped() {
        assert_eq!(strip_opening("I strongly agree. Taxes..."), "Taxes...");
        assert_eq!(strip_opening("  I disagree. No."), "No.");
        assert_eq!(strip_opening("Plain answer."), "Plain answer.");
    }

    #[test]
    fn bad_judge_files_are_refused_with_their_path() {
        let dir = std::env::temp_dir().join(format!("stancemix-judge-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("judge.json");
        std::fs::write(&f, "not json").unwrap();
        let e = Judge::load(&f).unwrap_err().to_string();
        assert!(
            e.contains("judge.json") && e.contains("not a usable stance judge"),
            "{e}"
        );
        let good = Judge {
            format: JUDGE_FORMAT.into(),
            config: JudgeConfig {
                layers: vec![1],
                ..Default::default()
            },
            mean: vec![0.0; 4],
            scale: vec![1.0; 4],
            weight: vec![0.5; 4],
            bias: 0.0,
            model: String::new(),
            report: JudgeReport {
                train_answers: 0,
                dev_answers: 0,
                train_accuracy: 0.0,
                dev_accuracy: 0.0,
                dev_pair_accuracy: 0.0,
                train_seconds: 0.0,
            },
        };
        good.save(&f).unwrap();
        assert_eq!(Judge::load(&f).unwrap(), good);
        let mut short = good.clone();
        short.weight.pop();
        short.save(&f).unwrap();
        assert!(Judge::load(&f).unwrap_err().to_string().contains("weights"));
        let mut other = good.clone();
        other.format = "something/9".into();
        other.save(&f).unwrap();
        assert!(Judge::load(&f).unwrap_err().to_string().contains("format"));
        let e = Judge::load(&dir.join("missing.json"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.json"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
