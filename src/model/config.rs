//! Model hyper-parameters, read from GGUF metadata.

use candle_core::quantized::gguf_file::{Content, Value};
use std::path::Path;

use crate::{Error, Result};

/// `general.architecture` values this runtime reads, and the family each belongs to.
pub const ARCHITECTURES: &[(&str, Arch)] = &[
    ("llama", Arch::Llama),
    ("mistral", Arch::Llama),
    ("qwen2", Arch::Qwen2),
    ("gemma3", Arch::Gemma3),
];

/// A transformer family: what differs between the forward passes of the architectures we run.
///
/// All share the block layout `x += attn(norm(x)); x += mlp(norm(x))` with RMSNorm, grouped-query
/// attention, a gated MLP, and the GGUF tensor names `blk.N.attn_q.weight`...
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// LLaMA, Mistral, SmolLM2: no biases; GGUF stores q/k rows permuted for interleaved RoPE.
    Llama,
    /// Qwen2 / Qwen2.5: biases on q, k and v; RoPE over the two halves of each head (NeoX
    /// style, rows as in Hugging Face); usually an untied output head.
    Qwen2,
    /// Gemma 3: the embedding scaled by sqrt(hidden); RMSNorm also after attention and after the
    /// MLP (before each residual add) and on each head of q and k; GeGLU (tanh GELU) MLP;
    /// five sliding-window layers (RoPE base 10,000) to one global layer (the file's base).
    /// GGUF stores its norm weights as `1 + w`, so the norms are plain RMSNorm here.
    Gemma3,
}

/// The MLP's gate activation: `down(act(gate(x)) * up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// SwiGLU (LLaMA, Qwen2).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

/// How RoPE pairs the dimensions of a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RopeStyle {
    /// Pairs `(2i, 2i+1)`: llama.cpp's `LLAMA_ROPE_TYPE_NORM` (q/k rows permuted in the file).
    Interleaved,
    /// Pairs `(i, i + d/2)`: llama.cpp's `LLAMA_ROPE_TYPE_NEOX`.
    Halves,
}

impl Arch {
    /// The family of a `general.architecture` value, if supported.
    pub fn from_name(name: &str) -> Option<Arch> {
        ARCHITECTURES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, a)| *a)
    }

    /// How this family rotates q and k.
    pub fn rope(self) -> RopeStyle {
        match self {
            Arch::Llama => RopeStyle::Interleaved,
            Arch::Qwen2 | Arch::Gemma3 => RopeStyle::Halves,
        }
    }

    /// Whether blocks norm the attention and MLP outputs before adding them
    /// (`blk.N.post_attention_norm`, `blk.N.post_ffw_norm`) and each head of q and k after
    /// projecting it (`blk.N.attn_q_norm`, `blk.N.attn_k_norm`).
    pub fn sandwich_norms(self) -> bool {
        matches!(self, Arch::Gemma3)
    }

    /// The MLP's activation.
    pub fn activation(self) -> Activation {
        match self {
            Arch::Llama | Arch::Qwen2 => Activation::Silu,
            Arch::Gemma3 => Activation::GeluTanh,
        }
    }

    /// Whether q, k and v carry a bias (`blk.N.attn_q.bias`...).
    pub fn qkv_bias(self) -> bool {
        matches!(self, Arch::Qwen2)
    }
}

/// Shape and numeric constants of a LLaMA-family model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Config {
    /// `general.architecture` as stored.
    pub arch: String,
    /// The family the forward pass follows.
    pub family: Arch,
    /// `general.name`, if present.
    pub name: Option<String>,
    pub n_layer: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Dimensions rotated by RoPE (usually `head_dim`).
    pub rope_dim: usize,
    pub rope_base: f32,
    /// RoPE position scale of the global layers (`1 / rope.scaling.factor`; 1 without one).
    pub rope_scale: f32,
    /// Sliding-window attention: window length, which layers use it, their RoPE base.
    pub sliding: Option<Sliding>,
    /// Multiplier of the token embedding before the first block (Gemma: sqrt(hidden)).
    pub embed_scale: Option<f32>,
    /// Multiplier of q·k (1 / sqrt(head_dim) in every family read so far).
    pub attn_scale: f32,
    pub rms_eps: f64,
    pub context_len: usize,
    pub vocab_size: usize,
}

/// Sliding-window attention (Gemma 3): most layers see only the last `window` positions.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Sliding {
    /// A query at position `p` sees keys at `p - window + 1 ..= p`.
    pub window: usize,
    /// Every `pattern`-th layer (1-based) is global; the others slide.
    pub pattern: usize,
    /// RoPE base of the sliding layers.
    pub rope_base: f32,
}

impl Sliding {
    /// Gemma 3 as llama.cpp reads it: five sliding layers to one global, the sliding layers'
    /// RoPE base 10,000 (neither is stored in GGUF).
    const GEMMA3_PATTERN: usize = 6;
    const GEMMA3_ROPE_BASE: f32 = 10_000.0;
}

