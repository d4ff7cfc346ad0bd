//! The gate: hashed n-gram features -> multinomial logistic regression (trained with linfa)
//! -> topic distribution -> policy -> gate weights.

use linfa::prelude::*;
use linfa_logistic::MultiLogisticRegression;
use ndarray::{Array1, Array2};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::features::{features, FeatureConfig};
use super::Policy;
use crate::runtime::Engine;
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
    features: FeatureConfig,
    topics: Vec<String>,
    /// `(classes, dim)` row-major.
    weight: Vec<f32>,
    bias: Vec<f32>,
    #[serde(default)]
    notes: BTreeMap<String, serde_json::Value>,
}

/// A trained topic classifier.
#[derive(Debug, Clone)]
pub struct Gate {
    pub topics: Vec<String>,
    pub features: FeatureConfig,
    weight: Vec<f32>, // (classes, dim)
    bias: Vec<f32>,
    pub notes: BTreeMap<String, serde_json::Value>,
    pub path: PathBuf,
}

impl Gate {
    /// Topic probabilities of `text`, in `self.topics` order.
    pub fn probabilities(&self, text: &str) -> Vec<f32> {
        let x = features(text, &self.features);
        let d = self.features.dim;
        let z: Vec<f32> = (0..self.topics.len())
            .map(|c| {
                self.bias[c]
                    + x.iter()
                        .map(|&(j, v)| self.weight[c * d + j] * v)
                        .sum::<f32>()
            })
            .collect();
        crate::runtime::softmax(&z)
    }

    /// Route `text` under `policy` with `engine`'s experts.
    pub fn route(&self, engine: &Engine, text: &str, policy: &Policy) -> Result<Route> {
        let p = self.probabilities(text);
        let gates = policy.gates(&self.topics, &p, &engine.experts)?;
        let mut probabilities: Vec<(String, f32)> = self.topics.iter().cloned().zip(p).collect();
        probabilities.sort_by(|a, b| b.1.total_cmp(&a.1));
        let weights = engine
            .experts
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
    /// restarting its solver up to `restarts` times from the last parameters.
    pub fn train(
        examples: &[(String, String)],
        topics: &[&str],
        cfg: &FeatureConfig,
        alpha: f64,
        max_iter: u64,
        restarts: usize,
    ) -> Result<Gate> {
        let d = cfg.dim;
        let mut x = Array2::<f64>::zeros((examples.len(), d));
        let mut y = Array1::<usize>::zeros(examples.len());
        for (i, (text, topic)) in examples.iter().enumerate() {
            for (j, v) in features(text, cfg) {
                x[[i, j]] = v as f64;
            }
            y[i] = topics
                .iter()
                .position(|t| t == topic)
                .ok_or_else(|| Error::Invalid(format!("unknown topic '{topic}'")))?;
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
                .map_err(|e| Error::Invalid(format!("gate training failed: {e}")))?;
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
        let fit = fit.ok_or_else(|| Error::Invalid("gate training ran no round".into()))?;
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
            features: cfg.clone(),
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
        if f.weight.len() != f.topics.len() * f.features.dim
            || f.bias.len() != f.topics.len()
            || f.features.dim == 0
        {
            return Err(Error::data(
                &path,
                1,
                "weight",
                format!(
                    "expected {} x {} weights and {} biases",
                    f.topics.len(),
                    f.features.dim,
                    f.topics.len()
                ),
            ));
        }
        Ok(Gate {
            topics: f.topics,
            features: f.features,
            weight: f.weight,
            bias: f.bias,
            notes: f.notes,
            path,
        })
    }

    /// Save to `dir/gate.json` (atomically).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let f = GateFile {
            classifier: "multinomial logistic regression (linfa-logistic), hashed word 1-2-grams"
                .into(),
            features: self.features.clone(),
            topics: self.topics.clone(),
            weight: self
                .weight
                .iter()
                .map(|w| (w * 1e5).round() / 1e5)
                .collect(),
            bias: self.bias.clone(),
            notes: self.notes.clone(),
        };
        let json = serde_json::to_string(&f).map_err(|e| Error::Invalid(e.to_string()))?;
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
