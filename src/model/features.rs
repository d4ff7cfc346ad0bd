//! Text features from the base model: the residual stream after a chosen block, mean-pooled over
//! the text's tokens. Used by classifiers (the gate, the open-ended stance judge) that need more
//! than word counts: the model's own reading of a prompt.

use candle_core::{Device, Tensor};

use super::{Logits, Model, NoHook, Pass};
use crate::{Error, Result};

/// Mean over positions of the residual stream after `layer` blocks (1-based) for `text`,
/// tokenized as is (apply any chat template first). Empty text is an error.
pub fn pooled_hidden(model: &Model, text: &str, layer: usize) -> Result<Vec<f32>> {
    let ids = model.tokenizer.encode(text)?;
    pooled_hidden_ids(model, &ids, layer)
}

/// [`pooled_hidden`] for already tokenized text; long inputs keep their last
/// `context_len` tokens.
pub fn pooled_hidden_ids(model: &Model, ids: &[u32], layer: usize) -> Result<Vec<f32>> {
    if ids.is_empty() {
        return Err(Error::Invalid("pooled_hidden: empty text".into()));
    }
    let ids = &ids[ids.len().saturating_sub(model.config.context_len)..];
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let h = model.forward(
        &x,
        None,
        &Pass {
            hook: &NoHook,
            logits: Logits::Layer(layer),
            differentiable: false,
        },
    )?; // (1, t, hidden)
    Ok(h.mean(1)?.squeeze(0)?.to_vec1()?)
}
