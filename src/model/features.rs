//! Text features from the base model: the residual stream after a chosen block, per position or
//! mean-pooled over the text's tokens. The gate reads them (the model's own reading of a prompt,
//! more than word counts can give).

use candle_core::{Device, Tensor};

use super::{LinearHook, Logits, Model, NoHook, Pass};
use crate::{Error, Result};

/// Mean over positions of the residual stream after `layer` blocks (1-based) for `ids`
/// (see [`layer_states`]).
pub fn pooled_hidden_ids(model: &Model, ids: &[u32], layer: usize) -> Result<Vec<f32>> {
    Ok(layer_states(model, ids, layer)?.mean(0)?.to_vec1()?)
}

/// The residual stream after `layer` blocks (1-based) at every position, `(t, hidden)`, for
/// `ids` (empty is an error; long inputs keep their last `context_len` tokens).
pub fn layer_states(model: &Model, ids: &[u32], layer: usize) -> Result<Tensor> {
    layer_states_with(model, ids, layer, &NoHook)
}

/// [`layer_states`] with `hook` attached to the blocks (e.g. a fine-tuned gate's adapter).
pub fn layer_states_with(
    model: &Model,
    ids: &[u32],
    layer: usize,
    hook: &dyn LinearHook,
) -> Result<Tensor> {
    if ids.is_empty() {
        return Err(Error::no_data("layer states", "the text is empty"));
    }
    let ids = &ids[ids.len().saturating_sub(model.config.context_len)..];
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let h = model.forward(
        &x,
        None,
        &Pass {
            hook,
            logits: Logits::Layer(layer),
            differentiable: false,
        },
    )?; // (1, t, hidden)
    Ok(h.squeeze(0)?)
}
