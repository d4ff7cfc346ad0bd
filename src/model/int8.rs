//! Int8 kernels for passes of few token rows (decoding): the base weights (`packed.rs`) and the
//! experts (`lora/experts.rs`). With AVX2, 32 multiply-adds per instruction; every matrix is
//! laid out so that a kernel reads it front to back in one stream (decoding streams the whole
//! model from memory for every token, and the hardware prefetcher follows one stream well, four
//! interleaved ones badly: measured under half the speed).
//!
//! Layouts:
//! - a vector quantized in blocks of [`BLOCK`]: `q[i]` int8 and one f32 scale `d[i / BLOCK]`
//!   with `x[i] ~ d * q[i]` (as GGML's Q8_0, with the scale kept in f32): the activations;
//! - a matrix `(rows, k)` in such blocks, four rows packed block by block
//!   ([`interleave_row_quads`], [`matvec_quads`]), or in GGML's Q4_1 packed the same way
//!   ([`Q4Quads`], [`matvec_q4`]): `W x`;
//! - a matrix `(k, n)` for `y = M^T u` ([`interleave_quads`], [`quad_matvec`]), for the experts'
//!   `B^T`: per 16 columns and group of four rows, each column's four values side by side.
//!
//! Each kernel has a plain-Rust version, used without AVX2 and by the tests as the reference.
//! The kernels check their slices' shapes and panic on a mismatch, as slice methods do (a
//! programming error inside the crate, never a consequence of input files or flags; the SIMD
//! code relies on these checks).

/// A zeroed vector for a large weight array, its memory marked for transparent huge pages
/// before first use (Linux; elsewhere a plain vector). Decoding reads every weight once per
/// token: with 4 KiB pages that is a TLB miss every 4 KiB, with 2 MiB pages almost none
/// (measured: +12-15% decode speed; docs/BENCHMARKS.md, "Huge pages").
pub fn huge_vec<T: Copy + Default>(n: usize) -> Vec<T> {
    let v = vec![T::default(); n];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = std::mem::size_of_val(v.as_slice());
        if bytes >= HUGE {
            let start = v.as_ptr() as usize;
            let (lo, hi) = (start.next_multiple_of(4096), (start + bytes) / 4096 * 4096);
            if hi > lo {
                // SAFETY: the range lies inside `v`'s allocation, page-aligned; the advice only
                // changes how the kernel backs it (a failure is harmless and ignored).
                unsafe { libc::madvise(lo as *mut libc::c_void, hi - lo, libc::MADV_HUGEPAGE) };
            }
        }
    }
    v
}

/// A run of a buffer that may be shared: an array's own vector until [`pack_shared`] moves
/// the arrays of a model (or an expert set) into one large one.
#[derive(Debug, Clone)]
pub struct Shared<T> {
    buf: std::sync::Arc<Vec<T>>,
    start: usize,
    len: usize,
}

impl<T> From<Vec<T>> for Shared<T> {
    fn from(v: Vec<T>) -> Self {
        Shared {
            len: v.len(),
            start: 0,
            buf: std::sync::Arc::new(v),
        }
    }
}

impl<T> std::ops::Deref for Shared<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// Move `parts` into one buffer marked for huge pages ([`huge_vec`]), in order.
pub fn pack_shared<T: Copy + Default>(parts: Vec<&mut Shared<T>>) {
    let total = parts.iter().map(|p| p.len).sum();
    let mut arena = huge_vec::<T>(total);
    let mut at = 0;
    for p in &parts {
        arena[at..at + p.len].copy_from_slice(p);
        at += p.len;
    }
    let arena = std::sync::Arc::new(arena);
    let mut at = 0;
    for p in parts {
        p.buf = arena.clone();
        p.start = at;
        at += p.len;
    }
}

/// Quantization block of the activation and weight vectors.
pub const BLOCK: usize = 32;

/// Round `x` (length a multiple of [`BLOCK`]) to int8 in blocks: `q` gets the values, `d` the
/// per-block scales (`max |x| / 127`, 0 for an all-zero block).
pub fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    assert!(
        x.len().is_multiple_of(BLOCK) && q.len() == x.len() && d.len() == x.len() / BLOCK,
        "quantize_blocks: shapes"
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the lengths are checked above and AVX2 is enabled at compile time.
        unsafe { avx2::quantize_blocks(x, q, d) }
    }
    #[cfg(not(target_feature = "avx2"))]
    quantize_blocks_plain(x, q, d)
}

