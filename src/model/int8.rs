//! Int8 kernels for the experts' decode steps: a quarter of the bytes of f32 and, with AVX2,
//! 32 multiply-adds per instruction.
//!
//! Layouts (all row-major):
//! - a vector quantized in blocks of [`BLOCK`]: `q[i]` int8 and one f32 scale `d[i / BLOCK]`
//!   with `x[i] ~ d * q[i]` (as GGML's Q8_0, with the scale kept in f32): the activations;
//! - a matrix with one scale per row ([`quantize_rows`]): `A`, dotted with a block-quantized
//!   vector four rows at a time ([`dot4`]);
//! - a "quad-interleaved" matrix `(k, n)` for `y = M^T u` (`B^T`, [`quad_matvec`]) with `k` a multiple of 4: for each
//!   group of four rows and each column, the four int8 values side by side,
//!   `m[(g * n + j) * 4 + r] = M[4 g + r][j]`, so one 32-byte load holds 8 columns x 4 rows.
//!
//! Each kernel has a plain-Rust version, used without AVX2 and by the tests as the reference.

/// Quantization block of the activation and weight vectors.
pub const BLOCK: usize = 32;

/// Round `x` (length a multiple of [`BLOCK`]) to int8 in blocks: `q` gets the values, `d` the
/// per-block scales (`max |x| / 127`, 0 for an all-zero block).
pub fn quantize_blocks(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    debug_assert!(
        x.len().is_multiple_of(BLOCK) && q.len() == x.len() && d.len() == x.len() / BLOCK
    );
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the lengths are checked above and AVX2 is enabled at compile time.
        unsafe { avx2::quantize_blocks(x, q, d) }
    }
    #[cfg(not(target_feature = "avx2"))]
    quantize_blocks_plain(x, q, d)
}

/// [`quantize_blocks`] in plain Rust.
pub fn quantize_blocks_plain(x: &[f32], q: &mut [i8], d: &mut [f32]) {
    for ((xb, qb), db) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK)).zip(d.iter_mut()) {
        let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
        *db = amax / 127.0;
        let inv = if amax > 0.0 { 127.0 / amax } else { 0.0 };
        for (qv, xv) in qb.iter_mut().zip(xb) {
            *qv = (xv * inv).round_ties_even() as i8;
        }
    }
}

/// Four dot products sharing `x`: `da[r] * sum_i a_r[i] * (dx[i/B] * x[i])` for int8 rows `a_r`
/// with one scale each (`da[r]`) and a block-quantized `x`.
pub fn dot4(a: [&[i8]; 4], da: [f32; 4], x: &[i8], dx: &[f32]) -> [f32; 4] {
    debug_assert!(a.iter().all(|r| r.len() == x.len()) && x.len() == dx.len() * BLOCK);
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: equal lengths, a multiple of the block, checked above; AVX2 at compile time.
        unsafe { avx2::dot4(a, da, x, dx) }
    }
    #[cfg(not(target_feature = "avx2"))]
    dot4_plain(a, da, x, dx)
}

