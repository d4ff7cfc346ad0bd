//! Experts: adapters stacked per linear so all of them cost one pair of small matmuls,
//! and the hook that adds `sum_i g_i * s_i * B_i (A_i x)` with gate weights per batch row.

use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};

use super::Adapter;
use crate::model::int8::{self, Shared};
use crate::model::{dot, HookResult, LinearHook, QuantizedRows, SideOutput, SideWork, Target};
use crate::{Error, Result};

/// The experts of every adaptable linear, stacked: `A_cat^T` `(in, R)` and `B_cat^T` `(R, out)`,
/// as tensors for prompts and as plain row-major arrays for the decode fast path.
#[derive(Debug)]
struct Stack {
    a_t: Tensor,
    b_t: Tensor,
    /// `A_cat` `(R, in)` row-major.
    a: Vec<f32>,
    /// `B_cat^T` `(R, out)` row-major.
    b: Vec<f32>,
    n_in: usize,
    n_out: usize,
    /// `(expert index, column offset, rank)` for each expert in the stack.
    spans: Vec<(usize, usize, usize)>,
    width: usize,
    /// Int8 copies for decode steps of a quantized base; `None` for shapes the int8 kernels do
    /// not take (see [`Int8Stack::new`]).
    int8: Option<Int8Stack>,
}

/// The int8 form of a [`Stack`], a quarter of its bytes, one part per expert (see [`int8`]),
/// and with several experts all of them stacked as one part too: the usual blend has every
/// expert on, and one pass over the stack is less work a token than one per expert.
#[derive(Debug)]
struct Int8Stack {
    spans: Vec<Int8Span>,
    all: Option<Int8Span>,
}

/// One expert's `A` and `B` in int8, its rank padded with zero rows to a multiple of 4.
#[derive(Debug)]
struct Int8Span {
    /// The first of its columns in a gate-scale row of the stack, and how many.
    off: usize,
    rank: usize,
    /// `rank` padded to a multiple of 4.
    rows: usize,
    /// `A` `(rows, in)` in int8 with one scale per row, packed for [`int8::matvec_quads_rows`].
    a: Shared<i8>,
    a_scale: Vec<f32>,
    /// `B^T` `(rows, out)` laid out for [`int8::quad_matvec`], one scale per row.
    b: Shared<i8>,
    b_scale: Vec<f32>,
}

impl Int8Stack {
    /// `None` when `in` is not a multiple of the 32-wide block or `out` of the 16 columns
    /// [`int8::quad_matvec`] takes a step.
    fn new(
        a: &[f32],
        b: &[f32],
        n_in: usize,
        n_out: usize,
        spans: &[(usize, usize, usize)],
    ) -> Option<Self> {
        if !n_in.is_multiple_of(int8::BLOCK) || !n_out.is_multiple_of(int8::COLS) {
            return None;
        }
        let width = spans
            .iter()
            .map(|&(_, off, rank)| off + rank)
            .max()
            .unwrap_or(0);
        let all = (spans.len() > 1).then(|| Int8Span::new(a, b, n_in, n_out, 0, width));
        let spans = spans
            .iter()
            .map(|&(_, off, rank)| Int8Span::new(a, b, n_in, n_out, off, rank))
            .collect();
        Some(Int8Stack { spans, all })
    }

    /// The parts to run for one token row whose stacked column scales are `scale` (one per rank
    /// column, `g_i s_i` over each expert's span): the stacked part when every expert is on,
    /// else each active expert's own; each with its per-row scales (padded rows 0).
    fn plan(&self, scale: &[f32]) -> Vec<(&Int8Span, Vec<f32>)> {
        let row_scales = |sp: &Int8Span| {
            let mut v = scale[sp.off..sp.off + sp.rank].to_vec();
            v.resize(sp.rows, 0.0);
            v
        };
        match &self.all {
            Some(all) if self.spans.iter().all(|sp| scale[sp.off] != 0.0) => {
                vec![(all, row_scales(all))]
            }
            _ => self
                .spans
                .iter()
                .filter(|sp| scale[sp.off] != 0.0)
                .map(|sp| (sp, row_scales(sp)))
                .collect(),
        }
    }
}

