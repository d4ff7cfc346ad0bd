//! Fine-tune the blocks the gate reads: a LoRA adapter on the first `layer` blocks and a linear
//! head over the gate's pooled hidden features (per-token RMS-normalised, mean-pooled), trained
//! together with cross-entropy over the topics. The head only steers the training; the gate's
//! classifier is then fitted as usual (`Gate::train`) on the features the adapter produces.
//! Measurements: `router-data/README.md`, "Fine-tuned end to end".

use candle_core::{DType, Device, Tensor, Var, D};

use super::{learning_rate, AdamParams, AdamW, TrainLora};
use crate::lora::{Adapter, AdapterConfig};
use crate::model::{Logits, Model, Pass, Target};
use crate::{Error, Result};

/// Fine-tuning settings.
#[derive(Debug, Clone, PartialEq)]
pub struct FinetuneConfig {
    pub epochs: usize,
    /// Peak learning rate (20 warm-up steps, then cosine to a tenth).
    pub lr: f64,
    pub rank: usize,
    /// Prompts per step.
    pub batch: usize,
    /// Seeds the adapter's initialisation and the data order.
    pub seed: u64,
    /// Longest text read, in tokens (the rest is cut).
    pub max_tokens: usize,
}

/// One epoch's figures, passed to the progress callback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpochReport {
    /// 1-based.
    pub epoch: usize,
    /// Mean cross-entropy of the training batches.
    pub train_loss: f64,
    /// Accuracy of the training head on the held-out examples, when some were given.
    pub dev_accuracy: Option<f64>,
}

impl Default for FinetuneConfig {
    fn default() -> Self {
        FinetuneConfig {
            epochs: 4,
            lr: 1e-3,
            rank: 8,
            batch: 16,
            seed: 1,
            max_tokens: 64,
        }
    }
}

/// Logits of the training head for a batch of texts.
fn head_logits(
    model: &Model,
    lora: &TrainLora,
    layer: usize,
    head: (&Var, &Var),
    texts: &[&str],
    max_tokens: usize,
    differentiable: bool,
) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(texts.len());
    for t in texts {
        let mut v = model.tokenizer.encode(t)?;
        v.truncate(max_tokens.max(1));
        if v.is_empty() {
            return Err(Error::no_data(
                "gate fine-tuning",
                format!("'{t}' has no tokens"),
            ));
        }
        ids.push(v);
    }
    let t = ids.iter().map(Vec::len).max().unwrap_or(1);
    let b = ids.len();
    // Right padding: the causal mask keeps it from touching the real tokens; the pooling
    // weights (1 / length on real tokens, 0 on padding) leave it out of the mean.
    let mut flat = vec![0u32; b * t];
    let mut weights = vec![0f32; b * t];
    for (r, v) in ids.iter().enumerate() {
        flat[r * t..r * t + v.len()].copy_from_slice(v);
        weights[r * t..r * t + v.len()].fill(1.0 / v.len() as f32);
    }
    let tokens = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
    let weights = Tensor::from_vec(weights, (b, t, 1), &Device::Cpu)?;
    let pass = Pass {
        hook: lora,
        logits: Logits::Layer(layer),
        differentiable,
    };
    let h = model.forward(&tokens, None, &pass)?; // (b, t, hidden)
    let rms = (h.sqr()?.mean_keepdim(D::Minus1)? + model.config.rms_eps)?.sqrt()?;
    let pooled = h.broadcast_div(&rms)?.broadcast_mul(&weights)?.sum(1)?; // (b, hidden)
    Ok(pooled
        .matmul(&head.0.as_tensor().t()?)?
        .broadcast_add(head.1.as_tensor())?)
}

