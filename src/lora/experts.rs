//! Experts: adapters stacked per linear so all of them cost one pair of small matmuls,
//! and the hook that adds `sum_i g_i * s_i * B_i (A_i x)` with gate weights per batch row.

use candle_core::{Device, Tensor};
use std::collections::HashMap;

use super::Adapter;
use crate::model::{LinearHook, Target};
use crate::{Error, Result};

/// The experts of every adaptable linear, stacked: `A_cat^T` `(in, R)` and `B_cat^T` `(R, out)`,
/// rounded to 8 bits ([`Q8Rows`]): as 8-bit rows for the decode fast path and as f32 tensors of
/// the same rounded values for prompts.
#[derive(Debug)]
struct Stack {
    a_t: Tensor,
    b_t: Tensor,
    /// `A_cat` `(R, in)`, 8-bit.
    a: Q8Rows,
    /// `B_cat^T` `(R, out)`, 8-bit.
    b: Q8Rows,
    n_in: usize,
    n_out: usize,
    /// `(expert index, column offset, rank)` for each expert in the stack.
    spans: Vec<(usize, usize, usize)>,
    width: usize,
}

/// The named experts an engine holds. Immutable once built; shared by all sessions.
#[derive(Debug)]
pub struct ExpertSet {
    adapters: Vec<Adapter>,
    names: Vec<String>,
    stacks: HashMap<(usize, Target), Stack>,
}

impl ExpertSet {
    /// No experts: only the base model.
    pub fn empty() -> Self {
        ExpertSet {
            adapters: Vec::new(),
            names: Vec::new(),
            stacks: HashMap::new(),
        }
    }

    /// Stack `adapters` as experts; names (stance or directory) must be unique.
    pub fn new(adapters: Vec<Adapter>) -> Result<Self> {
        let names: Vec<String> = adapters.iter().map(Adapter::name).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::Invalid(format!("two experts are named '{n}': give each adapter a distinct stance or directory name")));
            }
        }
        let mut keys: Vec<(usize, Target)> = adapters
            .iter()
            .flat_map(|a| a.pairs.keys().copied())
            .collect();
        keys.sort();
        keys.dedup();
        let mut stacks = HashMap::new();
        for key in keys {
            let mut a_parts = Vec::new();
            let mut b_parts = Vec::new();
            let mut spans = Vec::new();
            let mut off = 0;
            for (i, ad) in adapters.iter().enumerate() {
                if let Some(p) = ad.pairs.get(&key) {
                    let r = p.a.dim(0)?;
                    a_parts.push(p.a.clone());
                    b_parts.push(p.b.clone());
                    spans.push((i, off, r));
                    off += r;
                }
            }
            let a_cat = Tensor::cat(&a_parts, 0)?; // (R, in)
            let b_t = Tensor::cat(&b_parts, 1)?.t()?.contiguous()?; // (R, out)
            let (n_out, n_in, width) = (b_t.dim(1)?, a_cat.dim(1)?, off);
            // Both paths use the same 8-bit weights: prompts (candle matmuls on their f32
            // values) and decode (plain loops on the 8-bit rows) then agree to rounding, and a
            // conversation fed again as a prompt continues as it did when it was decoded.
            let a = Q8Rows::new(&a_cat.flatten_all()?.to_vec1()?, n_in);
            let b = Q8Rows::new(&b_t.flatten_all()?.to_vec1()?, n_out);
            let a_t = Tensor::from_vec(a.to_f32(), (width, n_in), &Device::Cpu)?
                .t()?
                .contiguous()?;
            let b_t = Tensor::from_vec(b.to_f32(), (width, n_out), &Device::Cpu)?;
            stacks.insert(
                key,
                Stack {
                    a,
                    b,
                    a_t,
                    b_t,
                    n_in,
                    n_out,
                    spans,
                    width,
                },
            );
        }
        Ok(ExpertSet {
            adapters,
            names,
            stacks,
        })
    }

    /// Number of experts.
    pub fn len(&self) -> usize {
        self.adapters.len()
    }

    /// True when there are no experts.
    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// Expert names, in gate order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The adapters, in gate order.
    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    /// Index of the expert named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// Index of the expert whose config says `stance: <stance>`.
    pub fn by_stance(&self, stance: &str) -> Option<usize> {
        self.adapters
            .iter()
            .position(|a| a.stance() == Some(stance))
    }

    /// A hook for a batch whose row `r` uses gate weights `rows[r]` (one per expert).
    pub fn hook<'a>(&'a self, rows: &'a [Vec<f32>]) -> Result<ExpertHook<'a>> {
        for (i, g) in rows.iter().enumerate() {
            if g.len() != self.len() {
                return Err(Error::Invalid(format!(
                    "gate row {i} has {} weights for {} experts",
                    g.len(),
                    self.len()
                )));
            }
        }
        Ok(ExpertHook { set: self, rows })
    }
}

