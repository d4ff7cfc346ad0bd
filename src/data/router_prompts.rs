//! Router prompts (`router-data/*.jsonl`): `{"id", "text", "topic"}`.

use std::path::Path;

use super::{read_jsonl, topics};
use crate::{Error, Result};

/// One labelled prompt for the gate.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterPrompt {
    pub id: String,
    pub text: String,
    pub topic: String,
}

/// Load and validate router prompts: unknown topics, empty text and duplicate ids are errors.
pub fn load_router_prompts(path: &Path) -> Result<Vec<RouterPrompt>> {
    let rows: Vec<(usize, RouterPrompt)> = read_jsonl(path)?;
    let known = topics::all_topics();
    let mut seen = std::collections::HashMap::new();
    let mut out = Vec::with_capacity(rows.len());
    for (line, p) in rows {
        if !known.contains(&p.topic.as_str()) {
            return Err(Error::data(
                path,
                line,
                "topic",
                format!("unknown topic '{}'", p.topic),
            ));
        }
        if p.text.trim().is_empty() {
            return Err(Error::data(path, line, "text", "empty"));
        }
        if let Some(first) = seen.insert(p.id.clone(), line) {
            return Err(Error::data(
                path,
                line,
                "id",
                format!("duplicate id '{}' (first on line {first})", p.id),
            ));
        }
        out.push(p);
    }
    Ok(out)
}

/// Deterministic split by hashed id: true for the ~10% dev share.
pub fn is_dev(id: &str) -> bool {
    crate::util::fnv1a(id.as_bytes()).is_multiple_of(10)
}
