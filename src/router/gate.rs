//! The gate: features (hashed n-grams and/or the base model's pooled hidden states) ->
//! multinomial logistic regression (trained with linfa) -> topic distribution -> policy -> gate
//! weights.

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use ndarray::{Array1, Array2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::features::{assemble, FeatureConfig, GateFeatures, HiddenFeatures};
use super::Policy;
use crate::lora::ExpertSet;
use crate::model::Model;
use crate::{Error, Result};

/// File names of a saved gate.
pub const GATE_FILE: &str = "gate.json";

/// A routing decision and its explanation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Route {
    /// Most likely topic.
    pub topic: String,
    /// Every topic's probability, most likely first.
    pub probabilities: Vec<(String, f32)>,
    /// Gate weights per expert, in the engine's expert order.
    pub gates: Vec<f32>,
    /// The same weights by expert name.
    pub weights: BTreeMap<String, f32>,
    pub policy: String,
}

impl Route {
    /// One line: top topics with probabilities and the resulting weights.
    pub fn explain(&self) -> String {
        let top: Vec<String> = self
            .probabilities
            .iter()
            .take(3)
            .map(|(t, p)| format!("{t} {p:.2}"))
            .collect();
        let w: Vec<String> = self
            .weights
            .iter()
            .map(|(e, g)| format!("{e}={g:.2}"))
            .collect();
        format!(
            "topic {} ({}) | policy {} | gate {}",
            self.topic,
            top.join(", "),
            self.policy,
            if w.is_empty() {
                "base".into()
            } else {
                w.join(", ")
            }
        )
    }

    /// The JSON object `{"topic", "probabilities": {id: p}, "weights": {expert: g}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let probs: serde_json::Map<String, serde_json::Value> = self
            .probabilities
            .iter()
            .map(|(t, p)| (t.clone(), serde_json::json!(p)))
            .collect();
        serde_json::json!({"topic": self.topic, "probabilities": probs, "weights": self.weights, "policy": self.policy})
    }
}

/// Saved form (`gate.json`): settings, topics and weights.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct GateFile {
    classifier: String,
    /// The n-gram settings.
    features: FeatureConfig,
    #[serde(default = "one")]
    ngram_scale: f32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hidden: Option<HiddenFeatures>,
    topics: Vec<String>,
    /// `(classes, features.input_dim())` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    #[serde(default)]
    notes: BTreeMap<String, serde_json::Value>,
}

fn one() -> f32 {
    1.0
}

/// A trained topic classifier.
#[derive(Debug, Clone)]
pub struct Gate {
    pub topics: Vec<String>,
    pub features: GateFeatures,
    weight: Vec<f32>, // (classes, input_dim)
    bias: Vec<f32>,
    pub notes: BTreeMap<String, serde_json::Value>,
    pub path: PathBuf,
}

impl Gate {
    /// Whether the gate reads the base model's hidden states (and so needs the model).
    pub fn needs_model(&self) -> bool {
        self.features.hidden.is_some()
    }

    /// The pooled hidden state of `text` this gate reads, if it reads one.
    pub fn pooled(&self, model: Option<&Model>, text: &str) -> Result<Option<Vec<f32>>> {
        match (&self.features.hidden, model) {
            (None, _) => Ok(None),
            (Some(h), Some(m)) => Ok(Some(h.pooled(m, text)?)),
            (Some(_), None) => Err(Error::setting(
                "model",
                "this gate reads the base model's hidden states: it needs the model",
            )),
        }
    }

    /// Topic probabilities of `text`, in `self.topics` order; `model` is the base model (needed
    /// when [`Gate::needs_model`]).
    pub fn probabilities(&self, model: Option<&Model>, text: &str) -> Result<Vec<f32>> {
        let pooled = self.pooled(model, text)?;
        self.probabilities_pooled(text, pooled.as_deref())
    }

    /// [`Gate::probabilities`] given the pooled hidden state already computed.
    pub fn probabilities_pooled(&self, text: &str, pooled: Option<&[f32]>) -> Result<Vec<f32>> {
        let x = assemble(text, pooled, &self.features)?;
        Ok(self.probabilities_of(&x))
    }

    /// Softmax of the classifier on a dense feature vector (`features.input_dim()` long).
    pub fn probabilities_of(&self, x: &[f32]) -> Vec<f32> {
        let d = self.features.input_dim();
        let z: Vec<f32> = (0..self.topics.len())
            .map(|c| {
                let w = &self.weight[c * d..(c + 1) * d];
                self.bias[c] + w.iter().zip(x).map(|(w, v)| w * v).sum::<f32>()
            })
            .collect();
        crate::util::softmax(&z)
    }

