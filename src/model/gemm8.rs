//! Int8 matrix products for LoRA training over a frozen base: `y = x W^T` forward and
//! `dx = dy W` backward, with per-row int8 copies of `W` and of `W^T`.
//!
//! Training passes hundreds of token rows through every weight, so unlike decoding
//! (`int8.rs`, memory-bound) it is compute-bound: candle's f32 GEMM (AVX2 FMA, 16
//! multiply-adds per cycle and core) was most of a training step. AVX-512 VNNI's `vpdpbusd`
//! does 64 `u8 x i8` multiply-adds per instruction into 32-bit sums.
//!
//! The arithmetic, for one output `y[t][o] = sum_j x[t][j] W[o][j]`:
//! - each weight row `o` is rounded to int8 with one scale, `W[o][j] ~ sw[o] * w[o][j]`, and
//!   stored as the unsigned byte `w + 128` (`vpdpbusd` multiplies unsigned by signed bytes);
//! - each activation row is rounded in blocks of [`BLOCK`] values with one scale per block,
//!   `x[t][j] ~ sx[t][b] * q[t][j]` (as decoding does, `int8.rs`): one scale per whole row
//!   lost too much to the few large channels LLaMA activations carry (LoRA gradients at cosine
//!   0.97 to the f32 ones; in blocks of 32, 0.995 with the int8 weights, 0.999 without);
//! - so `y[t][o] ~ sw[o] * (sum_b sx[t][b] * sum_{j in b} (w + 128) q  -  c[t])` with
//!   `c[t] = 128 * sum_b sx[t][b] * sum_{j in b} q[t][j]`, a number per activation row
//!   ([`Rows::offset`]).
//!
//! The backward product `dx[t][j] = sum_o dy[t][o] sw[o] w[o][j]` is the same computation on
//! the transposed copy, with `sw` folded into `dy` before `dy` is rounded.
//!
//! Layout ([`Panels`]): the weight in panels of [`PANEL`] rows; within a panel, for every 4
//! inner indices, the panel's rows x 4 bytes side by side (two 512-bit registers of 16 rows),
//! so the kernel reads a panel front to back. Each kernel has a plain-Rust twin, used on CPUs
//! without AVX-512 VNNI and by the tests as the reference.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

// Values per activation scale (8 groups of 4), and the one rounding of a block to int8.
use super::int8::{quantize_block, BLOCK};
/// Weight rows per panel (two registers of 16 32-bit sums).
const PANEL: usize = 32;
/// Activation rows per kernel call: 6 x 2 integer and 6 x 2 float accumulators.
const MR: usize = 6;

/// Whether this CPU runs the AVX-512 VNNI kernel (else the plain one, much slower).
pub fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix `(n, k)` of int8 values with one scale per row, in the panel layout, each value
/// stored as `v + 128`.
#[derive(Debug, Clone)]
pub struct Panels {
    n: usize,
    k: usize,
    /// `k` rounded up to whole blocks.
    k_pad: usize,
    data: Vec<u8>,
    /// Per row, padded to whole panels.
    scale: Vec<f32>,
}

impl Panels {
    /// Pack `q` `(n, k)` row-major with per-row `scale` (`n` values).
    pub fn new(q: &[i8], scale: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(q.len(), n * k, "Panels::new: values");
        Self::from_fn(scale, n, k, |row, j| q[row * k + j])
    }

    /// Pack the transpose of `q` `(k, n)` row-major: rows are `q`'s columns.
    pub fn transposed(q: &[i8], scale: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(q.len(), n * k, "Panels::transposed: values");
        Self::from_fn(scale, n, k, |row, j| q[j * n + row])
    }

    /// Pack the `(n, k)` matrix whose value at `(row, j)` is `value(row, j)`, written in the
    /// layout's own order (the transposed source is then read along its rows).
    fn from_fn(scale: &[f32], n: usize, k: usize, value: impl Fn(usize, usize) -> i8) -> Self {
        assert_eq!(scale.len(), n, "Panels: scales");
        let k_pad = k.div_ceil(BLOCK) * BLOCK;
        let n_pad = n.div_ceil(PANEL) * PANEL;
        // Padding holds 128 (zero); it meets zero activations anyway.
        let mut data = super::int8::huge_vec::<u8>(n_pad * k_pad);
        data.fill(128);
        for (p, panel) in data.chunks_mut(PANEL * k_pad).enumerate() {
            for (g, group) in panel.chunks_mut(PANEL * 4).enumerate().take(k.div_ceil(4)) {
                for j in g * 4..(g * 4 + 4).min(k) {
                    for lane in 0..PANEL.min(n - p * PANEL) {
                        group[lane * 4 + j % 4] = (value(p * PANEL + lane, j) as i32 + 128) as u8;
                    }
                }
            }
        }
        let mut sc = vec![0f32; n_pad];
        sc[..n].copy_from_slice(scale);
        Panels {
            n,
            k,
            k_pad,
            data,
            scale: sc,
        }
    }