/// [`quantize_blocks`] in plain Rust: the fallback without AVX2, and the tests' reference.
#[cfg_attr(target_feature = "avx2", allow(dead_code))]
pub fn quantize_blocks_plain(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)).zip(d.iter_mut()) {
        *db = quantize_block(xb, None, qb).0;
    }
}

/// Round one block `x` (times `cs`, the training kernels' column scales) to int8 in `q`:
/// its scale (`max |x| / 127`, 0 for an all-zero block) and the sum of its values; every
/// SIMD quantizer here rounds the same way (to nearest, ties to even). A
/// block holding NaN or infinity gets scale NaN (the products then carry the NaN on).
#[inline]
pub fn quantize_block(x: &[f32], cs: Option<&[f32]>, q: &mut [i8]) -> (f32, i32) {
    let v = |j: usize| match cs {
        Some(c) => x[j] * c[j],
        None => x[j],
    };
    let mut amax = 0f32;
    for j in 0..x.len() {
        let a = v(j).abs();
        if !a.is_finite() {
            return (f32::NAN, 0);
        }
        amax = amax.max(a);
    }
    if amax == 0.0 {
        return (0.0, 0);
    }
    let inv = 127.0 / amax;
    let mut sum = 0;
    for (j, d) in q.iter_mut().take(x.len()).enumerate() {
        *d = (v(j) * inv).round_ties_even() as i8;
        sum += *d as i32;
    }
    (amax / 127.0, sum)
}

/// Reorder a block-quantized matrix `(rows, k)` (`rows` a multiple of 4) so that each group
/// of four rows is stored block by block, the four rows' blocks side by side: element
/// `(4g + i, 32b + j)` at `((g nb + b) 4 + i) 32 + j`, scale `(4g + i, b)` at `(g nb + b) 4 + i`.
/// [`matvec_quads`] then reads the matrix front to back in one stream, as the hardware
/// prefetcher wants (four separate row streams ran at under half the speed from memory).
pub fn interleave_row_quads(q: &[i8], d: &[f32], k: usize) -> (Vec<i8>, Vec<f32>) {
    let nb = k / BLOCK;
    let rows = d.len() / nb.max(1);
    debug_assert!(rows.is_multiple_of(4) && q.len() == rows * k);
    let (mut qo, mut dout) = (huge_vec::<i8>(q.len()), huge_vec::<f32>(d.len()));
    for r in 0..rows {
        let (g, i) = (r / 4, r % 4);
        for b in 0..nb {
            let dst = ((g * nb + b) * 4 + i) * BLOCK;
            qo[dst..dst + BLOCK].copy_from_slice(&q[r * k + b * BLOCK..r * k + (b + 1) * BLOCK]);
            dout[(g * nb + b) * 4 + i] = d[r * nb + b];
        }
    }
    (qo, dout)
}

/// `out[r] = sum_i (dw[r, i/B] * w[r, i]) * (dx[i/B] * x[i])` for a matrix in the layout of
/// [`interleave_row_quads`] (`out.len()` rows, a multiple of 4) and a block-quantized `x`.
pub fn matvec_quads(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
    let (k, nb) = (x.len(), dx.len());
    assert!(
        w.len() == out.len() * k
            && dw.len() == out.len() * nb
            && k == nb * BLOCK
            && out.len().is_multiple_of(4),
        "matvec_quads: shapes"
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the shapes are checked above; AVX2 is enabled at compile time.
        unsafe { avx2::matvec_quads(w, dw, x, dx, out) };
    }
    #[cfg(not(target_feature = "avx2"))]
    matvec_quads_plain(w, dw, x, dx, out)
}

