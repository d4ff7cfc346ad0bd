//! A tiny random-weight model of each family (LLaMA, Qwen2, Gemma 3) written as a real GGUF file,
//! for fast unit tests.
//!
//! Its tokenizer has one token per byte (no merges) plus the ChatML specials, so text
//! round-trips; its weights are seeded random normals.

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::path::Path;

use super::{write_gguf, Arch, Config, Target, ARCHITECTURES};
use crate::Result;

/// Shape of the tiny model: 2 layers, hidden 64, FFN 128, 4 heads over 2 KV heads.
pub fn tiny_config() -> Config {
    Config {
        arch: "llama".into(),
        family: super::Arch::Llama,
        name: Some("stancemix-tiny".into()),
        n_layer: 2,
        hidden: 64,
        ffn: 128,
        n_head: 4,
        n_kv_head: 2,
        head_dim: 16,
        rope_dim: 16,
        rope_base: 10_000.0,
        rope_scale: 1.0,
        sliding: None,
        embed_scale: None,
        attn_scale: 0.25,
        rms_eps: 1e-5,
        context_len: 512,
        vocab_size: 256 + 3,
    }
}

fn normal(rng: &mut StdRng, n: usize, std: f32) -> Vec<f32> {
    // Box-Muller from two uniforms: enough for random weights.
    (0..n)
        .map(|_| {
            let u1: f32 = rng.random::<f32>().max(1e-7);
            let u2: f32 = rng.random();
            std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
        })
        .collect()
}

/// The tiny shape in another family (`general.architecture` = its first name there). Gemma 3's
/// has six layers (five sliding, one global), heads of 32 (wider than hidden / heads, as in
/// Gemma) and its embedding scale.
pub fn tiny_config_of(family: Arch) -> Config {
    let arch = ARCHITECTURES
        .iter()
        .find(|(_, a)| *a == family)
        .map_or("llama", |(n, _)| *n);
    let c = Config {
        arch: arch.into(),
        family,
        ..tiny_config()
    };
    match family {
        Arch::Gemma3 => Config {
            n_layer: 6,
            head_dim: 32,
            rope_dim: 32,
            rope_base: 1_000_000.0,
            sliding: Some(super::Sliding {
                window: 512,
                pattern: 6,
                rope_base: 10_000.0,
            }),
            embed_scale: Some((c.hidden as f32).sqrt()),
            attn_scale: 1.0 / (32f32).sqrt(),
            rms_eps: 1e-6,
            ..c
        },
        Arch::Llama | Arch::Qwen2 => c,
    }
}

/// Write the tiny LLaMA to `path` (a GGUF with f32 tensors) from `seed`.
pub fn write_tiny_gguf(path: &Path, seed: u64) -> Result<()> {
    write_tiny_gguf_of(path, seed, Arch::Llama)
}

/// Write the tiny model of `family` to `path` (a GGUF with f32 tensors) from `seed`: Qwen2's
/// has random q/k/v biases and an untied output head; Gemma 3's has random norm weights near 1
/// (GGUF stores Gemma's `1 + w`) and its further norms.
pub fn write_tiny_gguf_of(path: &Path, seed: u64, family: Arch) -> Result<()> {
    write_random_gguf(path, seed, &tiny_config_of(family))
}

