//! Prompt and decode speed of each weight format at several prompt lengths (a probe for
//! docs/BENCHMARKS.md, "Weight formats"). `cargo run --release --example format_probe`
use stancemix::model::{KvCache, LoadOptions, Logits, Model, WeightFormat};
use stancemix::{lora::ExpertSet, Engine};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    stancemix::runtime::threads::pin_default();
    let path = stancemix::model::fetch::default_model_path(&stancemix::util::Paths::at(env!(
        "CARGO_MANIFEST_DIR"
    )));
    let ids: Vec<u32> = (0..512u32).map(|i| 200 + (i * 37) % 20000).collect();
    for format in [
        WeightFormat::Stored,
        WeightFormat::Mixed,
        WeightFormat::Q8_0,
        WeightFormat::F32,
    ] {
        let model = Model::load(&path, &LoadOptions { format })?;
        let engine = Engine::new(model.clone(), ExpertSet::empty());
        let mut line = format!("{:>6}:", format.name());
        for n in [8usize, 16, 32, 64, 128, 256] {
            let mut best = f64::MAX;
            for _ in 0..3 {
                let mut cache = KvCache::new(model.config.n_layer);
                let t = Instant::now();
                engine.forward_rows(&ids[..n], Some(&mut cache), &[], Logits::Last)?;
                best = best.min(t.elapsed().as_secs_f64());
            }
            line += &format!(" prompt {n}: {:.0} tok/s |", n as f64 / best);
        }
        let mut cache = KvCache::new(model.config.n_layer);
        engine.forward_rows(&ids[..8], Some(&mut cache), &[], Logits::Last)?;
        let t = Instant::now();
        for &id in &ids[8..72] {
            engine.forward_rows(&[id], Some(&mut cache), &[], Logits::Last)?;
        }
        line += &format!(" decode: {:.0} tok/s", 64.0 / t.elapsed().as_secs_f64());
        println!("{line}");
    }
    Ok(())
}