/// Adds each row's blended expert deltas to a linear's output. Rows whose gate weights are all
/// zero get exactly the base output.
pub struct ExpertHook<'a> {
    set: &'a ExpertSet,
    rows: &'a [Vec<f32>],
}

impl LinearHook for ExpertHook<'_> {
    fn after_linear(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
        y: Tensor,
    ) -> candle_core::Result<Tensor> {
        let Some(stack) = self.set.stacks.get(&(layer, target)) else {
            return Ok(y);
        };
        // Per-row column scales g_i * s_i over the stacked rank dimension.
        let b = self.rows.len();
        let mut scale = vec![0f32; b * stack.width];
        let mut any = false;
        for (r, g) in self.rows.iter().enumerate() {
            for &(e, off, rank) in &stack.spans {
                let s = g[e] * self.set.adapters[e].scale() as f32;
                if s != 0.0 {
                    any = true;
                    scale[r * stack.width + off..r * stack.width + off + rank].fill(s);
                }
            }
        }
        if !any {
            return Ok(y);
        }
        let (xb, t, d_in) = x.dims3()?;
        if xb != b {
            candle_core::bail!("batch has {xb} rows but {b} gate rows were given");
        }
        if b * t <= FAST_ROWS {
            return fast_delta(stack, &scale, x, y);
        }
        let h = x.reshape((b * t, d_in))?.matmul(&stack.a_t)?; // (b*t, R)
        let scale = Tensor::from_vec(scale, (b, 1, stack.width), &Device::Cpu)?;
        let h = h.reshape((b, t, stack.width))?.broadcast_mul(&scale)?; // (b, t, R)
        let delta = h.reshape((b * t, stack.width))?.matmul(&stack.b_t)?; // (b*t, out)
        let shape = y.shape().clone();
        y + delta.reshape(shape)?
    }
}

/// Up to this many token rows (decode), the delta is computed in plain loops over 8-bit copies
/// of the stacked arrays: for one token the candle path's six small ops per linear cost more than
/// the math, and decoding is bound by memory traffic, so each expert weight read per token should
/// be as small as it can be while staying accurate (see [`Q8Rows`]).
const FAST_ROWS: usize = 4;

/// `y + (scale * (x A_cat^T)) B_cat^T` for a few rows, skipping experts whose scale is zero.
fn fast_delta(stack: &Stack, scale: &[f32], x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
    let (b, t, n_in) = x.dims3()?;
    let (r_all, n_out) = (stack.width, stack.n_out);
    debug_assert_eq!(n_in, stack.n_in);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let shape = y.shape().clone();
    let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
    for row in 0..b * t {
        let s = &scale[(row / t) * r_all..(row / t + 1) * r_all];
        let xr = &xs[row * n_in..(row + 1) * n_in];
        let yr = &mut ys[row * n_out..(row + 1) * n_out];
        for j in (0..r_all).filter(|&j| s[j] != 0.0) {
            let h = stack.a.dot(j, xr) * s[j];
            stack.b.axpy(j, h, yr);
        }
    }
    Tensor::from_vec(ys, shape, x.device())
}

/// Values per scale in [`Q8Rows`].
const Q8_BLOCK: usize = 32;

/// A row-major matrix stored like GGUF's Q8_0: blocks of 32 values as `i8` with one f32 scale
/// (block absmax / 127). A quarter of f32's bytes; each value is within half a step (absmax/254
/// of its block) of the original, and errors of independent values average out in a dot product.
#[derive(Debug)]
pub struct Q8Rows {
    q: Vec<i8>,
    d: Vec<f32>,
    cols: usize,
}

