//! Stance pairs (`adapters/data/stance/*.jsonl`): a prompt with a progressive and a
//! conservative answer (a counterfactual pair).

use std::path::Path;

use super::{read_jsonl, topics};
use crate::{Error, Result};

/// One counterfactual pair.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StancePair {
    pub id: String,
    pub topic: String,
    /// `economic` or `social`, matching the topic.
    pub axis: String,
    /// `opinion` or `proposition`.
    pub kind: String,
    pub prompt: String,
    pub progressive: String,
    pub conservative: String,
    /// The sub-issue within the topic (e.g. `estate-tax`), when the writer recorded one. All
    /// pairs of a sub-issue fall in the same train/dev split, so statements that differ only in
    /// direction ("raise" / "cut") never straddle it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subissue: Option<String>,
}

/// The explicit stance sentences a proposition answer must open with.
pub const STANCE_OPENINGS: [&str; 4] = [
    "I strongly agree.",
    "I agree.",
    "I disagree.",
    "I strongly disagree.",
];

/// Word count (whitespace-separated).
pub fn word_count(s: &str) -> usize {
    s.split_whitespace().count()
}

fn opening(answer: &str) -> Option<&'static str> {
    STANCE_OPENINGS
        .iter()
        .copied()
        .find(|o| answer.trim_start().starts_with(o))
}

impl StancePair {
    /// True when this pair belongs to the ~10% dev split: by its sub-issue (`topic/subissue`)
    /// where it has one, else by its id.
    pub fn is_dev(&self) -> bool {
        match &self.subissue {
            Some(sub) => super::is_dev(&format!("{}/{sub}", self.topic)),
            None => super::is_dev(&self.id),
        }
    }

    /// The answer of one side.
    pub fn answer(&self, stance: &str) -> Option<&str> {
        match stance {
            "progressive" => Some(&self.progressive),
            "conservative" => Some(&self.conservative),
            _ => None,
        }
    }

    /// Schema problems of this pair as `(field, problem)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        match topics::axis_of(&self.topic) {
            None => p.push(("topic", format!("unknown topic '{}'", self.topic))),
            Some(axis) if axis != self.axis => p.push((
                "axis",
                format!(
                    "topic '{}' is on the {axis} axis, not '{}'",
                    self.topic, self.axis
                ),
            )),
            _ => {}
        }
        if self.id.trim().is_empty() {
            p.push(("id", "empty".into()));
        }
        if self.prompt.trim().is_empty() {
            p.push(("prompt", "empty".into()));
        }
        let (wp, wc) = (
            word_count(&self.progressive),
            word_count(&self.conservative),
        );
        match self.kind.as_str() {
            "opinion" => {
                for (field, w) in [("progressive", wp), ("conservative", wc)] {
                    if !(30..=120).contains(&w) {
                        p.push((
                            field,
                            format!("opinion answers need 30-120 words, this has {w}"),
                        ));
                    }
                }
            }
            "proposition" => {
                let (op, oc) = (opening(&self.progressive), opening(&self.conservative));
                for (field, o) in [("progressive", op), ("conservative", oc)] {
                    if o.is_none() {
                        p.push((
                            field,
                            format!(
                                "a proposition answer must open with one of {STANCE_OPENINGS:?}"
                            ),
                        ));
                    }
                }
                if let (Some(a), Some(b)) = (op, oc) {
                    let agrees = |o: &str| !o.contains("disagree");
                    if agrees(a) == agrees(b) {
                        p.push((
                            "conservative",
                            "both sides take the same stance on the proposition".into(),
                        ));
                    }
                }
                for (field, w) in [("progressive", wp), ("conservative", wc)] {
                    if !(10..=130).contains(&w) {
                        p.push((
                            field,
                            format!("proposition answers need 10-130 words, this has {w}"),
                        ));
                    }
                }
            }
            k => p.push((
                "kind",
                format!("unknown kind '{k}' (expected opinion or proposition)"),
            )),
        }
        if wp.min(wc) > 0 && wp.max(wc) > 2 * wp.min(wc) {
            p.push((
                "conservative",
                format!("the two sides differ in length by more than 2x ({wp} vs {wc} words)"),
            ));
        }
        p
    }
}

/// Load a stance file; schema errors are reported by `data check`, JSON errors fail here.
pub fn load_stance_pairs(path: &Path) -> Result<Vec<(usize, StancePair)>> {
    read_jsonl(path)
}

/// Load every stance pair under `dir` (or one file), failing on the first schema problem.
pub fn load_stance_dir(dir: &Path) -> Result<Vec<StancePair>> {
    let files = if dir.is_dir() {
        crate::util::files_with_extension(dir, "jsonl")?
    } else {
        vec![dir.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files {
        for (line, pair) in load_stance_pairs(&f)? {
            if let Some((field, msg)) = pair.problems().into_iter().next() {
                return Err(Error::data(&f, line, field, msg));
            }
            out.push(pair);
        }
    }
    Ok(out)
}
