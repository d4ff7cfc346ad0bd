//! Policies: topic -> gate weights. `g = sum_t p(t) g_t`; `non_political` always maps to the base.
//!
//! A policy file (TOML) is either a toggle, one set of weights for every political topic:
//! ```toml
//! name = "toggle"
//! kind = "toggle"
//! weights = { progressive = 1.0 }
//! ```
//! or a by-topic table that lists all 21 topic ids (`non_political = {}` is the base):
//! ```toml
//! name = "libertarian"
//! kind = "by-topic"
//! [topics]
//! taxes = { conservative = 1.0 }
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::data::topics;
use crate::lora::ExpertSet;
use crate::{Error, Result};

/// A loaded policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    pub name: String,
    pub description: String,
    /// Topic id -> expert (name or stance) -> weight; every topic present.
    pub table: BTreeMap<String, BTreeMap<String, f32>>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    name: String,
    #[serde(default)]
    description: String,
    kind: String,
    #[serde(default)]
    weights: Option<BTreeMap<String, f32>>,
    #[serde(default)]
    topics: Option<BTreeMap<String, BTreeMap<String, f32>>>,
}

fn line_of(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| {
            let l = l.trim_start();
            l.starts_with(key) && l[key.len()..].trim_start().starts_with('=')
        })
        .map_or(1, |i| i + 1)
}

impl Policy {
    /// Parse a policy file's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Policy> {
        let f: PolicyFile = toml::from_str(text).map_err(|e| {
            // 1-based line of the span's start.
            let line = e.span().map_or(1, |s| {
                text[..s.start.min(text.len())].matches('\n').count() + 1
            });
            Error::data(path, line, "policy", e.message().to_string())
        })?;
        let mut table = BTreeMap::new();
        match f.kind.as_str() {
            "toggle" => {
                let w = f.weights.ok_or_else(|| {
                    Error::data(
                        path,
                        line_of(text, "kind"),
                        "weights",
                        "a toggle policy needs `weights = { expert = g, ... }`",
                    )
                })?;
                if let Some((e, _)) = w.iter().find(|(_, x)| !x.is_finite()) {
                    return Err(Error::data(
                        path,
                        line_of(text, "weights"),
                        format!("weights.{e}"),
                        "weight is not a finite number",
                    ));
                }
                for t in topics::all_topics() {
                    table.insert(
                        t.to_string(),
                        if t == topics::NON_POLITICAL {
                            BTreeMap::new()
                        } else {
                            w.clone()
                        },
                    );
                }
            }
            "by-topic" => {
                let given = f.topics.ok_or_else(|| {
                    Error::data(
                        path,
                        line_of(text, "kind"),
                        "topics",
                        "a by-topic policy needs a [topics] table",
                    )
                })?;
                let known = topics::all_topics();
                for (t, w) in &given {
                    if !known.contains(&t.as_str()) {
                        return Err(Error::data(
                            path,
                            line_of(text, t),
                            format!("topics.{t}"),
                            format!("unknown topic '{t}'"),
                        ));
                    }
                    if t == topics::NON_POLITICAL && w.values().any(|&x| x != 0.0) {
                        return Err(Error::data(
                            path,
                            line_of(text, t),
                            format!("topics.{t}"),
                            "non_political must map to the base (no expert weights)",
                        ));
                    }
                }
                for t in known {
                    let w = given.get(t).ok_or_else(|| {
                        Error::data(
                            path,
                            line_of(text, "[topics]"),
                            format!("topics.{t}"),
                            format!("topic '{t}' is missing from the policy"),
                        )
                    })?;
                    table.insert(t.to_string(), w.clone());
                }
            }
            k => {
                return Err(Error::data(
                    path,
                    line_of(text, "kind"),
                    "kind",
                    format!("unknown kind '{k}' (expected toggle or by-topic)"),
                ))
            }
        }
        for (t, w) in &table {
            for (e, x) in w {
                if !x.is_finite() {
                    return Err(Error::data(
                        path,
                        line_of(text, t),
                        format!("topics.{t}.{e}"),
                        "weight is not a finite number",
                    ));
                }
            }
        }
        Ok(Policy {
            name: f.name,
            description: f.description,
            table,
        })
    }

    /// Load one policy file.
    pub fn load(path: &Path) -> Result<Policy> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Policy::parse(&text, path)
    }

    /// Gate weights for topic probabilities `p` (one per `topics`), one weight per expert.
    /// A prompt whose most likely topic is `non_political` gets exactly the base (all zeros).
    pub fn gates(&self, topics_: &[String], p: &[f32], experts: &ExpertSet) -> Result<Vec<f32>> {
        let mut g = vec![0f32; experts.len()];
        let top = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(i, _)| i);
        if top.is_some_and(|i| topics_[i] == topics::NON_POLITICAL) {
            return Ok(g);
        }
        for (t, &pt) in topics_.iter().zip(p) {
            let Some(w) = self.table.get(t) else { continue };
            for (e, &x) in w {
                let i = experts
                    .index(e)
                    .or_else(|| experts.by_stance(e))
                    .ok_or_else(|| {
                        Error::mismatch(
                            format!("policy '{}'", self.name),
                            format!(
                                "it names expert '{e}', which is not loaded (loaded: {})",
                                experts.names().join(", ")
                            ),
                        )
                    })?;
                g[i] += pt * x;
            }
        }
        Ok(g)
    }
}

/// Load every `*.toml` in `dir`, sorted by name.
pub fn load_policies(dir: &Path) -> Result<Vec<Policy>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    crate::util::files_with_extension(dir, "toml")?
        .iter()
        .map(|p| Policy::load(p))
        .collect()
}
