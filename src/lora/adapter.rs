//! LoRA adapter files in PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.
//!
//! On disk, `B` of q/k is in Hugging Face row order (as PEFT writes it). In memory it is in
//! GGUF row order, because GGUF stores q/k rows permuted for interleaved RoPE.

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use crate::model::{Config, Target};
use crate::{Error, Result};

/// File names of PEFT's layout.
pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// `adapter_config.json`: PEFT's fields plus stancemix's `stance` and `description`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// The GGUF base it was trained on (stancemix's field; PEFT's `base_model_name_or_path`
    /// holds a hub id for adapters trained elsewhere). Loading on another base is an error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseModel>,
    /// `progressive` or `conservative` for the stance experts; free text otherwise.
    #[serde(default)]
    pub stance: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    #[serde(default = "default_task_type")]
    pub task_type: String,
    #[serde(default)]
    pub lora_dropout: f64,
    #[serde(default = "default_bias")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default)]
    pub inference_mode: bool,
    /// PEFT's `layers_to_transform`: the blocks (0-based) the adapter covers; all when absent
    /// (a fine-tuned gate covers only the blocks it reads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers_to_transform: Option<Vec<usize>>,
}

/// Which base an adapter belongs to.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BaseModel {
    /// `general.name` of the GGUF.
    pub name: Option<String>,
    /// `general.architecture`.
    pub architecture: String,
    /// sha256 of the GGUF file trained on (provenance: the same base in another quantization
    /// has another hash and is accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

impl BaseModel {
    /// The base `model` describes (sha256 when the caller has it).
    pub fn of(model: &Config, sha256: Option<String>) -> Self {
        BaseModel {
            name: model.name.clone(),
            architecture: model.arch.clone(),
            sha256,
        }
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_task_type() -> String {
    "CAUSAL_LM".into()
}
fn default_bias() -> String {
    "none".into()
}

impl AdapterConfig {
    /// The LoRA scale `s`: `alpha / r`, or `alpha / sqrt(r)` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Parsed `target_modules`.
    pub fn targets(&self) -> std::result::Result<Vec<Target>, String> {
        self.target_modules
            .iter()
            .map(|m| Target::parse(m).ok_or_else(|| m.clone()))
            .collect()
    }
}

/// One adapted linear: `A` `(r, in)` and `B` `(out, r)`, B in GGUF row order.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub a: Tensor,
    pub b: Tensor,
}

/// A loaded LoRA adapter.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Where it was loaded from (empty for one built in memory).
    pub dir: PathBuf,
    pub config: AdapterConfig,
    pub pairs: BTreeMap<(usize, Target), LoraPair>,
    /// A steering vector's direction per block `(hidden,)`, added after that block
    /// (`super::steer`); empty for a LoRA adapter.
    pub steer: BTreeMap<usize, Tensor>,
}

/// PEFT tensor name of `A` or `B` for a layer and target.
pub fn peft_tensor_name(layer: usize, target: Target, ab: char) -> String {
    format!(
        "base_model.model.model.layers.{layer}.{}.{}.lora_{ab}.weight",
        target.peft_parent(),
        target.peft_name()
    )
}

