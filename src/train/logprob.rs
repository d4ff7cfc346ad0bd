//! `log softmax(z)[target]` per row as one op with its own backward.
//!
//! Composed from candle ops (`log_softmax`, then `gather`), every step makes a new
//! `(answer tokens, vocab)` tensor (49,152 columns for the default base) forward and again
//! backward, and `gather`'s backward starts from a zeroed one: a dozen passes over tens of
//! megabytes per micro-batch, most on one thread. This op reads the logits once forward
//! (keeping each row's log-sum-exp) and writes the gradient once backward:
//! `d z[v] = g * (1[v = target] - exp(z[v] - lse))`.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use std::sync::Mutex;

/// `(n,)` log-probabilities of `targets[i]` under `softmax(logits[i])`, `logits` `(n, vocab)`.
pub fn target_logprobs(logits: &Tensor, targets: &[u32]) -> candle_core::Result<Tensor> {
    logits.apply_op1(TargetLogp {
        targets: targets.to_vec(),
        lse: Mutex::new(Vec::new()),
    })
}

struct TargetLogp {
    targets: Vec<u32>,
    /// Each row's log-sum-exp, from the forward pass.
    lse: Mutex<Vec<f32>>,
}

/// The pointer workers write disjoint rows through.
#[derive(Clone, Copy)]
struct Rows(*mut f32);
// SAFETY: each row is written by one worker only (see the uses).
unsafe impl Send for Rows {}
unsafe impl Sync for Rows {}
impl Rows {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Run `f(row)` for rows `0..n` on candle's thread pool.
fn each_row(n: usize, f: impl Fn(usize) + Sync) {
    candle_core::utils::barrier_pool().execute_chunked(n, |range| range.for_each(&f));
}

fn row_lse(z: &[f32]) -> f32 {
    let max = z.iter().fold(f32::NEG_INFINITY, |a, &v| a.max(v));
    let sum: f32 = z.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

impl TargetLogp {
    fn logits<'a>(&self, s: &'a CpuStorage, l: &Layout) -> candle_core::Result<(&'a [f32], usize)> {
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("target-logprobs: logits must be f32");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("target-logprobs: logits must be contiguous");
        };
        let (n, vocab) = l.shape().dims2()?;
        if n != self.targets.len() {
            candle_core::bail!("target-logprobs: {n} rows, {} targets", self.targets.len());
        }
        if let Some(t) = self.targets.iter().find(|&&t| t as usize >= vocab) {
            candle_core::bail!("target-logprobs: target {t} outside the vocabulary of {vocab}");
        }
        Ok((&v[start..end], vocab))
    }
}

impl CustomOp1 for TargetLogp {
    fn name(&self) -> &'static str {
        "target-logprobs"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (z, vocab) = self.logits(s, l)?;
        let n = self.targets.len();
        let mut lse = vec![0f32; n];
        let out = Rows(lse.as_mut_ptr());
        each_row(n, |i| {
            let v = row_lse(&z[i * vocab..(i + 1) * vocab]);
            // SAFETY: slot i is written by this call only; `lse` outlives the pool call.
            unsafe { *out.get().add(i) = v };
        });
        let logp = (0..n)
            .map(|i| z[i * vocab + self.targets[i] as usize] - lse[i])
            .collect();
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("target-logprobs: poisoned lock".into()))? = lse;
        Ok((CpuStorage::F32(logp), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.to_vec1::<f32>()?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("target-logprobs: poisoned lock".into()))?
            .clone();
        let (storage, layout) = arg.storage_and_layout();
        let candle_core::Storage::Cpu(s) = &*storage else {
            candle_core::bail!("target-logprobs: CPU tensors only");
        };
        let (z, vocab) = self.logits(s, layout)?;
        let n = self.targets.len();
        if lse.len() != n || g.len() != n {
            candle_core::bail!("target-logprobs: backward before forward");
        }
        let mut dz = Vec::<f32>::with_capacity(n * vocab);
        let out = Rows(dz.as_mut_ptr());
        each_row(n, |i| {
            // SAFETY: row i of `dz` is written by this call only, every element of it.
            let row = unsafe { std::slice::from_raw_parts_mut(out.get().add(i * vocab), vocab) };
            for (d, &v) in row.iter_mut().zip(&z[i * vocab..(i + 1) * vocab]) {
                *d = -g[i] * (v - lse[i]).exp();
            }
            row[self.targets[i] as usize] += g[i];
        });
        // SAFETY: every row was written above.
        unsafe { dz.set_len(n * vocab) };
        Ok(Some(Tensor::from_vec(dz, (n, vocab), arg.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    #[test]
    fn equals_log_softmax_and_gather_forward_and_backward() {
        let z = Tensor::randn(0f32, 3.0, (5, 37), &Device::Cpu).unwrap();
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
        let (a, b) = (
            ours.to_vec1::<f32>().unwrap(),
            theirs.to_vec1::<f32>().unwrap(),
        );
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
        let ga = (ours * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (theirs * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ga = ga
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let gb = gb
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in ga.iter().zip(&gb) {
            assert!((x - y).abs() < 1e-5, "{x} vs {y}");
        }
    }

    #[test]
    fn a_target_outside_the_vocabulary_is_an_error() {
        let z = Tensor::zeros((1, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(target_logprobs(&z, &[4]).is_err());
        assert!(target_logprobs(&z, &[1, 2]).is_err());
    }
}
