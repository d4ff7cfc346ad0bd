//! Per-session key/value cache. Owned by a session, never by the model.

use candle_core::{Result, Tensor};

/// One layer's keys and values: buffers of `cap` positions, `len` of them filled.
#[derive(Debug)]
struct LayerKv {
    k: Tensor, // (b, n_kv_head, cap, head_dim)
    v: Tensor,
    len: usize,
}

/// Keys and values of every layer for the tokens fed so far, for `rows` batch rows.
///
/// Buffers grow by doubling, so a decode step copies one position, not the whole history.
#[derive(Debug)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
}

impl KvCache {
    /// An empty cache for a model of `n_layer` layers.
    pub fn new(n_layer: usize) -> Self {
        KvCache {
            layers: (0..n_layer).map(|_| None).collect(),
        }
    }

    /// Number of positions cached (the next token's position).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |l| l.len)
    }

    /// True when nothing has been fed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Batch rows held (0 when empty).
    pub fn rows(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .and_then(|l| l.k.dim(0).ok())
            .unwrap_or(0)
    }

    /// Forget everything.
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }

    /// Roll back to the first `len` positions (a shared prompt prefix, say).
    pub fn truncate(&mut self, len: usize) {
        for l in self.layers.iter_mut().flatten() {
            l.len = l.len.min(len);
        }
    }

    /// A deep copy: the fork can be extended without touching this cache.
    pub fn fork(&self) -> Result<Self> {
        self.copy_layers(|t, _| t.copy())
    }

    /// A deep copy holding only the filled positions (no spare capacity): what a store of
    /// caches keeps. Extending it reallocates, so it never writes into the copy's buffers.
    pub fn compact(&self) -> Result<Self> {
        self.copy_layers(|t, len| owned(&t.narrow(2, 0, len)?))
    }

    /// Every layer's keys and values copied by `copy(buffer, filled positions)`.
    fn copy_layers(&self, copy: impl Fn(&Tensor, usize) -> Result<Tensor>) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        Ok(LayerKv {
                            k: copy(&l.k, l.len)?,
                            v: copy(&l.v, l.len)?,
                            len: l.len,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers })
    }

    /// Bytes held by the buffers (their filled shape).
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(|l| (l.k.elem_count() + l.v.elem_count()) * l.k.dtype().size_in_bytes())
            .sum()
    }

    /// Append `k`, `v` `(b, n_kv_head, t, head_dim)` to layer `layer`; returns all keys and
    /// values cached for it, `(b, n_kv_head, len, head_dim)`.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = k.dim(2)?;
        let slot = &mut self.layers[layer];
        let need = slot.as_ref().map_or(0, |l| l.len) + t;
        let cap = slot.as_ref().map_or(0, |l| l.k.dim(2).unwrap_or(0));
        if slot.is_none() || need > cap {
            let new_cap = need.max(2 * cap).max(128).next_power_of_two();
            let (b, h, _, d) = k.dims4()?;
            let nk = Tensor::zeros((b, h, new_cap, d), k.dtype(), k.device())?;
            let nv = Tensor::zeros((b, h, new_cap, d), v.dtype(), v.device())?;
            let len = match slot.take() {
                Some(old) => {
                    if old.len > 0 {
                        nk.slice_set(&old.k.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                        nv.slice_set(&old.v.narrow(2, 0, old.len)?.contiguous()?, 2, 0)?;
                    }
                    old.len
                }
                None => 0,
            };
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let l = slot.as_mut().expect("slot filled above");
        l.k.slice_set(&k.contiguous()?, 2, l.len)?;
        l.v.slice_set(&v.contiguous()?, 2, l.len)?;
        l.len += t;
        Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?))
    }
}

/// A copy of `t` in storage of its own (`contiguous` alone may share a contiguous view's).
fn owned(t: &Tensor) -> Result<Tensor> {
    if t.is_contiguous() {
        t.copy()
    } else {
        t.contiguous()
    }
}