/// [`matvec_quads`] for a matrix with one scale per row (`dw[r]`; values laid out by
/// [`interleave_row_quads`]): fewer bytes to read for the experts' `A`.
pub fn matvec_quads_rows(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
    let (k, nb) = (x.len(), dx.len());
    assert!(
        w.len() == out.len() * k
            && dw.len() == out.len()
            && k == nb * BLOCK
            && out.len().is_multiple_of(4),
        "matvec_quads_rows: shapes"
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the shapes are checked above; AVX2 is enabled at compile time.
        unsafe { avx2::matvec_quads_rows(w, dw, x, dx, out) };
    }
    #[cfg(not(target_feature = "avx2"))]
    {
        let per_block: Vec<f32> = (0..out.len() * nb)
            .map(|i| dw[(i / 4 / nb) * 4 + i % 4])
            .collect();
        matvec_quads_plain(w, &per_block, x, dx, out)
    }
}

/// [`matvec_quads`] in plain Rust: the fallback without AVX2, and the tests' reference.
#[cfg_attr(target_feature = "avx2", allow(dead_code))]
pub fn matvec_quads_plain(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
    let nb = dx.len();
    out.fill(0.0);
    for (g, quad) in out.chunks_mut(4).enumerate() {
        for (b, xb) in x.chunks(BLOCK).enumerate() {
            for (i, o) in quad.iter_mut().enumerate() {
                let at = (g * nb + b) * 4 + i;
                let wb = &w[at * BLOCK..(at + 1) * BLOCK];
                let s: i32 = wb.iter().zip(xb).map(|(&p, &q)| p as i32 * q as i32).sum();
                *o += dw[at] * dx[b] * s as f32;
            }
        }
    }
}

/// A matrix `(rows, k)` in GGML's Q4_1 (per block of 32: `w = d * q + m`, `q` in 0..16), laid
/// out as [`interleave_row_quads`] does for int8: per group of four rows and block, the four
/// rows' 16 nibble bytes side by side (byte `j` holds element `j` low and `j + 16` high, as in
/// GGML), scales and minimums in f32 at `(g * nb + b) * 4 + i`.
#[derive(Debug, Clone, Default)]
pub struct Q4Quads {
    pub nibbles: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

/// Reorder raw GGML Q4_1 blocks (20 bytes each: f16 `d`, f16 `m`, 16 nibble bytes; rows of
/// `k / 32` blocks, `rows` a multiple of 4) into [`Q4Quads`].
pub fn q4_1_quads(raw: &[u8], rows: usize, k: usize) -> Q4Quads {
    let nb = k / BLOCK;
    debug_assert!(rows.is_multiple_of(4) && raw.len() == rows * nb * 20);
    let mut out = Q4Quads {
        nibbles: huge_vec::<u8>(rows * nb * 16),
        d: huge_vec::<f32>(rows * nb),
        m: huge_vec::<f32>(rows * nb),
    };
    for r in 0..rows {
        let (g, i) = (r / 4, r % 4);
        for b in 0..nb {
            let blk = &raw[(r * nb + b) * 20..(r * nb + b + 1) * 20];
            let at = (g * nb + b) * 4 + i;
            out.d[at] = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            out.m[at] = half::f16::from_le_bytes([blk[2], blk[3]]).to_f32();
            out.nibbles[at * 16..(at + 1) * 16].copy_from_slice(&blk[4..20]);
        }
    }
    out
}

impl Q4Quads {
    /// The rows `r0..r0 + n` (`r0`, `n` multiples of 4) of a matrix with `nb` blocks a row.
    pub fn rows(&self, r0: usize, n: usize, nb: usize) -> Q4Slice<'_> {
        Q4Slice {
            nibbles: &self.nibbles[r0 * nb * 16..(r0 + n) * nb * 16],
            d: &self.d[r0 * nb..(r0 + n) * nb],
            m: &self.m[r0 * nb..(r0 + n) * nb],
        }
    }
}

/// A run of rows of a [`Q4Quads`] matrix.
#[derive(Debug, Clone, Copy)]
pub struct Q4Slice<'a> {
    pub nibbles: &'a [u8],
    pub d: &'a [f32],
    pub m: &'a [f32],
}