/// Write a random model of shape `c` (its `family`; vocabulary: bytes plus the ChatML specials,
/// `c.vocab_size` must be 259) to `path`, f32 tensors, from `seed`.
pub fn write_random_gguf(path: &Path, seed: u64, c: &Config) -> Result<()> {
    let (c, family) = (c.clone(), c.family);
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(seed);
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    // Values `mean + std * N(0, 1)`.
    let mut add = |name: String, shape: &[usize], std: f32, mean: f32| -> Result<()> {
        let n: usize = shape.iter().product();
        // (A constant draws nothing, so the other tensors' values do not depend on it.)
        let data: Vec<f32> = if std == 0.0 {
            vec![mean; n]
        } else {
            normal(&mut rng, n, std).iter().map(|x| x + mean).collect()
        };
        let t = Tensor::from_vec(data, shape, &dev)?;
        tensors.push((name, QTensor::quantize(&t, GgmlDType::F32)?));
        Ok(())
    };
    add(
        "token_embd.weight".into(),
        &[c.vocab_size, c.hidden],
        0.5,
        0.0,
    )?;
    // Norm weights: 1 (LLaMA, Qwen2), random near 1 (Gemma 3).
    let norm_std = if family.sandwich_norms() { 0.3 } else { 0.0 };
    add("output_norm.weight".into(), &[c.hidden], norm_std, 1.0)?;
    for i in 0..c.n_layer {
        add(
            format!("blk.{i}.attn_norm.weight"),
            &[c.hidden],
            norm_std,
            1.0,
        )?;
        add(
            format!("blk.{i}.ffn_norm.weight"),
            &[c.hidden],
            norm_std,
            1.0,
        )?;
        if family.sandwich_norms() {
            for (name, len) in [
                ("attn_q_norm", c.head_dim),
                ("attn_k_norm", c.head_dim),
                ("post_attention_norm", c.hidden),
                ("post_ffw_norm", c.hidden),
            ] {
                add(format!("blk.{i}.{name}.weight"), &[len], norm_std, 1.0)?;
            }
        }
        for t in Target::ALL {
            let std = 1.0 / (c.in_features(t) as f32).sqrt();
            add(
                format!("blk.{i}.{}.weight", t.gguf_name()),
                &[c.out_features(t), c.in_features(t)],
                std,
                0.0,
            )?;
        }
        if family.qkv_bias() {
            for t in [Target::Q, Target::K, Target::V] {
                add(
                    format!("blk.{i}.{}.bias", t.gguf_name()),
                    &[c.out_features(t)],
                    0.5,
                    0.0,
                )?;
            }
        }
    }
    if family == Arch::Qwen2 {
        add("output.weight".into(), &[c.vocab_size, c.hidden], 0.5, 0.0)?;
    }
    // Byte-level vocabulary: the 256 GPT-2 byte characters, then the specials.
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<Value> = alphabet
        .iter()
        .map(|ch| Value::String(ch.to_string()))
        .collect();
    let mut types: Vec<Value> = vec![Value::I32(1); tokens.len()];
    for s in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] {
        tokens.push(Value::String(s.into()));
        types.push(Value::I32(3));
    }
    let u32v = |x: usize| Value::U32(x as u32);
    let a = c.arch.as_str();
    let keys: Vec<String> = [
        "block_count",
        "embedding_length",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "rope.dimension_count",
        "rope.freq_base",
        "attention.layer_norm_rms_epsilon",
        "context_length",
    ]
    .iter()
    .map(|k| format!("{a}.{k}"))
    .collect();
    let mut md: Vec<(&str, Value)> = vec![
        ("general.architecture", Value::String(a.into())),
        ("general.name", Value::String("stancemix-tiny".into())),
        (&keys[0], u32v(c.n_layer)),
        (&keys[1], u32v(c.hidden)),
        (&keys[2], u32v(c.ffn)),
        (&keys[3], u32v(c.n_head)),
        (&keys[4], u32v(c.n_kv_head)),
        (&keys[5], u32v(c.rope_dim)),
        (&keys[6], Value::F32(c.rope_base)),
        (&keys[7], Value::F32(c.rms_eps as f32)),
        (&keys[8], u32v(c.context_len)),
        ("tokenizer.ggml.model", Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens", Value::Array(tokens)),
        ("tokenizer.ggml.token_type", Value::Array(types)),
        ("tokenizer.ggml.merges", Value::Array(vec![])),
        ("tokenizer.ggml.eos_token_id", Value::U32(258)),
        ("tokenizer.ggml.bos_token_id", Value::U32(257)),
    ];
    if family == Arch::Qwen2 {
        md.push(("tokenizer.ggml.pre", Value::String("qwen2".into())));
    }
    let (head_keys, window_key) = (
        [
            format!("{a}.attention.key_length"),
            format!("{a}.attention.value_length"),
        ],
        format!("{a}.attention.sliding_window"),
    );
    if c.head_dim * c.n_head != c.hidden {
        md.push((&head_keys[0], u32v(c.head_dim)));
        md.push((&head_keys[1], u32v(c.head_dim)));
    }
    if let Some(s) = c.sliding {
        md.push((&window_key, u32v(s.window)));
    }
    write_gguf(path, &md, &tensors)
}

/// A tensor of `shape` drawn from N(0, std^2) by a seeded generator, so tests that need random
/// inputs give the same inputs on every run (candle's own `randn` on the CPU cannot be seeded).
pub fn seeded_randn(seed: u64, std: f32, shape: &[usize]) -> Result<Tensor> {
    let mut rng = StdRng::seed_from_u64(seed);
    let n = shape.iter().product();
    Ok(Tensor::from_vec(
        normal(&mut rng, n, std),
        shape,
        &Device::Cpu,
    )?)
}