impl Int8Span {
    /// Rows `off..off + rank` of the stacked `A` `(R, in)` and `B^T` `(R, out)`: rank padded with
    /// zero rows to a multiple of 4; one scale per row of `A` and of `B^T` (each rank component's
    /// direction). `B`'s row scales are folded into `h` before it is rounded, so the product
    /// needs no per-output scales.
    fn new(a: &[f32], b: &[f32], n_in: usize, n_out: usize, off: usize, rank: usize) -> Self {
        let rows = rank.next_multiple_of(4);
        let padded = |m: &[f32], n: usize| {
            let mut v = m[off * n..(off + rank) * n].to_vec();
            v.resize(rows * n, 0.0);
            v
        };
        let (aq, a_scale) = int8::quantize_rows(&padded(a, n_in), n_in);
        let (bq, b_scale) = int8::quantize_rows(&padded(b, n_out), n_out);
        let nb = n_in / int8::BLOCK;
        let (aq, _) = int8::interleave_row_quads(&aq, &vec![0f32; rows * nb], n_in);
        Int8Span {
            off,
            rank,
            rows,
            a: aq.into(),
            a_scale,
            b: int8::interleave_quads(&bq, rows, n_out).into(),
            b_scale,
        }
    }
}

/// How the experts' deltas of decode steps (a few token rows) are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpertPrecision {
    /// f32 throughout: exact to float rounding (the reference; used with an f32 base).
    F32,
    /// Int8 weights and activations with f32 scales (as the Q8_0 base itself): used with a
    /// quantized base, where it is within the base's own rounding and costs a quarter of the bytes.
    Int8,
}

/// The named experts an engine holds. Immutable once built; shared by all sessions.
#[derive(Debug)]
pub struct ExpertSet {
    adapters: Vec<Adapter>,
    names: Vec<String>,
    stacks: HashMap<(usize, Target), Stack>,
    /// Steering experts' directions by block: (expert index, direction, `hidden` values).
    steer: BTreeMap<usize, Vec<(usize, Vec<f32>)>>,
}

impl ExpertSet {
    /// No experts: only the base model.
    pub fn empty() -> Self {
        ExpertSet {
            adapters: Vec::new(),
            names: Vec::new(),
            stacks: HashMap::new(),
            steer: BTreeMap::new(),
        }
    }

