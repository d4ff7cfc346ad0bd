//! An independent f32 reference for Qwen2 bases: candle-transformers' plain `qwen2` model (no
//! quantized products, no rounding of activations) over a GGUF's tensors dequantized to f32.
//! What our forward pass and llama.cpp's are both measured against (tests/model_real.rs,
//! tests/llamacpp.rs, examples/parity_probe.rs).

use candle_core::quantized::gguf_file;
use candle_core::{Device, Tensor};
use std::path::Path;

/// A plain 64+-token text whose next-token log-probabilities the parity checks compare.
#[allow(dead_code)] // (this file is also compiled into examples/parity_probe.rs)
pub const PARITY_TEXT: &str =
    "The river rose slowly through the night, and by morning the low fields near the \
old mill were under a foot of brown water. Farmers moved their animals to the ridge, while the \
town council met in the school gym to plan sandbags, shelters and a rota of volunteers for the \
weekend ahead. By noon the rain had eased, the radio promised a dry evening, and children were \
already floating paper boats along the flooded lane behind the bakery.";

/// `log softmax(row)[target]`, in f64.
pub fn log_softmax_at(row: &[f32], target: u32) -> f64 {
    let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
    let lse = mx + row.iter().map(|v| (*v as f64 - mx).exp()).sum::<f64>().ln();
    row[target as usize] as f64 - lse
}

/// Next-token log-probabilities of `ids` under `m` (no adapters), one prompt pass.
pub fn model_logprobs(m: &stancemix::model::Model, ids: &[u32]) -> Vec<f64> {
    use stancemix::model::{Logits, NoHook, Pass};
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let pass = Pass {
        hook: &NoHook,
        logits: Logits::All,
        differentiable: false,
    };
    let z: Vec<Vec<f32>> = m
        .forward(&x, None, &pass)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    (0..ids.len() - 1)
        .map(|i| log_softmax_at(&z[i], ids[i + 1]))
        .collect()
}

/// Mean absolute difference.
pub fn mad(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f64>() / a.len().min(b.len()) as f64
}

/// Hugging Face's name for a GGUF tensor of a Qwen2 file.
fn hf_name(name: &str) -> Option<String> {
    if let Some(rest) = name.strip_prefix("blk.") {
        let (i, rest) = rest.split_once('.')?;
        let (module, kind) = rest.split_once('.')?;
        let module = match module {
            "attn_q" => "self_attn.q_proj",
            "attn_k" => "self_attn.k_proj",
            "attn_v" => "self_attn.v_proj",
            "attn_output" => "self_attn.o_proj",
            "ffn_gate" => "mlp.gate_proj",
            "ffn_up" => "mlp.up_proj",
            "ffn_down" => "mlp.down_proj",
            "attn_norm" => "input_layernorm",
            "ffn_norm" => "post_attention_layernorm",
            _ => return None,
        };
        return Some(format!("model.layers.{i}.{module}.{kind}"));
    }
    Some(
        match name {
            "token_embd.weight" => "model.embed_tokens.weight",
            "output_norm.weight" => "model.norm.weight",
            "output.weight" => "lm_head.weight",
            _ => return None,
        }
        .into(),
    )
}

/// Next-token log-probabilities of `ids` (`ids.len() - 1` of them) from candle's f32 `qwen2`
/// over the Qwen2 GGUF at `path`, its weights dequantized (qwen2 files keep q/k rows in Hugging
/// Face order; no permutation). Takes about 4 bytes a parameter of memory.
pub fn qwen2_f32_logprobs(path: &Path, ids: &[u32]) -> anyhow::Result<Vec<f64>> {
    use candle_transformers::models::qwen2;
    let mut f = std::fs::File::open(path)?;
    let ct = gguf_file::Content::read(&mut f)?;
    let md = |k: &str| -> anyhow::Result<&gguf_file::Value> {
        ct.metadata
            .get(k)
            .ok_or_else(|| anyhow::anyhow!("{}: no {k}", path.display()))
    };
    let u = |k: &str| -> anyhow::Result<usize> { Ok(md(k)?.to_u32()? as usize) };
    let mut tensors = std::collections::HashMap::new();
    for name in ct.tensor_infos.keys() {
        let hf = hf_name(name)
            .ok_or_else(|| anyhow::anyhow!("{}: unexpected tensor {name}", path.display()))?;
        let t = ct
            .tensor(&mut f, name, &Device::Cpu)?
            .dequantize(&Device::Cpu)?;
        tensors.insert(hf, t);
    }
    let tied = !tensors.contains_key("lm_head.weight");
    let head = tensors[if tied {
        "model.embed_tokens.weight"
    } else {
        "lm_head.weight"
    }]
    .clone();
    let layers = u("qwen2.block_count")?;
    let cfg = qwen2::Config {
        vocab_size: head.dim(0)?,
        hidden_size: u("qwen2.embedding_length")?,
        intermediate_size: u("qwen2.feed_forward_length")?,
        num_hidden_layers: layers,
        num_attention_heads: u("qwen2.attention.head_count")?,
        num_key_value_heads: u("qwen2.attention.head_count_kv")?,
        max_position_embeddings: u("qwen2.context_length")?,
        sliding_window: u("qwen2.context_length")?,
        max_window_layers: layers,
        tie_word_embeddings: tied,
        rope_theta: md("qwen2.rope.freq_base")?.to_f32()? as f64,
        rms_norm_eps: md("qwen2.attention.layer_norm_rms_epsilon")?.to_f32()? as f64,
        use_sliding_window: false,
        hidden_act: candle_nn::Activation::Silu,
    };
    let vb = candle_nn::VarBuilder::from_tensors(tensors, candle_core::DType::F32, &Device::Cpu);
    let mut model = qwen2::Model::new(&cfg, vb)?;
    let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
    let h = model.forward(&x, 0, None)?.squeeze(0)?; // (t, hidden), final norm applied
    let z: Vec<Vec<f32>> = h.matmul(&head.t()?)?.to_vec2()?;
    Ok((0..ids.len() - 1)
        .map(|i| log_softmax_at(&z[i], ids[i + 1]))
        .collect())
}
