//! The transformer (LLaMA, Qwen2 and Gemma 3 families): config from GGUF metadata, quantized base
//! weights, tokenizer and chat template, forward pass with a LoRA hook at every linear, and the
//! per-session KV cache.
//!
//! From token ids to logits ([`Model::forward`], `llama.rs`):
//!
//! ```text
//! x = embed[ids] (* sqrt(hidden) in Gemma)         (b, t, hidden)
//! for each block:
//!     x += post(o(attention(rope(q(n)), rope(k(n)), v(n))))   n = rms_norm(x)
//!     x += post(down(act(gate(n)) * up(n)))                   n = rms_norm(x)
//!     x  = hook.after_block(x)                                (steering vectors)
//! logits = head(rms_norm(x))                       (b, vocab)
//! ```
//!
//! What the families change in it: Qwen2 biases q, k and v; Gemma 3 norms each head of q and k
//! before RoPE, norms both outputs (`post`) before the residual add, uses GELU for `act` (SiLU
//! elsewhere) and lets five of every six layers see only a sliding window of 512 positions.
//!
//! Every named linear (`q`...`down`) is `W x`, then the hook's LoRA delta, then the bias.

mod attention;
mod cache;
pub mod chat;
mod config;
pub mod features;
pub mod fetch;
mod frozen;
pub(crate) mod gemm8;
pub(crate) mod int8;
mod llama;
mod logprob;
mod packed;
pub use packed::{QuantizedRows, SideOutput, SideWork};
pub mod tiny;
mod tokenizer;

pub use cache::KvCache;
pub use config::{Activation, Arch, Config, RopeStyle, Sliding, ARCHITECTURES};
pub use llama::{Group, LoadOptions, Logits, Model, Pass, WeightFormat, WIDE_ROWS};
pub use tokenizer::{
    chatml_message, chatml_prompt, Message, TokenStream, Tokenizer, CHATML_ASSISTANT,
    DEFAULT_SYSTEM,
};

/// The int8 kernels themselves, for the kernel probes in `examples/` (`q8_kernel_probe`,
/// `gemm8_probe`) only: not part of the library's API, free to change with the kernels.
#[doc(hidden)]
pub mod kernels {
    pub use super::gemm8::{has_vnni, quantize_rows, FrozenInt8};
    pub use super::int8::{
        interleave_row_quads, matvec_q4, matvec_quads, q4_1_quads, quantize_blocks,
    };
}

use candle_core::quantized::{gguf_file, QTensor};
use candle_core::Tensor;
use std::path::Path;

/// Write a GGUF file from metadata and tensors (atomically): merged bases, steering vectors,
/// the tiny test models.
pub fn write_gguf(
    path: &Path,
    md: &[(&str, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> crate::Result<()> {
    let mut buf = std::io::Cursor::new(Vec::new());
    let md_refs: Vec<(&str, &gguf_file::Value)> = md.iter().map(|(k, v)| (*k, v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut buf, &md_refs, &t_refs)
        .map_err(|e| crate::Error::model(path, format!("writing GGUF: {e}")))?;
    crate::error::write_atomic(path, &buf.into_inner())
}

/// The seven linears of a LLaMA block that LoRA experts can adapt, named as in PEFT's
/// `target_modules`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    /// All targets, in block order.
    pub const ALL: [Target; 7] = [
        Target::Q,
        Target::K,
        Target::V,
        Target::O,
        Target::Gate,
        Target::Up,
        Target::Down,
    ];

    /// PEFT module name (`q_proj`...).
    pub fn peft_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// Every PEFT module name, comma-separated: the list error messages offer.
    pub fn peft_names() -> String {
        Target::ALL.map(Target::peft_name).join(", ")
    }

    /// PEFT parent module (`self_attn` or `mlp`).
    pub fn peft_parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            _ => "mlp",
        }
    }

    /// GGUF tensor name stem (`attn_q`...).
    pub fn gguf_name(self) -> &'static str {
        match self {
            Target::Q => "attn_q",
            Target::K => "attn_k",
            Target::V => "attn_v",
            Target::O => "attn_output",
            Target::Gate => "ffn_gate",
            Target::Up => "ffn_up",
            Target::Down => "ffn_down",
        }
    }

    /// Parse a PEFT module name (`q_proj`, also `q`).
    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL
            .into_iter()
            .find(|t| t.peft_name() == s || t.peft_name().trim_end_matches("_proj") == s)
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.peft_name())
    }
}

/// The LoRA hook: called after every adaptable linear with its input and base output.
///
/// What [`LinearHook::after_linear`] returns: the linear's output, changed or not.
pub type HookResult = candle_core::Result<Tensor>;

/// The model knows nothing of adapters; `lora::ExpertHook` implements this to add
/// `sum_i g_i * s_i * B_i (A_i x)` per row.
pub trait LinearHook {
    /// `x`: the linear's input `(b, t, in)`; `y`: the base output `(b, t, out)`. Default:
    /// `y` unchanged.
    fn after_linear(&self, _layer: usize, _target: Target, _x: &Tensor, y: Tensor) -> HookResult {
        Ok(y)
    }

    /// Called with the residual stream `(b, t, hidden)` after block `layer` (0-based); what it
    /// returns flows on (steering vectors add to it here). Default: unchanged.
    fn after_block(&self, _layer: usize, x: Tensor) -> candle_core::Result<Tensor> {
        Ok(x)
    }

    /// For a narrow pass over int8 base weights: work to run inside the base matmul's own
    /// dispatch, on the same int8-rounded input, its output added to the base output (see
    /// [`SideWork`]). When this returns `Some`, `after_linear` is not called for this linear.
    /// Default: `None`.
    fn side_work(
        &self,
        _layer: usize,
        _target: Target,
        _x: &Tensor,
    ) -> candle_core::Result<Option<Box<dyn SideWork + '_>>> {
        Ok(None)
    }
}

/// No adapters: the base model.
pub struct NoHook;

impl LinearHook for NoHook {}

/// Dot product in eight lanes (vectorizes under AVX2).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (xa, xb) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += xa[k] * xb[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}