    fn panels(&self) -> usize {
        self.scale.len() / PANEL
    }

    fn panel(&self, p: usize) -> &[u8] {
        let len = self.k_pad * PANEL;
        &self.data[p * len..(p + 1) * len]
    }

    /// The stored value at `(row, j)`.
    fn get(&self, row: usize, j: usize) -> i8 {
        let (p, lane) = (row / PANEL, row % PANEL);
        (self.data[p * PANEL * self.k_pad + (j / 4) * PANEL * 4 + lane * 4 + j % 4] as i32 - 128)
            as i8
    }
}

/// Activation rows rounded to int8 in blocks ([`quantize_rows`]).
#[derive(Debug, Clone)]
pub struct Rows {
    m: usize,
    /// Values per row (whole blocks; padding holds 0).
    k_pad: usize,
    q: Vec<i8>,
    /// Per row and block.
    scale: Vec<f32>,
    /// Per row: `128 * sum_b scale[b] * sum_{j in b} q[j]`, what the weights' `+ 128` added.
    offset: Vec<f32>,
}

/// Round each row of `x` `(m, k)` (times `col_scale` per column, when given) to int8 in
/// blocks of [`BLOCK`].
pub fn quantize_rows(x: &[f32], m: usize, k: usize, col_scale: Option<&[f32]>) -> Rows {
    assert_eq!(x.len(), m * k, "quantize_rows: values");
    if let Some(c) = col_scale {
        assert_eq!(c.len(), k, "quantize_rows: column scales");
    }
    let k_pad = k.div_ceil(BLOCK) * BLOCK;
    let nb = k_pad / BLOCK;
    let mut out = Rows {
        m,
        k_pad,
        q: vec![0i8; m * k_pad],
        scale: vec![0f32; m * nb],
        offset: vec![0f32; m],
    };
    let vnni = has_vnni();
    let one_row = |row: &[f32], q: &mut [i8], scale: &mut [f32]| -> f32 {
        let mut offset = 0f32;
        for (b, (q, s)) in q.chunks_mut(BLOCK).zip(scale.iter_mut()).enumerate() {
            let j0 = b * BLOCK;
            let j1 = (j0 + BLOCK).min(k);
            let cs = col_scale.map(|c| &c[j0..j1]);
            #[cfg(target_arch = "x86_64")]
            let (sc, sum) = if vnni && j1 - j0 == BLOCK {
                // SAFETY: the CPU has AVX-512 (checked by `has_vnni`); whole block.
                unsafe { quantize_block_avx512(&row[j0..j1], cs, q) }
            } else {
                quantize_block(&row[j0..j1], cs, q)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let (sc, sum) = quantize_block(&row[j0..j1], cs, q);
            *s = sc;
            if sum != 0 {
                offset += 128.0 * sc * sum as f32;
            }
        }
        offset
    };
    let (q, scale, offset) = (
        SendPtr(out.q.as_mut_ptr()),
        SendPtr(out.scale.as_mut_ptr()),
        SendPtr(out.offset.as_mut_ptr()),
    );
    let work = |range: std::ops::Range<usize>| {
        for r in range {
            // SAFETY: each row index is handed to exactly one call, so the row slices and
            // slots written here are disjoint; the buffers outlive the pool call.
            unsafe {
                let q = std::slice::from_raw_parts_mut(q.get().add(r * k_pad), k_pad);
                let s = std::slice::from_raw_parts_mut(scale.get().add(r * nb), nb);
                *offset.get().add(r) = one_row(&x[r * k..(r + 1) * k], q, s);
            }
        }
    };
    if m * k >= 1 << 15 {
        candle_core::utils::barrier_pool().execute_chunked(m, work);
    } else {
        work(0..m);
    }
    out
}

/// [`quantize_block`] for a whole block with AVX-512 (the same rounding: to nearest, ties to
/// even).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn quantize_block_avx512(x: &[f32], cs: Option<&[f32]>, q: &mut [i8]) -> (f32, i32) {
    use std::arch::x86_64::*;
    assert!(x.len() == BLOCK && q.len() == BLOCK && cs.is_none_or(|c| c.len() == BLOCK));
    let mut a = _mm512_loadu_ps(x.as_ptr());
    let mut b = _mm512_loadu_ps(x.as_ptr().add(16));
    if let Some(c) = cs {
        a = _mm512_mul_ps(a, _mm512_loadu_ps(c.as_ptr()));
        b = _mm512_mul_ps(b, _mm512_loadu_ps(c.as_ptr().add(16)));
    }
    let (aa, ab) = (_mm512_abs_ps(a), _mm512_abs_ps(b));
    let inf = _mm512_set1_ps(f32::INFINITY);
    // Ordered less-than: false for NaN and for infinity.
    let finite =
        _mm512_cmp_ps_mask::<_CMP_LT_OQ>(aa, inf) & _mm512_cmp_ps_mask::<_CMP_LT_OQ>(ab, inf);
    if finite != 0xffff {
        return (f32::NAN, 0);
    }
    let amax = _mm512_reduce_max_ps(_mm512_max_ps(aa, ab));
    if amax == 0.0 {
        return (0.0, 0);
    }
    let inv = _mm512_set1_ps(127.0 / amax);
    let qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));
    let qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
    let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
    _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm512_cvtsepi32_epi8(qa));
    _mm_storeu_si128(
        q.as_mut_ptr().add(16) as *mut __m128i,
        _mm512_cvtsepi32_epi8(qb),
    );
    (amax / 127.0, sum)
}