impl Config {
    /// Read the configuration from GGUF metadata; `path` is used in error messages.
    pub fn from_gguf(content: &Content, path: &Path) -> Result<Self> {
        let md = &content.metadata;
        let arch = match md.get("general.architecture") {
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(Error::model(path, "general.architecture is not a string")),
            None => {
                return Err(Error::model(
                    path,
                    "no general.architecture in GGUF metadata",
                ))
            }
        };
        let family = Arch::from_name(&arch).ok_or_else(|| {
            let known: Vec<&str> = ARCHITECTURES.iter().map(|(n, _)| *n).collect();
            Error::model(
                path,
                format!(
                    "unsupported architecture: general.architecture is '{arch}' (supported: {})",
                    known.join(", ")
                ),
            )
        })?;
        let get = |key: &str| -> Result<&Value> {
            let full = format!("{arch}.{key}");
            md.get(&full)
                .ok_or_else(|| Error::model(path, format!("missing metadata key {full}")))
        };
        let get_usize = |key: &str| -> Result<usize> {
            let v = get(key)?;
            v.to_u64()
                .map(|x| x as usize)
                .or_else(|_| v.to_u32().map(|x| x as usize))
                .map_err(|_| Error::model(path, format!("metadata {arch}.{key} is not an integer")))
        };
        let get_f32 = |key: &str| -> Result<Option<f32>> {
            match md.get(&format!("{arch}.{key}")) {
                None => Ok(None),
                Some(v) => v.to_f32().map(Some).map_err(|_| {
                    Error::model(path, format!("metadata {arch}.{key} is not a float"))
                }),
            }
        };
        let n_head = get_usize("attention.head_count")?;
        let hidden = get_usize("embedding_length")?;
        let n_kv_head = match md.get(&format!("{arch}.attention.head_count_kv")) {
            Some(_) => get_usize("attention.head_count_kv")?,
            None => n_head,
        };
        if n_head == 0 || hidden % n_head != 0 || n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(Error::model(
                path,
                format!(
                    "inconsistent heads: hidden {hidden}, heads {n_head}, kv heads {n_kv_head}"
                ),
            ));
        }
        // Gemma's heads are wider than hidden / heads: the file says so in key_length.
        let head_dim = match md.get(&format!("{arch}.attention.key_length")) {
            Some(_) => get_usize("attention.key_length")?,
            None => hidden / n_head,
        };
        if head_dim == 0 || head_dim % 2 != 0 {
            return Err(Error::model(
                path,
                format!("head dimension {head_dim} is not a positive even number"),
            ));
        }
        if let Some(Value::String(kind)) = md.get(&format!("{arch}.rope.scaling.type")) {
            if !matches!(kind.as_str(), "none" | "linear") {
                return Err(Error::model(
                    path,
                    format!("{arch}.rope.scaling.type is '{kind}': only linear RoPE scaling is supported"),
                ));
            }
        }
        let rope_scale = match get_f32("rope.scaling.factor")? {
            Some(f) if f > 0.0 => 1.0 / f,
            _ => 1.0,
        };
        let sliding = match (family, md.get(&format!("{arch}.attention.sliding_window"))) {
            (Arch::Gemma3, Some(_)) => Some(Sliding {
                window: get_usize("attention.sliding_window")?,
                pattern: Sliding::GEMMA3_PATTERN,
                rope_base: Sliding::GEMMA3_ROPE_BASE,
            }),
            _ => None,
        };
        let rope_dim = match md.get(&format!("{arch}.rope.dimension_count")) {
            Some(_) => get_usize("rope.dimension_count")?,
            None => head_dim,
        };
        let vocab_size = match md.get("tokenizer.ggml.tokens") {
            Some(Value::Array(a)) => a.len(),
            _ => content
                .tensor_infos
                .get("token_embd.weight")
                .map(|t| t.shape.dims()[0])
                .ok_or_else(|| {
                    Error::model(path, "no tokenizer.ggml.tokens and no token_embd.weight")
                })?,
        };
        Ok(Config {
            name: md
                .get("general.name")
                .and_then(|v| v.to_string().ok())
                .cloned(),
            n_layer: get_usize("block_count")?,
            hidden,
            ffn: get_usize("feed_forward_length")?,
            n_head,
            n_kv_head,
            head_dim,
            rope_dim,
            rope_base: get_f32("rope.freq_base")?.unwrap_or(10_000.0),
            rope_scale,
            sliding,
            embed_scale: (family == Arch::Gemma3).then(|| (hidden as f32).sqrt()),
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            rms_eps: get_f32("attention.layer_norm_rms_epsilon")?.unwrap_or(1e-5) as f64,
            context_len: match md.get(&format!("{arch}.context_length")) {
                Some(_) => get_usize("context_length")?,
                None => 2048,
            },
            vocab_size,
            arch,
            family,
        })
    }

    /// Whether layer `layer` (0-based) attends through a sliding window.
    pub fn is_sliding(&self, layer: usize) -> bool {
        self.sliding
            .is_some_and(|s| s.pattern == 0 || !(layer + 1).is_multiple_of(s.pattern))
    }

    /// Query heads per KV head (grouped-query attention).
    pub fn n_rep(&self) -> usize {
        self.n_head / self.n_kv_head
    }

    /// Output width of each adaptable linear, by PEFT target name.
    pub fn out_features(&self, target: super::Target) -> usize {
        use super::Target::*;
        match target {
            Q => self.n_head * self.head_dim,
            O => self.hidden,
            K | V => self.n_kv_head * self.head_dim,
            Gate | Up => self.ffn,
            Down => self.hidden,
        }
    }

    /// Input width of each adaptable linear, by PEFT target name.
    pub fn in_features(&self, target: super::Target) -> usize {
        use super::Target::*;
        match target {
            Q | K | V => self.hidden,
            O => self.n_head * self.head_dim,
            Gate | Up => self.hidden,
            Down => self.ffn,
        }
    }
}
