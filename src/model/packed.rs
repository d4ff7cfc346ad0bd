//! The base weights packed for our int8 kernels ([`super::int8`]): the file's own Q4_1 or Q8_0
//! blocks, or Q8_0 requantized from other values, four rows packed block by block so a matrix is
//! read as one stream. A matmul rounds its input rows to int8 blocks once and shares the weight
//! rows (and any [`SideWork`], the experts' deltas) among candle's worker threads.
//!
//! Why not candle's `QMatMul`: its x86 path computes one weight row at a time and converts both
//! f16 scales per block (about half this kernel's speed from cache), and it has no fast Q4_1
//! path (`cargo run --release --example q8_kernel_probe`; docs/BENCHMARKS.md, session 5).

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use super::int8::{self, Shared, BLOCK};

/// Extra work done inside a narrow int8 matmul's dispatch, items shared with the base rows
/// among the threads (the experts' deltas: on 2 cores a separate dispatch after the matmul
/// left one core idle and read the experts' weights on their own).
pub trait SideWork: Sync {
    /// Independent items.
    fn items(&self) -> usize;
    /// Item `item`'s contribution for the input rows `x`, if any: int32 sums times a scale,
    /// added to one output row after the matmul.
    fn run(&self, item: usize, x: &QuantizedRows) -> Option<SideOutput>;
}

/// What a [`SideWork`] item adds: `scale * sums[o]` to output row `row`'s column `o`.
#[derive(Debug)]
pub struct SideOutput {
    pub row: usize,
    pub scale: f32,
    pub sums: Vec<i32>,
}

/// The input rows of a matmul rounded to int8 blocks ([`int8::quantize_blocks`]).
#[derive(Debug)]
pub struct QuantizedRows {
    /// Row width.
    pub k: usize,
    /// The rounded values `(rows, k)` and their block scales.
    pub q: Vec<i8>,
    pub d: Vec<f32>,
}

impl QuantizedRows {
    /// Row `r`'s int8 values and block scales.
    pub fn row(&self, r: usize) -> (&[i8], &[f32]) {
        let nb = self.k / BLOCK;
        (
            &self.q[r * self.k..(r + 1) * self.k],
            &self.d[r * nb..(r + 1) * nb],
        )
    }
}

/// Weight rows per unit of work handed to a thread.
const CHUNK_ROWS: usize = 64;

/// A weight matrix `(rows, k)` packed for the quad kernels.
#[derive(Debug)]
pub struct PackedMatrix {
    rows: usize,
    k: usize,
    packed: Packed,
}

#[derive(Debug)]
enum Packed {
    /// Int8 blocks with f32 scales (requantized from the file's weights).
    Q8 { q: Shared<i8>, d: Shared<f32> },
    /// The file's own Q4_1 blocks, unchanged: fewer bytes to stream per token.
    Q4 {
        nibbles: Shared<u8>,
        d: Shared<f32>,
        m: Shared<f32>,
    },
}

/// Move the weights of `mats` into one large buffer per kind of array, each marked for
/// transparent huge pages ([`int8::huge_vec`]): per-matrix vectors (under 2 MiB for most of a
/// small model's matrices) cannot get huge pages, so decoding would take a TLB miss every 4 KiB.
pub fn pack_in_arenas(mats: &mut [&mut PackedMatrix]) {
    let (mut nibbles, mut q4d, mut q4m, mut q8q, mut q8d) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for m in mats.iter_mut() {
        match &mut m.packed {
            Packed::Q4 { nibbles: n, d, m } => {
                nibbles.push(n);
                q4d.push(d);
                q4m.push(m);
            }
            Packed::Q8 { q, d } => {
                q8q.push(q);
                q8d.push(d);
            }
        }
    }
    int8::pack_shared(nibbles);
    int8::pack_shared(q4d);
    int8::pack_shared(q4m);
    int8::pack_shared(q8q);
    int8::pack_shared(q8d);
}

impl PackedMatrix {
    /// Quantize a dense `(rows, k)` f32 matrix; `None` when `k` is not a multiple of 32 or
    /// `rows` of 4 (the kernel's shapes).
    pub fn new(w: &Tensor) -> candle_core::Result<Option<Self>> {
        let (rows, k) = w.dims2()?;
        if !k.is_multiple_of(BLOCK) || !rows.is_multiple_of(4) {
            return Ok(None);
        }
        let dense = w.flatten_all()?.to_vec1::<f32>()?;
        let mut q = vec![0i8; rows * k];
        let mut d = vec![0f32; rows * k / BLOCK];
        int8::quantize_blocks(&dense, &mut q, &mut d);
        let (q, d) = int8::interleave_row_quads(&q, &d, k);
        Ok(Some(PackedMatrix {
            rows,
            k,
            packed: Packed::Q8 {
                q: q.into(),
                d: d.into(),
            },
        }))
    }

