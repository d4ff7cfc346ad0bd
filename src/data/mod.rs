//! Stance-pair and router-prompt schemas, validation, filters and chat formatting.

mod check;
pub mod export;
mod instrument;
mod router_prompts;
mod stance;
pub mod survey;
pub mod topics;

pub use check::{check, is_offensive, split_of, CheckReport, INSTRUMENT_JACCARD, NEAR_DUP_JACCARD};
pub use instrument::{Axis, Instrument, Item, Scale};
pub use router_prompts::{is_dev, load_router_prompts, RouterPrompt};
pub use stance::{load_stance_dir, load_stance_pairs, word_count, StancePair, STANCE_OPENINGS};

use std::path::Path;

use crate::{Error, Result};

/// Read a JSON Lines file into `(line number, record)` pairs; blank lines are skipped.
/// Errors name the file, the line and the field.
pub fn read_jsonl<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: T = serde_json::from_str(line)
            .map_err(|e| Error::data(path, i + 1, json_field(&e), e.to_string()))?;
        out.push((i + 1, rec));
    }
    Ok(out)
}

/// The field a serde_json error is about, when it says (`missing field `x``, `unknown field `x``).
fn json_field(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    for pat in ["missing field `", "unknown field `", "duplicate field `"] {
        if let Some(rest) = msg.split(pat).nth(1) {
            if let Some(f) = rest.split('`').next() {
                return f.to_string();
            }
        }
    }
    if e.is_syntax() || e.is_eof() {
        "json".into()
    } else {
        "record".into()
    }
}
