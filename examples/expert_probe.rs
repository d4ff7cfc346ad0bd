//! Where the two experts' decode cost goes (a probe for docs/BENCHMARKS.md, "Two experts"):
//! the expert hook alone, one call per adaptable linear (a token's expert work, its weights
//! warm in cache), in f32 and int8; then decode steps of the base and of the experts' engine at
//! several gate settings, alternately.
//!
//! `cargo run --release --example expert_probe [-- --hook-only]`
use candle_core::{DType, Device, Tensor};
use stancemix::lora::{Adapter, ExpertPrecision, ExpertSet};
use stancemix::model::LinearHook;
use stancemix::model::{KvCache, LoadOptions, Logits, Model, Target, WeightFormat};
use stancemix::Engine;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    stancemix::runtime::threads::pin_default();
    let path = stancemix::model::fetch::default_model_path(&stancemix::util::Paths::at(env!(
        "CARGO_MANIFEST_DIR"
    )));
    let model = Model::load(
        &path,
        &LoadOptions {
            format: WeightFormat::Mixed,
        },
    )?;
    let random =
        |s: &str, seed| Adapter::random(&model.config, s, 16, 16.0, &Target::ALL, seed, 0.02);
    let experts = ExpertSet::new(vec![random("progressive", 1)?, random("conservative", 2)?])?;
    let base = Engine::new(model.clone(), ExpertSet::empty());
    let engine = Engine::new(model.clone(), experts);
    let mut xs = std::collections::HashMap::new();
    let mut ys = std::collections::HashMap::new();
    for target in Target::ALL {
        let n_in = model.config.in_features(target);
        xs.insert(
            target,
            Tensor::randn(0f32, 1.0, (1, 1, n_in), &Device::Cpu)?,
        );
        ys.insert(
            target,
            Tensor::zeros(
                (1, 1, model.config.out_features(target)),
                DType::F32,
                &Device::Cpu,
            )?,
        );
    }
    let ids: Vec<u32> = (100..300).collect();
    let run = |e: &Engine, rows: &[Vec<f32>]| -> anyhow::Result<f64> {
        let mut cache = KvCache::new(e.model.config.n_layer);
        e.forward_rows(&ids[..8], Some(&mut cache), rows, Logits::Last)?;
        let t = Instant::now();
        for &id in &ids[8..136] {
            e.forward_rows(&[id], Some(&mut cache), rows, Logits::Last)?;
        }
        Ok(128.0 / t.elapsed().as_secs_f64())
    };
    let cases: Vec<(&str, Vec<Vec<f32>>)> = vec![
        ("hook, gates 0", vec![vec![0.0, 0.0]]),
        ("one expert", vec![vec![0.6, 0.0]]),
        ("two experts", vec![vec![0.6, 0.4]]),
    ];
    let hook_only = std::env::args().any(|a| a == "--hook-only");
    // The hook alone: one call per adaptable linear = one token's expert work.
    for (name, rows) in &cases {
        for precision in [ExpertPrecision::F32, ExpertPrecision::Int8] {
            if hook_only && (precision == ExpertPrecision::F32 || name.starts_with("hook")) {
                continue;
            }
            let hook = engine.experts.hook_with(rows, precision)?;
            let t = Instant::now();
            let n = if hook_only { 2000 } else { 200 };
            for _ in 0..n {
                for layer in 0..model.config.n_layer {
                    for target in Target::ALL {
                        let x = &xs[&target];
                        let y = ys[&target].clone();
                        std::hint::black_box(hook.after_linear(layer, target, x, y)?);
                    }
                }
            }
            println!(
                "hook only, {name}, {precision:?}: {:.3} ms a token",
                t.elapsed().as_secs_f64() * 1e3 / n as f64
            );
        }
    }
    if hook_only {
        return Ok(());
    }
    for round in 0..5 {
        let b = run(&base, &[])?;
        let mut line = format!("round {round}: base {b:.1} tok/s");
        for (name, rows) in &cases {
            let e = run(&engine, rows)?;
            line += &format!(" | {name} {e:.1} ({:+.1}%)", (b / e - 1.0) * 100.0);
        }
        println!("{line}");
    }
    Ok(())
}
