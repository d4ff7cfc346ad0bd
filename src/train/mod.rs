//! LoRA training of the stance experts: SFT on the adapter's own answers, and DPO with the
//! other side's answer as the rejected one (the counterfactual pairs give preference pairs for
//! free). Candle autograd over a frozen base held in f32 or, faster, as int8 copies
//! (`TrainConfig::base`, `model::gemm8`); checkpoints and exact resume. Also the gate's whole
//! training run ([`gate::train_gate`]), which fine-tunes its reader here.

mod batch;
mod checkpoint;
mod lora;
mod optim;
mod trainer;

pub use batch::{
    epoch_batches, pack, row_sums, token_logprobs, token_logprobs_from, tokenize, Example, Packed,
    Residuals,
};
pub use checkpoint::{Checkpoint, CHECKPOINT_FILE};
pub use lora::{TrainLora, VarPair};
pub mod finetune;
pub mod gate;
pub use optim::{learning_rate, AdamParams, AdamW};
pub use trainer::{dpo_loss, peak_rss_mb, Outcome, Progress, TrainReport, Trainer};

use std::path::{Path, PathBuf};

use crate::data::export::{export, Record, Split, View};
use crate::data::survey::survey;
use crate::data::StancePair;
use crate::model::chat::ChatTemplate;
use crate::model::WeightFormat;
use crate::{Error, Result};

/// Training objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Supervised fine-tuning: next-token loss on the adapter's own answers only.
    Sft,
    /// Direct preference optimisation against a frozen reference model ([`Reference`]).
    Dpo,
}

/// DPO's reference model: what the implicit reward `beta (log pi - log ref)` is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Reference {
    /// The base model, experts off (runs written before this setting existed).
    Base,
    /// The adapter the run starts from (`init`, e.g. the SFT stage's), frozen: the usual
    /// SFT-then-DPO recipe, whose implicit KL anchor is the SFT model rather than the base.
    /// Without `init` this is the base.
    Init,
}

/// Every setting of a run; saved as `train.toml` beside the adapter.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub method: Method,
    /// `progressive` or `conservative`: the adapter's own side.
    pub stance: String,
    /// Stance-pair folder (`*.jsonl`).
    pub data: PathBuf,
    pub rank: usize,
    pub alpha: f64,
    pub rslora: bool,
    /// PEFT module names (`q_proj`, ...).
    pub targets: Vec<String>,
    pub dropout: f64,
    /// Peak learning rate.
    pub lr: f64,
    pub warmup_steps: usize,
    /// The cosine decays to `lr * min_lr_ratio`.
    pub min_lr_ratio: f64,
    pub weight_decay: f64,
    /// Sequences per micro-batch (DPO: pairs, each two sequences).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Prompt + answer tokens; longer answers are cut.
    pub max_seq_len: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0: run all epochs).
    pub max_steps: usize,
    pub seed: u64,
    /// DPO temperature.
    pub beta: f64,
    /// Start from this adapter instead of a fresh one (e.g. DPO after SFT).
    pub init: Option<PathBuf>,
    /// DPO's reference model. Files written before this setting existed used the base.
    #[serde(default = "base_reference")]
    pub reference: Reference,
    /// The base model file the run trains over, as given: recorded so that a resume finds it
    /// (unset: the caller's default base).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// Dev-set loss every this many optimizer steps (0: only at the end).
    pub eval_every: usize,
    /// Dev examples used for the dev loss, periodic and final, spread evenly over the dev split
    /// (0: all).
    pub eval_limit: usize,
    /// Checkpoint every this many optimizer steps.
    pub checkpoint_every: usize,
    /// Survey-format examples added per proposition pair (0: none); see `data::survey`.
    #[serde(default)]
    pub survey: usize,
    /// Train on the long-form answers (`false` with `survey` > 0: survey examples only).
    #[serde(default = "yes")]
    pub long_form: bool,
    /// How the frozen base weights are held: `f32` (exact) or `int8` (per-row int8 products
    /// forward and backward, 3-5x faster per matmul with AVX-512 VNNI; see `model::gemm8`).
    /// Files written before this setting existed trained in `f32`.
    #[serde(default = "f32_base")]
    pub base: WeightFormat,
    /// Early stopping: stop once the dev loss (measured every `eval_every` steps) has not
    /// improved for this many evaluations, and keep the adapter of the best one (0: train every
    /// step and keep the last).
    #[serde(default)]
    pub patience: usize,
    /// Adapt only blocks `layers_from..` (PEFT's `layers_to_transform`; 0: every block). The
    /// blocks below are then frozen whatever the adapter does, so the residual stream entering
    /// block `layers_from` is computed once per sequence and kept in memory: epochs after the
    /// first run only the adapted blocks (memory: sequence tokens x hidden x 4 bytes).
    #[serde(default)]
    pub layers_from: usize,
}

fn yes() -> bool {
    true
}

fn base_reference() -> Reference {
    Reference::Base
}

fn f32_base() -> WeightFormat {
    WeightFormat::F32
}

