//! Steering-vector experts: one direction per layer, added to the residual stream after that
//! block as `h += g * v_l` (g the expert's gate weight, the same `g` that scales a LoRA expert).
//!
//! Files are llama.cpp control vectors (`cvector-generator`'s output, what `--control-vector`
//! reads): a GGUF with `general.architecture = "controlvector"`, `controlvector.model_hint`,
//! `controlvector.layer_count`, and one f32 tensor `direction.N` of the hidden width for each
//! steered block N, added to the output of block N (0-based; llama.cpp never steers block 0's
//! input). stancemix adds `stancemix.stance` and `stancemix.base_name` to the metadata.
//!
//! Directions come from the counterfactual pairs by forward passes only ([`compute`]): per block,
//! the mean over pairs of the difference between the two sides' residual streams, each averaged
//! over its answer's tokens (the "mean difference" of repeng and llama.cpp's generator).

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;

use super::{Adapter, AdapterConfig, BaseModel};
use crate::model::{Config, LinearHook, Logits, Model, Pass};
use crate::{Error, Result};

/// Is `path` a control-vector GGUF (rather than a PEFT adapter folder)?
pub fn is_control_vector(path: &Path) -> bool {
    path.is_file() && path.extension().is_some_and(|x| x == "gguf")
}

fn meta_string(content: &gguf_file::Content, key: &str) -> Option<String> {
    content
        .metadata
        .get(key)
        .and_then(|v| v.to_string().ok())
        .cloned()
}

/// Load a control vector as a steering expert for `model`.
pub fn load(path: &Path, model: &Config) -> Result<Adapter> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut f)
        .map_err(|e| Error::adapter(path, "gguf", format!("not a readable GGUF file: {e}")))?;
    if meta_string(&content, "general.architecture").as_deref() != Some("controlvector") {
        return Err(Error::adapter(
            path,
            "general.architecture",
            "not a control vector (expected 'controlvector')",
        ));
    }
    if let Some(hint) = meta_string(&content, "controlvector.model_hint") {
        if hint != model.arch {
            return Err(Error::adapter(
                path,
                "controlvector.model_hint",
                format!(
                    "made for a '{hint}' model, but the model loaded is '{}'",
                    model.arch
                ),
            ));
        }
    }
    let base_name = meta_string(&content, "stancemix.base_name");
    if base_name.is_some() && base_name != model.name {
        return Err(Error::adapter(
            path,
            "stancemix.base_name",
            format!(
                "made on base '{}', but the model loaded is '{}'",
                base_name.unwrap_or_default(),
                model.name.as_deref().unwrap_or("unnamed")
            ),
        ));
    }
    let mut steer = BTreeMap::new();
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    for name in names {
        let layer = name
            .strip_prefix("direction.")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| {
                Error::adapter(path, name, "unexpected tensor (expected direction.N)")
            })?;
        if layer == 0 || layer >= model.n_layer {
            return Err(Error::adapter(
                path,
                name,
                format!(
                    "block {layer} out of range 1-{} for this model",
                    model.n_layer - 1
                ),
            ));
        }
        let t = content
            .tensor(&mut f, name, &Device::Cpu)
            .and_then(|q| q.dequantize(&Device::Cpu))
            .map_err(|e| Error::adapter(path, name, e.to_string()))?;
        if t.dims() != [model.hidden] {
            return Err(Error::adapter(
                path,
                name,
                format!(
                    "shape {:?}, expected [{}] (the model's hidden width)",
                    t.dims(),
                    model.hidden
                ),
            ));
        }
        steer.insert(layer, t);
    }
    if steer.is_empty() {
        return Err(Error::adapter(path, "direction.N", "no direction tensors"));
    }
    let stance = meta_string(&content, "stancemix.stance");
    Ok(Adapter {
        dir: path.to_path_buf(),
        config: AdapterConfig {
            r: 1,
            lora_alpha: 1.0,
            target_modules: Vec::new(),
            use_rslora: false,
            base_model_name_or_path: base_name.clone(),
            base: Some(BaseModel {
                name: base_name.or_else(|| model.name.clone()),
                architecture: model.arch.clone(),
                sha256: None,
            }),
            stance,
            description: Some("steering vector (llama.cpp control vector)".into()),
            peft_type: "CONTROL_VECTOR".into(),
            task_type: "CAUSAL_LM".into(),
            lora_dropout: 0.0,
            bias: "none".into(),
            fan_in_fan_out: false,
            inference_mode: true,
            layers_to_transform: None,
        },
        pairs: BTreeMap::new(),
        steer,
    })
}

