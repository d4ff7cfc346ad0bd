//! A linear layer over a frozen dense weight that carries gradients to its input only.
//!
//! `x.matmul(&w.t())` would also compute `x^T @ grad` for the weight on every backward pass,
//! although the base weights never train. This op returns only `grad @ W`: LoRA training
//! gets faster and needs about half the memory.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// `y = x @ W^T` for `x` `(.., in)` and `W` `(out, in)`; gradients flow to `x` only.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let x2 = x.detach().flatten_to(x.rank().saturating_sub(2))?; // (rows, in)
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = w.dim(0)?;
    }
    let y = x2.matmul(&w.t()?)?.reshape(dims)?;
    x.apply_op1(Frozen {
        w: w.clone(),
        y: std::sync::Mutex::new(Some(y)),
    })
}

/// Carries the forward result computed outside the graph (handed over, not kept: the graph
/// holds this op until backward), and the weight for the backward.
struct Frozen {
    w: Tensor,
    y: std::sync::Mutex<Option<Tensor>>,
}

impl CustomOp1 for Frozen {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, _x: &CpuStorage, _layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::Msg("frozen-linear: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("frozen-linear: forward ran twice".into()))?;
        let data = y.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(data), y.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g2 = grad.flatten_to(grad.rank().saturating_sub(2))?; // (rows, out)
        let mut dims = grad.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.w.dim(1)?;
        }
        Ok(Some(g2.matmul(&self.w)?.reshape(dims)?))
    }
}