/// [`dot4`] in plain Rust.
pub fn dot4_plain(a: [&[i8]; 4], da: [f32; 4], x: &[i8], dx: &[f32]) -> [f32; 4] {
    let mut out = [0f32; 4];
    for (o, (row, d)) in out.iter_mut().zip(a.iter().zip(da)) {
        let s: f32 = row
            .chunks(BLOCK)
            .zip(x.chunks(BLOCK))
            .zip(dx)
            .map(|((rb, xb), t)| {
                t * rb
                    .iter()
                    .zip(xb)
                    .map(|(&p, &q)| p as i32 * q as i32)
                    .sum::<i32>() as f32
            })
            .sum();
        *o = d * s;
    }
    out
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
    let (mut qo, mut dout) = (vec![0i8; q.len()], vec![0f32; d.len()]);
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

/// [`matvec_quads`] in plain Rust.
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
        nibbles: vec![0u8; rows * nb * 16],
        d: vec![0f32; rows * nb],
        m: vec![0f32; rows * nb],
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

/// [`matvec_q4`] in plain Rust.
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

/// Round each row of `m` `(rows, n)` to int8 with one scale per row (`max |row| / 127`).
pub fn quantize_rows(m: &[f32], n: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = vec![0i8; m.len()];
    let mut d = vec![0f32; m.len() / n.max(1)];
    for ((row, qr), dr) in m.chunks(n).zip(q.chunks_mut(n)).zip(d.iter_mut()) {
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

/// Interleave a row-major int8 matrix `(k, n)` (`k` a multiple of 4) into the quad layout.
pub fn interleave_quads(m: &[i8], k: usize, n: usize) -> Vec<i8> {
    debug_assert!(k.is_multiple_of(4) && m.len() == k * n);
    let mut out = vec![0i8; k * n];
    for g in 0..k / 4 {
        for j in 0..n {
            for r in 0..4 {
                out[(g * n + j) * 4 + r] = m[(4 * g + r) * n + j];
            }
        }
    }
    out
}

/// `acc[j] = sum_r u[r] * M[r][j]` in int32 for a quad-interleaved `m` `(u.len(), acc.len())`.
pub fn quad_matvec(m: &[i8], u: &[i8], acc: &mut [i32]) {
    debug_assert!(u.len().is_multiple_of(4) && m.len() == u.len() * acc.len());
    #[cfg(target_feature = "avx2")]
    {
        // SAFETY: the lengths are checked above; AVX2 is enabled at compile time.
        unsafe { avx2::quad_matvec(m, u, acc) }
    }
    #[cfg(not(target_feature = "avx2"))]
    quad_matvec_plain(m, u, acc)
}

/// [`quad_matvec`] in plain Rust.
pub fn quad_matvec_plain(m: &[i8], u: &[i8], acc: &mut [i32]) {
    let n = acc.len();
    acc.fill(0);
    for (g, ug) in u.chunks(4).enumerate() {
        for (j, a) in acc.iter_mut().enumerate() {
            let mq = &m[(g * n + j) * 4..(g * n + j + 1) * 4];
            *a += mq
                .iter()
                .zip(ug)
                .map(|(&p, &q)| p as i32 * q as i32)
                .sum::<i32>();
        }
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

    pub unsafe fn dot4(a: [&[i8]; 4], da: [f32; 4], x: &[i8], dx: &[f32]) -> [f32; 4] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        for (b, &d) in dx.iter().enumerate() {
            let vx = _mm256_loadu_si256(x.as_ptr().add(b * BLOCK) as *const __m256i);
            // |x| once for the four rows; each row takes x's signs.
            let ax = _mm256_sign_epi8(vx, vx);
            let vd = _mm256_set1_ps(d);
            for r in 0..4 {
                let va = _mm256_loadu_si256(a[r].as_ptr().add(b * BLOCK) as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(va, vx)), ones);
                acc[r] = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(p), acc[r]);
            }
        }
        [
            da[0] * hsum(acc[0]),
            da[1] * hsum(acc[1]),
            da[2] * hsum(acc[2]),
            da[3] * hsum(acc[3]),
        ]
    }

    pub unsafe fn matvec_quads(w: &[i8], dw: &[f32], x: &[i8], dx: &[f32], out: &mut [f32]) {
        let nb = dx.len();
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
                    *a = _mm256_fmadd_ps(_mm256_set1_ps(*dp.add(i) * d), _mm256_cvtepi32_ps(p), *a);
                }
                wp = wp.add(4 * BLOCK);
                dp = dp.add(4);
            }
            for (o, a) in quad.iter_mut().zip(acc) {
                *o = hsum(a);
            }
        }
        let _ = nb;
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
        let n = acc.len();
        let groups = u.len() / 4;
        // Each group's four values broadcast to every 32-bit lane, split into |u| and signs.
        let ug: Vec<(__m256i, __m256i)> = u
            .chunks(4)
            .map(|c| {
                let v = _mm256_set1_epi32(i32::from_le_bytes([
                    c[0] as u8, c[1] as u8, c[2] as u8, c[3] as u8,
                ]));
                (_mm256_sign_epi8(v, v), v)
            })
            .collect();
        let ones = _mm256_set1_epi16(1);
        let term = |g: usize, j: usize| {
            let (au, su) = ug[g];
            let vm = _mm256_loadu_si256(m.as_ptr().add((g * n + j) * 4) as *const __m256i);
            _mm256_madd_epi16(_mm256_maddubs_epi16(au, _mm256_sign_epi8(vm, su)), ones)
        };
        let mut j = 0;
        // 16 columns a step: two independent sums.
        while j + 16 <= n {
            let (mut s0, mut s1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            for g in 0..groups {
                s0 = _mm256_add_epi32(s0, term(g, j));
                s1 = _mm256_add_epi32(s1, term(g, j + 8));
            }
            _mm256_storeu_si256(acc.as_mut_ptr().add(j) as *mut __m256i, s0);
            _mm256_storeu_si256(acc.as_mut_ptr().add(j + 8) as *mut __m256i, s1);
            j += 16;
        }
        while j + 8 <= n {
            let mut s = _mm256_setzero_si256();
            for g in 0..groups {
                s = _mm256_add_epi32(s, term(g, j));
            }
            _mm256_storeu_si256(acc.as_mut_ptr().add(j) as *mut __m256i, s);
            j += 8;
        }
        for (jj, a) in acc.iter_mut().enumerate().skip(j) {
            *a = (0..groups)
                .map(|g| {
                    (0..4)
                        .map(|r| m[(g * n + jj) * 4 + r] as i32 * u[4 * g + r] as i32)
                        .sum::<i32>()
                })
                .sum();
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
    fn dot4_matches_plain_and_float() {
        let rows: Vec<Vec<f32>> = (0..4).map(|r| pseudo(96, 10 + r)).collect();
        let x = pseudo(96, 20);
        let (mut xq, mut dx) = (vec![0i8; 96], vec![0f32; 3]);
        quantize_blocks(&x, &mut xq, &mut dx);
        let q: Vec<(Vec<i8>, Vec<f32>)> = rows.iter().map(|r| quantize_rows(r, 96)).collect();
        let a = [&q[0].0[..], &q[1].0[..], &q[2].0[..], &q[3].0[..]];
        let da = [q[0].1[0], q[1].1[0], q[2].1[0], q[3].1[0]];
        let got = dot4(a, da, &xq, &dx);
        let plain = dot4_plain(a, da, &xq, &dx);
        for r in 0..4 {
            assert!((got[r] - plain[r]).abs() <= 1e-3 * plain[r].abs().max(1.0));
            let exact: f32 = rows[r].iter().zip(&x).map(|(p, q)| p * q).sum();
            let norm = (rows[r].iter().map(|v| v * v).sum::<f32>()
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
    fn quad_matvec_matches_plain_and_the_row_major_product() {
        for n in [8, 13, 40] {
            // Values in -127..=127, the range the quantizers produce.
            let k = 8;
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
            assert_eq!(got, want, "n = {n}");
            assert_eq!(plain, want, "n = {n}");
        }
    }
}
