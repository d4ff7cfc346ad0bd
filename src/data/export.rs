//! Training views of the stance pairs: SFT (chat-formatted prompt + own-side answer) and DPO
//! (prompt, chosen = own side, rejected = the other side).

use super::StancePair;
use crate::model::chat::ChatTemplate;
use crate::{Error, Result};

/// Which view to export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum View {
    Sft,
    Dpo,
}

/// Which split: train (about 90%), dev (about 10%), or all; by hashed id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Split {
    Train,
    Dev,
    All,
}

/// One training record (`rejected` only in the DPO view).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub id: String,
    /// The user turn rendered by the model's chat template, up to and including the
    /// assistant header.
    pub prompt: String,
    /// The adapter's own side, framed as the template frames an answer
    /// ([`ChatTemplate::completion`]: `answer<|im_end|>` in ChatML).
    pub chosen: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub rejected: Option<String>,
}

/// The other stance.
pub fn other_stance(stance: &str) -> Result<&'static str> {
    match stance {
        "progressive" => Ok("conservative"),
        "conservative" => Ok("progressive"),
        s => Err(Error::unknown("stance", s, ["progressive", "conservative"])),
    }
}

/// Export `pairs` for `stance` in a view and split, prompts rendered by `chat` (the chat
/// template of the base to train).
pub fn export(
    pairs: &[StancePair],
    view: View,
    stance: &str,
    split: Split,
    chat: &ChatTemplate,
) -> Result<Vec<Record>> {
    let other = other_stance(stance)?;
    pairs
        .iter()
        .filter(|p| match split {
            Split::All => true,
            Split::Dev => p.is_dev(),
            Split::Train => !p.is_dev(),
        })
        .map(|p| {
            Ok(Record {
                id: p.id.clone(),
                prompt: chat.user_prompt(&p.prompt)?,
                chosen: chat.completion(p.answer(stance).unwrap_or_default()),
                rejected: (view == View::Dpo)
                    .then(|| chat.completion(p.answer(other).unwrap_or_default())),
            })
        })
        .collect()
}
