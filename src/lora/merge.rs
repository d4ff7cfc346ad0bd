//! Merge: write `W + sum_i g_i s_i B_i A_i` for a fixed `g` as a new GGUF file.
//!
//! The exact sum, not PEFT's per-matrix mixing (which adds cross terms `B_i A_j`).
//! Adapted linears are written as F16 (or F32); every other tensor is copied as stored.
//! GGUF, so this runtime and llama.cpp both load the result.

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::path::Path;

use super::ExpertSet;
use crate::model::{write_gguf, Model, Target};
use crate::{Error, Result};

/// Write the base model with the experts merged at gate weights `g` to `out` (a `.gguf`).
/// `f32`: store merged linears as F32 instead of F16.
pub fn merge_to_gguf(
    model: &Model,
    experts: &ExpertSet,
    g: &[f32],
    out: &Path,
    f32: bool,
    note: &str,
) -> Result<()> {
    if g.len() != experts.len() {
        return Err(Error::mismatch(
            "gate weights",
            format!("{} weights for {} experts", g.len(), experts.len()),
        ));
    }
    if let Some((_, a)) = experts
        .adapters()
        .iter()
        .enumerate()
        .find(|(i, a)| !a.steer.is_empty() && g[*i] != 0.0)
    {
        return Err(Error::BadBlend(format!(
            "expert '{}' is a steering vector: it adds to the residual stream, not to a weight, so it cannot be merged (serve it with the experts, or give it weight 0)",
            a.name()
        )));
    }
    let src = &model.path;
    let mut file = std::fs::File::open(src).map_err(|e| Error::io(src, e))?;
    let content = Content::read(&mut file).map_err(|e| Error::model(src, e.to_string()))?;
    let dtype = if f32 { GgmlDType::F32 } else { GgmlDType::F16 };
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let q = content
            .tensor(&mut file, name, &Device::Cpu)
            .map_err(|e| Error::model(src, format!("tensor {name}: {e}")))?;
        let adapted = parse_linear(name).filter(|(l, t)| {
            experts
                .adapters()
                .iter()
                .any(|a| a.pairs.contains_key(&(*l, *t)))
        });
        let q = match adapted {
            None => q,
            Some((layer, target)) => {
                let mut w = q.dequantize(&Device::Cpu)?;
                for (i, a) in experts.adapters().iter().enumerate() {
                    if g[i] != 0.0 {
                        if let Some(d) = a.delta(layer, target)? {
                            w = (w + (d * g[i] as f64)?)?;
                        }
                    }
                }
                QTensor::quantize(&w, dtype)?
            }
        };
        tensors.push((name.clone(), q));
    }
    let mut md: Vec<(&str, Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    md.sort_by(|a, b| a.0.cmp(b.0));
    md.retain(|(k, _)| *k != "stancemix.merge");
    md.push(("stancemix.merge", Value::String(note.to_string())));
    write_gguf(out, &md, &tensors)
}

/// `blk.{i}.{attn_q|...}.weight` -> (i, target).
fn parse_linear(name: &str) -> Option<(usize, Target)> {
    let rest = name.strip_prefix("blk.")?;
    let (idx, rest) = rest.split_once('.')?;
    let stem = rest.strip_suffix(".weight")?;
    let t = Target::ALL.into_iter().find(|t| t.gguf_name() == stem)?;
    Some((idx.parse().ok()?, t))
}