/// Write `dirs` (block -> direction) as a control vector for `model`, atomically.
pub fn save(
    path: &Path,
    dirs: &BTreeMap<usize, Vec<f32>>,
    model: &Config,
    stance: &str,
) -> Result<()> {
    let mut tensors = Vec::new();
    for (layer, v) in dirs {
        let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
        tensors.push((
            format!("direction.{layer}"),
            QTensor::quantize(&t, GgmlDType::F32)?,
        ));
    }
    let n = model.n_layer as i32;
    let md: Vec<(&str, Value)> = vec![
        (
            "general.architecture",
            Value::String("controlvector".into()),
        ),
        (
            "controlvector.model_hint",
            Value::String(model.arch.clone()),
        ),
        ("controlvector.layer_count", Value::I32(n)),
        ("stancemix.stance", Value::String(stance.into())),
        (
            "stancemix.base_name",
            Value::String(model.name.clone().unwrap_or_default()),
        ),
    ];
    crate::model::write_gguf(path, &md, &tensors)
}

/// Records the residual stream after every block (one forward pass, one row).
struct Recorder {
    states: Mutex<BTreeMap<usize, Tensor>>,
}

impl LinearHook for Recorder {
    fn after_block(&self, layer: usize, x: Tensor) -> candle_core::Result<Tensor> {
        if let Ok(mut s) = self.states.lock() {
            s.insert(layer, x.clone());
        }
        Ok(x)
    }
}

/// The mean residual stream after each block over the tokens `from..` of `ids` (one pass).
fn answer_means(model: &Model, ids: &[u32], from: usize) -> Result<BTreeMap<usize, Vec<f32>>> {
    let rec = Recorder {
        states: Mutex::new(BTreeMap::new()),
    };
    let x = Tensor::new(ids, model.device())?.unsqueeze(0)?;
    model.forward(
        &x,
        None,
        &Pass {
            hook: &rec,
            logits: Logits::Hidden,
            differentiable: false,
        },
    )?;
    let states = rec
        .states
        .into_inner()
        .map_err(|_| Error::Internal("steering: the state recorder was poisoned".into()))?;
    let mut out = BTreeMap::new();
    for (layer, h) in states {
        let t = h.dim(1)?;
        let m = h.narrow(1, from, t - from)?.mean(1)?.squeeze(0)?; // (hidden,)
        out.insert(layer, m.to_vec1::<f32>()?);
    }
    Ok(out)
}

/// One counterfactual example: the rendered prompt and the two sides' answers.
pub struct Contrast<'a> {
    pub prompt: String,
    pub toward: &'a str,
    pub away: &'a str,
}

/// Mean over `examples` of (residual stream under `toward` - under `away`) after each block,
/// each side averaged over its answer's tokens. `progress(done, total)` after each example;
/// return `false` from it to stop early (the mean of what was done is returned).
pub fn compute(
    model: &Model,
    examples: &[Contrast],
    progress: &mut dyn FnMut(usize, usize) -> bool,
) -> Result<BTreeMap<usize, Vec<f32>>> {
    let tok = &model.tokenizer;
    let mut sum: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut n = 0usize;
    for (i, ex) in examples.iter().enumerate() {
        let p = tok.encode(&ex.prompt)?;
        let side = |answer: &str| -> Result<BTreeMap<usize, Vec<f32>>> {
            let a = tok.encode(answer)?;
            if a.is_empty() {
                return Err(Error::no_data(
                    "steering direction",
                    format!("empty answer in example {i}"),
                ));
            }
            answer_means(model, &[p.clone(), a].concat(), p.len())
        };
        let (pos, neg) = (side(ex.toward)?, side(ex.away)?);
        for (layer, v) in pos {
            let s = sum.entry(layer).or_insert_with(|| vec![0.0; v.len()]);
            for ((acc, a), b) in s.iter_mut().zip(&v).zip(&neg[&layer]) {
                *acc += (a - b) as f64;
            }
        }
        n += 1;
        if !progress(i + 1, examples.len()) {
            break;
        }
    }
    if n == 0 {
        return Err(Error::no_data(
            "steering direction",
            "no examples to compute it from",
        ));
    }
    Ok(sum
        .into_iter()
        .map(|(l, s)| (l, s.into_iter().map(|x| (x / n as f64) as f32).collect()))
        .collect())
}