impl Q8Rows {
    /// Quantize `values` (rows of `cols` values).
    pub fn new(values: &[f32], cols: usize) -> Self {
        let blocks = cols.div_ceil(Q8_BLOCK);
        let rows = values.len() / cols.max(1);
        let mut q = Vec::with_capacity(values.len());
        let mut d = Vec::with_capacity(rows * blocks);
        for row in values.chunks(cols.max(1)) {
            for block in row.chunks(Q8_BLOCK) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = amax / 127.0;
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                q.extend(block.iter().map(|v| (v * inv).round() as i8));
                d.push(scale);
            }
        }
        Q8Rows { q, d, cols }
    }

    /// Every value, dequantized, row-major.
    pub fn to_f32(&self) -> Vec<f32> {
        let blocks = self.cols.div_ceil(Q8_BLOCK);
        let mut out = Vec::with_capacity(self.q.len());
        for (r, row) in self.q.chunks(self.cols.max(1)).enumerate() {
            for (qb, &s) in row
                .chunks(Q8_BLOCK)
                .zip(&self.d[r * blocks..(r + 1) * blocks])
            {
                out.extend(qb.iter().map(|&v| v as f32 * s));
            }
        }
        out
    }

    /// The stored value at `(row, col)`, dequantized.
    #[cfg(test)]
    pub fn get(&self, row: usize, col: usize) -> f32 {
        let blocks = self.cols.div_ceil(Q8_BLOCK);
        self.q[row * self.cols + col] as f32 * self.d[row * blocks + col / Q8_BLOCK]
    }

    /// `row . x`.
    pub fn dot(&self, row: usize, x: &[f32]) -> f32 {
        let blocks = self.cols.div_ceil(Q8_BLOCK);
        let q = &self.q[row * self.cols..(row + 1) * self.cols];
        let d = &self.d[row * blocks..(row + 1) * blocks];
        q.chunks(Q8_BLOCK)
            .zip(x.chunks(Q8_BLOCK))
            .zip(d)
            .map(|((qb, xb), &s)| s * dot_i8(qb, xb))
            .sum()
    }

    /// `y += h * row`.
    pub fn axpy(&self, row: usize, h: f32, y: &mut [f32]) {
        let blocks = self.cols.div_ceil(Q8_BLOCK);
        let q = &self.q[row * self.cols..(row + 1) * self.cols];
        let d = &self.d[row * blocks..(row + 1) * blocks];
        for ((qb, yb), &s) in q.chunks(Q8_BLOCK).zip(y.chunks_mut(Q8_BLOCK)).zip(d) {
            let hs = h * s;
            for (yo, &qv) in yb.iter_mut().zip(qb) {
                *yo += hs * qv as f32;
            }
        }
    }
}

/// Dot product of 8-bit values with f32 in eight lanes (vectorizes under AVX2).
fn dot_i8(a: &[i8], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(&x, y)| x as f32 * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k] as f32 * xb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_rows_match_the_f32_products_within_their_step() {
        // 3 rows of 80 values (two full blocks and a partial one), against plain f32 sums.
        let cols = 80;
        let vals: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect();
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 13 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let m = Q8Rows::new(&vals, cols);
        for r in 0..3 {
            let row = &vals[r * cols..(r + 1) * cols];
            for (c, v) in row.iter().enumerate() {
                let amax = row[c / 32 * 32..((c / 32 + 1) * 32).min(cols)]
                    .iter()
                    .fold(0f32, |a, v| a.max(v.abs()));
                assert!((m.get(r, c) - v).abs() <= amax / 254.0 + 1e-6);
            }
            let want: f32 = row.iter().zip(&x).map(|(a, b)| a * b).sum();
            let got = m.dot(r, &x);
            let bound: f32 = x.iter().map(|v| v.abs()).sum::<f32>() * (50.0 / 30.0) / 254.0;
            assert!((got - want).abs() <= bound, "row {r}: {got} vs {want}");
            let all = m.to_f32();
            assert!((0..cols).all(|c| all[r * cols + c] == m.get(r, c)));
            let mut y = vec![1f32; cols];
            m.axpy(r, 0.5, &mut y);
            for (c, yo) in y.iter().enumerate() {
                assert!((yo - (1.0 + 0.5 * m.get(r, c))).abs() < 1e-6);
            }
        }
    }
}