    /// Route `text` under `policy` to `experts`, reading it with `model` (the base the experts
    /// adapt; the gate's hidden-state features come from it).
    pub fn route(
        &self,
        model: &Model,
        experts: &ExpertSet,
        text: &str,
        policy: &Policy,
    ) -> Result<Route> {
        let p = self.probabilities(Some(model), text)?;
        let gates = policy.gates(&self.topics, &p, experts)?;
        let mut probabilities: Vec<(String, f32)> = self.topics.iter().cloned().zip(p).collect();
        probabilities.sort_by(|a, b| b.1.total_cmp(&a.1));
        let weights = experts
            .names()
            .iter()
            .cloned()
            .zip(gates.iter().copied())
            .filter(|(_, g)| *g != 0.0)
            .collect();
        Ok(Route {
            topic: probabilities[0].0.clone(),
            probabilities,
            gates,
            weights,
            policy: policy.name.clone(),
        })
    }

    /// Train on `(text, topic)` examples with linfa's multinomial logistic regression,
    /// restarting its solver up to `restarts` times from the last parameters. When `cfg` reads
    /// hidden states, `pooled[i]` is example `i`'s pooled hidden state
    /// ([`super::HiddenFeatures::pooled`]); their mean and standard deviation become the
    /// standardisation saved with the gate.
    pub fn train(
        examples: &[(String, String)],
        pooled: Option<&[Vec<f32>]>,
        topics: &[&str],
        cfg: &GateFeatures,
        alpha: f64,
        max_iter: u64,
        restarts: usize,
    ) -> Result<Gate> {
        if examples.is_empty() {
            return Err(Error::no_data("gate training", "no examples"));
        }
        let mut cfg = cfg.clone();
        if let Some(h) = cfg.hidden.as_mut() {
            let pooled = pooled.ok_or_else(|| {
                Error::setting(
                    "pooled",
                    "gate training: hidden features need pooled hidden states",
                )
            })?;
            if pooled.len() != examples.len() || pooled.iter().any(|p| p.len() != h.size) {
                return Err(Error::mismatch(
                    "pooled",
                    format!(
                        "gate training: need one pooled hidden state of size {} per example, \
                         got {} for {} examples",
                        h.size,
                        pooled.len(),
                        examples.len()
                    ),
                ));
            }
            let n = pooled.len() as f64;
            let mut mean = vec![0f64; h.size];
            for p in pooled {
                for (m, v) in mean.iter_mut().zip(p) {
                    *m += *v as f64 / n;
                }
            }
            let mut var = vec![0f64; h.size];
            for p in pooled {
                for ((s, v), m) in var.iter_mut().zip(p).zip(&mean) {
                    *s += (*v as f64 - m).powi(2) / n;
                }
            }
            h.mean = mean.iter().map(|m| *m as f32).collect();
            h.std = var.iter().map(|v| (v.sqrt() as f32).max(1e-6)).collect();
        }
        let d = cfg.input_dim();
        if d == 0 {
            return Err(Error::setting(
                "features",
                "gate training: no features (dim 0 and no hidden layer)",
            ));
        }
        let mut x = Array2::<f64>::zeros((examples.len(), d));
        let mut y = Array1::<usize>::zeros(examples.len());
        for (i, (text, topic)) in examples.iter().enumerate() {
            let p = pooled.map(|p| p[i].as_slice());
            for (j, v) in assemble(text, p, &cfg)?.into_iter().enumerate() {
                x[[i, j]] = v as f64;
            }
            y[i] = topics
                .iter()
                .position(|t| t == topic)
                .ok_or_else(|| Error::unknown("topic", topic, topics))?;
        }
        let ds = Dataset::new(x, y);
        // linfa's L-BFGS stops early on this problem (train accuracy ~0.86 whatever the
        // tolerance), so restart it from its own best parameters until the loss settles.
        let mut init: Option<Array2<f64>> = None;
        let mut best_loss = f64::INFINITY;
        let mut fit = None;
        let mut losses = Vec::new();
        for _ in 0..restarts.max(1) {
            let mut params = MultiLogisticRegression::default()
                .alpha(alpha)
                .max_iterations(max_iter)
                .gradient_tolerance(1e-7);
            if let Some(p) = init.take() {
                params = params.initial_params(p);
            }
            let f = params
                .fit(&ds)
                .map_err(|e| Error::Internal(format!("gate training failed: {e}")))?;
            let loss = train_loss(&f, &ds, alpha);
            losses.push(loss);
            let p = f.params();
            let mut next = Array2::<f64>::zeros((p.nrows() + 1, p.ncols()));
            next.slice_mut(ndarray::s![..p.nrows(), ..]).assign(p);
            next.row_mut(p.nrows()).assign(f.intercept());
            init = Some(next);
            fit = Some(f);
            if best_loss - loss < 1e-3 * best_loss.abs().max(1.0) {
                break;
            }
            best_loss = loss;
        }
        let fit = fit.ok_or_else(|| Error::Internal("gate training ran no round".into()))?;
        // linfa's params are (dim, classes) over its sorted class labels.
        let classes: Vec<usize> = fit.classes().to_vec();
        let params = fit.params();
        let intercept = fit.intercept();
        let c = topics.len();
        let mut weight = vec![0f32; c * d];
        let mut bias = vec![-1e4f32; c]; // a class absent from training is never predicted
        for (k, &cls) in classes.iter().enumerate() {
            for j in 0..d {
                weight[cls * d + j] = params[[j, k]] as f32;
            }
            bias[cls] = intercept[k] as f32;
        }
        Ok(Gate {
            topics: topics.iter().map(|s| s.to_string()).collect(),
            features: cfg,
            weight,
            bias,
            notes: BTreeMap::from([("train_loss".into(), serde_json::json!(losses))]),
            path: PathBuf::new(),
        })
    }

