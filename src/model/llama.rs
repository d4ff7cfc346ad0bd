//! The forward pass over GGUF weights, for the LLaMA and Qwen2 families ([`super::Arch`]).
//! Reads top to bottom: embedding -> blocks (attention, SwiGLU MLP) -> final norm -> logits.
//! The families differ in two places only: Qwen2's q/k/v biases (added in [`Model::linear`])
//! and the RoPE pairing ([`Model::rope`]).

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::gemm8::{frozen_linear_int8, FrozenInt8};
use super::packed::PackedMatrix;
use super::{Activation, Config, KvCache, LinearHook, RopeStyle, Target, Tokenizer};
use crate::{Error, Result};

/// How the base weights are held in memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightFormat {
    /// As stored in the file (Q4_1 for the default base, its embedding Q8_0), multiplied by our
    /// int8 kernels (`packed.rs`): Q4_1 and Q8_0 blocks as they are, every other quantized type
    /// (Q4_0, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K...) requantized to int8 blocks; F32/F16/BF16 by
    /// candle's dense matmul.
    #[default]
    Stored,
    /// Requantized to Q8_0 (our int8 kernels): more bytes than Q4_1, less rounding than a
    /// 4-bit type would add to a file stored at higher precision.
    Q8_0,
    /// Dequantized to dense f32: fastest for long prompts, and gradients flow (training).
    F32,
    /// The fastest for generation. Q4_1 and Q8_0 blocks (SmolLM2) and unquantized weights: the
    /// stored blocks (as `stored`) for passes of few token rows (decoding) and a dense f32 copy
    /// from [`WIDE_ROWS`] rows up (prompts). Block types our kernels requantize (the K-quants,
    /// Q4_0, Q5_x: Qwen2.5, Gemma 3), where the CPU has AVX-512 VNNI: one copy in int8 rows for
    /// every pass, multiplied by the kernel of format `int8` (on Qwen-1.5B 4.5x the f32 prompt
    /// speed and 1.5x the int8 blocks' decoding); without VNNI, int8 blocks and f32 as above.
    Mixed,
    /// Each weight rounded to int8 per row, held twice (`W` and `W^T`) for int8 products
    /// forward and backward (`gemm8.rs`): LoRA training 3-5x faster per matmul than f32 with
    /// AVX-512 VNNI, at half the memory; gradients flow to the input. Without AVX-512 VNNI the
    /// products run in plain Rust (slow): train in `f32` there.
    Int8,
}

/// In format [`WeightFormat::Mixed`], passes with at least this many token rows (batch x
/// tokens) use the f32 copy (where it has one: [`WeightFormat::Mixed`]). Set with candle's Q8_0
/// kernels (a 16-token pass 61 ms in Q8_0, 81 ms in f32; 64 tokens 224 and 165 ms); with our
/// kernels on the stored blocks f32 pulls ahead only from ~128 tokens, within noise at 32-64
/// (docs/BENCHMARKS.md, "Weight formats now").
pub const WIDE_ROWS: usize = 32;

impl WeightFormat {
    /// Every format, in the order `--format` lists them.
    pub const ALL: [WeightFormat; 5] =
        [Self::Stored, Self::Q8_0, Self::F32, Self::Mixed, Self::Int8];

    /// The name `--format` takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Stored => "stored",
            Self::Q8_0 => "q8_0",
            Self::F32 => "f32",
            Self::Mixed => "mixed",
            Self::Int8 => "int8",
        }
    }
}

impl std::str::FromStr for WeightFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let lower = s.to_ascii_lowercase();
        let name = if lower == "q8" { "q8_0" } else { &lower };
        Self::ALL
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| Error::unknown("weight format", s, Self::ALL.map(Self::name)))
    }
}

/// Options for [`Model::load`].
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub format: WeightFormat,
}

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position: `(b, vocab)`.
    Last,
    /// Every position: `(b, t, vocab)`.
    All,
    /// No head: the final-norm hidden states `(b, t, hidden)`; see [`Model::head`].
    Hidden,
    /// Stop after this many blocks and return the residual stream there `(b, t, hidden)`, no
    /// final norm (features for classifiers; a cache passed along is left partly filled).
    Layer(usize),
}

/// Per-call settings of a forward pass.
pub struct Pass<'a> {
    /// Adapters attach here; [`super::NoHook`] for the base model.
    pub hook: &'a dyn LinearHook,
    pub logits: Logits,
    /// Use plain tensor ops that carry gradients (training) instead of fused kernels.
    pub differentiable: bool,
}