/// A raw pointer the pool's workers share; each writes a disjoint part.
#[derive(Clone, Copy)]
pub(super) struct SendPtr<T>(pub(super) *mut T);
// SAFETY: only used for disjoint writes, documented at each use.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

/// `out (m, n) = x W^T` from the rounded rows `x` and the panels `w`.
pub fn gemm(x: &Rows, w: &Panels) -> Vec<f32> {
    gemm_with(x, w, has_vnni())
}

/// [`gemm`] with the kernel chosen by the caller (the tests compare both).
pub fn gemm_with(x: &Rows, w: &Panels, vnni: bool) -> Vec<f32> {
    assert_eq!(x.k_pad, w.k_pad, "gemm: inner dimensions");
    assert!(!vnni || has_vnni(), "gemm: this CPU has no AVX-512 VNNI");
    let (m, n) = (x.m, w.n);
    // Every element is written below, each by one kernel call: no zeroing first.
    let mut out = Vec::<f32>::with_capacity(m * n);
    if m == 0 || n == 0 {
        return out;
    }
    // Work items: a panel times a group of row blocks, panel-major (a panel stays in cache
    // while its row groups run).
    const GROUP: usize = 8 * MR;
    let groups = m.div_ceil(GROUP);
    let items = w.panels() * groups;
    let nb = x.k_pad / BLOCK;
    let dst = SendPtr(out.as_mut_ptr());
    let work = |range: std::ops::Range<usize>| {
        for item in range {
            let (p, g) = (item / groups, item % groups);
            let mut r0 = g * GROUP;
            while r0 < m.min((g + 1) * GROUP) {
                let rows = (m - r0).min(MR);
                let block = Block {
                    x: &x.q[r0 * x.k_pad..(r0 + rows) * x.k_pad],
                    scale: &x.scale[r0 * nb..(r0 + rows) * nb],
                    offset: &x.offset[r0..r0 + rows],
                    k_pad: x.k_pad,
                    panel: w.panel(p),
                    w_scale: &w.scale[p * PANEL..(p + 1) * PANEL],
                    // SAFETY: rows r0..r0+rows, columns p*PANEL..p*PANEL+cols of `out`
                    // belong to this item alone; `out` outlives the pool call.
                    out: unsafe { dst.get().add(r0 * n + p * PANEL) },
                    ldo: n,
                    cols: (n - p * PANEL).min(PANEL),
                };
                #[cfg(target_arch = "x86_64")]
                if vnni {
                    // SAFETY: `vnni` is only true on CPUs with the features (asserted above).
                    unsafe { vnni_block(&block) };
                    r0 += rows;
                    continue;
                }
                plain_block(&block);
                r0 += rows;
            }
        }
    };
    if items > 1 && m * n * w.k >= 1 << 20 {
        candle_core::utils::barrier_pool().execute_chunked(items, work);
    } else {
        work(0..items);
    }
    // SAFETY: the items cover every (row, column) of `out` once (row groups x panels, with
    // `cols` reaching the last column), and each kernel writes all of its block.
    unsafe { out.set_len(m * n) };
    out
}

