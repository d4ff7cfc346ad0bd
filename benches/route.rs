//! Gate cost: routing one prompt (features, including the shipped gate's pass through the first
//! blocks of the base model for its hidden states, + classifier + policy) against a whole 64-token
//! answer to it under `Blend::auto` (routing, prompt processing and 64 decoded tokens) on the real
//! base model with two random rank-8 experts. Gate share = route / answer.
//!
//! Run: `cargo bench --bench route` (results in docs/BENCHMARKS.md, "Gate cost").

use criterion::{criterion_group, criterion_main, Criterion};
use std::time::Duration;

use stancemix::lora::{Adapter, ExpertSet};
use stancemix::model::{LoadOptions, Model, Target, WeightFormat};
use stancemix::router::{load_policies, policies_dir, shipped_gate_dir, Gate};
use stancemix::{Blend, Engine, GenParams};

const PROMPT: &str = "Should the estate tax be raised so that large inheritances pay more?";

fn benches(c: &mut Criterion) {
    let paths = stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR"));
    let path = stancemix::model::fetch::ensure_default_model(&paths).unwrap();
    let model = Model::load(
        &path,
        &LoadOptions {
            format: WeightFormat::Q8_0,
        },
    )
    .unwrap();
    let make = |name: &str, seed: u64| {
        Adapter::random(&model.config, name, 8, 8.0, &Target::ALL, seed, 0.02).unwrap()
    };
    let experts = ExpertSet::new(vec![make("progressive", 1), make("conservative", 2)]).unwrap();
    let gate = Gate::load(&shipped_gate_dir(&paths)).unwrap();
    let policies = load_policies(&policies_dir(&paths)).unwrap();
    let engine = Engine::with_gate(model.clone(), experts, gate, policies);
    // Greedy, no stop before 64 tokens: the answer's length is fixed.
    let params = GenParams {
        max_tokens: 64,
        ..GenParams::default()
    };

    let mut g = c.benchmark_group("route");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .warm_up_time(Duration::from_secs(1));
    g.bench_function("route/libertarian", |b| {
        b.iter(|| engine.route(PROMPT, "libertarian").unwrap())
    });
    g.bench_function("answer_64/auto-libertarian", |b| {
        b.iter(|| {
            let mut s = engine.session();
            s.set_blend(Blend::auto("libertarian")).unwrap();
            let mut turn = s.begin(PROMPT, &params).unwrap();
            let mut n = 0;
            while turn.next_token().unwrap().is_some() {
                n += 1;
            }
            n
        })
    });
    g.finish();
}

criterion_group!(route, benches);
criterion_main!(route);