/// Rows of a batch that share one KV cache (and so one position), for [`Model::decode_groups`].
#[derive(Debug)]
pub struct Group<'a> {
    pub cache: Option<&'a mut KvCache>,
    pub rows: usize,
}

impl Group<'_> {
    /// The position of the group's next token.
    fn pos(&self) -> usize {
        self.cache.as_ref().map_or(0, |c| c.len())
    }
}

/// One base weight matrix: its matmul, and in format `mixed` a dense f32 copy for wide passes.
#[derive(Debug)]
struct Weight {
    mm: Narrow,
    wide: Option<QMatMul>,
}

impl Weight {
    /// Our packed matrix when it serves this pass (every pass without a wide copy; in format
    /// `mixed`, passes of fewer than [`WIDE_ROWS`] token rows).
    fn packed_for(&self, x: &Tensor) -> Result<Option<&PackedMatrix>> {
        let Narrow::Packed(m) = &self.mm else {
            return Ok(None);
        };
        let narrow = self.wide.is_none() || x.elem_count() / x.dim(D::Minus1)? < WIDE_ROWS;
        Ok(narrow.then_some(m))
    }
}

/// The matmul for passes narrower than [`WIDE_ROWS`] (every pass unless format `mixed`).
#[derive(Debug)]
enum Narrow {
    /// Candle's: the stored quantization, dense f32, or Q8_0 where our kernel's shapes fail.
    Candle(QMatMul),
    /// Formats `stored` (Q4_1 and Q8_0 blocks), `q8_0` and `mixed`: our int8 kernels
    /// (`packed.rs`).
    Packed(PackedMatrix),
    /// Format `int8`: per-row int8 `W` and `W^T` (`gemm8.rs`), for every pass.
    Int8(Arc<FrozenInt8>),
}

/// One transformer block's weights.
#[derive(Debug)]
struct Block {
    attn_norm: Tensor,
    /// Biases of q, k and v (Qwen2), `None` for LLaMA.
    qkv_bias: Option<[Tensor; 3]>,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    ffn_norm: Tensor,
    gate: Weight,
    up: Weight,
    down: Weight,
    /// Gemma 3's further norms ([`Arch::sandwich_norms`]), `None` elsewhere.
    sandwich: Option<SandwichNorms>,
}

/// The norms Gemma 3 adds to a block: on each head of q and k, and on the attention and MLP
/// outputs before their residual adds.
#[derive(Debug)]
struct SandwichNorms {
    q: Tensor,         // (head_dim,)
    k: Tensor,         // (head_dim,)
    post_attn: Tensor, // (hidden,)
    post_ffn: Tensor,  // (hidden,)
}

impl Block {
    fn bias(&self, target: Target) -> Option<&Tensor> {
        let [q, k, v] = self.qkv_bias.as_ref()?;
        match target {
            Target::Q => Some(q),
            Target::K => Some(k),
            Target::V => Some(v),
            _ => None,
        }
    }

    fn weight(&self, target: Target) -> &Weight {
        match target {
            Target::Q => &self.q,
            Target::K => &self.k,
            Target::V => &self.v,
            Target::O => &self.o,
            Target::Gate => &self.gate,
            Target::Up => &self.up,
            Target::Down => &self.down,
        }
    }
}

/// Model weights and tokenizer: immutable, shared by every session (`Arc<Model>`).
#[derive(Debug)]
pub struct Model {
    pub config: Config,
    pub tokenizer: Tokenizer,
    /// The file the weights came from.
    pub path: PathBuf,
    pub format: WeightFormat,
    embed: Tensor, // (vocab, hidden) f32
    blocks: Vec<Block>,
    norm: Tensor,
    head: Weight, // output.weight, or the tied token embedding
    /// RoPE tables of the global layers, `(context, head_dim / 2)` each.
    rope: RopeTables,
    /// RoPE tables of the sliding-window layers (Gemma 3), on their own base.
    rope_sliding: Option<RopeTables>,
    device: Device,
}

fn check_bounds(content: &Content, file_len: u64, path: &Path) -> Result<()> {
    for (name, info) in &content.tensor_infos {
        let elems = info.shape.elem_count();
        let block = info.ggml_dtype.block_size();
        let bytes = (elems / block * info.ggml_dtype.type_size()) as u64;
        let end = content.tensor_data_offset + info.offset + bytes;
        if end > file_len {
            return Err(Error::model(
                path,
                format!("truncated file: tensor {name} ends at byte {end} but the file has {file_len} bytes"),
            ));
        }
    }
    Ok(())
}