    /// Load `dir/gate.json`.
    pub fn load(dir: &Path) -> Result<Gate> {
        let path = dir.join(GATE_FILE);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let f: GateFile = serde_json::from_str(&text)
            .map_err(|e| Error::data(&path, e.line(), "gate", e.to_string()))?;
        let bad = |field: &str, msg: String| Err(Error::data(&path, 1, field, msg));
        let mut features = GateFeatures {
            ngrams: f.features,
            ngram_scale: f.ngram_scale,
            hidden: f.hidden,
        };
        // A fine-tuned gate's adapter: a folder beside gate.json, read on first use.
        if let Some(h) = features.hidden.as_mut() {
            if let Some(name) = &h.adapter {
                let plain = !name.is_empty()
                    && Path::new(name).components().count() == 1
                    && !name.contains("..");
                if !plain {
                    return bad(
                        "hidden.adapter",
                        format!("'{name}' is not a folder name beside gate.json"),
                    );
                }
                let d = dir.join(name);
                if !d.join("adapter_config.json").is_file() {
                    return bad(
                        "hidden.adapter",
                        format!(
                            "no adapter in {} (adapter_config.json missing)",
                            d.display()
                        ),
                    );
                }
                h.reader = super::features::GateAdapter::at(d);
            }
        }
        let d = features.input_dim();
        if d == 0 {
            return bad(
                "features",
                "no features: dim is 0 and there is no hidden layer".into(),
            );
        }
        if f.topics.is_empty() {
            return bad("topics", "no topics".into());
        }
        if !features.ngram_scale.is_finite() {
            return bad("ngram_scale", "must be finite".into());
        }
        if let Some(h) = &features.hidden {
            if h.layer == 0 {
                return bad("hidden.layer", "must be at least 1".into());
            }
            if h.size == 0 {
                return bad("hidden.size", "must be at least 1".into());
            }
            for (name, v) in [("mean", &h.mean), ("std", &h.std)] {
                if v.len() != h.size {
                    return bad(
                        &format!("hidden.{name}"),
                        format!("expected {} values, found {}", h.size, v.len()),
                    );
                }
            }
            if h.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
                return bad(
                    "hidden.std",
                    "every value must be finite and positive".into(),
                );
            }
        }
        if f.weight.len() != f.topics.len() * d {
            return bad(
                "weight",
                format!(
                    "expected {} x {} weights, found {}",
                    f.topics.len(),
                    d,
                    f.weight.len()
                ),
            );
        }
        if f.bias.len() != f.topics.len() {
            return bad(
                "bias",
                format!("expected {} biases, found {}", f.topics.len(), f.bias.len()),
            );
        }
        if f.weight.iter().chain(&f.bias).any(|w| !w.is_finite()) {
            return bad("weight", "weights and biases must be finite".into());
        }
        Ok(Gate {
            topics: f.topics,
            features,
            weight: f.weight,
            bias: f.bias,
            notes: f.notes,
            path,
        })
    }

    /// Save to `dir/gate.json` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let f = GateFile {
            classifier: match &self.features.hidden {
                Some(h) => format!(
                    "multinomial logistic regression (linfa-logistic), hashed word 1-2-grams + \
                     base-model residual stream after block {}, RMS-normalised per token, \
                     mean-pooled, standardised",
                    h.layer
                ),
                None => {
                    "multinomial logistic regression (linfa-logistic), hashed word 1-2-grams".into()
                }
            },
            features: self.features.ngrams.clone(),
            ngram_scale: self.features.ngram_scale,
            hidden: self.features.hidden.clone(),
            topics: self.topics.clone(),
            weight: self
                .weight
                .iter()
                .map(|w| (w * 1e5).round() / 1e5)
                .collect(),
            bias: self.bias.clone(),
            notes: self.notes.clone(),
        };
        let json =
            serde_json::to_string(&f).map_err(|e| Error::Internal(format!("{GATE_FILE}: {e}")))?;
        crate::error::write_atomic(&dir.join(GATE_FILE), json.as_bytes())
    }
}

/// linfa's objective: summed cross-entropy plus `alpha / 2 |W|^2`.
fn train_loss(
    fit: &linfa_logistic::MultiFittedLogisticRegression<f64, usize>,
    ds: &Dataset<f64, usize, ndarray::Ix1>,
    alpha: f64,
) -> f64 {
    let p = fit.predict_probabilities(ds.records());
    let ce: f64 = ds
        .targets()
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let k = fit.classes().iter().position(|&c| c == t).unwrap_or(0);
            -p[[i, k]].max(1e-300).ln()
        })
        .sum();
    ce + 0.5 * alpha * fit.params().iter().map(|w| w * w).sum::<f64>()
}
