//! The gate (router): features, a linfa classifier, policies, save / load.

mod cache;
mod features;
mod gate;
mod policy;
mod report;

pub use cache::PooledCache;
pub use features::{
    assemble, features, rms_pooled, FeatureConfig, GateAdapter, GateFeatures, HiddenFeatures,
    Template,
};
pub use gate::{Gate, Route, GATE_FILE};
pub use policy::{load_policies, Policy};
pub use report::{argmax, evaluate, evaluate_with_progress, Report};

use std::path::PathBuf;

use crate::util::Paths;

/// `router-data/` in the repository at `paths.root`.
pub fn shipped_gate_dir(paths: &Paths) -> PathBuf {
    paths.root.join("router-data")
}

/// `router-data/policies/`.
pub fn policies_dir(paths: &Paths) -> PathBuf {
    shipped_gate_dir(paths).join("policies")
}
