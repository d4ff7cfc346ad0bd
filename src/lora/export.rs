//! Export a blend of the experts as one standard PEFT LoRA adapter, exactly.
//!
//! At gate weights `g` the blend adds `sum_i g_i s_i B_i A_i` to each adapted linear. That is one
//! LoRA of rank `sum_i r_i`: `A = [A_1; A_2; ...]` (stacked rows), `B = [g_1 s_1 B_1 | g_2 s_2 B_2
//! | ...]` (scaled, concatenated columns), with scale 1 (`lora_alpha = r`). No cross terms, no
//! approximation: any server with multi-LoRA support (vLLM, LoRAX, llama.cpp's `--lora`) serves
//! the blend point as this adapter. Experts at weight 0 add nothing and are left out.

use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::{Adapter, AdapterConfig, ExpertSet, LoraPair};
use crate::model::{Config, Target};
use crate::{Error, Result};

/// One adapter equal to the experts of `experts` at gate weights `g` (weights mode).
/// `description` goes into its config.
pub fn export_blend(
    experts: &ExpertSet,
    g: &[f32],
    model: &Config,
    description: &str,
) -> Result<Adapter> {
    if g.len() != experts.len() {
        return Err(Error::mismatch(
            "gate weights",
            format!("{} weights for {} experts", g.len(), experts.len()),
        ));
    }
    let parts: Vec<(&Adapter, f64)> = experts
        .adapters()
        .iter()
        .zip(g)
        .filter(|(_, &w)| w != 0.0)
        .map(|(a, &w)| (a, w as f64))
        .collect();
    if let Some((a, _)) = parts.iter().find(|(a, _)| !a.steer.is_empty()) {
        return Err(Error::BadBlend(format!(
            "expert '{}' is a steering vector: a LoRA adapter cannot carry it (export a blend of LoRA experts only)",
            a.name()
        )));
    }
    if parts.is_empty() {
        return Err(Error::BadBlend(
            "this blend gives every expert weight 0: it is the base model, with nothing to export"
                .into(),
        ));
    }
    // Every (layer, target) of any expert in the blend; an expert without one adds zeros there.
    let layers: BTreeSet<usize> = parts
        .iter()
        .flat_map(|(a, _)| a.pairs.keys().map(|k| k.0))
        .collect();
    let targets: BTreeSet<Target> = parts
        .iter()
        .flat_map(|(a, _)| a.pairs.keys().map(|k| k.1))
        .collect();
    let rank: usize = parts.iter().map(|(a, _)| a.config.r).sum();
    let dev = Device::Cpu;
    let mut pairs = BTreeMap::new();
    for &layer in &layers {
        for &t in &targets {
            let (n_in, n_out) = (model.in_features(t), model.out_features(t));
            let mut a_parts = Vec::with_capacity(parts.len());
            let mut b_parts = Vec::with_capacity(parts.len());
            for (adapter, w) in &parts {
                let r = adapter.config.r;
                match adapter.pairs.get(&(layer, t)) {
                    Some(p) => {
                        a_parts.push(p.a.clone());
                        b_parts.push((&p.b * (w * adapter.scale()))?);
                    }
                    None => {
                        a_parts.push(Tensor::zeros((r, n_in), DType::F32, &dev)?);
                        b_parts.push(Tensor::zeros((n_out, r), DType::F32, &dev)?);
                    }
                }
            }
            pairs.insert(
                (layer, t),
                LoraPair {
                    a: Tensor::cat(&a_parts, 0)?,
                    b: Tensor::cat(&b_parts, 1)?,
                },
            );
        }
    }
    let first = &parts[0].0.config;
    let all_layers = layers.len() == model.n_layer;
    Ok(Adapter {
        dir: PathBuf::new(),
        config: AdapterConfig {
            r: rank,
            lora_alpha: rank as f64,
            target_modules: targets.iter().map(|t| t.peft_name().to_string()).collect(),
            use_rslora: false,
            base_model_name_or_path: first.base_model_name_or_path.clone(),
            base: first.base.clone(),
            stance: None,
            description: Some(description.to_string()),
            peft_type: first.peft_type.clone(),
            task_type: first.task_type.clone(),
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            layers_to_transform: (!all_layers).then(|| layers.into_iter().collect()),
        },
        pairs,
        steer: BTreeMap::new(),
    })
}
