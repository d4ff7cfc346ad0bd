//! Checkpoints: LoRA parameters, AdamW moments and the step counter in one safetensors file,
//! written to a temporary file and renamed, so a kill at any moment leaves the last good one.

use candle_core::{Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

use super::{AdamW, TrainLora};
use crate::{Error, Result};

/// The checkpoint's file name inside the output folder.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Progress counters stored with a checkpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Checkpoint {
    /// Optimizer steps done.
    pub step: usize,
    /// Real tokens processed so far.
    pub tokens: usize,
    /// Training seconds so far (excludes evaluation).
    pub seconds: f64,
}

impl Checkpoint {
    /// Save `lora` and `opt` with these counters to `path`, atomically.
    pub fn save(&self, path: &Path, lora: &TrainLora, opt: &AdamW) -> Result<()> {
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, var)) in lora.named_vars().into_iter().enumerate() {
            out.insert(format!("lora.{name}"), var.as_tensor().clone());
            out.insert(format!("adam.m.{name}"), opt.m[i].clone());
            out.insert(format!("adam.v.{name}"), opt.v[i].clone());
        }
        let meta = [
            self.step as i64,
            opt.t as i64,
            self.tokens as i64,
            (self.seconds * 1000.0) as i64,
        ];
        out.insert("meta".into(), Tensor::new(&meta, &Device::Cpu)?);
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        candle_core::safetensors::save(&out, &tmp)
            .map_err(|e| Error::io(&tmp, std::io::Error::other(e.to_string())))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Load a checkpoint into `lora` and `opt`; every tensor must be present with its shape.
    pub fn load(path: &Path, lora: &TrainLora, opt: &mut AdamW) -> Result<Checkpoint> {
        let bad = |tensor: &str, msg: String| Error::adapter(path, tensor, msg);
        let mut t = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| bad("-", e.to_string()))?;
        let mut take = |name: String, like: &Tensor| -> Result<Tensor> {
            let x = t
                .remove(&name)
                .ok_or_else(|| bad(&name, "missing from the checkpoint".into()))?;
            if x.dims() != like.dims() {
                return Err(bad(
                    &name,
                    format!("shape {:?}, the run expects {:?}", x.dims(), like.dims()),
                ));
            }
            Ok(x)
        };
        for (i, (name, var)) in lora.named_vars().into_iter().enumerate() {
            var.set(&take(format!("lora.{name}"), var.as_tensor())?)?;
            opt.m[i] = take(format!("adam.m.{name}"), var.as_tensor())?;
            opt.v[i] = take(format!("adam.v.{name}"), var.as_tensor())?;
        }
        let meta = t
            .remove("meta")
            .ok_or_else(|| bad("meta", "missing from the checkpoint".into()))?
            .to_vec1::<i64>()
            .map_err(|e| bad("meta", e.to_string()))?;
        if meta.len() != 4 || meta.iter().any(|&m| m < 0) {
            return Err(bad("meta", format!("expected 4 counters, found {meta:?}")));
        }
        opt.t = meta[1] as usize;
        Ok(Checkpoint {
            step: meta[0] as usize,
            tokens: meta[2] as usize,
            seconds: meta[3] as f64 / 1000.0,
        })
    }
}
