//! Shared test helpers: the real base model (fetched if missing) and the tiny random model.
#![allow(dead_code)]

pub mod reference;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use stancemix::model::{fetch, tiny, LoadOptions, Model, WeightFormat};

/// The repository's shipped files and models cache, as the binary finds them.
pub fn paths() -> stancemix::util::Paths {
    stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR"))
}

/// The real base model's path, fetched on first use.
pub fn real_model_path() -> PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        fetch::ensure_default_model(&paths())
            .expect("fetching the base model (needs python3 -m pip)")
    })
    .clone()
}

/// The real base model in a weight format.
pub fn real_model(format: WeightFormat) -> Arc<Model> {
    Model::load(real_model_path(), &LoadOptions { format }).expect("loading the base model")
}

/// The tiny random model (written to a temp GGUF, loaded through the real loader).
pub fn tiny_model(seed: u64) -> Arc<Model> {
    tiny_model_as(seed, WeightFormat::F32)
}

/// The tiny model with its weights held in `format`.
pub fn tiny_model_as(seed: u64, format: WeightFormat) -> Arc<Model> {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    tiny::write_tiny_gguf(&p, seed).unwrap();
    Model::load(&p, &LoadOptions { format }).unwrap()
}

/// The `stancemix` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stancemix"))
}

/// Max absolute difference of two equal-length slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A python3 that has numpy and safetensors (scripts/test installs them under target/pydeps).
pub fn python_with_deps() -> std::process::Command {
    let mut c = std::process::Command::new("python3");
    let deps = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/pydeps");
    c.env("PYTHONPATH", deps);
    c
}

/// One forward pass of `model` over `x` `(b, t)` with `hook`, its output flattened.
pub fn forward_flat(
    model: &Model,
    x: &candle_core::Tensor,
    cache: Option<&mut stancemix::model::KvCache>,
    hook: &dyn stancemix::model::LinearHook,
    logits: stancemix::model::Logits,
) -> Vec<f32> {
    let pass = stancemix::model::Pass {
        hook,
        logits,
        differentiable: false,
    };
    model
        .forward(x, cache, &pass)
        .expect("forward pass")
        .flatten_all()
        .expect("flatten")
        .to_vec1()
        .expect("to_vec1")
}