impl Model {
    /// Load a LLaMA-family GGUF file. Everything (sizes, heads, rope base, tokenizer) comes
    /// from its metadata.
    pub fn load(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Arc<Model>> {
        let path = path.as_ref();
        let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        let file_len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let content = Content::read(&mut file).map_err(|e| {
            Error::model(
                path,
                format!("not a readable GGUF file: {}", first_line(&e)),
            )
        })?;
        let config = Config::from_gguf(&content, path)?;
        check_bounds(&content, file_len, path)?;
        let tokenizer = Tokenizer::from_gguf(&content, path)?;
        let device = Device::Cpu;
        let mut read = |name: &str, shape: &[usize]| -> Result<QTensor> {
            let info = content
                .tensor_infos
                .get(name)
                .ok_or_else(|| Error::model(path, format!("missing tensor {name}")))?;
            if info.shape.dims() != shape {
                return Err(Error::model(
                    path,
                    format!(
                        "tensor {name} has shape {:?}, expected {shape:?}",
                        info.shape.dims()
                    ),
                ));
            }
            content
                .tensor(&mut file, name, &device)
                .map_err(|e| Error::model(path, format!("tensor {name}: {}", first_line(&e))))
        };
        let c = &config;
        let embed_q = read("token_embd.weight", &[c.vocab_size, c.hidden])?;
        let embed = embed_q.dequantize(&device)?;
        let norm = read("output_norm.weight", &[c.hidden])?.dequantize(&device)?;
        let tied = !content.tensor_infos.contains_key("output.weight");
        let head_q = if tied {
            embed_q
        } else {
            read("output.weight", &[c.vocab_size, c.hidden])?
        };
        // A tied head shares the f32 embedding already held.
        let mut head = to_matmul(head_q, opts.format, tied.then(|| embed.clone()))?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let mut lin = |t: Target| -> Result<Weight> {
                let name = format!("blk.{i}.{}.weight", t.gguf_name());
                to_matmul(
                    read(&name, &[c.out_features(t), c.in_features(t)])?,
                    opts.format,
                    None,
                )
            };
            let (q, k, v, o) = (
                lin(Target::Q)?,
                lin(Target::K)?,
                lin(Target::V)?,
                lin(Target::O)?,
            );
            let (gate, up, down) = (lin(Target::Gate)?, lin(Target::Up)?, lin(Target::Down)?);
            let qkv_bias = if c.family.qkv_bias() {
                let mut bias = |t: Target| -> Result<Tensor> {
                    let name = format!("blk.{i}.{}.bias", t.gguf_name());
                    Ok(read(&name, &[c.out_features(t)])?.dequantize(&device)?)
                };
                Some([bias(Target::Q)?, bias(Target::K)?, bias(Target::V)?])
            } else {
                None
            };
            let sandwich = if c.family.sandwich_norms() {
                let mut norm = |name: &str, len: usize| -> Result<Tensor> {
                    Ok(read(&format!("blk.{i}.{name}.weight"), &[len])?.dequantize(&device)?)
                };
                Some(SandwichNorms {
                    q: norm("attn_q_norm", c.head_dim)?,
                    k: norm("attn_k_norm", c.head_dim)?,
                    post_attn: norm("post_attention_norm", c.hidden)?,
                    post_ffn: norm("post_ffw_norm", c.hidden)?,
                })
            } else {
                None
            };
            blocks.push(Block {
                qkv_bias,
                sandwich,
                attn_norm: read(&format!("blk.{i}.attn_norm.weight"), &[c.hidden])?
                    .dequantize(&device)?,
                ffn_norm: read(&format!("blk.{i}.ffn_norm.weight"), &[c.hidden])?
                    .dequantize(&device)?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        if c.rope_dim != c.head_dim {
            return Err(Error::model(
                path,
                format!(
                    "partial rotary embeddings (rope dim {} of head dim {}) are not supported",
                    c.rope_dim, c.head_dim
                ),
            ));
        }
        // Our int8 matrices into a few large huge-page buffers.
        let mut mats: Vec<&mut PackedMatrix> = blocks
            .iter_mut()
            .flat_map(|b| {
                [
                    &mut b.q,
                    &mut b.k,
                    &mut b.v,
                    &mut b.o,
                    &mut b.gate,
                    &mut b.up,
                    &mut b.down,
                ]
            })
            .chain(std::iter::once(&mut head))
            .filter_map(|w| match &mut w.mm {
                Narrow::Packed(m) => Some(m),
                Narrow::Candle(_) | Narrow::Int8(_) => None,
            })
            .collect();
        super::packed::pack_in_arenas(&mut mats);
        // Llama 3.1 and later divide each frequency by a stored factor.
        let freq_factors = if content.tensor_infos.contains_key("rope_freqs.weight") {
            let f = read("rope_freqs.weight", &[c.head_dim / 2])?.dequantize(&device)?;
            Some(f.to_vec1::<f32>()?)
        } else {
            None
        };
        let rope = RopeTables::new(
            c.head_dim,
            c.rope_base,
            c.rope_scale,
            freq_factors.as_deref(),
            c.context_len,
            &device,
        )?;
        let rope_sliding = match c.sliding {
            Some(s) => Some(RopeTables::new(
                c.head_dim,
                s.rope_base,
                1.0,
                None,
                c.context_len,
                &device,
            )?),
            None => None,
        };
        Ok(Arc::new(Model {
            config,
            tokenizer,
            path: path.to_path_buf(),
            format: opts.format,
            embed,
            blocks,
            norm,
            head,
            rope,
            rope_sliding,
            device,
        }))
    }

    /// The device tensors live on (CPU).
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Base weight of one adaptable linear, dequantized to f32 `(out, in)`.
    pub fn base_weight(&self, layer: usize, target: Target) -> Result<Tensor> {
        let block = self.blocks.get(layer).ok_or_else(|| {
            Error::setting(
                "layer",
                format!(
                    "{layer} is out of range: the model has {} blocks",
                    self.blocks.len()
                ),
            )
        })?;
        Ok(match &block.weight(target).mm {
            Narrow::Candle(QMatMul::QTensor(q)) => q.dequantize(&self.device)?,
            Narrow::Candle(QMatMul::Tensor(t)) => t.clone(),
            Narrow::Candle(QMatMul::TensorF16(t)) => t.to_dtype(DType::F32)?,
            Narrow::Packed(m) => m.dequantize()?,
            Narrow::Int8(m) => Tensor::from_vec(m.dequantize(), m.dims(), &self.device)?,
        })
    }

    /// Run `tokens` `(b, t)` through the model, extending `cache` when given.
    ///
    /// Every row of the batch sits at the same position (`cache.len()`); rows differ only in
    /// what the hook adds (their gate weights).
    pub fn forward(
        &self,
        tokens: &Tensor,
        cache: Option<&mut KvCache>,
        pass: &Pass,
    ) -> Result<Tensor> {
        let b = tokens.dims2()?.0;
        let mut groups = [Group { cache, rows: b }];
        self.forward_groups(tokens, &mut groups, pass)
    }

    /// One decode step for several caches at once, each at its own position: `tokens` `(b, 1)`
    /// stacks each group's rows in order (`groups[i].rows` rows for `groups[i].cache`). The
    /// linears (and the hook, row by row) run over all `b` rows together, which is where a
    /// step's time goes; attention runs per group over its own cache. Row for row the result is
    /// what [`Model::forward`] gives each group alone.
    pub fn decode_groups(
        &self,
        tokens: &Tensor,
        groups: &mut [Group],
        pass: &Pass,
    ) -> Result<Tensor> {
        let t = tokens.dims2()?.1;
        if t != 1 {
            return Err(Error::mismatch(
                "decode_groups",
                format!("takes one token per row, got {t}"),
            ));
        }
        if groups.iter().any(|g| g.cache.is_none()) {
            return Err(Error::setting(
                "groups",
                "decode_groups needs a cache per group",
            ));
        }
        self.forward_groups(tokens, groups, pass)
    }

    /// Continue a pass from the residual stream `x` `(b, t, hidden)` after the first `after`
    /// blocks (what [`Logits::Layer`]`(after)` returned for the same tokens), without a cache.
    /// Training whose adapters cover only the blocks from `after` on starts here from stored
    /// residuals: the blocks below cannot change, so they run once, not every epoch.
    pub fn forward_from(&self, x: &Tensor, after: usize, pass: &Pass) -> Result<Tensor> {
        if after > self.blocks.len() {
            return Err(Error::setting(
                "after",
                format!(
                    "forward_from: the model has {} blocks, cannot start after {after}",
                    self.blocks.len()
                ),
            ));
        }
        let (b, _, h) = x.dims3()?;
        if h != self.config.hidden {
            return Err(Error::mismatch(
                "forward_from",
                format!("residual width {h}, the model's is {}", self.config.hidden),
            ));
        }
        let mut groups = [Group {
            cache: None,
            rows: b,
        }];
        self.blocks_from(x.clone(), after, &mut groups, pass)
    }

    fn forward_groups(&self, tokens: &Tensor, groups: &mut [Group], pass: &Pass) -> Result<Tensor> {
        let (b, t) = tokens.dims2()?;
        let mut x = self
            .embed
            .index_select(&tokens.flatten_all()?, 0)?
            .reshape((b, t, self.config.hidden))?; // (b, t, hidden)
        if let Some(scale) = self.config.embed_scale {
            x = (x * scale as f64)?;
        }
        self.blocks_from(x, 0, groups, pass)
    }

    /// Blocks `first..` over the residual stream `x` `(b, t, hidden)`, then what `pass.logits`
    /// asks for.
    fn blocks_from(
        &self,
        mut x: Tensor,
        first: usize,
        groups: &mut [Group],
        pass: &Pass,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        if groups.iter().map(|g| g.rows).sum::<usize>() != b {
            return Err(Error::mismatch(
                "groups",
                format!(
                    "the groups hold {} rows, the batch has {b}",
                    groups.iter().map(|g| g.rows).sum::<usize>()
                ),
            ));
        }
        for g in groups.iter() {
            let pos = g.pos();
            if pos + t > self.config.context_len {
                return Err(Error::ContextFull {
                    needed: pos + t,
                    context: self.config.context_len,
                });
            }
            if let Some(c) = g.cache.as_ref() {
                if c.rows() != 0 && c.rows() != g.rows {
                    return Err(Error::mismatch(
                        "cache",
                        format!("it holds {} rows, the batch has {}", c.rows(), g.rows),
                    ));
                }
            }
        }
        if t > 1 && groups.len() > 1 {
            return Err(Error::setting(
                "groups",
                format!(
                    "prompt passes run one cache at a time, got {}",
                    groups.len()
                ),
            ));
        }
        // Each group's position before this pass (its cache grows block by block below).
        let positions: Vec<usize> = groups.iter().map(Group::pos).collect();
        let pos = positions[0];
        // Additive masks `(t, pos + t)`: causal, and causal within the window for sliding layers.
        let (mask, mask_sliding) = if t > 1 {
            let window = self.config.sliding.map(|s| s.window);
            (
                Some(causal_mask(t, pos, None, &self.device)?),
                match window {
                    Some(w) => Some(causal_mask(t, pos, Some(w), &self.device)?),
                    None => None,
                },
            )
        } else {
            (None, None)
        };
        if pass.logits == Logits::Layer(first) {
            return Ok(x);
        }
        for (i, block) in self.blocks.iter().enumerate().skip(first) {
            let mask = match self.config.is_sliding(i) {
                true => mask_sliding.as_ref(),
                false => mask.as_ref(),
            };
            let h = self.rms_norm(&x, &block.attn_norm, pass)?;
            let a = self.attention(i, block, &h, groups, &positions, mask, pass)?;
            let a = match &block.sandwich {
                Some(n) => self.rms_norm(&a, &n.post_attn, pass)?,
                None => a,
            };
            x = (x + a)?;
            let h = self.rms_norm(&x, &block.ffn_norm, pass)?;
            let m = self.mlp(i, block, &h, pass)?;
            let m = match &block.sandwich {
                Some(n) => self.rms_norm(&m, &n.post_ffn, pass)?,
                None => m,
            };
            x = pass.hook.after_block(i, (x + m)?)?; // steering vectors act here

            if pass.logits == Logits::Layer(i + 1) {
                return Ok(x);
            }
        }
        let x = self.rms_norm(&x, &self.norm, pass)?;
        match pass.logits {
            Logits::Last => self.head(&x.i((.., t - 1, ..))?.contiguous()?, pass), // (b, vocab)
            Logits::All => self.head(&x, pass),                                    // (b, t, vocab)
            Logits::Hidden => Ok(x),                                               // (b, t, hidden)
            // A layer in range returned inside the loop.
            Logits::Layer(n) => Err(Error::setting(
                "logits",
                format!(
                    "Logits::Layer({n}): this pass runs blocks {first}-{} ({first}-{} allowed)",
                    self.blocks.len(),
                    self.blocks.len()
                ),
            )),
        }
    }

    /// The output head: final-norm hidden states `(.., hidden)` to logits `(.., vocab)`.
    pub fn head(&self, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        self.dense(&self.head, x, pass)
    }

    /// `log softmax(head(x))[target]` per row: `x` `(n, hidden)` final-norm hidden states,
    /// `targets` `n` token ids; `(n,)`. With the head in int8, one op from hidden states to
    /// log-probabilities (the `(n, vocab)` logits never enter the autograd graph).
    pub fn target_logprobs(&self, x: &Tensor, targets: &[u32], pass: &Pass) -> Result<Tensor> {
        if let Narrow::Int8(m) = &self.head.mm {
            return Ok(super::logprob::head_target_logprobs(
                &x.contiguous()?,
                m,
                targets,
            )?);
        }
        let logits = self.head(x, pass)?; // (n, vocab)
        Ok(super::logprob::target_logprobs(&logits, targets)?)
    }

    /// A base matmul; in a differentiable pass over dense weights, one that sends gradients
    /// to `x` only (the base is frozen).
    fn dense(&self, w: &Weight, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        if let Some(m) = w.packed_for(x)? {
            return Ok(m.forward(&x.contiguous()?)?);
        }
        let w = match (&w.wide, &w.mm) {
            (Some(wide), _) => wide,
            (None, Narrow::Candle(mm)) => mm,
            // (`packed_for` takes these: a packed matrix without a wide copy serves every pass.)
            (None, Narrow::Packed(m)) => return Ok(m.forward(&x.contiguous()?)?),
            (_, Narrow::Int8(m)) => return Ok(frozen_linear_int8(&x.contiguous()?, m)?),
        };
        Ok(match w {
            QMatMul::Tensor(w) if pass.differentiable => super::frozen::frozen_linear(x, w)?,
            _ => w.forward(x)?,
        })
    }

    /// One adaptable linear: the base matmul, then the LoRA hook (the only place adapters
    /// act), then the base's bias where it has one: `W x + delta(x) + b`.
    fn linear(
        &self,
        layer: usize,
        target: Target,
        blk: &Block,
        x: &Tensor,
        pass: &Pass,
    ) -> Result<Tensor> {
        let w = blk.weight(target);
        let y = match w.packed_for(x)? {
            // A pass over our packed weights takes the hook's work into its own dispatch.
            Some(m) if !pass.differentiable => match pass.hook.side_work(layer, target, x)? {
                Some(side) => m.forward_with(&x.contiguous()?, Some(&*side))?,
                None => pass
                    .hook
                    .after_linear(layer, target, x, m.forward(&x.contiguous()?)?)?,
            },
            _ => {
                let y = self.dense(w, x, pass)?;
                pass.hook.after_linear(layer, target, x, y)?
            }
        };
        Ok(match blk.bias(target) {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }

    /// Self-attention of block `layer` over `x` `(b, t, hidden)`, each group of rows against
    /// its own cache, its tokens starting at `positions[group]`.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        blk: &Block,
        x: &Tensor,
        groups: &mut [Group],
        positions: &[usize],
        mask: Option<&Tensor>,
        pass: &Pass,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (c.n_head, c.n_kv_head, c.head_dim);
        let q = self.linear(layer, Target::Q, blk, x, pass)?; // (b, t, nh * hd)
        let k = self.linear(layer, Target::K, blk, x, pass)?; // (b, t, nkv * hd)
        let v = self.linear(layer, Target::V, blk, x, pass)?;
        let (q, k) = (q.reshape((b, t, nh, hd))?, k.reshape((b, t, nkv, hd))?);
        let (q, k) = match &blk.sandwich {
            // Gemma 3: RMSNorm over each head before RoPE.
            Some(n) => (
                self.rms_norm(&q, &n.q, pass)?,
                self.rms_norm(&k, &n.k, pass)?,
            ),
            None => (q, k),
        };
        let q = q.transpose(1, 2)?.contiguous()?; // (b, nh, t, hd)
        let k = k.transpose(1, 2)?.contiguous()?; // (b, nkv, t, hd)
        let v = v.reshape((b, t, nkv, hd))?.transpose(1, 2)?.contiguous()?;
        let y = if let [group] = groups {
            self.attend(layer, &q, &k, &v, group, positions[0], mask, pass)?
        } else {
            let mut ys = Vec::with_capacity(groups.len());
            let mut row = 0;
            for (g, &pos) in groups.iter_mut().zip(positions) {
                let part = |x: &Tensor| x.narrow(0, row, g.rows);
                ys.push(self.attend(
                    layer,
                    &part(&q)?,
                    &part(&k)?,
                    &part(&v)?,
                    g,
                    pos,
                    mask,
                    pass,
                )?);
                row += g.rows;
            }
            Tensor::cat(&ys, 0)?
        };
        self.linear(layer, Target::O, blk, &y, pass)
    }

    /// One group's attention: RoPE from `pos` (its first token's position, read before the
    /// pass: the cache grows block by block), its cache extended, softmax(q k^T) v.
    /// `q` `(rows, nh, t, hd)`, `k`, `v` `(rows, nkv, t, hd)`; returns `(rows, t, nh * hd)`.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        group: &mut Group,
        pos: usize,
        mask: Option<&Tensor>,
        pass: &Pass,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, nh, t, hd) = q.dims4()?;
        let q = self.rope(layer, q, pos, pass)?;
        let k = self.rope(layer, k, pos, pass)?;
        let (k, v) = match group.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, &k, v)?, // (b, nkv, pos + t, hd)
            None => (k, v.clone()),
        };
        if t == 1 && !pass.differentiable {
            // A sliding layer's query sees only the last `window` keys.
            let (k, v) = match c.sliding {
                Some(s) if c.is_sliding(layer) && k.dim(2)? > s.window => {
                    let from = k.dim(2)? - s.window;
                    (k.narrow(2, from, s.window)?, v.narrow(2, from, s.window)?)
                }
                _ => (k, v),
            };
            // A decode step: one op over the cache in place (see `attention.rs`).
            return Ok(super::attention::decode_attention(
                &q,
                &k,
                &v,
                c.attn_scale,
            )?);
        }
        let k = candle_transformers::utils::repeat_kv(k, c.n_rep())?; // (b, nh, kv_len, hd)
        let v = candle_transformers::utils::repeat_kv(v, c.n_rep())?.contiguous()?;
        let att = (q.matmul(&k.t()?)? * c.attn_scale as f64)?; // (b, nh, t, kv_len)
        let att = match mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = if pass.differentiable {
            candle_nn::ops::softmax(&att, D::Minus1)?
        } else {
            candle_nn::ops::softmax_last_dim(&att)?
        };
        let y = att.matmul(&v)?; // (b, nh, t, hd)
        Ok(y.transpose(1, 2)?.reshape((b, t, nh * hd))?)
    }

