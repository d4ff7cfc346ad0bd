//! Inference speed on the real base model: prompt processing (64 tokens) and decode (64 tokens),
//! for the base, one expert, two experts blended (weights mode, unmerged) and a merged model;
//! plus the cost of switching a session's blend. Tokens/s = 64 / reported time.
//!
//! Run: `cargo bench --bench inference` (results and thread count in docs/BENCHMARKS.md).

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

use stancemix::lora::{merge_to_gguf, Adapter, ExpertSet};
use stancemix::model::{fetch, KvCache, LoadOptions, Logits, Model, Target, WeightFormat};
use stancemix::{Blend, Engine};

const N: usize = 64;

fn prompt(model: &Model) -> Vec<u32> {
    let text = "The history of bread is long and varied. People have baked flat loaves from ground grain for thousands of years, and every region developed its own methods, ovens and recipes. Today bakers still argue about";
    let mut ids = model.tokenizer.encode(text).unwrap();
    while ids.len() < N {
        ids.extend(ids.clone());
    }
    ids.truncate(N);
    assert_eq!(ids.len(), N);
    ids
}

fn decode(engine: &Engine, ids: &[u32], rows: &[Vec<f32>]) {
    let mut cache = KvCache::new(engine.model.config.n_layer);
    engine
        .forward_rows(&ids[..8], Some(&mut cache), rows, Logits::Last)
        .unwrap();
    for i in 0..N {
        engine
            .forward_rows(&[ids[i % ids.len()]], Some(&mut cache), rows, Logits::Last)
            .unwrap();
    }
}

fn benches(c: &mut Criterion) {
    let path = fetch::ensure_default_model(&stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR")))
        .unwrap();
    let threads = candle_core::utils::get_num_threads();
    eprintln!("candle threads: {threads}");
    let mut g = c.benchmark_group("inference");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .warm_up_time(Duration::from_secs(1));
    for format in [
        WeightFormat::Stored,
        WeightFormat::Mixed,
        WeightFormat::Q8_0,
        WeightFormat::F32,
    ] {
        let model = Model::load(&path, &LoadOptions { format }).unwrap();
        let ids = prompt(&model);
        let base = Engine::new(model.clone(), ExpertSet::empty());
        g.bench_function(format!("prompt_{N}/{format:?}"), |b| {
            b.iter(|| {
                base.forward_rows(
                    &ids,
                    Some(&mut KvCache::new(model.config.n_layer)),
                    &[],
                    Logits::Last,
                )
                .unwrap()
            })
        });
        g.bench_function(format!("decode_{N}/{format:?}/base"), |b| {
            b.iter(|| decode(&base, &ids, &[]))
        });
    }
    // Experts: two random rank-16 adapters on all seven projections, the runtime's default
    // format (`mixed`: decoding on the file's Q4_1 blocks, the experts in int8).
    let model = Model::load(
        &path,
        &LoadOptions {
            format: WeightFormat::Mixed,
        },
    )
    .unwrap();
    let ids = prompt(&model);
    let pro = Adapter::random(
        &model.config,
        "progressive",
        16,
        16.0,
        &Target::ALL,
        1,
        0.02,
    )
    .unwrap();
    let con = Adapter::random(
        &model.config,
        "conservative",
        16,
        16.0,
        &Target::ALL,
        2,
        0.02,
    )
    .unwrap();
    let engine = Engine::new(model.clone(), ExpertSet::new(vec![pro, con]).unwrap());
    // The base again, right beside the experts: this machine's speed drifts between minutes.
    let base = Engine::new(model.clone(), ExpertSet::empty());
    g.bench_function(format!("decode_{N}/Mixed/base_beside_experts"), |b| {
        b.iter(|| decode(&base, &ids, &[]))
    });
    g.bench_function(format!("decode_{N}/Mixed/one_expert"), |b| {
        b.iter(|| decode(&engine, &ids, &[vec![1.0, 0.0]]))
    });
    g.bench_function(format!("decode_{N}/Mixed/two_experts_blended"), |b| {
        b.iter(|| decode(&engine, &ids, &[vec![0.6, 0.4]]))
    });
    let dir = std::env::temp_dir().join(format!("stancemix-bench-{}", std::process::id()));
    let merged_path = dir.join("merged.gguf");
    merge_to_gguf(
        &model,
        &engine.experts,
        &[0.6, 0.4],
        &merged_path,
        false,
        "bench",
    )
    .unwrap();
    let merged = Model::load(
        &merged_path,
        &LoadOptions {
            format: WeightFormat::Mixed,
        },
    )
    .unwrap();
    let merged_engine = Engine::new(merged, ExpertSet::empty());
    g.bench_function(format!("decode_{N}/Mixed/merged"), |b| {
        b.iter(|| decode(&merged_engine, &ids, &[]))
    });
    let _ = std::fs::remove_dir_all(&dir);
    let mut s = engine.session();
    let (a, b2) = (Blend::dial(0.7).unwrap(), Blend::dial(-0.3).unwrap());
    g.bench_function("blend_switch", |b| {
        b.iter(|| {
            s.set_blend(a.clone()).unwrap();
            s.set_blend(b2.clone()).unwrap();
        })
    });
    g.finish();
}

criterion_group!(inference, benches);
criterion_main!(inference);
