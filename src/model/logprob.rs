//! `log softmax(z)[target]` per row as one op with its own backward, and the same from hidden
//! states through an int8 output head.
//!
//! Composed from candle ops (`log_softmax`, then `gather`), every step makes a new
//! `(answer tokens, vocab)` tensor (49,152 columns for the default base) forward and again
//! backward, and `gather`'s backward starts from a zeroed one: a dozen passes over tens of
//! megabytes per micro-batch, most on one thread. This op reads the logits once forward
//! (keeping each row's log-sum-exp) and writes the gradient once backward:
//! `d z[v] = g * (1[v = target] - exp(z[v] - lse))`.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

use super::gemm8::{FrozenInt8, SendPtr};

/// `(n,)` log-probabilities of `targets[i]` under `softmax(logits[i])`, `logits` `(n, vocab)`.
pub fn target_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(TargetLogp {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    })
}

/// [`target_logprobs`] of `head(x)` for `x` `(n, hidden)` and an int8 head, as one op: the
/// `(n, vocab)` logits live inside it (kept from forward to backward), not in the autograd
/// graph, which would otherwise zero and add a gradient of that size.
pub fn head_target_logprobs(x: &Tensor, head: &Arc<FrozenInt8>, targets: &[u32]) -> Result<Tensor> {
    x.apply_op1(HeadLogp {
        head: head.clone(),
        targets: targets.to_vec(),
        saved: Mutex::new(None),
    })
}

/// Run `f(row)` for rows `0..n` on candle's thread pool.
fn each_row(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

/// Check `targets` against `(n, vocab)` logits.
fn check(targets: &[u32], n: usize, vocab: usize) -> Result<()> {
    if n != targets.len() {
        candle_core::bail!("target-logprobs: {n} rows, {} targets", targets.len());
    }
    if let Some(t) = targets.iter().find(|&&t| t as usize >= vocab) {
        candle_core::bail!("target-logprobs: target {t} outside the vocabulary of {vocab}");
    }
    Ok(())
}

/// Each row's log-sum-exp and the targets' log-probabilities.
fn forward_rows(z: &[f32], vocab: usize, targets: &[u32]) -> (Vec<f32>, Vec<f32>) {
    let n = targets.len();
    let mut lse = vec![0f32; n];
    let out = SendPtr(lse.as_mut_ptr());
    each_row(n, |i| {
        let row = crate::util::log_sum_exp(&z[i * vocab..(i + 1) * vocab]);
        // SAFETY: slot i is written by this call only; `lse` outlives the pool call.
        unsafe { *out.get().add(i) = row };
    });
    let logp = (0..n)
        .map(|i| z[i * vocab + targets[i] as usize] - lse[i])
        .collect();
    (lse, logp)
}

/// Turn logits `z` into their gradient in place: `g * (1[v = target] - exp(z[v] - lse))`.
fn grad_in_place(z: &mut [f32], vocab: usize, targets: &[u32], lse: &[f32], g: &[f32]) {
    let rows = SendPtr(z.as_mut_ptr());
    each_row(targets.len(), |i| {
        // SAFETY: row i is touched by this call only; `z` outlives the pool call.
        let row = unsafe { std::slice::from_raw_parts_mut(rows.get().add(i * vocab), vocab) };
        for v in row.iter_mut() {
            *v = -g[i] * (*v - lse[i]).exp();
        }
        row[targets[i] as usize] += g[i];
    });
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>> {
    m.lock()
        .map_err(|_| candle_core::Error::Msg("target-logprobs: poisoned lock".into()))
}

/// The contiguous f32 values of a CPU tensor's storage.
fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("target-logprobs: {what} must be f32");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("target-logprobs: {what} must be contiguous");
    };
    Ok(&v[start..end])
}

struct TargetLogp {
    targets: Vec<u32>,
    /// Each row's log-sum-exp, from the forward pass.
    lse: Mutex<Vec<f32>>,
}

