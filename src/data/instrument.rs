//! Instruments (`adapters/instruments/*.json`): propositions with per-answer effects on axes.
//!
//! An axis score is `sum_items effects[answer] / divisor + offset` (`affine`) or the sum mapped
//! linearly from its attainable `[min, max]` onto `[lo, hi]` (`range`).

use std::collections::BTreeMap;
use std::path::Path;

use crate::{Error, Result};

/// How an axis sum becomes a score.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Scale {
    /// `[divisor, offset]`.
    Affine([f64; 2]),
    /// `[lo, hi]`.
    Range([f64; 2]),
}

/// One axis of an instrument.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Axis {
    pub scale: Scale,
}

/// One proposition.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Item {
    pub id: String,
    pub text: String,
    /// Axis -> one number per answer.
    pub effects: BTreeMap<String, Vec<f64>>,
}

/// A political-orientation instrument.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Instrument {
    pub name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub sign: String,
    pub answers: Vec<String>,
    pub axes: BTreeMap<String, Axis>,
    pub items: Vec<Item>,
}

impl Instrument {
    /// Load and validate; errors read `file: item: field: problem`.
    pub fn load(path: &Path) -> Result<Instrument> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let ins: Instrument = serde_json::from_str(&text)
            .map_err(|e| Error::data(path, e.line(), "json", e.to_string()))?;
        ins.validate(path)?;
        Ok(ins)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        // `file: item: field: problem` (no item for the instrument's own fields).
        let bad = |item: &str, field: &str, msg: String| {
            let field = match item {
                "-" => field.to_string(),
                _ => format!("{item}: {field}"),
            };
            Error::data(path, 0, field, msg)
        };
        if self.answers.len() < 2 {
            return Err(bad("-", "answers", "need at least two answers".into()));
        }
        if self.axes.is_empty() {
            return Err(bad("-", "axes", "no axes".into()));
        }
        for (name, axis) in &self.axes {
            if let Scale::Affine([d, _]) = axis.scale {
                if d == 0.0 {
                    return Err(bad(
                        "-",
                        &format!("axes.{name}.scale"),
                        "affine divisor is 0".into(),
                    ));
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for it in &self.items {
            if !seen.insert(&it.id) {
                return Err(bad(&it.id, "id", "duplicate id".into()));
            }
            if it.text.trim().is_empty() {
                return Err(bad(&it.id, "text", "empty".into()));
            }
            if it.effects.is_empty() {
                return Err(bad(&it.id, "effects", "no effects".into()));
            }
            for (axis, e) in &it.effects {
                if !self.axes.contains_key(axis) {
                    return Err(bad(
                        &it.id,
                        &format!("effects.{axis}"),
                        format!("unknown axis '{axis}'"),
                    ));
                }
                if e.len() != self.answers.len() {
                    return Err(bad(
                        &it.id,
                        &format!("effects.{axis}"),
                        format!("{} numbers for {} answers", e.len(), self.answers.len()),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Score an answer sheet: for each item, a probability (or one-hot) vector over answers.
    /// Returns the score per axis (expected effects).
    pub fn score(&self, sheet: &[Vec<f64>]) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for (name, axis) in &self.axes {
            let (mut sum, mut lo, mut hi) = (0.0, 0.0, 0.0);
            for (it, probs) in self.items.iter().zip(sheet) {
                if let Some(e) = it.effects.get(name) {
                    sum += e.iter().zip(probs).map(|(a, b)| a * b).sum::<f64>();
                    lo += e.iter().cloned().fold(f64::INFINITY, f64::min);
                    hi += e.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                }
            }
            let score = match axis.scale {
                Scale::Affine([d, o]) => sum / d + o,
                Scale::Range([a, b]) => {
                    if hi > lo {
                        a + (sum - lo) / (hi - lo) * (b - a)
                    } else {
                        (a + b) / 2.0
                    }
                }
            };
            out.insert(name.clone(), score);
        }
        out
    }
}