    fn mlp(&self, layer: usize, blk: &Block, x: &Tensor, pass: &Pass) -> Result<Tensor> {
        let gate = self.linear(layer, Target::Gate, blk, x, pass)?; // (b, t, ffn)
        let up = self.linear(layer, Target::Up, blk, x, pass)?;
        let act = match self.config.family.activation() {
            Activation::Silu => candle_nn::ops::silu(&gate)?,
            Activation::GeluTanh => gate.gelu()?, // candle's `gelu` is the tanh approximation
        };
        let h = (act * up)?;
        self.linear(layer, Target::Down, blk, &h, pass)
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, pass: &Pass) -> Result<Tensor> {
        let eps = self.config.rms_eps as f32;
        Ok(if pass.differentiable {
            candle_nn::ops::rms_norm_slow(x, w, eps)?
        } else {
            candle_nn::ops::rms_norm(x, w, eps)?
        })
    }

    /// RoPE in the family's pairing: interleaved for LLaMA (GGUF stores its q/k rows permuted
    /// for it), halves for Qwen2. `x`: `(b, heads, t, hd)`.
    fn rope(&self, layer: usize, x: &Tensor, pos: usize, pass: &Pass) -> Result<Tensor> {
        use candle_nn::rotary_emb::{rope, rope_i, rope_i_slow, rope_slow};
        let t = x.dim(2)?;
        let tables = match &self.rope_sliding {
            Some(sliding) if self.config.is_sliding(layer) => sliding,
            _ => &self.rope,
        };
        let cos = tables.cos.narrow(0, pos, t)?;
        let sin = tables.sin.narrow(0, pos, t)?;
        Ok(match (self.config.family.rope(), pass.differentiable) {
            (RopeStyle::Interleaved, true) => rope_i_slow(x, &cos, &sin)?,
            (RopeStyle::Interleaved, false) => rope_i(x, &cos, &sin)?,
            (RopeStyle::Halves, true) => rope_slow(x, &cos, &sin)?,
            (RopeStyle::Halves, false) => rope(x, &cos, &sin)?,
        })
    }
}

