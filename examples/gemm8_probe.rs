//! Int8 training GEMM (`model::gemm8`) against candle's f32 matmul, forward and backward, on
//! the base model's shapes: `cargo run --release --example gemm8_probe [ROWS]`.
use candle_core::{Device, Tensor};
use stancemix::model::kernels::{has_vnni, FrozenInt8};
use std::time::Instant;

fn time<F: FnMut()>(mut f: F) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        f();
        best = best.min(t.elapsed().as_secs_f64());
    }
    best
}

fn main() -> candle_core::Result<()> {
    let m: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    println!("AVX-512 VNNI: {}; {m} rows; best of 5", has_vnni());
    for &(n, k) in &[
        (576, 576),
        (192, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
    ] {
        let w = Tensor::randn(0f32, 0.05, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let dy = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?;
        let f = FrozenInt8::from_tensor(&w)?;
        let xv = x.flatten_all()?.to_vec1::<f32>()?;
        let dyv = dy.flatten_all()?.to_vec1::<f32>()?;
        let wt = w.t()?;
        let t_f32 = time(|| {
            x.matmul(&wt).unwrap();
        });
        let t_f32b = time(|| {
            dy.matmul(&w).unwrap();
        });
        let t_i8 = time(|| {
            f.forward(&xv, m);
        });
        let t_i8b = time(|| {
            f.backward(&dyv, m).unwrap();
        });
        let t_q = time(|| {
            stancemix::model::kernels::quantize_rows(&xv, m, k, None);
        });
        let rows = stancemix::model::kernels::quantize_rows(&xv, m, k, None);
        let (n_, k_) = (n, k);
        let _ = (n_, k_);
        let t_g = time(|| {
            f.forward_rows(&rows);
        });
        println!(
            "    quantize {:.3} ms, gemm alone {:.3} ms",
            t_q * 1e3,
            t_g * 1e3
        );
        let gmac = (m * n * k) as f64 / 1e9;
        println!(
            "({n:>5}, {k:>4}): fwd f32 {:7.2} ms int8 {:7.2} ms ({:5.1} GMAC/s, {:.2}x) | bwd f32 {:7.2} ms int8 {:7.2} ms ({:.2}x)",
            t_f32 * 1e3,
            t_i8 * 1e3,
            gmac / t_i8,
            t_f32 / t_i8,
            t_f32b * 1e3,
            t_i8b * 1e3,
            t_f32b / t_i8b
        );
    }
    Ok(())
}