/// One kernel call: up to [`MR`] activation rows times one panel.
struct Block<'a> {
    /// `rows x k_pad` values.
    x: &'a [i8],
    /// `rows x k_pad / BLOCK` scales.
    scale: &'a [f32],
    offset: &'a [f32],
    k_pad: usize,
    panel: &'a [u8],
    w_scale: &'a [f32],
    /// Top-left output element; rows `ldo` apart, `cols` columns written.
    out: *mut f32,
    ldo: usize,
    cols: usize,
}

fn plain_block(b: &Block) {
    let nb = b.k_pad / BLOCK;
    for (r, &offset) in b.offset.iter().enumerate() {
        let x = &b.x[r * b.k_pad..(r + 1) * b.k_pad];
        for c in 0..b.cols {
            let mut acc = 0f32;
            for (blk, xs) in x.chunks(BLOCK).enumerate() {
                let mut sum = 0i32;
                for (i, &xv) in xs.iter().enumerate() {
                    let j = blk * BLOCK + i;
                    sum += b.panel[(j / 4) * PANEL * 4 + c * 4 + j % 4] as i32 * xv as i32;
                }
                acc += sum as f32 * b.scale[r * nb + blk];
            }
            let v = (acc - offset) * b.w_scale[c];
            // SAFETY: inside the block's own output region (see `gemm_with`).
            unsafe { *b.out.add(r * b.ldo + c) = v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn vnni_block(b: &Block) {
    match b.offset.len() {
        1 => vnni_rows::<1>(b),
        2 => vnni_rows::<2>(b),
        3 => vnni_rows::<3>(b),
        4 => vnni_rows::<4>(b),
        5 => vnni_rows::<5>(b),
        _ => vnni_rows::<6>(b),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
unsafe fn vnni_rows<const R: usize>(b: &Block) {
    use std::arch::x86_64::*;
    let nb = b.k_pad / BLOCK;
    let mut f = [[_mm512_setzero_ps(); 2]; R];
    let x = b.x.as_ptr();
    let w = b.panel.as_ptr();
    for blk in 0..nb {
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        for g in 0..BLOCK / 4 {
            let j = blk * BLOCK + g * 4;
            let p = w.add(j * PANEL);
            let w0 = _mm512_loadu_si512(p as *const _);
            let w1 = _mm512_loadu_si512(p.add(64) as *const _);
            for (r, acc) in acc.iter_mut().enumerate() {
                let xv = _mm512_set1_epi32((x.add(r * b.k_pad + j) as *const i32).read_unaligned());
                acc[0] = _mm512_dpbusd_epi32(acc[0], w0, xv);
                acc[1] = _mm512_dpbusd_epi32(acc[1], w1, xv);
            }
        }
        for (r, (f, acc)) in f.iter_mut().zip(&acc).enumerate() {
            let s = _mm512_set1_ps(*b.scale.get_unchecked(r * nb + blk));
            f[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[0]), s, f[0]);
            f[1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[1]), s, f[1]);
        }
    }
    for s in 0..2 {
        let c0 = s * 16;
        if c0 >= b.cols {
            break;
        }
        let left = b.cols - c0;
        let mask: __mmask16 = if left >= 16 {
            0xffff
        } else {
            (1u16 << left) - 1
        };
        let ws = _mm512_loadu_ps(b.w_scale.as_ptr().add(c0));
        for (r, f) in f.iter().enumerate() {
            let v = _mm512_sub_ps(f[s], _mm512_set1_ps(b.offset[r]));
            _mm512_mask_storeu_ps(b.out.add(r * b.ldo + c0), mask, _mm512_mul_ps(v, ws));
        }
    }
}

/// A frozen weight `W` `(n, k)` for training: `x W^T` and `dy W` in int8.
///
/// The blocks matter most for the output head's `dy`, `softmax - onehot`: thousands of small
/// probabilities beside one large one. Rounded per row, most of them were lost (LoRA gradients
/// at cosine 0.5 to the f32 ones); per block of 32 the gradients match as well as with an f32
/// head (cosine 0.994 both, `examples/train_format_probe.rs`).
#[derive(Debug, Clone)]
pub struct FrozenInt8 {
    /// `W`, rows of the output.
    fwd: Panels,
    /// `W^T`, rows of the input (scales 1: `W`'s row scales are folded into `dy` before it is
    /// rounded); `None` in a copy made for inference only ([`FrozenInt8::forward_only`]).
    bwd: Option<Panels>,
    /// `W`'s row scales.
    w_scale: Vec<f32>,
}

impl FrozenInt8 {
    /// Round `w` `(n, k)` row-major to int8 per row and pack it both ways.
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        Self::packed(w, n, k, true)
    }

    /// Round `w` `(n, k)` to int8 per row and pack `W`, and `W^T` when `backward`.
    fn packed(w: &[f32], n: usize, k: usize, backward: bool) -> Self {
        assert_eq!(w.len(), n * k, "FrozenInt8: values");
        let (q, scale) = quantize_weight(w, n, k);
        FrozenInt8 {
            fwd: Panels::new(&q, &scale, n, k),
            bwd: backward.then(|| Panels::transposed(&q, &vec![1.0; k], k, n)),
            w_scale: scale,
        }
    }

    /// From a `(n, k)` f32 tensor.
    pub fn from_tensor(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        Ok(Self::packed(
            &w.flatten_all()?.to_vec1::<f32>()?,
            n,
            k,
            true,
        ))
    }

    /// [`FrozenInt8::from_tensor`] without `W^T`: half the memory, for passes that need no
    /// gradient to the input (format `mixed` on requantized block types).
    pub fn forward_only(w: &Tensor) -> candle_core::Result<Self> {
        let (n, k) = w.dims2()?;
        Ok(Self::packed(
            &w.flatten_all()?.to_vec1::<f32>()?,
            n,
            k,
            false,
        ))
    }

    /// `(n, k)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.fwd.n, self.fwd.k)
    }

    /// The weight as the int8 copy holds it, `(n, k)` row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let (n, k) = self.dims();
        let mut out = vec![0f32; n * k];
        for (row, o) in out.chunks_mut(k).enumerate() {
            for (j, v) in o.iter_mut().enumerate() {
                *v = self.fwd.get(row, j) as f32 * self.w_scale[row];
            }
        }
        out
    }

    /// `x W^T` for `x` `(m, k)` row-major.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        gemm(&quantize_rows(x, m, self.fwd.k, None), &self.fwd)
    }

    /// `x W^T` for rows rounded already.
    pub fn forward_rows(&self, x: &Rows) -> Vec<f32> {
        gemm(x, &self.fwd)
    }

    /// `dy W` for `dy` `(m, n)` row-major; `None` for a [`FrozenInt8::forward_only`] copy.
    pub fn backward(&self, dy: &[f32], m: usize) -> Option<Vec<f32>> {
        let bwd = self.bwd.as_ref()?;
        Some(gemm(&quantize_rows(dy, m, bwd.k, Some(&self.w_scale)), bwd))
    }
}

