//! Where do our next-token log-probabilities and llama.cpp's part? Three readings of one text on a
//! Qwen2 or LLaMA GGUF: ours (the file's weights on our int8 kernels), candle-transformers'
//! `quantized_qwen2` / `quantized_llama` (ggml's own block products, activations rounded to 8 bits
//! as llama.cpp rounds them), and llama.cpp's (from `scripts/peers/llamacpp_reference.py`).
//! Prints the mean |difference| of each pair, so a gap can be put on our forward pass or on the
//! rounding both references share (docs/EVAL.md, parity with llama.cpp).
//!
//! ```sh
//! .peers/lcpp/bin/python scripts/peers/llamacpp_reference.py MODEL REQUEST.json > ANSWER.json
//! cargo run --release --example parity_probe -- MODEL ANSWER.json [f32]   # our weights in f32
//! ```
//! (REQUEST: `{"lines": [], "prompts": [], "greedy": 0, "text": "..."}`.)

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use stancemix::model::{LoadOptions, Logits, Model, NoHook, Pass};

#[path = "../tests/common/reference.rs"]
mod reference;
use reference::{log_softmax_at, mad, model_logprobs, qwen2_f32_logprobs};

/// One step of a reference model: a token at a position to the last position's logits.
type Step = Box<dyn FnMut(&Tensor, usize) -> candle_core::Result<Tensor>>;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (model_path, answer, format) = match args.as_slice() {
        [m, a] => (m, a, "stored"),
        [m, a, f] => (m, a, f.as_str()),
        _ => anyhow::bail!("usage: parity_probe MODEL.gguf LLAMACPP_ANSWER.json [WEIGHT_FORMAT]"),
    };
    let answer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(answer)?)?;
    let ids: Vec<u32> = serde_json::from_value(answer["text_ids"].clone())?;
    let theirs: Vec<f64> = serde_json::from_value(answer["logprobs"].clone())?;
    let n = ids.len().min(64);

    let format = format.parse()?;
    let ours_model = Model::load(std::path::Path::new(model_path), &LoadOptions { format })?;
    let x = Tensor::new(&ids[..n], &Device::Cpu)?.unsqueeze(0)?;
    let ours = model_logprobs(&ours_model, &ids[..n]);
    // Outliers: the residual stream's largest |value| at the first position and at the others,
    // after a few depths (LLaMA-family models park "massive activations" on the first token).
    for depth in [
        1,
        2,
        4,
        ours_model.config.n_layer / 2,
        ours_model.config.n_layer,
    ] {
        let pass = Pass {
            hook: &NoHook,
            logits: Logits::Layer(depth),
            differentiable: false,
        };
        let h: Vec<Vec<f32>> = ours_model.forward(&x, None, &pass)?.squeeze(0)?.to_vec2()?;
        let maxabs = |r: &[f32]| r.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rest = h[1..].iter().map(|r| maxabs(r)).fold(0f32, f32::max);
        println!(
            "after {depth:>2} blocks: max |x| first position {:>9.1}, others {:>7.1}",
            maxabs(&h[0]),
            rest
        );
    }
    let arch = ours_model.config.arch.clone();
    drop(ours_model);

    // candle's reference, one token at a time (its forward returns the last position's logits).
    let mut f = std::fs::File::open(model_path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let mut step: Step = match arch.as_str() {
        "qwen2" => {
            let mut m = candle_transformers::models::quantized_qwen2::ModelWeights::from_gguf(
                ct,
                &mut f,
                &Device::Cpu,
            )?;
            Box::new(move |x, pos| m.forward(x, pos))
        }
        "llama" => {
            let mut m = candle_transformers::models::quantized_llama::ModelWeights::from_gguf(
                ct,
                &mut f,
                &Device::Cpu,
            )?;
            Box::new(move |x, pos| m.forward(x, pos))
        }
        other => anyhow::bail!("no candle reference wired for architecture '{other}'"),
    };
    let mut candle = Vec::new();
    for i in 0..n - 1 {
        let x = Tensor::new(&ids[i..=i], &Device::Cpu)?.unsqueeze(0)?;
        let row: Vec<f32> = step(&x, i)?.squeeze(0)?.to_vec1()?;
        candle.push(log_softmax_at(&row, ids[i + 1]));
    }
    drop(step);
    let theirs = &theirs[..n - 1];
    // Qwen2: also candle's plain f32 `qwen2` over the file's weights dequantized: no rounding of
    // activations anywhere, the arbiter between the two roundings.
    if arch == "qwen2" {
        let exact = qwen2_f32_logprobs(std::path::Path::new(model_path), &ids[..n])?;
        println!("  exact f32 (candle qwen2, dequantized weights):");
        println!("    ours      vs exact: {:.4} nats", mad(&ours, &exact));
        println!("    candle q  vs exact: {:.4} nats", mad(&candle, &exact));
        println!("    llama.cpp vs exact: {:.4} nats", mad(theirs, &exact));
        println!("    position 0: exact {:.3}", exact[0]);
    }
    println!("{model_path}: {} next-token log-probabilities", n - 1);
    println!("  ours    vs llama.cpp: {:.4} nats", mad(&ours, theirs));
    println!("  candle  vs llama.cpp: {:.4} nats", mad(&candle, theirs));
    println!("  ours    vs candle:    {:.4} nats", mad(&ours, &candle));
    let worst = (0..n - 1)
        .max_by(|&a, &b| {
            (ours[a] - theirs[a])
                .abs()
                .total_cmp(&(ours[b] - theirs[b]).abs())
        })
        .unwrap_or(0);
    println!(
        "  largest ours-llama.cpp gap at position {worst}: ours {:.3}, candle {:.3}, llama.cpp {:.3}",
        ours[worst], candle[worst], theirs[worst]
    );
    Ok(())
}
