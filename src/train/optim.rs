//! AdamW with decoupled weight decay, and the learning-rate schedule (linear warm-up, cosine
//! decay).
//!
//! The update is candle-nn's `AdamW`; it is restated here because resuming from a checkpoint
//! needs the moment estimates, which candle-nn keeps private.

use candle_core::{Tensor, Var};

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl AdamParams {
    /// The usual moments (beta1 0.9, beta2 0.999, eps 1e-8) with `weight_decay`.
    pub fn with_weight_decay(weight_decay: f64) -> Self {
        AdamParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }
}

/// AdamW state for a list of parameters.
pub struct AdamW {
    pub params: AdamParams,
    /// Optimizer steps taken (the bias correction uses it).
    pub t: usize,
    /// First and second moment per parameter, in the order of the parameter list.
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
}

impl AdamW {
    /// Fresh state (zero moments) for `vars`.
    pub fn new(vars: &[&Var], params: AdamParams) -> candle_core::Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            params,
            t: 0,
            v: m.clone(),
            m,
        })
    }

    /// One update of `vars` with gradients `grads` (same order) at learning rate `lr`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> candle_core::Result<()> {
        self.t += 1;
        let p = self.params;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(self.t as i32));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(self.t as i32));
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + p.eps)?)?;
            let theta = ((var.as_tensor() * (1.0 - lr * p.weight_decay))? - (update * lr)?)?;
            var.set(&theta)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warm-up over `warmup`
/// steps to `peak`, then cosine decay to `peak * min_ratio` at the last step.
pub fn learning_rate(step: usize, total: usize, warmup: usize, peak: f64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(s, 100, 10, 1e-3, 0.1);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!(lr(50) < lr(20) && lr(80) < lr(50));
        assert!((lr(100) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn adamw_matches_hand_computation() -> candle_core::Result<()> {
        let dev = candle_core::Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev)?)?;
        let params = AdamParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut opt = AdamW::new(&[&var], params)?;
        let g = Tensor::new(&[0.5f32, -0.25], &dev)?;
        opt.step(&[&var], &[g], 0.01)?;
        // First step: m_hat = g, v_hat = g^2, so the update is sign(g) (up to eps).
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = [1.0 * (1.0 - 0.001) - 0.01, -2.0 * (1.0 - 0.001) + 0.01];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        Ok(())
    }
}
