//! Flags shared by several subcommands: which model, adapters and gate; which blend.

use std::path::PathBuf;
use std::sync::Arc;

use stancemix::model::WeightFormat;
use stancemix::{Blend, Engine, EngineOptions, GenParams, Mode};

/// What answering a prompt needs (chat and generate): the engine, the blend, sampling, a system
/// prompt, and whether to show the routing.
#[derive(clap::Args, Debug)]
pub struct TurnArgs {
    /// System prompt (default: none).
    #[arg(long)]
    pub system: Option<String>,
    /// Print the routing decision and gate weights after every answer.
    #[arg(long)]
    pub explain: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub blend: BlendArgs,
    #[command(flatten)]
    pub gen: GenArgs,
}

/// Which base model and experts (every command that loads an engine).
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Base model: a GGUF file, or a base id from `stancemix models` (fetched if missing;
    /// default: smollm2-135m).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Expert adapter directories (default: the shipped ones).
    #[arg(long, num_args = 1..)]
    pub adapters: Option<Vec<PathBuf>>,
    /// Load no experts at all.
    #[arg(long, conflicts_with = "adapters")]
    pub no_adapters: bool,
}

impl ModelArgs {
    /// Whether the shipped experts are asked for (neither --adapters nor --no-adapters).
    pub fn shipped_experts(&self) -> bool {
        self.adapters.is_none() && !self.no_adapters
    }

    /// The engine options these flags give, in weight format `format`, with gate `gate`; the
    /// model resolved to its file (a base id fetched if missing).
    pub fn options(
        &self,
        format: WeightFormat,
        gate: Option<PathBuf>,
    ) -> anyhow::Result<EngineOptions> {
        Ok(EngineOptions {
            paths: super::paths(),
            model: Some(super::model_path(self.model.as_deref())?),
            adapters: if self.no_adapters {
                Some(Vec::new())
            } else {
                self.adapters.clone()
            },
            gate,
            format,
        })
    }
}

/// Which model, experts and gate to load.
#[derive(clap::Args, Debug, Clone)]
pub struct EngineArgs {
    #[command(flatten)]
    pub base: ModelArgs,
    /// Gate directory (default: router-data/ if it holds a gate).
    #[arg(long)]
    pub gate: Option<PathBuf>,
    /// Base weights in memory: stored (the file's blocks), q8_0, f32, int8, or mixed (the
    /// fastest: the stored blocks for decoding and f32 for prompts of 32 tokens or more; files
    /// with K-quant blocks in int8 rows for both where the CPU has AVX-512 VNNI).
    #[arg(long, default_value = "mixed")]
    pub format: WeightFormat,
}

impl EngineArgs {
    /// Load the engine these flags describe.
    pub fn load(&self) -> anyhow::Result<Arc<Engine>> {
        Ok(Engine::load(
            &self.base.options(self.format, self.gate.clone())?,
        )?)
    }
}

/// The blend of a request.
#[derive(clap::Args, Debug, Clone)]
pub struct BlendArgs {
    /// base | dial=D | mix=A | expert=NAME | auto=POLICY | name=w,name=w [@weights|@logits|@contrast]
    #[arg(long, conflicts_with_all = ["dial", "policy"])]
    pub blend: Option<Blend>,
    /// Dial from -1 (conservative) through 0 (base) to +1 (progressive).
    #[arg(long, allow_hyphen_values = true, conflicts_with = "policy")]
    pub dial: Option<f32>,
    /// Route each prompt with the gate under this policy (e.g. libertarian).
    #[arg(long)]
    pub policy: Option<String>,
    /// How gate weights apply: weights, logits or contrast.
    #[arg(long)]
    pub mode: Option<Mode>,
}

impl BlendArgs {
    /// The blend these flags describe (base if none).
    pub fn blend(&self) -> anyhow::Result<Blend> {
        let b = if let Some(b) = &self.blend {
            b.clone()
        } else if let Some(d) = self.dial {
            Blend::dial(d)?
        } else if let Some(p) = &self.policy {
            Blend::auto(p)
        } else {
            Blend::base()
        };
        Ok(match self.mode {
            Some(m) => b.with_mode(m),
            None => b,
        })
    }
}

/// Sampling flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GenArgs {
    #[arg(long, default_value_t = 200)]
    pub max_tokens: usize,
    /// 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long)]
    pub top_p: Option<f64>,
    #[arg(long, default_value_t = 1.1)]
    pub repeat_penalty: f32,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
}

impl GenArgs {
    /// As library parameters.
    pub fn params(&self) -> anyhow::Result<GenParams> {
        if self.temperature < 0.0 || !self.temperature.is_finite() {
            anyhow::bail!("--temperature must be 0 or more, got {}", self.temperature);
        }
        if let Some(p) = self.top_p {
            if !(0.0..=1.0).contains(&p) {
                anyhow::bail!("--top-p must be in [0, 1], got {p}");
            }
        }
        if self.repeat_penalty <= 0.0 {
            anyhow::bail!(
                "--repeat-penalty must be positive, got {}",
                self.repeat_penalty
            );
        }
        Ok(GenParams {
            max_tokens: self.max_tokens,
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repeat_penalty: self.repeat_penalty,
            repeat_last_n: 64,
            seed: self.seed,
        })
    }
}