    /// Stack `adapters` as experts; names (stance or directory) must be unique.
    pub fn new(adapters: Vec<Adapter>) -> Result<Self> {
        let names: Vec<String> = adapters.iter().map(Adapter::name).collect();
        for (i, n) in names.iter().enumerate() {
            if names[..i].contains(n) {
                return Err(Error::setting(
                    "adapters",
                    format!("two experts are named '{n}': give each adapter a distinct stance or directory name"),
                ));
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
            let (n_out, n_in) = (b_t.dim(1)?, a_cat.dim(1)?);
            let a: Vec<f32> = a_cat.flatten_all()?.to_vec1()?;
            let b: Vec<f32> = b_t.flatten_all()?.to_vec1()?;
            stacks.insert(
                key,
                Stack {
                    int8: Int8Stack::new(&a, &b, n_in, n_out, &spans),
                    a,
                    b,
                    a_t: a_cat.t()?.contiguous()?,
                    b_t,
                    n_in,
                    n_out,
                    spans,
                    width: off,
                },
            );
        }
        // The int8 copies into one large huge-page buffer, in the order a decode step reads
        // them (layer, then Q, K, V, O, gate, up, down; the stacked part first, then each
        // expert's; A then B).
        let mut by_key: Vec<(&(usize, Target), &mut Stack)> = stacks.iter_mut().collect();
        by_key.sort_by_key(|(k, _)| **k);
        let mut parts = Vec::new();
        for (_, stack) in by_key {
            if let Some(q) = &mut stack.int8 {
                for sp in q.all.iter_mut().chain(q.spans.iter_mut()) {
                    parts.push(&mut sp.a);
                    parts.push(&mut sp.b);
                }
            }
        }
        int8::pack_shared(parts);
        let mut steer: BTreeMap<usize, Vec<(usize, Vec<f32>)>> = BTreeMap::new();
        for (i, ad) in adapters.iter().enumerate() {
            for (layer, v) in &ad.steer {
                steer.entry(*layer).or_default().push((i, v.to_vec1()?));
            }
        }
        Ok(ExpertSet {
            adapters,
            names,
            stacks,
            steer,
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

    /// A hook for a batch whose row `r` uses gate weights `rows[r]` (one per expert), exact in
    /// f32 ([`ExpertPrecision::F32`]).
    pub fn hook<'a>(&'a self, rows: &'a [Vec<f32>]) -> Result<ExpertHook<'a>> {
        self.hook_with(rows, ExpertPrecision::F32)
    }

    /// [`ExpertSet::hook`] with the decode steps' arithmetic chosen by `precision`. Passes of
    /// more than a few token rows (prompts) are f32 either way.
    pub fn hook_with<'a>(
        &'a self,
        rows: &'a [Vec<f32>],
        precision: ExpertPrecision,
    ) -> Result<ExpertHook<'a>> {
        for (i, g) in rows.iter().enumerate() {
            if g.len() != self.len() {
                return Err(Error::mismatch(
                    "gate weights",
                    format!("row {i} has {} weights for {} experts", g.len(), self.len()),
                ));
            }
        }
        Ok(ExpertHook {
            set: self,
            rows,
            precision,
        })
    }
}

/// Adds each row's blended expert deltas to a linear's output. Rows whose gate weights are all
/// zero get exactly the base output.
pub struct ExpertHook<'a> {
    set: &'a ExpertSet,
    rows: &'a [Vec<f32>],
    precision: ExpertPrecision,
}

/// The int8 expert work of one decode-step linear, run inside the base matmul's dispatch: one
/// item per (token row, active expert).
struct ExpertSideWork<'a> {
    n_out: usize,
    /// (token row, part, its per-row scales).
    items: Vec<(usize, &'a Int8Span, Vec<f32>)>,
}

impl SideWork for ExpertSideWork<'_> {
    fn items(&self) -> usize {
        self.items.len()
    }

    fn run(&self, item: usize, x: &QuantizedRows) -> Option<SideOutput> {
        let (row, sp, scales) = self.items.get(item)?;
        let (xq, dx) = x.row(*row);
        let (scale, sums) = span_sums(sp, scales, xq, dx, self.n_out)?;
        Some(SideOutput {
            row: *row,
            scale,
            sums,
        })
    }
}

/// A part's `B diag(scales) (A x)` for an int8-rounded row `x`, as int32 sums and their scale
/// (`None` when it is zero): `h = A x` by the base weights' kernel, `u = scales * h` times `B`'s
/// row scales rounded to int8 with one scale, then `B^T u` in int32 sums.
fn span_sums(
    sp: &Int8Span,
    scales: &[f32],
    xq: &[i8],
    dx: &[f32],
    n_out: usize,
) -> Option<(f32, Vec<i32>)> {
    // h and u on the stack for ranks up to 64 (this runs ~400 times a decoded token).
    const STACK: usize = 64;
    let (mut h_stack, mut h_heap) = ([0f32; STACK], Vec::new());
    let h: &mut [f32] = if sp.rows <= STACK {
        &mut h_stack[..sp.rows]
    } else {
        h_heap.resize(sp.rows, 0.0);
        &mut h_heap
    };
    int8::matvec_quads_rows(&sp.a, &sp.a_scale, xq, dx, h);
    for ((v, d), se) in h.iter_mut().zip(&sp.b_scale).zip(scales) {
        *v *= se * d;
    }
    let amax = h.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax == 0.0 {
        return None;
    }
    let (mut u_stack, mut u_heap) = ([0i8; STACK], Vec::new());
    let u: &mut [i8] = if sp.rows <= STACK {
        &mut u_stack[..sp.rows]
    } else {
        u_heap.resize(sp.rows, 0);
        &mut u_heap
    };
    for (q, v) in u.iter_mut().zip(h.iter()) {
        *q = (v * 127.0 / amax).round() as i8;
    }
    let mut acc = vec![0i32; n_out];
    int8::quad_matvec(&sp.b, u, &mut acc);
    Some((amax / 127.0, acc))
}

