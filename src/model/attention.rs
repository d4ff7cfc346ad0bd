//! Attention of one new token over the cached keys and values, as one op.
//!
//! The general path (`repeat_kv`, `q @ k^T`, scale, softmax, `@ v`, transpose) is eight candle
//! ops a layer, and `repeat_kv` copies the whole cache for every token; for a decode step the
//! arithmetic is tiny (9 heads x ~100 positions x 64), so the ops cost more than the math. This
//! reads the cache in place, shares each key/value head among its query heads (GQA) without
//! copying, and writes the output straight in the `(b, 1, heads * head_dim)` layout the output
//! projection takes. No gradients: it serves inference passes of one token.

use candle_core::{bail, CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::dot;

/// `softmax(q k^T * scale) v` for `q` `(b, n_head, 1, hd)` and `k`, `v` `(b, n_kv_head, len,
/// hd)` (any strides, e.g. views into the KV cache); returns `(b, 1, n_head * hd)`.
pub fn decode_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f32) -> Result<Tensor> {
    q.apply_op3_no_bwd(k, v, &DecodeAttention { scale })
}

struct DecodeAttention {
    scale: f32,
}

/// The f32 data of a storage, or an error naming the op.
fn f32s(s: &CpuStorage) -> Result<&[f32]> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => bail!("decode-attention: expects f32 tensors"),
    }
}

/// Index of element `[i0, i1, i2, 0]` of a rank-4 layout whose last dimension is contiguous.
fn at(l: &Layout, i0: usize, i1: usize, i2: usize) -> usize {
    let s = l.stride();
    l.start_offset() + i0 * s[0] + i1 * s[1] + i2 * s[2]
}

impl CustomOp3 for DecodeAttention {
    fn name(&self) -> &'static str {
        "decode-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, nh, t, hd) = ql.shape().dims4()?;
        let (kb, nkv, len, khd) = kl.shape().dims4()?;
        if t != 1 || kb != b || khd != hd || vl.shape() != kl.shape() {
            bail!(
                "decode-attention: q {:?}, k {:?}, v {:?} do not fit (one query position, same rows and head size)",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        if nkv == 0 || nh % nkv != 0 || len == 0 {
            bail!("decode-attention: {nh} query heads over {nkv} key heads and {len} positions");
        }
        if [ql, kl, vl].iter().any(|l| l.stride()[3] != 1) {
            bail!("decode-attention: the head dimension must be contiguous");
        }
        let (q, k, v) = (f32s(qs)?, f32s(ks)?, f32s(vs)?);
        let rep = nh / nkv;
        let mut out = vec![0f32; b * nh * hd];
        let mut p = vec![0f32; len];
        for bi in 0..b {
            for h in 0..nh {
                let kvh = h / rep;
                let qh = &q[at(ql, bi, h, 0)..][..hd];
                let mut max = f32::NEG_INFINITY;
                for (j, pj) in p.iter_mut().enumerate() {
                    let kj = &k[at(kl, bi, kvh, j)..][..hd];
                    *pj = dot(qh, kj) * self.scale;
                    max = max.max(*pj);
                }
                let mut sum = 0f32;
                for pj in p.iter_mut() {
                    *pj = (*pj - max).exp();
                    sum += *pj;
                }
                let o = &mut out[(bi * nh + h) * hd..][..hd];
                for (j, pj) in p.iter().enumerate() {
                    let w = pj / sum;
                    let vj = &v[at(vl, bi, kvh, j)..][..hd];
                    for (oi, vi) in o.iter_mut().zip(vj) {
                        *oi += w * vi;
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((b, 1, nh * hd))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    #[test]
    fn matches_repeat_kv_softmax_attention_on_cache_views() {
        // Reference: the general path (repeat_kv, matmul, softmax, matmul), on a narrowed view
        // of a larger buffer like the KV cache's.
        for len in 1..70 {
            let (b, nh, nkv, cap, hd) = (1, 9, 3, 128, 64);
            let seed = 3 * len as u64;
            let q = crate::model::tiny::seeded_randn(seed, 1., &[b, nh, 1, hd]).unwrap();
            let kbuf = crate::model::tiny::seeded_randn(seed + 1, 1., &[b, nkv, cap, hd]).unwrap();
            let vbuf = crate::model::tiny::seeded_randn(seed + 2, 1., &[b, nkv, cap, hd]).unwrap();
            let (k, v) = (
                kbuf.narrow(2, 0, len).unwrap(),
                vbuf.narrow(2, 0, len).unwrap(),
            );
            let scale = 1.0 / (hd as f32).sqrt();
            let got = decode_attention(&q, &k, &v, scale).unwrap();
            let rep = nh / nkv;
            let kr = candle_transformers::utils::repeat_kv(k.contiguous().unwrap(), rep).unwrap();
            let vr = candle_transformers::utils::repeat_kv(v.contiguous().unwrap(), rep).unwrap();
            let att = (q.matmul(&kr.t().unwrap()).unwrap() * scale as f64).unwrap();
            let att = candle_nn::ops::softmax(&att, D::Minus1).unwrap();
            let want = att
                .matmul(&vr.contiguous().unwrap())
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .reshape((b, 1, nh * hd))
                .unwrap();
            let diff = (got - want)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(diff < 1e-5, "len {len}: max difference {diff}");
        }
    }

    #[test]
    fn rejects_shapes_that_do_not_fit() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 2, 8), candle_core::DType::F32, &dev).unwrap();
        let k = Tensor::zeros((1, 2, 5, 8), candle_core::DType::F32, &dev).unwrap();
        let e = decode_attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(e.contains("decode-attention"), "{e}");
    }
}
