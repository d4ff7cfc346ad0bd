//! Single-thread Q8_0 matrix-vector kernels, candle's against ours (a probe).
use candle_core::quantized::k_quants::{BlockQ8_0, GgmlType};
use std::time::Instant;

fn main() {
    let (rows, k): (usize, usize) = (
        std::env::args().nth(1).map_or(1536, |s| s.parse().unwrap()),
        576,
    );
    let w: Vec<f32> = (0..rows * k).map(|i| ((i as f32) * 0.7311).sin()).collect();
    let x: Vec<f32> = (0..k).map(|i| ((i as f32) * 0.377).cos()).collect();
    let nb = k / 32;
    let mut wb = vec![BlockQ8_0::zeros(); rows * nb];
    BlockQ8_0::from_float(&w, &mut wb);
    let mut xb = vec![BlockQ8_0::zeros(); nb];
    BlockQ8_0::from_float(&x, &mut xb);
    let reps = (3_000_000_000 / (rows * k)).max(3);
    let mut out = vec![0f32; rows];
    let t = Instant::now();
    for _ in 0..reps {
        for r in 0..rows {
            out[r] = BlockQ8_0::vec_dot(k, &wb[r * nb..(r + 1) * nb], std::hint::black_box(&xb));
        }
    }
    let candle_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    // Ours: rows as int8 with per-block f32 scales.
    let mut wq = vec![0i8; rows * k];
    let mut dw = vec![0f32; rows * nb];
    stancemix::model::kernels::quantize_blocks(&w, &mut wq, &mut dw);
    let mut xq = vec![0i8; k];
    let mut dx = vec![0f32; nb];
    stancemix::model::kernels::quantize_blocks(&x, &mut xq, &mut dx);
    let (wq, dw) = stancemix::model::kernels::interleave_row_quads(&wq, &dw, k);
    let mut out2 = vec![0f32; rows];
    let t = Instant::now();
    for _ in 0..reps {
        stancemix::model::kernels::matvec_quads(
            &wq,
            &dw,
            std::hint::black_box(&xq),
            &dx,
            &mut out2,
        );
    }
    let ours_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    // Q4_1 as stored in GGUF files, our quad layout.
    use candle_core::quantized::k_quants::BlockQ4_1;
    let mut w4 = vec![BlockQ4_1::zeros(); rows * nb];
    BlockQ4_1::from_float(&w, &mut w4);
    let raw: &[u8] = unsafe { std::slice::from_raw_parts(w4.as_ptr() as *const u8, w4.len() * 20) };
    let mut out4 = vec![0f32; rows];
    let q4 = stancemix::model::kernels::q4_1_quads(raw, rows, k);
    let xsum: Vec<i32> = xq
        .chunks(32)
        .map(|c| c.iter().map(|&v| v as i32).sum())
        .collect();
    let t = Instant::now();
    for _ in 0..reps {
        stancemix::model::kernels::matvec_q4(
            q4.rows(0, rows, nb),
            std::hint::black_box(&xq),
            &dx,
            &xsum,
            &mut out4,
        );
    }
    let q4_us = t.elapsed().as_secs_f64() * 1e6 / reps as f64;
    let maxdiff4 = out
        .iter()
        .zip(&out4)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!(
        "ours q4_1: {q4_us:.1} us ({:.2}x candle q8), max diff vs q8 {maxdiff4}",
        candle_us / q4_us
    );
    let maxdiff = out
        .iter()
        .zip(&out2)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    println!(
        "candle vec_dot: {candle_us:.1} us, ours: {ours_us:.1} us ({:.2}x), max diff {maxdiff}",
        candle_us / ours_us
    );
}