    /// The file's own blocks, values unchanged, when they are Q4_1 or Q8_0; `None` for another
    /// type or shapes the kernels do not take.
    pub fn from_stored(w: &QTensor) -> candle_core::Result<Option<Self>> {
        let (rows, k) = w.shape().dims2()?;
        let (dtype, nb) = (w.dtype(), k / BLOCK);
        if !matches!(dtype, GgmlDType::Q4_1 | GgmlDType::Q8_0)
            || !k.is_multiple_of(BLOCK)
            || !rows.is_multiple_of(4)
        {
            return Ok(None);
        }
        let raw = w.data()?;
        let block_bytes = if dtype == GgmlDType::Q4_1 { 20 } else { 34 };
        if raw.len() != rows * nb * block_bytes {
            candle_core::bail!("{dtype:?} tensor of {rows} x {k} holds {} bytes", raw.len());
        }
        let packed = if dtype == GgmlDType::Q4_1 {
            let p = int8::q4_1_quads(&raw, rows, k);
            Packed::Q4 {
                nibbles: p.nibbles.into(),
                d: p.d.into(),
                m: p.m.into(),
            }
        } else {
            let (q, d) = int8::q8_0_quads(&raw, rows, k);
            Packed::Q8 {
                q: q.into(),
                d: d.into(),
            }
        };
        Ok(Some(PackedMatrix { rows, k, packed }))
    }

