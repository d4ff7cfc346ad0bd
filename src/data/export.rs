//! Training views of the stance pairs: SFT (chat-formatted prompt + own-side answer) and DPO
//! (prompt, chosen = own side, rejected = the other side).

use super::{is_dev, StancePair};
use crate::model::{chatml_prompt, Message};
use crate::{Error, Result};

/// Which view to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum View {
    Sft,
    Dpo,
}

/// Which split: train (about 90%), dev (about 10%), or all; by hashed id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    Train,
    Dev,
    All,
}

/// One training record (`rejected` only in the DPO view).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub id: String,
    /// ChatML text up to and including the assistant header.
    pub prompt: String,
    /// The adapter's own side, ending with `<|im_end|>`.
    pub chosen: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rejected: Option<String>,
}

/// The other stance.
pub fn other_stance(stance: &str) -> Result<&'static str> {
    match stance {
        "progressive" => Ok("conservative"),
        "conservative" => Ok("progressive"),
        s => Err(Error::Invalid(format!(
            "unknown stance '{s}' (expected progressive or conservative)"
        ))),
    }
}

/// Export `pairs` for `stance` in a view and split.
pub fn export(pairs: &[StancePair], view: View, stance: &str, split: Split) -> Result<Vec<Record>> {
    let other = other_stance(stance)?;
    Ok(pairs
        .iter()
        .filter(|p| match split {
            Split::All => true,
            Split::Dev => is_dev(&p.id),
            Split::Train => !is_dev(&p.id),
        })
        .map(|p| Record {
            id: p.id.clone(),
            prompt: chatml_prompt(&[Message {
                role: "user".into(),
                content: p.prompt.clone(),
            }]),
            chosen: format!("{}<|im_end|>", p.answer(stance).unwrap_or_default()),
            rejected: (view == View::Dpo)
                .then(|| format!("{}<|im_end|>", p.answer(other).unwrap_or_default())),
        })
        .collect())
}