/// Raw GGML Q8_0 blocks (34 bytes each: f16 scale, 32 int8 values; rows of `k / 32` blocks,
/// `rows` a multiple of 4) as [`interleave_row_quads`] lays them out, scales in f32.
pub fn q8_0_quads(raw: &[u8], rows: usize, k: usize) -> (Vec<i8>, Vec<f32>) {
    let nb = k / BLOCK;
    assert!(
        rows.is_multiple_of(4) && raw.len() == rows * nb * 34,
        "q8_0_quads: shapes"
    );
    let mut q = vec![0i8; rows * k];
    let mut d = vec![0f32; rows * nb];
    for (i, blk) in raw.chunks(34).enumerate() {
        d[i] = half::f16::from_le_bytes([blk[0], blk[1]]).to_f32();
        for (o, &v) in q[i * BLOCK..(i + 1) * BLOCK].iter_mut().zip(&blk[2..]) {
            *o = v as i8;
        }
    }
    interleave_row_quads(&q, &d, k)
}

/// `out[r] = sum_i w[r, i] * (dx[i/B] * x[i])` for rows of a [`Q4Quads`] matrix (`out.len()`
/// of them) and a block-quantized `x` whose per-block integer sums are `xsum`.
pub fn matvec_q4(w: Q4Slice, x: &[i8], dx: &[f32], xsum: &[i32], out: &mut [f32]) {
    let nb = dx.len();
    assert!(
        w.nibbles.len() == out.len() * nb * 16
            && w.d.len() == out.len() * nb
            && w.m.len() == out.len() * nb
            && x.len() == nb * BLOCK
            && xsum.len() == nb
            && out.len().is_multiple_of(4),
        "matvec_q4: shapes"
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the shapes are checked above; AVX2 is enabled at compile time.
        unsafe { avx2::matvec_q4(w, x, dx, xsum, out) };
    }
    #[cfg(not(target_feature = "avx2"))]
    matvec_q4_plain(w, x, dx, xsum, out)
}

/// [`matvec_q4`] in plain Rust: the fallback without AVX2, and the tests' reference.
#[cfg_attr(target_feature = "avx2", allow(dead_code))]
pub fn matvec_q4_plain(w: Q4Slice, x: &[i8], dx: &[f32], xsum: &[i32], out: &mut [f32]) {
    let nb = dx.len();
    out.fill(0.0);
    for (g, quad) in out.chunks_mut(4).enumerate() {
        for b in 0..nb {
            let xb = &x[b * BLOCK..(b + 1) * BLOCK];
            for (i, o) in quad.iter_mut().enumerate() {
                let at = (g * nb + b) * 4 + i;
                let nib = &w.nibbles[at * 16..(at + 1) * 16];
                let s: i32 = (0..BLOCK)
                    .map(|j| {
                        let q = if j < 16 {
                            nib[j] & 15
                        } else {
                            nib[j - 16] >> 4
                        };
                        q as i32 * xb[j] as i32
                    })
                    .sum();
                *o += dx[b] * (w.d[at] * s as f32 + w.m[at] * xsum[b] as f32);
            }
        }
    }
}

/// Round each row of `m` `(rows, n)` to int8 with one scale per row (`max |row| / 127`; 0 and
/// zeros for an all-zero row).
pub fn quantize_rows(m: &[f32], n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; m.len()];
    let mut d = vec![0f32; m.len().checked_div(n).unwrap_or(0)];
    for ((row, qr), dr) in m
        .chunks(n.max(1))
        .zip(q.chunks_mut(n.max(1)))
        .zip(d.iter_mut())
    {
        let amax = row.iter().fold(0f32, |a, v| a.max(v.abs()));
        *dr = amax / 127.0;
        if amax > 0.0 {
            for (qv, v) in qr.iter_mut().zip(row) {
                *qv = (v * 127.0 / amax).round() as i8;
            }
        }
    }
    (q, d)
}

/// Columns per step of [`quad_matvec`].
pub const COLS: usize = 16;

/// Lay out a row-major int8 matrix `(k, n)` (`k` a multiple of 4, `n` of [`COLS`]) for
/// [`quad_matvec`]: element `(4g + r, 16c + j)` at `((c groups + g) 16 + j) 4 + r`, where
/// `groups = k / 4`.
pub fn interleave_quads(m: &[i8], k: usize, n: usize) -> Vec<i8> {
    assert!(
        k.is_multiple_of(4) && n.is_multiple_of(COLS) && m.len() == k * n,
        "interleave_quads: shapes"
    );
    let groups = k / 4;
    let mut out = vec![0i8; k * n];
    for g in 0..groups {
        for col in 0..n {
            let (c, j) = (col / COLS, col % COLS);
            for r in 0..4 {
                out[((c * groups + g) * COLS + j) * 4 + r] = m[(4 * g + r) * n + col];
            }
        }
    }
    out
}