    /// The matrix in f32, as rounded.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        let nb = self.k / BLOCK;
        let mut w = vec![0f32; self.rows * self.k];
        // Block `at` = (g * nb + b) * 4 + i holds row 4 g + i, block b.
        let start = |at: usize| (4 * (at / 4 / nb) + at % 4) * self.k + ((at / 4) % nb) * BLOCK;
        match &self.packed {
            Packed::Q8 { q, d } => {
                for (at, (block, &d)) in q.chunks(BLOCK).zip(d.iter()).enumerate() {
                    let s = start(at);
                    for (o, &v) in w[s..s + BLOCK].iter_mut().zip(block) {
                        *o = v as f32 * d;
                    }
                }
            }
            Packed::Q4 { nibbles, d, m } => {
                for (at, nib) in nibbles.chunks(16).enumerate() {
                    let s = start(at);
                    for (j, &byte) in nib.iter().enumerate() {
                        w[s + j] = d[at] * (byte & 15) as f32 + m[at];
                        w[s + j + 16] = d[at] * (byte >> 4) as f32 + m[at];
                    }
                }
            }
        }
        Tensor::from_vec(w, (self.rows, self.k), &Device::Cpu)
    }

    /// `x W^T` for `x` `(.., k)`: `(.., rows)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, None)
    }

    /// `x W^T` plus the output of `side` (run in the same dispatch, on the same rounded input).
    pub fn forward_with(
        &self,
        x: &Tensor,
        side: Option<&dyn SideWork>,
    ) -> candle_core::Result<Tensor> {
        let k = self.k;
        let mut shape = x.dims().to_vec();
        let Some(last) = shape.last_mut() else {
            candle_core::bail!("q8 matmul of a scalar");
        };
        if *last != k {
            candle_core::bail!(
                "q8 matmul: input width {} for a ({}, {k}) weight",
                *last,
                self.rows
            );
        }
        *last = self.rows;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let m = xs.len() / k;
        let nb = k / BLOCK;
        let mut xq = vec![0i8; m * k];
        let mut dx = vec![0f32; m * nb];
        int8::quantize_blocks(&xs, &mut xq, &mut dx);
        let xsum: Vec<i32> = xq
            .chunks(BLOCK)
            .map(|c| c.iter().map(|&v| v as i32).sum())
            .collect();
        let rounded = QuantizedRows { k, q: xq, d: dx };
        let (xq, dx) = (&rounded.q, &rounded.d);
        // The side items first (each a larger unit than a chunk of rows), then the chunks.
        let n_side = side.map_or(0, |s| s.items());
        let side_out: Vec<Mutex<Option<SideOutput>>> =
            (0..n_side).map(|_| Mutex::new(None)).collect();
        // Output rows-major per weight chunk: (rows, m), transposed at the end when m > 1.
        let mut out = vec![0f32; self.rows * m];
        let chunk = CHUNK_ROWS.min(self.rows);
        let parts: Vec<Mutex<&mut [f32]>> = out.chunks_mut(chunk * m).map(Mutex::new).collect();
        let next = AtomicUsize::new(0);
        let work = |_: usize| loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            if i < n_side {
                if let (Some(side), Ok(mut slot)) = (side, side_out[i].lock()) {
                    *slot = side.run(i, &rounded);
                }
                continue;
            }
            let i = i - n_side;
            let Some(part) = parts.get(i) else { break };
            let Ok(mut part) = part.lock() else { break };
            let r0 = i * chunk;
            let n = part.len() / m;
            // Weight rows r0..r0 + n times input row `row`, into `dst`.
            let rows_times = |row: usize, dst: &mut [f32]| {
                let (x, d) = (&xq[row * k..(row + 1) * k], &dx[row * nb..(row + 1) * nb]);
                match &self.packed {
                    Packed::Q8 { q, d: dw } => int8::matvec_quads(
                        &q[r0 * k..(r0 + n) * k],
                        &dw[r0 * nb..(r0 + n) * nb],
                        x,
                        d,
                        dst,
                    ),
                    Packed::Q4 {
                        nibbles,
                        d: dw,
                        m: mw,
                    } => int8::matvec_q4(
                        int8::Q4Slice {
                            nibbles: &nibbles[r0 * nb * 16..(r0 + n) * nb * 16],
                            d: &dw[r0 * nb..(r0 + n) * nb],
                            m: &mw[r0 * nb..(r0 + n) * nb],
                        },
                        x,
                        d,
                        &xsum[row * nb..(row + 1) * nb],
                        dst,
                    ),
                }
            };
            if m == 1 {
                rows_times(0, &mut part);
            } else {
                let mut col = vec![0f32; n];
                for row in 0..m {
                    rows_times(row, &mut col);
                    for (j, v) in col.iter().enumerate() {
                        part[j * m + row] = *v;
                    }
                }
            }
        };
        if parts.len() + n_side > 1 {
            candle_core::utils::barrier_pool().execute(work);
        } else {
            work(0);
        }
        drop(parts);
        let mut out = if m == 1 {
            out
        } else {
            // (rows, m) -> (m, rows)
            let mut o = vec![0f32; out.len()];
            for (j, col) in out.chunks(m).enumerate() {
                for (r, v) in col.iter().enumerate() {
                    o[r * self.rows + j] = *v;
                }
            }
            o
        };
        for slot in side_out {
            let slot = slot
                .into_inner()
                .map_err(|_| candle_core::Error::Msg("a matmul side worker panicked".into()))?;
            let Some(add) = slot else { continue };
            let Some(row) = out.get_mut(add.row * self.rows..(add.row + 1) * self.rows) else {
                candle_core::bail!("side work for row {} of {m}", add.row);
            };
            for (o, &v) in row.iter_mut().zip(&add.sums) {
                *o += v as f32 * add.scale;
            }
        }
        Tensor::from_vec(out, shape, &Device::Cpu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dense(rows: usize, k: usize) -> Tensor {
        let v: Vec<f32> = (0..rows * k)
            .map(|i| ((i as f32) * 0.731).sin() * 2.0)
            .collect();
        Tensor::from_vec(v, (rows, k), &Device::Cpu).unwrap()
    }

    #[test]
    fn stored_blocks_dequantize_exactly_as_candle() {
        let w = dense(8, 64);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let q = QTensor::quantize(&w, dtype).unwrap();
            let m = PackedMatrix::from_stored(&q).unwrap().unwrap();
            let want: Vec<f32> = q
                .dequantize(&Device::Cpu)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let got: Vec<f32> = m
                .dequantize()
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{dtype:?}");
        }
        // Another type, or rows not a multiple of 4: not ours.
        let q = QTensor::quantize(&w, GgmlDType::Q4_0).unwrap();
        assert!(PackedMatrix::from_stored(&q).unwrap().is_none());
        let q = QTensor::quantize(&dense(6, 64), GgmlDType::Q8_0).unwrap();
        assert!(PackedMatrix::from_stored(&q).unwrap().is_none());
    }

    #[test]
    fn forward_equals_the_dequantized_product_for_one_and_several_rows() {
        let (rows, k) = (136, 96); // three thread chunks, the last one short
        let w = dense(rows, k);
        let mats = [
            PackedMatrix::new(&w).unwrap().unwrap(),
            PackedMatrix::from_stored(&QTensor::quantize(&w, GgmlDType::Q4_1).unwrap())
                .unwrap()
                .unwrap(),
        ];
        for m in &mats {
            let wd = m.dequantize().unwrap();
            for n in [1usize, 3] {
                let x: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.29).cos()).collect();
                // The kernel multiplies x rounded to int8 blocks: round it the same way here.
                let (mut xq, mut dx) = (vec![0i8; n * k], vec![0f32; n * k / BLOCK]);
                int8::quantize_blocks(&x, &mut xq, &mut dx);
                let xr: Vec<f32> = (0..n * k).map(|i| xq[i] as f32 * dx[i / BLOCK]).collect();
                let xr = Tensor::from_vec(xr, (n, k), &Device::Cpu).unwrap();
                let want: Vec<f32> = xr
                    .matmul(&wd.t().unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let xt = Tensor::from_vec(x, (1, n, k), &Device::Cpu).unwrap();
                let got = m.forward(&xt).unwrap();
                assert_eq!(got.dims(), &[1, n, rows]);
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-4 * w.abs().max(1.0), "{g} vs {w}");
                }
            }
        }
        assert!(mats[0]
            .forward(&Tensor::zeros((1, 5), candle_core::DType::F32, &Device::Cpu).unwrap())
            .is_err());
    }
}
