//! Experiment: the gate fine-tuned end to end. A rank-8 LoRA on the first `LAYER` blocks (the
//! blocks the shipped gate already runs) and a linear head on the mean-pooled, per-token
//! RMS-normalised residual stream after them (the shipped gate's hidden features), trained
//! together with cross-entropy over the 21 topics; dev accuracy on the router prompts' dev split.
//! The shipped gate is a linear probe of the same features (0.812).
//!
//! `cargo run --release --example gate_lora -- [EPOCHS] [LR]` (default 4, 5e-4).
use candle_core::{DType, Device, Tensor, Var, D};
use stancemix::data::{is_dev, load_router_prompts, load_stance_dir, topics};
use stancemix::lora::AdapterConfig;
use stancemix::model::{fetch, LoadOptions, Logits, Model, Pass, Target};
use stancemix::train::{default_base, learning_rate, AdamParams, AdamW, TrainLora};

const LAYER: usize = 8;
const BATCH: usize = 16;

fn batch_logits(
    model: &Model,
    lora: &TrainLora,
    head: (&Var, &Var),
    texts: &[&str],
    train: bool,
) -> anyhow::Result<Tensor> {
    let ids: Vec<Vec<u32>> = texts
        .iter()
        .map(|t| {
            let mut v = model.tokenizer.encode(t)?;
            v.truncate(64);
            Ok(v)
        })
        .collect::<stancemix::Result<_>>()?;
    let t = ids.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let b = ids.len();
    let mut flat = vec![0u32; b * t];
    let mut mask = vec![0f32; b * t];
    for (r, v) in ids.iter().enumerate() {
        flat[r * t..r * t + v.len()].copy_from_slice(v);
        for m in &mut mask[r * t..r * t + v.len()] {
            *m = 1.0 / v.len() as f32;
        }
    }
    let tokens = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
    let mask = Tensor::from_vec(mask, (b, t, 1), &Device::Cpu)?;
    let pass = Pass {
        hook: lora,
        logits: Logits::Layer(LAYER),
        differentiable: train,
    };
    let h = model.forward(&tokens, None, &pass)?; // (b, t, hidden)
    let rms = (h.sqr()?.mean_keepdim(D::Minus1)? + model.config.rms_eps)?.sqrt()?;
    let pooled = h.broadcast_div(&rms)?.broadcast_mul(&mask)?.sum(1)?; // (b, hidden)
    Ok(pooled
        .matmul(&head.0.as_tensor().t()?)?
        .broadcast_add(head.1.as_tensor())?)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let epochs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(4);
    let peak: f64 = args.next().map(|a| a.parse()).transpose()?.unwrap_or(5e-4);
    let model = Model::load(
        &fetch::ensure_default_model()?,
        &LoadOptions {
            format: default_base(),
        },
    )?;
    let ids: Vec<&str> = topics::ECONOMIC
        .iter()
        .chain(topics::SOCIAL)
        .copied()
        .chain([topics::NON_POLITICAL])
        .collect();
    let class = |t: &str| ids.iter().position(|x| *x == t).unwrap() as u32;
    let prompts = load_router_prompts(std::path::Path::new("router-data/prompts.jsonl"))?;
    let mut train: Vec<(String, u32)> = Vec::new();
    let mut dev: Vec<(String, u32)> = Vec::new();
    for p in &prompts {
        let row = (p.text.clone(), class(&p.topic));
        if is_dev(&p.id) {
            dev.push(row);
        } else {
            train.push(row);
        }
    }
    for p in load_stance_dir(std::path::Path::new("adapters/data/stance"))? {
        train.push((p.prompt.clone(), class(&p.topic)));
    }
    println!(
        "{} train, {} dev prompts, {} classes",
        train.len(),
        dev.len(),
        ids.len()
    );
    let ac = AdapterConfig {
        r: 8,
        lora_alpha: 16.0,
        target_modules: Target::ALL.map(|t| t.peft_name().to_string()).to_vec(),
        use_rslora: false,
        base_model_name_or_path: model.config.name.clone(),
        stance: None,
        description: None,
        peft_type: "LORA".into(),
        task_type: "CAUSAL_LM".into(),
        lora_dropout: 0.0,
        bias: "none".into(),
        fan_in_fan_out: false,
        inference_mode: true,
        layers_to_transform: None,
    };
    let mut lora = TrainLora::init(&model.config, ac, 1, 0.0)?;
    lora.pairs.retain(|(l, _), _| *l < LAYER);
    let w = Var::zeros((ids.len(), model.config.hidden), DType::F32, &Device::Cpu)?;
    let b = Var::zeros(ids.len(), DType::F32, &Device::Cpu)?;
    let mut vars: Vec<&Var> = lora.named_vars().into_iter().map(|(_, v)| v).collect();
    vars.push(&w);
    vars.push(&b);
    let mut opt = AdamW::new(
        &vars,
        AdamParams {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )?;
    let steps_per_epoch = train.len().div_ceil(BATCH);
    let total = steps_per_epoch * epochs;
    let mut step = 0;
    let mut order: Vec<usize> = (0..train.len()).collect();
    let t0 = std::time::Instant::now();
    for epoch in 0..epochs {
        // A fixed shuffle per epoch (a simple LCG, seeded by the epoch).
        let mut s = 0x9E37_79B9u64 + epoch as u64;
        for i in (1..order.len()).rev() {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            order.swap(i, (s >> 33) as usize % (i + 1));
        }
        let mut loss_sum = 0.0;
        for chunk in order.chunks(BATCH) {
            let texts: Vec<&str> = chunk.iter().map(|&i| train[i].0.as_str()).collect();
            let labels = Tensor::new(
                chunk.iter().map(|&i| train[i].1).collect::<Vec<_>>(),
                &Device::Cpu,
            )?;
            let logits = batch_logits(&model, &lora, (&w, &b), &texts, true)?;
            let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            let g: Vec<Tensor> = vars
                .iter()
                .map(|v| {
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .unwrap_or_else(|| v.zeros_like().unwrap())
                })
                .collect();
            let lr = learning_rate(step, total, 20, peak, 0.1);
            opt.step(&vars, &g, lr)?;
            step += 1;
        }
        let mut right = 0;
        for chunk in dev.chunks(32) {
            let texts: Vec<&str> = chunk.iter().map(|d| d.0.as_str()).collect();
            let logits = batch_logits(&model, &lora, (&w, &b), &texts, false)?;
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            right += pred.iter().zip(chunk).filter(|(p, d)| **p == d.1).count();
        }
        println!(
            "epoch {}: train loss {:.4}, dev accuracy {:.3} ({right}/{}), {:.0} s",
            epoch + 1,
            loss_sum / steps_per_epoch as f64,
            right as f64 / dev.len() as f64,
            dev.len(),
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