impl CustomOp1 for TargetLogp {
    fn name(&self) -> &'static str {
        "target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, vocab) = l.shape().dims2()?;
        check(&self.targets, n, vocab)?;
        let (lse, logp) = forward_rows(f32_slice(s, l, "logits")?, vocab, &self.targets);
        *lock(&self.lse)? = lse;
        Ok((CpuStorage::F32(logp), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        let (n, vocab) = arg.dims2()?;
        let lse = lock(&self.lse)?.clone();
        if lse.len() != n || g.len() != n {
            candle_core::bail!("target-logprobs: backward before forward");
        }
        let mut dz = arg.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        grad_in_place(&mut dz, vocab, &self.targets, &lse, &g);
        Ok(Some(Tensor::from_vec(dz, (n, vocab), arg.device())?))
    }
}

struct HeadLogp {
    head: Arc<FrozenInt8>,
    targets: Vec<u32>,
    /// The logits and each row's log-sum-exp, from the forward pass to the backward.
    saved: Mutex<Option<(Vec<f32>, Vec<f32>)>>,
}

impl CustomOp1 for HeadLogp {
    fn name(&self) -> &'static str {
        "head-target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, hidden) = l.shape().dims2()?;
        let (vocab, k) = self.head.dims();
        if hidden != k {
            candle_core::bail!(
                "head-target-logprobs: hidden states ({n}, {hidden}), head ({vocab}, {k})"
            );
        }
        check(&self.targets, n, vocab)?;
        let z = self.head.forward(f32_slice(s, l, "hidden states")?, n);
        let (lse, logp) = forward_rows(&z, vocab, &self.targets);
        *lock(&self.saved)? = Some((z, lse));
        Ok((CpuStorage::F32(logp), Shape::from(n)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        // The backward runs once per forward; the logits are handed over, not copied.
        let Some((mut z, lse)) = lock(&self.saved)?.take() else {
            candle_core::bail!("head-target-logprobs: backward without (or after) its forward");
        };
        let vocab = self.head.dims().0;
        grad_in_place(&mut z, vocab, &self.targets, &lse, &g);
        let dx = self.head.backward(&z, self.targets.len()).ok_or_else(|| {
            candle_core::Error::Msg(
                "head_target_logprobs: the head was made for inference only".into(),
            )
        })?;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    /// `ours` and `theirs` agree in value (within `tol`) and in the gradient of
    /// `sum(weights * .)` with respect to `var` (within `grad_tol`).
    fn assert_same(
        ours: Tensor,
        theirs: Tensor,
        var: &Var,
        weights: &Tensor,
        tol: f32,
        grad_tol: f32,
    ) {
        let values = |t: &Tensor| t.to_vec1::<f32>().unwrap();
        for (p, q) in values(&ours).iter().zip(&values(&theirs)) {
            assert!((p - q).abs() < tol, "{p} vs {q}");
        }
        let grad = |t: Tensor| {
            let g = (t * weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            g.get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        let (ga, gb) = (grad(ours), grad(theirs));
        for (p, q) in ga.iter().zip(&gb) {
            assert!((p - q).abs() < grad_tol, "{p} vs {q}");
        }
    }

    #[test]
    fn equals_log_softmax_and_gather_forward_and_backward() {
        let z = crate::model::tiny::seeded_randn(1, 3.0, &[5, 37]).unwrap();
        let targets = [0u32, 36, 5, 5, 17];
        let weights = Tensor::new(&[1.0f32, -2.0, 0.5, 3.0, 1.5], &Device::Cpu).unwrap();
        let var = Var::from_tensor(&z).unwrap();
        let ours = target_logprobs(var.as_tensor(), &targets).unwrap();
        let idx = Tensor::new(&targets, &Device::Cpu)
            .unwrap()
            .unsqueeze(1)
            .unwrap();
        let theirs = candle_nn::ops::log_softmax(var.as_tensor(), D::Minus1)
            .unwrap()
            .gather(&idx, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_same(ours, theirs, &var, &weights, 1e-5, 1e-5);
    }

    #[test]
    fn the_int8_head_op_equals_its_parts() {
        let (n, hidden, vocab) = (3, 64, 50);
        let w = crate::model::tiny::seeded_randn(2, 0.3, &[vocab, hidden]).unwrap();
        let head = Arc::new(FrozenInt8::from_tensor(&w).unwrap());
        let x = Var::from_tensor(&crate::model::tiny::seeded_randn(3, 1.0, &[n, hidden]).unwrap())
            .unwrap();
        let targets = [3u32, 49, 0];
        let weights = Tensor::new(&[1.0f32, -0.5, 2.0], &Device::Cpu).unwrap();
        let ours = head_target_logprobs(x.as_tensor(), &head, &targets).unwrap();
        let logits = crate::model::gemm8::frozen_linear_int8(x.as_tensor(), &head).unwrap();
        let theirs = target_logprobs(&logits, &targets).unwrap();
        assert_same(ours, theirs, &x, &weights, 1e-5, 1e-4);
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let z = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(target_logprobs(&z, &[4]).is_err());
        assert!(target_logprobs(&z, &[1, 2]).is_err());
    }
}