/// The base format a run uses unless told otherwise: `int8` where the CPU has AVX-512 VNNI,
/// else `f32` (the int8 products would run in plain Rust there).
pub fn default_base() -> WeightFormat {
    if crate::model::gemm8::has_vnni() {
        WeightFormat::Int8
    } else {
        WeightFormat::F32
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            method: Method::Sft,
            stance: "progressive".into(),
            data: PathBuf::from("adapters/data/stance"),
            rank: 8,
            alpha: 16.0,
            rslora: false,
            targets: crate::model::Target::ALL
                .map(|t| t.peft_name().to_string())
                .to_vec(),
            dropout: 0.0,
            lr: 2e-4,
            warmup_steps: 10,
            min_lr_ratio: 0.1,
            weight_decay: 0.0,
            batch_size: 4,
            grad_accum: 2,
            max_seq_len: 192,
            epochs: 1,
            max_steps: 0,
            seed: 1,
            beta: 0.1,
            init: None,
            model: None,
            eval_every: 50,
            eval_limit: 48,
            checkpoint_every: 20,
            patience: 0,
            layers_from: 0,
            reference: Reference::Init,
            survey: 0,
            long_form: true,
            base: default_base(),
        }
    }
}

impl TrainConfig {
    /// Read a TOML config; errors name the file and the field.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: TrainConfig = toml::from_str(&text).map_err(|e| {
            // `file:line: field: problem`, the field read from the line the error points at.
            let at = e.span().map_or(0, |s| s.start).min(text.len());
            let line = text[..at].matches('\n').count() + 1;
            let field = text.lines().nth(line - 1).and_then(|l| l.split('=').next());
            let field = field
                .map(str::trim)
                .filter(|f| !f.is_empty() && !f.starts_with('['));
            Error::data(path, line, field.unwrap_or("toml"), e.message())
        })?;
        c.validate().map_err(|e| match e {
            Error::Setting { name, msg } => {
                // The line that sets it (0 when the file leaves it at its default).
                let line = text
                    .lines()
                    .position(|l| l.split('=').next().map(str::trim) == Some(name.as_str()))
                    .map_or(0, |i| i + 1);
                Error::data(path, line, name, msg)
            }
            e => e,
        })?;
        Ok(c)
    }

    /// Write as TOML, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = toml::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("train config: {e}")))?;
        crate::error::write_atomic(path, text.as_bytes())
    }

    /// Check ranges: the error is an [`Error::Setting`] naming the field.
    pub fn validate(&self) -> Result<()> {
        crate::data::export::other_stance(&self.stance)
            .map_err(|e| Error::setting("stance", e.to_string()))?;
        let positive = [
            ("rank", self.rank),
            ("batch_size", self.batch_size),
            ("grad_accum", self.grad_accum),
            ("epochs", self.epochs),
            ("checkpoint_every", self.checkpoint_every),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(Error::setting(name, "must be at least 1"));
            }
        }
        if self.max_seq_len < 16 {
            return Err(Error::setting("max_seq_len", "must be at least 16"));
        }
        if !(self.lr > 0.0 && self.lr < 1.0) {
            return Err(Error::setting(
                "lr",
                format!("{} is not in (0, 1)", self.lr),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::setting(
                "dropout",
                format!("{} is not in [0, 1)", self.dropout),
            ));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err(Error::setting(
                "min_lr_ratio",
                format!("{} is not in [0, 1]", self.min_lr_ratio),
            ));
        }
        if self.beta <= 0.0 {
            return Err(Error::setting(
                "beta",
                format!("{} must be positive", self.beta),
            ));
        }
        for t in &self.targets {
            if crate::model::Target::parse(t).is_none() {
                return Err(Error::setting(
                    "targets",
                    format!(
                        "unknown module '{t}' (expected {})",
                        crate::model::Target::peft_names()
                    ),
                ));
            }
        }
        if !self.long_form && self.survey == 0 {
            return Err(Error::setting(
                "long_form",
                "false needs survey >= 1 (there would be no examples)",
            ));
        }
        if self.targets.is_empty() {
            return Err(Error::setting("targets", "at least one module is needed"));
        }
        if !matches!(self.base, WeightFormat::F32 | WeightFormat::Int8) {
            return Err(Error::setting(
                "base",
                format!(
                    "'{}' carries no gradients (expected f32 or int8)",
                    self.base.name()
                ),
            ));
        }
        Ok(())
    }

    /// The training and dev records this run reads from `pairs`, prompts rendered in `chat`:
    /// the long-form answers (`long_form`) and `survey` poll records per proposition. Dev
    /// records carry the other side's answer whatever the method (SFT's dev figures include a
    /// side accuracy), and alternate long-form and survey so that a limited dev loss sees both.
    pub fn records(
        &self,
        pairs: &[StancePair],
        chat: &ChatTemplate,
    ) -> Result<(Vec<Record>, Vec<Record>)> {
        let view = match self.method {
            Method::Sft => View::Sft,
            Method::Dpo => View::Dpo,
        };
        let (mut train, mut dev) = match self.long_form {
            true => (
                export(pairs, view, &self.stance, Split::Train, chat)?,
                export(pairs, View::Dpo, &self.stance, Split::Dev, chat)?,
            ),
            false => (Vec::new(), Vec::new()),
        };
        if self.survey > 0 {
            let n = self.survey;
            train.extend(survey(pairs, view, &self.stance, Split::Train, n, chat)?);
            let extra = survey(pairs, View::Dpo, &self.stance, Split::Dev, n, chat)?;
            let (mut a, mut b) = (std::mem::take(&mut dev).into_iter(), extra.into_iter());
            loop {
                match (a.next(), b.next()) {
                    (None, None) => break,
                    (x, y) => dev.extend(x.into_iter().chain(y)),
                }
            }
        }
        Ok((train, dev))
    }
}