/// The message of a candle error without the backtrace candle appends when RUST_BACKTRACE is set.
fn first_line(e: &candle_core::Error) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

/// One weight in `format`. `known`: its f32 values when the caller already holds them (the tied
/// output head is the f32 token embedding), so they are shared, not computed again.
fn to_matmul(q: QTensor, format: WeightFormat, known: Option<Tensor>) -> Result<Weight> {
    let device = q.device();
    let values = |q: &QTensor| -> Result<Tensor> {
        Ok(match &known {
            Some(t) => t.clone(),
            None => q.dequantize(&device)?,
        })
    };
    let mixed = format == WeightFormat::Mixed;
    // The file's Q4_1 or Q8_0 blocks as they are, for our kernels: formats `stored` and `mixed`.
    if matches!(format, WeightFormat::Stored | WeightFormat::Mixed) {
        if let Some(m) = PackedMatrix::from_stored(&q)? {
            // The file's own blocks: prompts on exact f32 values (int8 rows would double the
            // rounding error of SmolLM2's Q4_1 blocks, docs/BENCHMARKS.md).
            let wide = if mixed {
                Some(QMatMul::Tensor(values(&q)?))
            } else {
                None
            };
            return Ok(Weight {
                mm: Narrow::Packed(m),
                wide,
            });
        }
        // Any other block type (Q4_0, Q5_0, Q5_1, the K-quants...): its values requantized to
        // int8 blocks, so every quantized file runs on our int8 kernels.
        if !matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            let dense = values(&q)?;
            // Format `mixed` where the CPU has AVX-512 VNNI: one copy in int8 rows for every
            // pass, prompts and decoding (faster than our AVX2 kernels on int8 blocks for both:
            // docs/BENCHMARKS.md, "Prompts on the int8 kernel").
            if mixed && super::gemm8::has_vnni() {
                return Ok(Weight {
                    mm: Narrow::Int8(Arc::new(FrozenInt8::forward_only(&dense)?)),
                    wide: None,
                });
            }
            if let Some(m) = PackedMatrix::new(&dense)? {
                let wide = mixed.then(|| QMatMul::Tensor(dense));
                return Ok(Weight {
                    mm: Narrow::Packed(m),
                    wide,
                });
            }
        }
    }
    let mm = match format {
        WeightFormat::Int8 => {
            let m = FrozenInt8::from_tensor(&values(&q)?)?;
            return Ok(Weight {
                mm: Narrow::Int8(Arc::new(m)),
                wide: None,
            });
        }
        WeightFormat::Stored => QMatMul::from_qtensor(q)?,
        WeightFormat::F32 => QMatMul::Tensor(values(&q)?),
        WeightFormat::Q8_0 | WeightFormat::Mixed => {
            let dense = values(&q)?;
            let wide = mixed.then(|| QMatMul::Tensor(dense.clone()));
            if let Some(m) = PackedMatrix::new(&dense)? {
                return Ok(Weight {
                    mm: Narrow::Packed(m),
                    wide,
                });
            }
            if dense.dim(D::Minus1)? % GgmlDType::Q8_0.block_size() != 0 {
                return Ok(Weight {
                    mm: Narrow::Candle(QMatMul::Tensor(dense)),
                    wide: None,
                });
            }
            let mm = QMatMul::from_qtensor(QTensor::quantize(&dense, GgmlDType::Q8_0)?)?;
            return Ok(Weight {
                mm: Narrow::Candle(mm),
                wide,
            });
        }
    };
    Ok(Weight {
        mm: Narrow::Candle(mm),
        wide: None,
    })
}