/// Train the adapter on `(text, class)` examples (texts as the gate reads them, i.e. already
/// wrapped by its template); `model` must carry gradients (f32 or int8 weights). After each
/// epoch `progress` gets the training loss and, when `dev` holds examples, the training head's
/// accuracy on them.
pub fn finetune(
    model: &Model,
    layer: usize,
    examples: &[(String, usize)],
    dev: &[(String, usize)],
    classes: usize,
    cfg: &FinetuneConfig,
    progress: &mut dyn FnMut(EpochReport),
) -> Result<Adapter> {
    if examples.is_empty() || classes == 0 {
        return Err(Error::no_data("gate fine-tuning", "no examples"));
    }
    if layer == 0 || layer > model.config.n_layer {
        return Err(Error::setting(
            "layer",
            format!(
                "gate fine-tuning: layer {layer} of a {}-layer model (1-{0} allowed)",
                model.config.n_layer
            ),
        ));
    }
    if let Some((_, c)) = examples.iter().chain(dev).find(|(_, c)| *c >= classes) {
        return Err(Error::setting(
            "classes",
            format!("gate fine-tuning: an example has class {c}, of {classes} classes"),
        ));
    }
    let ac = AdapterConfig {
        r: cfg.rank,
        lora_alpha: 2.0 * cfg.rank as f64,
        target_modules: Target::ALL.map(|t| t.peft_name().to_string()).to_vec(),
        use_rslora: false,
        base_model_name_or_path: model.config.name.clone(),
        base: Some(crate::lora::BaseModel::of(&model.config, None)),
        stance: None,
        description: Some(format!(
            "the gate's reader: fine-tuned on topic labels, blocks 1-{layer} only"
        )),
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        lora_dropout: 0.0,
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        layers_to_transform: Some((0..layer).collect()),
    };
    let mut lora = TrainLora::init(&model.config, ac, cfg.seed, 0.0)?;
    lora.pairs.retain(|(l, _), _| *l < layer);
    let w = Var::zeros((classes, model.config.hidden), DType::F32, &Device::Cpu)?;
    let b = Var::zeros(classes, DType::F32, &Device::Cpu)?;
    let mut vars: Vec<&Var> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    vars.push(&w);
    vars.push(&b);
    let mut opt = AdamW::new(&vars, AdamParams::with_weight_decay(0.0))?;
    let total = examples.len().div_ceil(cfg.batch.max(1)) * cfg.epochs;
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        // A seeded shuffle per epoch (LCG, Fisher-Yates).
        let mut s = cfg.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64;
        for i in (1..order.len()).rev() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut loss_sum = 0.0;
        let mut batches = 0;
        for chunk in order.chunks(cfg.batch.max(1)) {
            let texts: Vec<&str> = chunk.iter().map(|&i| examples[i].0.as_str()).collect();
            let labels: Vec<u32> = chunk.iter().map(|&i| examples[i].1 as u32).collect();
            let labels = Tensor::new(labels, &Device::Cpu)?;
            let logits = head_logits(model, &lora, layer, (&w, &b), &texts, cfg.max_tokens, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            batches += 1;
            let grads = loss.backward()?;
            let g = vars
                .iter()
                .map(|v| match grads.get(v.as_tensor()) {
                    Some(g) => Ok(g.clone()),
                    None => v.zeros_like(),
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            opt.step(&vars, &g, learning_rate(step, total, 20, cfg.lr, 0.1))?;
            step += 1;
        }
        let dev_accuracy = if dev.is_empty() {
            None
        } else {
            let mut right = 0;
            for chunk in dev.chunks(cfg.batch.max(1)) {
                let texts: Vec<&str> = chunk.iter().map(|(t, _)| t.as_str()).collect();
                let logits =
                    head_logits(model, &lora, layer, (&w, &b), &texts, cfg.max_tokens, false)?;
                let guess = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
                right += guess
                    .iter()
                    .zip(chunk)
                    .filter(|(g, (_, c))| **g as usize == *c)
                    .count();
            }
            Some(right as f64 / dev.len() as f64)
        };
        progress(EpochReport {
            epoch: epoch + 1,
            train_loss: loss_sum / batches.max(1) as f64,
            dev_accuracy,
        });
    }
    lora.to_adapter()
}