/// `acc[j] = sum_r u[r] * M[r][j]` in int32 for `m` laid out by [`interleave_quads`] from an
/// `(u.len(), acc.len())` matrix.
pub fn quad_matvec(m: &[i8], u: &[i8], acc: &mut [i32]) {
    assert!(
        u.len().is_multiple_of(4)
            && acc.len().is_multiple_of(COLS)
            && m.len() == u.len() * acc.len(),
        "quad_matvec: shapes"
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the lengths are checked above; AVX2 is enabled at compile time.
        unsafe { avx2::quad_matvec(m, u, acc) }
    }
    #[cfg(not(target_feature = "avx2"))]
    quad_matvec_plain(m, u, acc)
}

/// [`quad_matvec`] in plain Rust: the fallback without AVX2, and the tests' reference.
#[cfg_attr(target_feature = "avx2", allow(dead_code))]
pub fn quad_matvec_plain(m: &[i8], u: &[i8], acc: &mut [i32]) {
    let groups = u.len() / 4;
    for (col, a) in acc.iter_mut().enumerate() {
        let (c, j) = (col / COLS, col % COLS);
        *a = (0..groups)
            .map(|g| {
                let at = ((c * groups + g) * COLS + j) * 4;
                (0..4)
                    .map(|r| m[at + r] as i32 * u[4 * g + r] as i32)
                    .sum::<i32>()
            })
            .sum();
    }
}

#[cfg(target_feature = "avx2")]
mod avx2 {
    use super::BLOCK;
    use std::arch::x86_64::*;

