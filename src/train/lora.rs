//! Trainable LoRA parameters: one `A`, `B` pair of candle `Var`s per adapted linear, and the
//! hook that adds `s * B (A dropout(x))` to the base output during training.

use candle_core::{DType, Device, Tensor, Var};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::lora::{Adapter, AdapterConfig, LoraPair};
use crate::model::{Config, HookResult, LinearHook, Target};
use crate::{Error, Result};

/// The trainable pair of one linear: `A` `(r, in)`, `B` `(out, r)` (B in GGUF row order).
pub struct VarPair {
    pub a: Var,
    pub b: Var,
}

/// All trainable LoRA parameters of one adapter.
pub struct TrainLora {
    pub config: AdapterConfig,
    pub pairs: BTreeMap<(usize, Target), VarPair>,
    scale: f64,
    dropout: f32,
    /// Seeded per micro-batch so dropout masks repeat exactly after `--resume`.
    rng: RefCell<Option<StdRng>>,
}

impl TrainLora {
    /// PEFT's initialisation: `A` Kaiming-uniform (bound `1 / sqrt(in)`), `B` zero, so training
    /// starts from exactly the base model. Every block, or `config.layers_to_transform`.
    pub fn init(model: &Config, config: AdapterConfig, seed: u64, dropout: f32) -> Result<Self> {
        let targets = config
            .targets()
            .map_err(|m| Error::unknown("target module", m, Target::ALL.map(Target::peft_name)))?;
        if config.r == 0 {
            return Err(Error::setting("r", "the rank must be at least 1"));
        }
        let layers: Vec<usize> = match &config.layers_to_transform {
            Some(l) => l.clone(),
            None => (0..model.n_layer).collect(),
        };
        if let Some(&bad) = layers.iter().find(|&&l| l >= model.n_layer) {
            return Err(Error::setting(
                "layers_to_transform",
                format!(
                    "block {bad}, the model has {} (0-{})",
                    model.n_layer,
                    model.n_layer - 1
                ),
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut pairs = BTreeMap::new();
        for layer in layers {
            for &t in &targets {
                let (n_in, n_out) = (model.in_features(t), model.out_features(t));
                let bound = 1.0 / (n_in as f32).sqrt();
                let a: Vec<f32> = (0..config.r * n_in)
                    .map(|_| rng.random_range(-bound..bound))
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (config.r, n_in), &Device::Cpu)?)?;
                let b = Var::zeros((n_out, config.r), DType::F32, &Device::Cpu)?;
                pairs.insert((layer, t), VarPair { a, b });
            }
        }
        Ok(Self::from_parts(config, pairs, dropout))
    }

    /// Continue from a trained adapter (e.g. DPO after SFT).
    pub fn from_adapter(adapter: &Adapter, dropout: f32) -> Result<Self> {
        let mut pairs = BTreeMap::new();
        for (key, p) in &adapter.pairs {
            pairs.insert(
                *key,
                VarPair {
                    a: Var::from_tensor(&p.a)?,
                    b: Var::from_tensor(&p.b)?,
                },
            );
        }
        Ok(Self::from_parts(adapter.config.clone(), pairs, dropout))
    }

    fn from_parts(
        config: AdapterConfig,
        pairs: BTreeMap<(usize, Target), VarPair>,
        dropout: f32,
    ) -> Self {
        TrainLora {
            scale: config.scale(),
            config,
            pairs,
            dropout,
            rng: RefCell::new(None),
        }
    }

    /// Every trainable tensor with a stable name, `A` then `B` per linear, in layer order.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        for ((layer, t), p) in &self.pairs {
            out.push((format!("{layer}.{}.A", t.peft_name()), &p.a));
            out.push((format!("{layer}.{}.B", t.peft_name()), &p.b));
        }
        out
    }

    /// Number of trainable parameters.
    pub fn num_params(&self) -> usize {
        self.named_vars().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The lowest block an adapter pair sits in: the blocks below it are the base's alone.
    pub fn first_layer(&self) -> usize {
        self.pairs.keys().map(|k| k.0).min().unwrap_or(0)
    }

    /// Turn dropout on for the next forward passes with masks drawn from `seed`, or off (`None`).
    pub fn set_dropout_seed(&self, seed: Option<u64>) {
        *self.rng.borrow_mut() = seed.map(StdRng::seed_from_u64);
    }

    /// Set every parameter to `adapter`'s (same linears and ranks: e.g. the best checkpoint of
    /// this run, written by [`TrainLora::to_adapter`]).
    pub fn load_adapter(&self, adapter: &Adapter) -> Result<()> {
        for (key, p) in &self.pairs {
            let q = adapter.pairs.get(key).ok_or_else(|| {
                Error::adapter(
                    &adapter.dir,
                    format!("layer {} {}", key.0, key.1.peft_name()),
                    "the adapter has no pair for it",
                )
            })?;
            p.a.set(&q.a)?;
            p.b.set(&q.b)?;
        }
        Ok(())
    }

    /// A snapshot of the current parameters as an [`Adapter`].
    pub fn to_adapter(&self) -> Result<Adapter> {
        let mut pairs = BTreeMap::new();
        for (key, p) in &self.pairs {
            pairs.insert(
                *key,
                LoraPair {
                    a: p.a.as_tensor().copy()?,
                    b: p.b.as_tensor().copy()?,
                },
            );
        }
        Ok(Adapter {
            dir: PathBuf::new(),
            config: self.config.clone(),
            pairs,
            steer: BTreeMap::new(),
        })
    }

    fn dropout_mask(&self, x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut rng = self.rng.borrow_mut();
        let Some(rng) = rng.as_mut() else {
            return Ok(None);
        };
        if self.dropout <= 0.0 {
            return Ok(None);
        }
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| {
                if rng.random::<f32>() < keep {
                    1.0 / keep
                } else {
                    0.0
                }
            })
            .collect();
        Ok(Some(Tensor::from_vec(mask, x.shape(), x.device())?))
    }
}

impl LinearHook for TrainLora {
    fn after_linear(&self, layer: usize, target: Target, x: &Tensor, y: Tensor) -> HookResult {
        let Some(p) = self.pairs.get(&(layer, target)) else {
            return Ok(y);
        };
        let x = match self.dropout_mask(x)? {
            Some(m) => (x * m)?,
            None => x.clone(),
        };
        // As 2-D matmuls over all b * t rows: no broadcast copies of A and B.
        let x2 = x.flatten_to(x.rank() - 2)?; // (b * t, in)
        let h = x2.matmul(&p.a.as_tensor().t()?)?; // (b * t, r)
        let delta = h.matmul(&p.b.as_tensor().t()?)?; // (b * t, out)
        let delta = delta.reshape(y.shape())?;
        y + (delta * self.scale)?
    }
}
