//! Time the two forward passes forced-choice scoring is made of, on the real base (f32) with the
//! shipped experts: a 30-token prompt suffix after a 70-token cached prefix, and a one-token
//! option pass, both for 11 dial rows (and 11 rows with the experts off).
//! The "Sweep time" table in docs/BENCHMARKS.md compares thread settings with it:
//!   RAYON_NUM_THREADS=2 CANDLE_NUM_THREADS=1 cargo run --release --example scoring_probe
use stancemix::model::{KvCache, Logits, WeightFormat};
use stancemix::{Engine, EngineOptions};
use std::time::Instant;

fn main() -> stancemix::Result<()> {
    let engine = Engine::load(&EngineOptions {
        format: WeightFormat::F32,
        ..EngineOptions::shipped(stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR")))
    })?;
    let text = "The government should do more to reduce inequality between rich and poor people. ";
    let ids = engine.model.tokenizer.encode(&text.repeat(8))?;
    let (prefix, suffix) = (&ids[..70], &ids[70..100]);
    let dial: Vec<Vec<f32>> = (0..11)
        .map(|i| {
            let d = -1.0 + 0.2 * i as f32;
            vec![d.max(0.0), (-d).max(0.0)]
        })
        .collect();
    let off = vec![vec![0.0; engine.experts.len()]; 11];
    let dial = if engine.experts.len() == 2 {
        dial
    } else {
        off.clone()
    };
    for (name, rows) in [("11 dial rows", &dial), ("11 rows, experts off", &off)] {
        let mut cache = KvCache::new(engine.model.config.n_layer);
        engine.forward_rows(prefix, Some(&mut cache), rows, Logits::Last)?;
        for _ in 0..2 {
            cache.truncate(prefix.len());
            let t = Instant::now();
            engine.forward_rows(suffix, Some(&mut cache), rows, Logits::Last)?;
            let a = t.elapsed();
            let t = Instant::now();
            engine.forward_rows(&suffix[..1], Some(&mut cache), rows, Logits::All)?;
            println!(
                "{name}: suffix {a:.2?}, one-token option pass {:.2?}",
                t.elapsed()
            );
        }
    }
    Ok(())
}