/// Round each row of `w` `(n, k)` to int8 with one scale per row.
fn quantize_weight(w: &[f32], n: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; n * k];
    let mut scale = vec![0f32; n];
    for (row, (src, dst)) in w.chunks(k).zip(q.chunks_mut(k)).enumerate() {
        let amax = src.iter().fold(0f32, |a, v| a.max(v.abs()));
        if amax == 0.0 {
            continue;
        }
        let inv = 127.0 / amax;
        for (d, v) in dst.iter_mut().zip(src) {
            *d = (v * inv).round() as i8;
        }
        scale[row] = amax / 127.0;
    }
    (q, scale)
}

/// `y = x W^T` for `x` `(.., k)` in int8 ([`FrozenInt8`]); gradients flow to `x` only.
pub fn frozen_linear_int8(
    x: &Tensor,
    w: &std::sync::Arc<FrozenInt8>,
) -> candle_core::Result<Tensor> {
    x.apply_op1(Frozen8(w.clone()))
}

struct Frozen8(std::sync::Arc<FrozenInt8>);

/// Rows of a `(.., last)` shape.
fn rows_of(dims: &[usize]) -> usize {
    dims[..dims.len().saturating_sub(1)].iter().product()
}

impl CustomOp1 for Frozen8 {
    fn name(&self) -> &'static str {
        "frozen-linear-int8"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k) = self.0.dims();
        let dims = l.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen-linear-int8: input {dims:?}, weight ({n}, {k})");
        }
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("frozen-linear-int8: input must be f32");
        };
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen-linear-int8: input must be contiguous");
        };
        let y = self.0.forward(&v[start..end], rows_of(dims));
        let mut out = dims.to_vec();
        if let Some(last) = out.last_mut() {
            *last = n;
        }
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let (storage, layout) = grad.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(g)) = &*storage else {
            candle_core::bail!("frozen-linear-int8: gradient must be f32 on the CPU");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear-int8: gradient not contiguous");
        };
        let Some(dx) = self.0.backward(&g[start..end], rows_of(grad.dims())) else {
            candle_core::bail!(
                "frozen-linear-int8: this weight was made for inference only (no W^T)"
            );
        };
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeded values in (-scale, scale), with every 37th a few times larger (activations
    /// carry such channels).
    fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|i| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
                if i % 37 == 0 {
                    u * scale * 6.0
                } else {
                    u * scale
                }
            })
            .collect()
    }

    /// The product of the rounded values, in f64 from their plain definitions.
    fn rounded_product(x: &[f32], m: usize, w: &FrozenInt8) -> Vec<f64> {
        let (n, k) = w.dims();
        let wd = w.dequantize();
        let mut out = vec![0f64; m * n];
        for t in 0..m {
            let mut xr = x[t * k..(t + 1) * k].to_vec();
            for blk in xr.chunks_mut(BLOCK) {
                let s = blk.iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                if s > 0.0 {
                    blk.iter_mut()
                        .for_each(|v| *v = (*v / s).round_ties_even() * s);
                }
            }
            for o in 0..n {
                out[t * n + o] = (0..k).map(|j| xr[j] as f64 * wd[o * k + j] as f64).sum();
            }
        }
        out
    }

    fn kernels() -> Vec<bool> {
        if has_vnni() {
            vec![false, true]
        } else {
            vec![false]
        }
    }

    #[test]
    fn the_kernels_compute_the_rounded_product_for_odd_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (7, 70, 13),
            (13, 64, 32),
            (6, 129, 100),
            (20, 33, 576),
        ] {
            let w = FrozenInt8::new(&values(n * k, 1, 0.1), n, k);
            let x = values(m * k, 2, 1.0);
            let want = rounded_product(&x, m, &w);
            let rows = quantize_rows(&x, m, k, None);
            for vnni in kernels() {
                let got = gemm_with(&rows, &w.fwd, vnni);
                for (g, e) in got.iter().zip(&want) {
                    assert!(
                        (*g as f64 - e).abs() <= 1e-4 * (1.0 + e.abs()),
                        "{g} vs {e} ({m}, {n}, {k}), vnni {vnni}"
                    );
                }
            }
        }
    }

    #[test]
    fn int8_products_track_the_f32_ones_both_ways() {
        let (m, n, k) = (9, 96, 200);
        let w = values(n * k, 3, 0.1);
        let x = values(m * k, 4, 1.0);
        let dy = values(m * n, 5, 1.0);
        let f = FrozenInt8::new(&w, n, k);
        let y = f.forward(&x, m);
        let dx = f.backward(&dy, m).unwrap();
        let rel = |got: &[f32], want: &dyn Fn(usize) -> f64| {
            let (mut num, mut den) = (0f64, 0f64);
            for (i, g) in got.iter().enumerate() {
                num += (*g as f64 - want(i)).powi(2);
                den += want(i).powi(2);
            }
            (num / den).sqrt()
        };
        let ry = rel(&y, &|i| {
            let (t, o) = (i / n, i % n);
            (0..k)
                .map(|j| x[t * k + j] as f64 * w[o * k + j] as f64)
                .sum()
        });
        let rdx = rel(&dx, &|i| {
            let (t, j) = (i / k, i % k);
            (0..n)
                .map(|o| dy[t * n + o] as f64 * w[o * k + j] as f64)
                .sum()
        });
        assert!(ry < 0.02, "forward relative error {ry}");
        assert!(rdx < 0.02, "backward relative error {rdx}");
    }

    #[test]
    fn zero_rows_give_zero_and_nan_stays_nan() {
        let f = FrozenInt8::new(&values(40 * 8, 8, 0.1), 40, 8);
        assert!(f.forward(&[0.0; 16], 2).iter().all(|v| *v == 0.0));
        let mut x = vec![1.0; 8];
        x[3] = f32::NAN;
        assert!(f.forward(&x, 1).iter().all(|v| v.is_nan()));
    }
}