impl LinearHook for ExpertHook<'_> {
    /// Steering experts: row `r` gets `sum_i g[r][i] * v_i` added after this block.
    fn after_block(&self, layer: usize, x: Tensor) -> candle_core::Result<Tensor> {
        let Some(dirs) = self.set.steer.get(&layer) else {
            return Ok(x);
        };
        let (b, _, hidden) = x.dims3()?;
        let mut add = vec![0f32; b * hidden];
        let mut any = false;
        for (r, g) in self.rows.iter().enumerate() {
            for (i, v) in dirs {
                if g[*i] != 0.0 {
                    any = true;
                    for (o, d) in add[r * hidden..(r + 1) * hidden].iter_mut().zip(v) {
                        *o += g[*i] * d;
                    }
                }
            }
        }
        if !any {
            return Ok(x);
        }
        let add = Tensor::from_vec(add, (b, 1, hidden), x.device())?;
        x.broadcast_add(&add)
    }

    fn side_work(
        &self,
        layer: usize,
        target: Target,
        x: &Tensor,
    ) -> candle_core::Result<Option<Box<dyn SideWork + '_>>> {
        if self.precision != ExpertPrecision::Int8 {
            return Ok(None);
        }
        let Some(stack) = self.set.stacks.get(&(layer, target)) else {
            return Ok(None);
        };
        let Some(q) = &stack.int8 else {
            return Ok(None);
        };
        let (b, t, _) = x.dims3()?;
        if b != self.rows.len() || b * t > SIDE_ROWS {
            return Ok(None);
        }
        let mut items = Vec::new();
        let mut scale = vec![0f32; stack.width];
        for row in 0..b * t {
            let g = &self.rows[row / t];
            for &(e, off, rank) in &stack.spans {
                scale[off..off + rank].fill(g[e] * self.set.adapters[e].scale() as f32);
            }
            items.extend(q.plan(&scale).into_iter().map(|(sp, s)| (row, sp, s)));
        }
        if items.is_empty() {
            return Ok(None);
        }
        Ok(Some(Box::new(ExpertSideWork {
            n_out: stack.n_out,
            items,
        })))
    }

    fn after_linear(&self, layer: usize, target: Target, x: &Tensor, y: Tensor) -> HookResult {
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
            if let (ExpertPrecision::Int8, Some(q)) = (self.precision, &stack.int8) {
                return int8_delta(stack, q, &scale, x, y);
            }
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

/// Up to this many token rows (decode steps, short prompts) the int8 experts run inside the
/// base matmul's dispatch, one item per row and expert; wider passes use candle's matmuls.
const SIDE_ROWS: usize = 16;

/// Up to this many token rows (decode), the delta is computed in plain loops over the stacked
/// arrays: for one token the candle path's six small ops per linear cost more than the math.
const FAST_ROWS: usize = 4;

/// `y + (scale * (x A_cat^T)) B_cat^T` for a few rows, skipping experts whose scale is zero.
/// The rank rows with a non-zero scale are shared among candle's worker threads (each adds its
/// part into its own buffer; the buffers are summed after): during a decode step those threads
/// would otherwise wait while one core does all the experts' arithmetic.
fn fast_delta(stack: &Stack, scale: &[f32], x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
    let (b, t, n_in) = x.dims3()?;
    let (r_all, n_out) = (stack.width, stack.n_out);
    debug_assert_eq!(n_in, stack.n_in);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let shape = y.shape().clone();
    let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
    // (token row, rank row) pairs with a non-zero scale: the work to share.
    let work: Vec<(usize, usize)> = (0..b * t)
        .flat_map(|row| {
            let s = &scale[(row / t) * r_all..(row / t + 1) * r_all];
            (0..r_all)
                .filter(move |&j| s[j] != 0.0)
                .map(move |j| (row, j))
        })
        .collect();
    let add = |part: &[(usize, usize)], out: &mut [f32]| {
        for &(row, j) in part {
            let s = scale[(row / t) * r_all + j];
            let h = dot(
                &stack.a[j * n_in..(j + 1) * n_in],
                &xs[row * n_in..(row + 1) * n_in],
            ) * s;
            let yr = &mut out[row * n_out..(row + 1) * n_out];
            for (yo, bo) in yr.iter_mut().zip(&stack.b[j * n_out..(j + 1) * n_out]) {
                *yo += h * bo;
            }
        }
    };
    let pool = candle_core::utils::barrier_pool();
    let threads = pool_threads();
    if threads < 2 || work.len() < 2 * threads {
        add(&work, &mut ys);
    } else {
        let part = work.len().div_ceil(threads);
        let parts: Vec<std::sync::Mutex<Vec<f32>>> = (0..threads)
            .map(|_| std::sync::Mutex::new(vec![0f32; ys.len()]))
            .collect();
        pool.execute(|tid| {
            let lo = (tid * part).min(work.len());
            let hi = ((tid + 1) * part).min(work.len());
            if let Ok(mut buf) = parts[tid].lock() {
                add(&work[lo..hi], &mut buf);
            }
        });
        for p in parts {
            let p = p
                .into_inner()
                .map_err(|_| candle_core::Error::Msg("expert worker panicked".into()))?;
            for (yo, v) in ys.iter_mut().zip(p) {
                *yo += v;
            }
        }
    }
    Tensor::from_vec(ys, shape, x.device())
}

/// [`fast_delta`] in int8 ([`span_sums`] per token row and active expert), on the calling
/// thread. Decode steps over our int8 base weights do the same work inside the base matmul's
/// dispatch instead ([`ExpertHook::side_work`]); this serves the other weight types and direct
/// calls.
fn int8_delta(
    stack: &Stack,
    q: &Int8Stack,
    scale: &[f32],
    x: &Tensor,
    y: Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t, n_in) = x.dims3()?;
    let (r_all, n_out) = (stack.width, stack.n_out);
    let xs = x.flatten_all()?.to_vec1::<f32>()?;
    let shape = y.shape().clone();
    let mut ys = y.flatten_all()?.to_vec1::<f32>()?;
    let (mut xq, mut dx) = (vec![0i8; n_in], vec![0f32; n_in / int8::BLOCK]);
    for row in 0..b * t {
        int8::quantize_blocks(&xs[row * n_in..(row + 1) * n_in], &mut xq, &mut dx);
        for (sp, scales) in q.plan(&scale[(row / t) * r_all..(row / t + 1) * r_all]) {
            if let Some((du, sums)) = span_sums(sp, &scales, &xq, &dx, n_out) {
                for (yo, &a) in ys[row * n_out..(row + 1) * n_out].iter_mut().zip(&sums) {
                    *yo += a as f32 * du;
                }
            }
        }
    }
    Tensor::from_vec(ys, shape, x.device())
}

/// Threads of candle's barrier pool (its workers and the calling thread), counted once.
fn pool_threads() -> usize {
    static N: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *N.get_or_init(|| {
        let n = std::sync::atomic::AtomicUsize::new(1);
        candle_core::utils::barrier_pool().execute(|tid| {
            n.fetch_max(tid + 1, std::sync::atomic::Ordering::Relaxed);
        });
        n.into_inner()
    })
}