    /// Horizontal sum of eight f32 lanes.
    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    pub unsafe fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
        let sign = _mm256_set1_ps(-0.0);
        for (b, db) in d.iter_mut().enumerate() {
            let p = x.as_ptr().add(b * BLOCK);
            let v = [
                _mm256_loadu_ps(p),
                _mm256_loadu_ps(p.add(8)),
                _mm256_loadu_ps(p.add(16)),
                _mm256_loadu_ps(p.add(24)),
            ];
            let m = _mm256_max_ps(
                _mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])),
            );
            let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
            let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
            *db = amax / 127.0;
            let inv = _mm256_set1_ps(if amax > 0.0 { 127.0 / amax } else { 0.0 });
            // Round to nearest (even on ties), then pack 4 x 8 int32 to 32 int8 in order.
            let i: [__m256i; 4] = v.map(|vv| _mm256_cvtps_epi32(_mm256_mul_ps(vv, inv)));
            let w = _mm256_packs_epi16(
                _mm256_packs_epi32(i[0], i[1]),
                _mm256_packs_epi32(i[2], i[3]),
            );
            let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            _mm256_storeu_si256(q.as_mut_ptr().add(b * BLOCK) as *mut __m256i, w);
        }
    }

    pub unsafe fn matvec_quads(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
        quads::<false>(w, dw, x, dx, out)
    }

    pub unsafe fn matvec_quads_rows(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
        quads::<true>(w, dw, x, dx, out)
    }

    /// Both: `ROW_SCALES` reads one scale per row (applied to the finished sum) instead of one
    /// per row and block (applied per block).
    #[inline(always)]
    unsafe fn quads<const ROW_SCALES: bool>(
        w: &[i8],
        dw: &[f32],
        x: &[i8],
        dx: &[f32],
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let mut wp = w.as_ptr();
        let mut dp = dw.as_ptr();
        for quad in out.chunks_mut(4) {
            let mut acc = [_mm256_setzero_ps(); 4];
            for (b, &d) in dx.iter().enumerate() {
                let vx = _mm256_loadu_si256(x.as_ptr().add(b * BLOCK) as *const __m256i);
                let ax = _mm256_sign_epi8(vx, vx);
                for (i, a) in acc.iter_mut().enumerate() {
                    let vw = _mm256_loadu_si256(wp.add(i * BLOCK) as *const __m256i);
                    let p =
                        _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(vw, vx)), ones);
                    let scale = if ROW_SCALES { d } else { *dp.add(i) * d };
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(scale), _mm256_cvtepi32_ps(p), *a);
                }
                wp = wp.add(4 * BLOCK);
                if !ROW_SCALES {
                    dp = dp.add(4);
                }
            }
            for (i, (o, a)) in quad.iter_mut().zip(acc).enumerate() {
                *o = if ROW_SCALES {
                    hsum(a) * *dp.add(i)
                } else {
                    hsum(a)
                };
            }
            if ROW_SCALES {
                dp = dp.add(4);
            }
        }
    }

    pub unsafe fn matvec_q4(
        w: super::Q4Slice,
        x: &[i8],
        dx: &[f32],
        xsum: &[i32],
        out: &mut [f32],
    ) {
        let ones = _mm256_set1_epi16(1);
        let low = _mm256_set1_epi8(15);
        let mut wp = w.nibbles.as_ptr();
        let mut dp = w.d.as_ptr();
        let mut mp = w.m.as_ptr();
        for quad in out.chunks_mut(4) {
            let mut acc = [_mm256_setzero_ps(); 4];
            let mut macc = _mm_setzero_ps();
            for (b, &d) in dx.iter().enumerate() {
                let vx = _mm256_loadu_si256(x.as_ptr().add(b * BLOCK) as *const __m256i);
                for (i, a) in acc.iter_mut().enumerate() {
                    let v = _mm_loadu_si128(wp.add(i * 16) as *const __m128i);
                    // Elements 0..16 from the low nibbles, 16..32 from the high ones.
                    let q = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), low);
                    let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q, vx), ones);
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*dp.add(i) * d), _mm256_cvtepi32_ps(p), *a);
                }
                // The minimums' term for the four rows at once: m * dx * sum(x).
                let sx = _mm_set1_ps(d * *xsum.get_unchecked(b) as f32);
                macc = _mm_fmadd_ps(_mm_loadu_ps(mp), sx, macc);
                wp = wp.add(64);
                dp = dp.add(4);
                mp = mp.add(4);
            }
            let mut mins = [0f32; 4];
            _mm_storeu_ps(mins.as_mut_ptr(), macc);
            for ((o, a), mv) in quad.iter_mut().zip(acc).zip(mins) {
                *o = hsum(a) + mv;
            }
        }
    }

    pub unsafe fn quad_matvec(m: &[i8], u: &[i8], acc: &mut [i32]) {
        let groups = u.len() / 4;
        // Each group's four values broadcast to every 32-bit lane, split into |u| and signs
        // (on the stack up to 16 groups).
        let broadcast = |c: &[i8]| {
            let v = _mm256_set1_epi32(i32::from_le_bytes([
                c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
            ]));
            (_mm256_sign_epi8(v, v), v)
        };
        let mut stack = [(_mm256_setzero_si256(), _mm256_setzero_si256()); 16];
        let heap: Vec<(__m256i, __m256i)>;
        let ug: &[(__m256i, __m256i)] = if groups <= stack.len() {
            for (slot, c) in stack.iter_mut().zip(u.chunks(4)) {
                *slot = broadcast(c);
            }
            &stack[..groups]
        } else {
            heap = u.chunks(4).map(broadcast).collect();
            &heap
        };
        let ones = _mm256_set1_epi16(1);
        let mut mp = m.as_ptr();
        for out in acc.chunks_mut(super::COLS) {
            // 16 columns: two independent sums of eight, over the groups in memory order.
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for &(au, su) in ug {
                let m0 = _mm256_loadu_si256(mp as *const __m256i);
                let m1 = _mm256_loadu_si256(mp.add(32) as *const __m256i);
                s0 = _mm256_add_epi32(
                    s0,
                    _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(m0, su)), ones),
                );
                s1 = _mm256_add_epi32(
                    s1,
                    _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(m1, su)), ones),
                );
                mp = mp.add(64);
            }
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, s0);
            _mm256_storeu_si256(out.as_mut_ptr().add(8) as *mut __m256i, s1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as f32 * 0.618 + seed as f32 * 1.7).sin() * 3.0).powi(3))
            .collect()
    }

    #[test]
    fn quantize_matches_plain_and_rounds_within_half_a_step() {
        let x = pseudo(96, 1);
        let (mut q1, mut d1) = (vec![0i8; 96], vec![0f32; 3]);
        let (mut q2, mut d2) = (vec![0i8; 96], vec![0f32; 3]);
        quantize_blocks(&x, &mut q1, &mut d1);
        quantize_blocks_plain(&x, &mut q2, &mut d2);
        assert_eq!(q1, q2);
        assert_eq!(d1, d2);
        for (i, xv) in x.iter().enumerate() {
            assert!((d1[i / BLOCK] * q1[i] as f32 - xv).abs() <= d1[i / BLOCK] * 0.5 + 1e-6);
        }
        // An all-zero block gets scale 0 and zeros, not NaN.
        let (mut q, mut d) = (vec![1i8; 32], vec![1f32; 1]);
        quantize_blocks(&[0.0; 32], &mut q, &mut d);
        assert_eq!((q, d), (vec![0i8; 32], vec![0.0]));
    }

    #[test]
    fn matvec_quads_matches_plain_and_float() {
        let (rows, k) = (8, 96);
        let w = pseudo(rows * k, 30);
        let x = pseudo(k, 31);
        let (mut wq, mut dw) = (vec![0i8; rows * k], vec![0f32; rows * k / BLOCK]);
        quantize_blocks(&w, &mut wq, &mut dw);
        let (mut xq, mut dx) = (vec![0i8; k], vec![0f32; k / BLOCK]);
        quantize_blocks(&x, &mut xq, &mut dx);
        let (wi, di) = interleave_row_quads(&wq, &dw, k);
        let (mut got, mut plain) = (vec![0f32; rows], vec![0f32; rows]);
        matvec_quads(&wi, &di, &xq, &dx, &mut got);
        matvec_quads_plain(&wi, &di, &xq, &dx, &mut plain);
        for r in 0..rows {
            // The same integer sums and scales, only summed in another order.
            assert!(
                (got[r] - plain[r]).abs() <= 1e-4 * plain[r].abs().max(1.0),
                "row {r}"
            );
            let row = &w[r * k..(r + 1) * k];
            let exact: f32 = row.iter().zip(&x).map(|(p, q)| p * q).sum();
            let norm = (row.iter().map(|v| v * v).sum::<f32>()
                * x.iter().map(|v| v * v).sum::<f32>())
            .sqrt();
            assert!(
                (got[r] - exact).abs() <= 0.02 * norm,
                "row {r}: {} vs {exact}",
                got[r]
            );
        }
    }

    #[test]
    fn matvec_q4_matches_plain_and_the_dequantized_rows() {
        let (rows, k) = (8, 64);
        let nb = k / BLOCK;
        // Raw GGML Q4_1 blocks built by hand: d, m as f16, then 16 nibble bytes.
        let mut raw = Vec::new();
        let mut dense = vec![0f32; rows * k];
        for r in 0..rows {
            for b in 0..nb {
                let (d, m) = (0.05 + 0.01 * r as f32, -0.3 + 0.1 * b as f32);
                let (dh, mh) = (half::f16::from_f32(d), half::f16::from_f32(m));
                raw.extend(dh.to_le_bytes());
                raw.extend(mh.to_le_bytes());
                let q: Vec<u8> = (0..BLOCK)
                    .map(|j| ((r * 7 + b * 3 + j * 5) % 16) as u8)
                    .collect();
                for j in 0..16 {
                    raw.push(q[j] | (q[j + 16] << 4));
                }
                for j in 0..BLOCK {
                    dense[r * k + b * BLOCK + j] = dh.to_f32() * q[j] as f32 + mh.to_f32();
                }
            }
        }
        let w = q4_1_quads(&raw, rows, k);
        let x = pseudo(k, 40);
        let (mut xq, mut dx) = (vec![0i8; k], vec![0f32; nb]);
        quantize_blocks(&x, &mut xq, &mut dx);
        let xsum: Vec<i32> = xq
            .chunks(BLOCK)
            .map(|c| c.iter().map(|&v| v as i32).sum())
            .collect();
        let (mut got, mut plain) = (vec![0f32; rows], vec![0f32; rows]);
        matvec_q4(w.rows(0, rows, nb), &xq, &dx, &xsum, &mut got);
        matvec_q4_plain(w.rows(0, rows, nb), &xq, &dx, &xsum, &mut plain);
        // The second half of the rows alone gives the same numbers.
        let mut half_rows = vec![0f32; 4];
        matvec_q4(w.rows(4, 4, nb), &xq, &dx, &xsum, &mut half_rows);
        assert_eq!(&half_rows[..], &got[4..]);
        for r in 0..rows {
            assert!(
                (got[r] - plain[r]).abs() <= 1e-4 * plain[r].abs().max(1.0),
                "row {r}"
            );
            // Against the dequantized row times the rounded x: only float summation order differs.
            let xr: Vec<f32> = (0..k).map(|i| dx[i / BLOCK] * xq[i] as f32).collect();
            let want: f32 = dense[r * k..(r + 1) * k]
                .iter()
                .zip(&xr)
                .map(|(p, q)| p * q)
                .sum();
            assert!(
                (got[r] - want).abs() <= 1e-4 * want.abs().max(1.0),
                "row {r}: {} vs {want}",
                got[r]
            );
        }
    }

    #[test]
    fn matvec_quads_rows_matches_the_per_block_kernel_with_repeated_scales() {
        let (rows, k) = (8, 96);
        let nb = k / BLOCK;
        let w: Vec<i8> = (0..rows * k)
            .map(|i| ((i * 53 % 255) as i32 - 127) as i8)
            .collect();
        let dw: Vec<f32> = (0..rows).map(|r| 0.01 * (r + 1) as f32).collect();
        let x = pseudo(k, 50);
        let (mut xq, mut dx) = (vec![0i8; k], vec![0f32; nb]);
        quantize_blocks(&x, &mut xq, &mut dx);
        let per_block: Vec<f32> = (0..rows * nb).map(|i| dw[i / nb]).collect();
        let (wi, di) = interleave_row_quads(&w, &per_block, k);
        let (mut got, mut want) = (vec![0f32; rows], vec![0f32; rows]);
        matvec_quads_rows(&wi, &dw, &xq, &dx, &mut got);
        matvec_quads_plain(&wi, &di, &xq, &dx, &mut want);
        for r in 0..rows {
            assert!(
                (got[r] - want[r]).abs() <= 1e-4 * want[r].abs().max(1.0),
                "row {r}"
            );
        }
    }

    #[test]
    fn quantize_rows_rounds_each_row_within_half_its_step() {
        let mut m = pseudo(3 * 40, 60);
        m[40..80].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
        let (q, d) = quantize_rows(&m, 40);
        assert_eq!(d[1], 0.0);
        assert!(q[40..80].iter().all(|&v| v == 0));
        for (i, v) in m.iter().enumerate() {
            assert!((d[i / 40] * q[i] as f32 - v).abs() <= d[i / 40] * 0.5 + 1e-6);
        }
        assert!(q.iter().any(|&v| v == 127 || v == -127));
    }

    #[test]
    fn quad_matvec_matches_plain_and_the_row_major_product() {
        // k = 80: more than the 16 groups of four kept on the stack.
        for (n, k) in [(16, 8), (48, 8), (32, 80)] {
            // Values in -127..=127, the range the quantizers produce.
            let u: Vec<i8> = (0..k)
                .map(|i| ((i * 37 % 255) as i32 - 127) as i8)
                .collect();
            let m: Vec<i8> = (0..k * n)
                .map(|i| (((i * 91 + 7) % 255) as i32 - 127) as i8)
                .collect();
            let quads = interleave_quads(&m, k, n);
            let (mut got, mut plain) = (vec![0i32; n], vec![0i32; n]);
            quad_matvec(&quads, &u, &mut got);
            quad_matvec_plain(&quads, &u, &mut plain);
            let want: Vec<i32> = (0..n)
                .map(|j| (0..k).map(|r| u[r] as i32 * m[r * n + j] as i32).sum())
                .collect();
            assert_eq!(got, want, "n = {n}, k = {k}");
            assert_eq!(plain, want, "n = {n}, k = {k}");
        }
    }
}