/// RoPE's cosines and sines for every position, `(len, head_dim / 2)` each.
#[derive(Debug)]
struct RopeTables {
    cos: Tensor,
    sin: Tensor,
}

impl RopeTables {
    /// Angle `pos * scale * base^(-2i / head_dim) / factor_i` (factors: Llama 3.1's
    /// `rope_freqs`, 1 without them).
    fn new(
        head_dim: usize,
        base: f32,
        scale: f32,
        factors: Option<&[f32]>,
        len: usize,
        device: &Device,
    ) -> Result<Self> {
        let inv: Vec<f32> = (0..head_dim / 2)
            .map(|i| {
                let factor = factors.map_or(1.0, |f| f[i]);
                scale / base.powf(2.0 * i as f32 / head_dim as f32) / factor
            })
            .collect();
        let inv = Tensor::new(inv.as_slice(), device)?.reshape((1, head_dim / 2))?;
        let pos = Tensor::arange(0u32, len as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((len, 1))?;
        let angles = pos.matmul(&inv)?; // (len, hd / 2)
        Ok(RopeTables {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }
}

/// Additive causal mask `(t, pos + t)`: 0 where query `pos + i` may see key `j`, -inf elsewhere.
/// With a `window`, a query also sees no key `window` or more positions back.
fn causal_mask(t: usize, pos: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    let kv = pos + t;
    let window = window.unwrap_or(usize::MAX);
    let data: Vec<f32> = (0..t)
        .flat_map(|i| {
            let q = pos + i;
            (0..kv).map(move |j| {
                if j > q || q - j >= window {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Tensor::from_vec(data, (t, kv), device)?)
}