/// Row permutation between HF order and GGUF order for q/k (llama.cpp's `permute`).
/// `to_gguf`: HF -> GGUF; otherwise GGUF -> HF. `w`: `(n_head * head_dim, cols)`.
pub fn permute_rows(w: &Tensor, n_head: usize, to_gguf: bool) -> Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    let hd = rows / n_head;
    Ok(if to_gguf {
        // rows (n_head, 2, hd/2) -> (n_head, hd/2, 2)
        w.reshape((n_head, 2, hd / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?
    } else {
        w.reshape((n_head, hd / 2, 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?
    })
}

fn rope_heads(config: &Config, target: Target) -> Option<usize> {
    if config.family.rope() != crate::model::RopeStyle::Interleaved {
        return None;
    }
    match target {
        Target::Q => Some(config.n_head),
        Target::K => Some(config.n_kv_head),
        _ => None,
    }
}

impl Adapter {
    /// The LoRA scale `s`.
    pub fn scale(&self) -> f64 {
        self.config.scale()
    }

    /// Stance named in the config, if any.
    pub fn stance(&self) -> Option<&str> {
        self.config.stance.as_deref()
    }

    /// Load an adapter directory (PEFT layout) or a control-vector GGUF (a steering expert),
    /// checking every tensor against the model's shapes.
    pub fn load(dir: impl AsRef<Path>, model: &Config) -> Result<Adapter> {
        let dir = dir.as_ref();
        if super::steer::is_control_vector(dir) {
            return super::steer::load(dir, model);
        }
        let cfg_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        let config: AdapterConfig = serde_json::from_str(&text)
            .map_err(|e| Error::adapter(&cfg_path, "config", e.to_string()))?;
        if config.r == 0 {
            return Err(Error::adapter(&cfg_path, "r", "rank must be at least 1"));
        }
        if let Some(base) = &config.base {
            if base.name != model.name || base.architecture != model.arch {
                let show = |n: &Option<String>, a: &str| {
                    format!("'{}' ({a})", n.as_deref().unwrap_or("unnamed"))
                };
                return Err(Error::adapter(
                    &cfg_path,
                    "base",
                    format!(
                        "trained on base {}, but the model loaded is {}",
                        show(&base.name, &base.architecture),
                        show(&model.name, &model.arch)
                    ),
                ));
            }
        }
        let targets = config.targets().map_err(|m| {
            Error::adapter(
                &cfg_path,
                "target_modules",
                format!(
                    "unknown target module '{m}' (expected {})",
                    crate::model::Target::peft_names()
                ),
            )
        })?;
        let w_path = dir.join(WEIGHTS_FILE);
        if !w_path.exists() {
            return Err(Error::adapter(
                &w_path,
                WEIGHTS_FILE,
                "missing weights file",
            ));
        }
        let mut tensors: HashMap<String, Tensor> =
            candle_core::safetensors::load(&w_path, &Device::Cpu).map_err(|e| {
                Error::adapter(
                    &w_path,
                    WEIGHTS_FILE,
                    format!("not a readable safetensors file: {e}"),
                )
            })?;
        let layers: Vec<usize> = match &config.layers_to_transform {
            None => (0..model.n_layer).collect(),
            Some(ls) => {
                if let Some(l) = ls.iter().find(|&&l| l >= model.n_layer) {
                    return Err(Error::adapter(
                        &cfg_path,
                        "layers_to_transform",
                        format!("layer {l} of a {}-layer model", model.n_layer),
                    ));
                }
                ls.clone()
            }
        };
        let mut pairs = BTreeMap::new();
        for layer in layers {
            for &t in &targets {
                let mut take = |ab: char, shape: (usize, usize)| -> Result<Tensor> {
                    let name = peft_tensor_name(layer, t, ab);
                    let w = tensors
                        .remove(&name)
                        .ok_or_else(|| Error::adapter(&w_path, &name, "missing tensor"))?;
                    let dims = w.dims().to_vec();
                    if dims != [shape.0, shape.1] {
                        let what = if ab == 'A' && dims.len() == 2 && dims[1] == shape.1
                            || ab == 'B' && dims.len() == 2 && dims[0] == shape.0
                        {
                            format!(
                                "rank mismatch: shape {dims:?}, config says r = {}",
                                config.r
                            )
                        } else {
                            format!("wrong shape {dims:?}, expected [{}, {}]", shape.0, shape.1)
                        };
                        return Err(Error::adapter(&w_path, &name, what));
                    }
                    Ok(w.to_dtype(DType::F32)?)
                };
                let a = take('A', (config.r, model.in_features(t)))?;
                let mut b = take('B', (model.out_features(t), config.r))?;
                if let Some(h) = rope_heads(model, t) {
                    b = permute_rows(&b, h, true)?;
                }
                pairs.insert((layer, t), LoraPair { a, b });
            }
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(Error::adapter(
                &w_path,
                extra,
                "unexpected tensor (not a target of this adapter, or layer out of range)",
            ));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            config,
            pairs,
            steer: BTreeMap::new(),
        })
    }

    /// Save in PEFT's layout (q/k `B` back in HF row order); each file written atomically.
    pub fn save(&self, dir: impl AsRef<Path>, model: &Config) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let mut out: HashMap<String, Tensor> = HashMap::new();
        for ((layer, t), p) in &self.pairs {
            let b = match rope_heads(model, *t) {
                Some(h) => permute_rows(&p.b, h, false)?,
                None => p.b.clone(),
            };
            out.insert(peft_tensor_name(*layer, *t, 'A'), p.a.contiguous()?);
            out.insert(peft_tensor_name(*layer, *t, 'B'), b.contiguous()?);
        }
        let w_path = dir.join(WEIGHTS_FILE);
        let tmp = dir.join(format!(".{WEIGHTS_FILE}.{}.tmp", std::process::id()));
        candle_core::safetensors::save(&out, &tmp)
            .map_err(|e| Error::adapter(&tmp, WEIGHTS_FILE, e.to_string()))?;
        std::fs::rename(&tmp, &w_path).map_err(|e| Error::io(&w_path, e))?;
        let json = serde_json::to_string_pretty(&self.config)
            .map_err(|e| Error::Internal(format!("{CONFIG_FILE}: {e}")))?;
        crate::error::write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
    }

    /// The weight change of one linear, `s * B @ A` `(out, in)` in GGUF row order.
    pub fn delta(&self, layer: usize, target: Target) -> Result<Option<Tensor>> {
        match self.pairs.get(&(layer, target)) {
            None => Ok(None),
            Some(p) => Ok(Some((p.b.matmul(&p.a)? * self.scale())?)),
        }
    }

    /// A random non-zero adapter (both `A` and `B` random), for tests and benchmarks.
    pub fn random(
        model: &Config,
        stance: &str,
        rank: usize,
        alpha: f64,
        targets: &[Target],
        seed: u64,
        std: f32,
    ) -> Result<Adapter> {
        if rank == 0 {
            return Err(Error::setting("rank", "must be at least 1"));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut rand = |r: usize, c: usize| -> Result<Tensor> {
            let v: Vec<f32> = (0..r * c)
                .map(|_| (rng.random::<f32>() * 2.0 - 1.0) * std * 1.732)
                .collect();
            Ok(Tensor::from_vec(v, (r, c), &Device::Cpu)?)
        };
        let mut pairs = BTreeMap::new();
        for layer in 0..model.n_layer {
            for &t in targets {
                let a = (rand(rank, model.in_features(t))? / (model.in_features(t) as f64).sqrt())?;
                let b = rand(model.out_features(t), rank)?;
                pairs.insert((layer, t), LoraPair { a, b });
            }
        }
        Ok(Adapter {
            dir: PathBuf::new(),
            config: AdapterConfig {
                r: rank,
                lora_alpha: alpha,
                target_modules: targets.iter().map(|t| t.peft_name().to_string()).collect(),
                use_rslora: false,
                base_model_name_or_path: model.name.clone(),
                base: Some(BaseModel::of(model, None)),
                stance: Some(stance.to_string()),
                description: Some(format!(
                    "random {stance} adapter (seed {seed}) for tests and benchmarks; not trained"
                )),
                peft_type: default_peft_type(),
                task_type: default_task_type(),
                lora_dropout: 0.0,
                bias: default_bias(),
                fan_in_fan_out: false,
                inference_mode: true,
                layers_to_transform: None,
            },
            pairs,
            steer: BTreeMap::new(),
        })
    }

    /// Short name: the stance if given, else the directory name.
    pub fn name(&self) -> String {
        self.config.stance.clone().unwrap_or_else(|| {
            self.dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "adapter".into())
        })
    }
}
