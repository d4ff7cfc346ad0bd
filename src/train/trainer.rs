//! The training loop: micro-batches, gradient accumulation, AdamW, dev loss, checkpoints,
//! resume and a clean stop on request.

use candle_core::{Tensor, Var};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use super::batch::{
    epoch_batches, pack, row_sums, token_logprobs, token_logprobs_from, tokenize, Example, Packed,
    Residuals,
};
use super::{
    AdamParams, AdamW, Checkpoint, Method, Reference, TrainConfig, TrainLora, CHECKPOINT_FILE,
};
use crate::data::export::Record;
use crate::lora::{Adapter, AdapterConfig};
use crate::model::{Model, NoHook, Pass, WeightFormat};
use crate::{Error, Result};

/// The DPO reference cache's file name inside the output folder.
pub const REFERENCE_FILE: &str = "reference_logps.json";
/// Folder of the best adapter so far under early stopping (`patience`), and its record.
pub const BEST_DIR: &str = "best";
const BEST_FILE: &str = "best.json";

/// The best periodic dev loss of a run with early stopping.
struct Best {
    step: usize,
    dev_loss: f64,
}

impl Best {
    /// The record in `dir`, if a run saved one (a resumed run continues from it).
    fn load(dir: &Path) -> Option<Best> {
        let text = std::fs::read_to_string(dir.join(BEST_FILE)).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        Some(Best {
            step: v["step"].as_u64()? as usize,
            dev_loss: v["dev_loss"].as_f64()?,
        })
    }
}

/// Cache key of an example's reference log-probabilities: its id and token lengths, so a change
/// of data or `max_seq_len` never reuses a stale entry, and the base format unless f32 (the
/// int8 base's log-probabilities differ a little; f32 keys predate the other formats).
fn reference_key(e: &Example, base: WeightFormat) -> String {
    let key = format!(
        "{}:{}:{}:{}",
        e.id,
        e.prompt.len(),
        e.chosen.len(),
        e.rejected.len()
    );
    match base {
        WeightFormat::F32 => key,
        other => format!("{key}:{}", other.name()),
    }
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// All steps done; the adapter is saved.
    Finished,
    /// Stopped on request; a checkpoint is saved and `--resume` continues.
    Interrupted,
}

/// What a run reports as it goes, to whoever watches it (the CLI draws a progress bar).
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// The run begins: `total` optimiser steps, the first being `step` (non-zero on resume).
    Start { total: usize, step: usize },
    /// An optimiser step is done: its mean loss, learning rate and the run's tokens a second.
    Step {
        step: usize,
        loss: f64,
        lr: f64,
        tokens_per_second: f64,
    },
    /// A line worth printing, e.g. the dev loss at an evaluation step.
    Note(String),
}

/// What a run measured; also written to `train_summary.json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TrainReport {
    pub outcome: Outcome,
    pub method: Method,
    pub steps: usize,
    pub total_steps: usize,
    pub resumed_from: Option<usize>,
    pub train_examples: usize,
    pub dev_examples: usize,
    pub trainable_params: usize,
    /// Real (non-padding) tokens processed, including both answers for DPO.
    pub tokens: usize,
    pub train_seconds: f64,
    pub tokens_per_second: f64,
    /// Mean training loss over the last logged steps.
    pub train_loss: Option<f64>,
    /// SFT: mean answer-token NLL on the dev set; DPO: mean DPO loss on it.
    pub dev_loss: Option<f64>,
    /// DPO only: share of dev pairs whose implicit reward prefers the adapter's own side.
    pub dev_reward_accuracy: Option<f64>,
    /// SFT on records with both sides' answers: share of dev records whose own answer the
    /// adapter finds likelier than the other side's (see [`Trainer::dev_loss`]).
    #[serde(default)]
    pub dev_side_accuracy: Option<f64>,
    /// With `patience`: the step whose adapter was kept (the lowest periodic dev loss), and
    /// that loss. `dev_loss` above is then the kept adapter's.
    #[serde(default)]
    pub best_step: Option<usize>,
    #[serde(default)]
    pub best_dev_loss: Option<f64>,
    pub peak_rss_mb: Option<f64>,
    pub threads: usize,
}

/// DPO loss `-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, averaged; also returns
/// the margins `d` per pair. All arguments `(b,)`.
pub fn dpo_loss(
    pi_c: &Tensor,
    pi_r: &Tensor,
    ref_c: &Tensor,
    ref_r: &Tensor,
    beta: f64,
) -> Result<(Tensor, Tensor)> {
    let d = (((pi_c - ref_c)? - (pi_r - ref_r)?)? * beta)?;
    // softplus(-d), written stably: relu(-d) + log(1 + exp(-|d|)).
    let z = d.neg()?;
    let loss = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    Ok((loss.mean_all()?, d))
}

/// One training run of one adapter.
pub struct Trainer<'a> {
    model: &'a Model,
    config: TrainConfig,
    lora: TrainLora,
    train: Vec<Example>,
    dev: Vec<Example>,
    /// DPO reference log-probabilities `(chosen, rejected)`, by [`reference_key`].
    reference: RefCell<HashMap<String, (f32, f32)>>,
    out: PathBuf,
    pad: u32,
    /// Records left out because their prompt alone nearly fills `max_seq_len`.
    dropped: usize,
    /// When the adapter leaves the lowest blocks alone: their output, kept per sequence.
    residuals: Option<Residuals>,
    /// DPO against the starting adapter ([`Reference::Init`]): that adapter, frozen.
    reference_lora: Option<TrainLora>,
}

impl<'a> Trainer<'a> {
    /// Set up a run writing to `out`. The model must hold its weights in a format gradients
    /// flow through ([`WeightFormat::F32`] or [`WeightFormat::Int8`]); the saved settings
    /// record the model's format as `base`, whatever `config.base` said.
    pub fn new(
        model: &'a Model,
        mut config: TrainConfig,
        train: &[Record],
        dev: &[Record],
        out: &Path,
    ) -> Result<Self> {
        if !matches!(model.format, WeightFormat::F32 | WeightFormat::Int8) {
            return Err(Error::setting(
                "format",
                format!(
                    "training needs the model loaded with f32 or int8 weights, not {}",
                    model.format.name()
                ),
            ));
        }
        config.base = model.format;
        config.validate()?;
        if config.method == Method::Dpo && train.iter().chain(dev).any(|r| r.rejected.is_none()) {
            return Err(Error::no_data(
                "DPO training",
                "every record needs a rejected answer",
            ));
        }
        let tok = &model.tokenizer;
        let (train, d1) = tokenize(tok, train, config.max_seq_len)?;
        let (dev, d2) = tokenize(tok, dev, config.max_seq_len)?;
        if train.is_empty() {
            return Err(Error::no_data("training", "no examples fit in max_seq_len"));
        }
        // The starting adapter, read once: trained from, and (DPO) the frozen reference.
        let init = (config.init.as_ref())
            .map(|dir| Adapter::load(dir, &model.config))
            .transpose()?;
        let lora = match &init {
            Some(a) => TrainLora::from_adapter(a, config.dropout as f32)?,
            None => {
                let ac = AdapterConfig {
                    r: config.rank,
                    lora_alpha: config.alpha,
                    target_modules: config.targets.clone(),
                    use_rslora: config.rslora,
                    base_model_name_or_path: model.config.name.clone(),
                    base: Some(crate::lora::BaseModel::of(
                        &model.config,
                        crate::model::fetch::sha256_file(&model.path).ok(),
                    )),
                    stance: Some(config.stance.clone()),
                    description: None,
                    peft_type: "LORA".into(),
                    task_type: "CAUSAL_LM".into(),
                    lora_dropout: config.dropout,
                    bias: "none".into(),
                    fan_in_fan_out: false,
                    inference_mode: true,
                    layers_to_transform: match config.layers_from {
                        0 => None,
                        n if n < model.config.n_layer => Some((n..model.config.n_layer).collect()),
                        n => {
                            return Err(Error::setting(
                                "layers_from",
                                format!(
                                    "{n}, but the model has {} blocks (0-{})",
                                    model.config.n_layer,
                                    model.config.n_layer - 1
                                ),
                            ))
                        }
                    },
                };
                TrainLora::init(&model.config, ac, config.seed, config.dropout as f32)?
            }
        };
        let reference_lora = match (&init, config.method, config.reference) {
            (Some(a), Method::Dpo, Reference::Init) => Some(TrainLora::from_adapter(a, 0.0)?),
            _ => None,
        };
        let pad = *model.tokenizer.stop_ids().first().unwrap_or(&0);
        let residuals = match lora.first_layer() {
            0 => None,
            n => Some(Residuals::new(n)),
        };
        Ok(Trainer {
            residuals,
            reference_lora,
            model,
            config,
            lora,
            train,
            dev,
            reference: RefCell::new(HashMap::new()),
            out: out.to_path_buf(),
            pad,
            dropped: d1.len() + d2.len(),
        })
    }

    /// The trainable parameters.
    pub fn lora(&self) -> &TrainLora {
        &self.lora
    }

    /// The tokenized training examples, in data-file order.
    pub fn train_examples(&self) -> &[Example] {
        &self.train
    }

    /// Training and dev examples used, and records dropped for length.
    pub fn sizes(&self) -> (usize, usize, usize) {
        (self.train.len(), self.dev.len(), self.dropped)
    }

    /// Micro-batches in one epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.config.batch_size)
    }

    /// Optimizer steps the whole run takes.
    pub fn total_steps(&self) -> usize {
        let all = (self.batches_per_epoch() * self.config.epochs).div_ceil(self.config.grad_accum);
        match self.config.max_steps {
            0 => all,
            m => m.min(all),
        }
    }

    /// Log-probabilities of the answer tokens of `prompt ++ chosen` for every example, then (DPO)
    /// `prompt ++ rejected` for every one, under `pass`; from the kept residuals when the
    /// adapter leaves the lowest blocks alone (`dev`: the examples are dev ones, read again
    /// at every evaluation, so their residuals are kept for the run).
    fn answer_logprobs(
        &self,
        examples: &[&Example],
        with_rejected: bool,
        pass: &Pass,
        dev: bool,
    ) -> Result<(Packed, Tensor)> {
        let mut seqs: Vec<_> = examples
            .iter()
            .map(|e| (&e.prompt[..], &e.chosen[..]))
            .collect();
        if with_rejected {
            seqs.extend(examples.iter().map(|e| (&e.prompt[..], &e.rejected[..])));
        }
        let packed = pack(&seqs, self.pad)?;
        let logp = match &self.residuals {
            None => token_logprobs(self.model, &packed, pass)?,
            Some(r) => {
                let keep = dev || self.repeats_examples();
                let x = r.batch(self.model, &seqs, self.pad, keep)?;
                token_logprobs_from(self.model, &packed, &x, r.after(), pass)?
            }
        };
        Ok((packed, logp))
    }

    /// Whether the run reads a training example more than once (more than one epoch), so that
    /// keeping its residuals pays.
    pub fn repeats_examples(&self) -> bool {
        self.total_steps() * self.config.grad_accum * self.config.batch_size > self.train.len()
    }

    /// Residual sequences kept for the frozen lowest blocks, and their memory in bytes.
    pub fn residuals_stored(&self) -> Option<(usize, usize)> {
        self.residuals.as_ref().map(Residuals::stored)
    }

    /// Loss of one micro-batch (with the graph for backward) and its real token count.
    pub fn batch_loss(
        &self,
        examples: &[&Example],
        differentiable: bool,
    ) -> Result<(Tensor, usize)> {
        let pass = Pass {
            hook: &self.lora,
            logits: crate::model::Logits::Hidden,
            differentiable,
        };
        match self.config.method {
            Method::Sft => {
                let (packed, logp) = self.answer_logprobs(examples, false, &pass, false)?;
                Ok((logp.mean_all()?.neg()?, packed.real_tokens))
            }
            Method::Dpo => {
                let (loss, _, tokens) = self.dpo_batch(examples, &pass, false)?;
                Ok((loss, tokens))
            }
        }
    }

    fn dpo_batch(
        &self,
        examples: &[&Example],
        pass: &Pass,
        dev: bool,
    ) -> Result<(Tensor, Tensor, usize)> {
        let b = examples.len();
        let (packed, logp) = self.answer_logprobs(examples, true, pass, dev)?;
        let sums = row_sums(&packed, &logp)?; // (2b,)
        let (rc, rr): (Vec<f32>, Vec<f32>) = self.reference_for(examples, dev)?.into_iter().unzip();
        let dev = sums.device();
        let (loss, d) = dpo_loss(
            &sums.narrow(0, 0, b)?,
            &sums.narrow(0, b, b)?,
            &Tensor::new(rc, dev)?,
            &Tensor::new(rr, dev)?,
            self.config.beta,
        )?;
        Ok((loss, d, packed.real_tokens))
    }

    /// DPO: load the cache of the base model's log-probabilities (`reference_logps.json` in the
    /// output folder). Missing entries are computed when a batch first needs them, so a short
    /// run pays only for the examples it uses; the cache is saved with every checkpoint.
    pub fn prepare_reference(&mut self) -> Result<()> {
        if self.config.method != Method::Dpo {
            return Ok(());
        }
        let path = self.out.join(REFERENCE_FILE);
        if let Ok(s) = std::fs::read_to_string(&path) {
            let cache: HashMap<String, (f32, f32)> = serde_json::from_str(&s)
                .map_err(|e| Error::data(&path, e.line(), "reference", e.to_string()))?;
            self.reference.borrow_mut().extend(cache);
        }
        Ok(())
    }

    /// Write the reference cache, atomically.
    fn save_reference(&self) -> Result<()> {
        if self.config.method != Method::Dpo {
            return Ok(());
        }
        let json = serde_json::to_string(&*self.reference.borrow())
            .map_err(|e| Error::Internal(format!("{REFERENCE_FILE}: {e}")))?;
        crate::error::write_atomic(&self.out.join(REFERENCE_FILE), json.as_bytes())
    }

    /// Reference log-probabilities `(chosen, rejected)` of `examples`, computing missing ones
    /// with the reference model: the base (experts off) or the frozen starting adapter.
    fn reference_for(&self, examples: &[&Example], dev: bool) -> Result<Vec<(f32, f32)>> {
        let todo: Vec<&Example> = examples
            .iter()
            .copied()
            .filter(|e| {
                !self
                    .reference
                    .borrow()
                    .contains_key(&reference_key(e, self.model.format))
            })
            .collect();
        if !todo.is_empty() {
            let hook: &dyn crate::model::LinearHook = match &self.reference_lora {
                Some(l) => l,
                None => &NoHook,
            };
            let pass = Pass {
                hook,
                logits: crate::model::Logits::Hidden,
                differentiable: false,
            };
            let (packed, logp) = self.answer_logprobs(&todo, true, &pass, dev)?;
            let sums = row_sums(&packed, &logp)?.to_vec1::<f32>()?;
            let mut cache = self.reference.borrow_mut();
            for (i, e) in todo.iter().enumerate() {
                cache.insert(
                    reference_key(e, self.model.format),
                    (sums[i], sums[todo.len() + i]),
                );
            }
        }
        let cache = self.reference.borrow();
        Ok(examples
            .iter()
            .map(|e| cache[&reference_key(e, self.model.format)])
            .collect())
    }

    /// Dev loss over the first `limit` dev examples (0: all), and a side accuracy: DPO, the share
    /// of dev pairs whose implicit reward prefers the adapter's own answer; SFT on records that
    /// carry the other side's answer too, the share whose own answer the adapter finds likelier
    /// (summed log-probability: a forced choice between the two answers; `None` without them).
    pub fn dev_loss(&self, limit: usize) -> Result<Option<(f64, Option<f64>)>> {
        let n = if limit == 0 {
            self.dev.len()
        } else {
            limit.min(self.dev.len())
        };
        if n == 0 {
            return Ok(None);
        }
        self.lora.set_dropout_seed(None);
        let pass = Pass {
            hook: &self.lora,
            logits: crate::model::Logits::Hidden,
            differentiable: false,
        };
        let (mut total, mut weight, mut wins) = (0.0, 0.0, 0usize);
        // An even spread over the dev split (it is ordered by topic), not its first `n` records.
        let len = self.dev.len();
        let refs: Vec<&Example> = (0..n).map(|i| &self.dev[i * len / n]).collect();
        let both = refs.iter().all(|e| !e.rejected.is_empty());
        for chunk in refs.chunks(self.config.batch_size) {
            match self.config.method {
                Method::Sft => {
                    let (packed, logp) = self.answer_logprobs(chunk, both, &pass, true)?;
                    // Own answers first: the first `own` answer tokens and rows are theirs.
                    let own: usize = chunk.iter().map(|e| e.chosen.len()).sum();
                    total -= logp.narrow(0, 0, own)?.sum_all()?.to_scalar::<f32>()? as f64;
                    weight += own as f64;
                    if both {
                        let sums = row_sums(&packed, &logp)?.to_vec1::<f32>()?;
                        let b = chunk.len();
                        wins += (0..b).filter(|&i| sums[i] > sums[b + i]).count();
                    }
                }
                Method::Dpo => {
                    let (loss, d, _) = self.dpo_batch(chunk, &pass, true)?;
                    total += loss.to_scalar::<f32>()? as f64 * chunk.len() as f64;
                    weight += chunk.len() as f64;
                    wins += d.to_vec1::<f32>()?.iter().filter(|&&x| x > 0.0).count();
                }
            }
        }
        let acc = (self.config.method == Method::Dpo || both).then(|| wins as f64 / n as f64);
        Ok(Some((total / weight, acc)))
    }

    /// What [`Trainer::dev_loss`]'s accuracy is called in logs and reports.
    fn accuracy_name(&self) -> &'static str {
        match self.config.method {
            Method::Sft => "side accuracy",
            Method::Dpo => "reward accuracy",
        }
    }

    /// Run to the end, or until `stop` is set (then a checkpoint is saved). With `resume`, start
    /// from the checkpoint in the output folder if there is one. `progress` hears of the start,
    /// every step and the dev evaluations (`&mut |_| {}` to ignore them).
    pub fn run(
        &mut self,
        resume: bool,
        stop: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<TrainReport> {
        let c = self.config.clone();
        std::fs::create_dir_all(&self.out).map_err(|e| Error::io(&self.out, e))?;
        c.save(&self.out.join("train.toml"))?;
        self.prepare_reference()?;
        let vars: Vec<Var> = self
            .lora
            .named_vars()
            .into_iter()
            .map(|(_, v)| v.clone())
            .collect();
        let var_refs: Vec<&Var> = vars.iter().collect();
        let mut opt = AdamW::new(&var_refs, AdamParams::with_weight_decay(c.weight_decay))?;
        let ckpt_path = self.out.join(CHECKPOINT_FILE);
        let mut state = Checkpoint::default();
        let mut resumed_from = None;
        if resume && ckpt_path.exists() {
            state = Checkpoint::load(&ckpt_path, &self.lora, &mut opt)?;
            resumed_from = Some(state.step);
        }
        let total = self.total_steps();
        let per_epoch = self.batches_per_epoch();
        progress(Progress::Start {
            total,
            step: state.step,
        });
        let log_path = self.out.join("train_log.jsonl");
        let mut epoch_cache: Option<(usize, Vec<Vec<usize>>)> = None;
        let mut recent: Vec<f64> = Vec::new();
        let mut outcome = Outcome::Finished;
        let (start_tokens, start_seconds) = (state.tokens, state.seconds);
        // Early stopping: the best periodic dev loss so far (kept across --resume in best/).
        let best_dir = self.out.join(BEST_DIR);
        let mut best: Option<Best> = (c.patience > 0).then(|| Best::load(&best_dir)).flatten();
        while state.step < total {
            if stop.load(Ordering::SeqCst) {
                outcome = Outcome::Interrupted;
                break;
            }
            let lr = super::learning_rate(state.step, total, c.warmup_steps, c.lr, c.min_lr_ratio);
            let t0 = Instant::now();
            let mut grads: Option<Vec<Tensor>> = None;
            let (mut step_loss, mut micro) = (0.0, 0);
            for k in 0..c.grad_accum {
                let m = state.step * c.grad_accum + k;
                if m >= per_epoch * c.epochs {
                    break;
                }
                let epoch = m / per_epoch;
                if epoch_cache.as_ref().map(|e| e.0) != Some(epoch) {
                    epoch_cache = Some((
                        epoch,
                        epoch_batches(&self.train, c.batch_size, c.seed, epoch),
                    ));
                }
                let batch = &epoch_cache
                    .as_ref()
                    .map(|e| &e.1[m % per_epoch])
                    .cloned()
                    .unwrap_or_default();
                let examples: Vec<&Example> = batch.iter().map(|&i| &self.train[i]).collect();
                self.lora
                    .set_dropout_seed(Some(c.seed.wrapping_mul(1_000_003).wrapping_add(m as u64)));
                let (loss, tokens) = self.batch_loss(&examples, true)?;
                let store = (&loss / c.grad_accum as f64)?.backward()?;
                let g: Vec<Tensor> = vars
                    .iter()
                    .map(|v| {
                        store
                            .get(v)
                            .cloned()
                            .map_or_else(|| v.as_tensor().zeros_like(), Ok)
                    })
                    .collect::<candle_core::Result<_>>()?;
                grads = Some(match grads {
                    None => g,
                    Some(acc) => acc
                        .iter()
                        .zip(&g)
                        .map(|(a, b)| a + b)
                        .collect::<candle_core::Result<_>>()?,
                });
                step_loss += loss.to_scalar::<f32>()? as f64;
                micro += 1;
                state.tokens += tokens;
            }
            if let Some(g) = grads {
                opt.step(&var_refs, &g, lr)?;
            }
            state.step += 1;
            state.seconds += t0.elapsed().as_secs_f64();
            let loss = step_loss / micro.max(1) as f64;
            recent.push(loss);
            if recent.len() > 20 {
                recent.remove(0);
            }
            let tps = state.tokens as f64 / state.seconds.max(1e-9);
            progress(Progress::Step {
                step: state.step,
                loss,
                lr,
                tokens_per_second: tps,
            });
            let mut line = serde_json::json!({"step": state.step, "loss": loss, "lr": lr, "tokens_per_second": tps});
            if c.eval_every > 0 && state.step % c.eval_every == 0 && state.step < total {
                if let Some((dl, acc)) = self.dev_loss(c.eval_limit)? {
                    progress(Progress::Note(format!(
                        "step {:>5}: dev loss {dl:.4}{}",
                        state.step,
                        acc.map(|a| format!(", {} {a:.3}", self.accuracy_name()))
                            .unwrap_or_default()
                    )));
                    line["dev_loss"] = dl.into();
                    if let Some(a) = acc {
                        line[format!("dev_{}", self.accuracy_name().replace(' ', "_"))] = a.into();
                    }
                    if c.patience > 0 {
                        if best.as_ref().is_none_or(|b| dl < b.dev_loss) {
                            best = Some(Best {
                                step: state.step,
                                dev_loss: dl,
                            });
                            self.save_best(&best_dir, state.step, dl)?;
                        }
                        let since = best
                            .as_ref()
                            .map_or(0, |b| (state.step - b.step) / c.eval_every);
                        if since >= c.patience {
                            progress(Progress::Note(format!(
                                "step {:>5}: no better dev loss in {since} evaluations; keeping step {}",
                                state.step,
                                best.as_ref().map_or(0, |b| b.step)
                            )));
                            append_line(&log_path, &line)?;
                            break;
                        }
                    }
                }
            }
            append_line(&log_path, &line)?;
            if state.step % c.checkpoint_every == 0 && state.step < total {
                self.save_reference()?;
                state.save(&ckpt_path, &self.lora, &opt)?;
            }
        }
        let mut report = TrainReport {
            outcome,
            method: c.method,
            steps: state.step,
            total_steps: total,
            resumed_from,
            train_examples: self.train.len(),
            dev_examples: self.dev.len(),
            trainable_params: self.lora.num_params(),
            tokens: state.tokens,
            train_seconds: state.seconds,
            // This segment's rate; the whole run's when the segment trained nothing.
            tokens_per_second: if state.tokens > start_tokens {
                (state.tokens - start_tokens) as f64 / (state.seconds - start_seconds).max(1e-9)
            } else {
                state.tokens as f64 / state.seconds.max(1e-9)
            },
            train_loss: (!recent.is_empty())
                .then(|| recent.iter().sum::<f64>() / recent.len() as f64),
            dev_loss: None,
            dev_reward_accuracy: None,
            dev_side_accuracy: None,
            best_step: None,
            best_dev_loss: None,
            peak_rss_mb: peak_rss_mb(),
            threads: candle_core::utils::get_num_threads(),
        };
        if outcome == Outcome::Interrupted {
            self.save_reference()?;
            state.save(&ckpt_path, &self.lora, &opt)?;
            return Ok(report);
        }
        // With early stopping, the last weights compete with the best periodic ones.
        if let Some((dl, acc)) = self.dev_loss(c.eval_limit)? {
            report.dev_loss = Some(dl);
            report.dev_reward_accuracy = acc;
            // Logged whichever weights are kept, so every evaluation of the run is on record.
            let mut line = serde_json::json!({"step": state.step, "final": true, "dev_loss": dl});
            if let Some(a) = acc {
                line[format!("dev_{}", self.accuracy_name().replace(' ', "_"))] = a.into();
            }
            append_line(&log_path, &line)?;
        }
        if let Some(b) = best.filter(|b| report.dev_loss.is_none_or(|dl| b.dev_loss < dl)) {
            let kept = crate::lora::Adapter::load(&best_dir, &self.model.config)?;
            self.lora.load_adapter(&kept)?;
            if let Some((dl, acc)) = self.dev_loss(c.eval_limit)? {
                report.dev_loss = Some(dl);
                report.dev_reward_accuracy = acc;
            }
            report.best_step = Some(b.step);
            report.best_dev_loss = Some(b.dev_loss);
        }
        if c.method == Method::Sft {
            report.dev_side_accuracy = report.dev_reward_accuracy.take();
        }
        self.save_adapter(&report)?;
        let json = serde_json::to_string_pretty(&report)
            .map_err(|e| Error::Internal(format!("train summary: {e}")))?;
        crate::error::write_atomic(&self.out.join("train_summary.json"), json.as_bytes())?;
        let _ = std::fs::remove_file(&ckpt_path);
        Ok(report)
    }

    /// Save the current adapter as the best so far (`best/`, with its step and dev loss).
    fn save_best(&self, dir: &Path, step: usize, dev_loss: f64) -> Result<()> {
        self.lora.to_adapter()?.save(dir, &self.model.config)?;
        let json = serde_json::json!({"step": step, "dev_loss": dev_loss});
        crate::error::write_atomic(&dir.join(BEST_FILE), json.to_string().as_bytes())
    }

    fn save_adapter(&self, report: &TrainReport) -> Result<()> {
        let mut adapter = self.lora.to_adapter()?;
        let c = &self.config;
        adapter.config.stance = Some(c.stance.clone());
        adapter.config.description = Some(format!(
            "Deliberately biased {} LoRA expert for research and comparison; trained by `stancemix train {}` ({} steps) on {}.",
            c.stance,
            match c.method { Method::Sft => "sft", Method::Dpo => "dpo" },
            report.steps,
            c.data.display()
        ));
        adapter.save(&self.out, &self.model.config)
    }
}

fn append_line(path: &Path, value: &serde_json::Value) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{value}").map_err(|e| Error::io(path, e))
}

/// Peak resident memory of this process (Linux `VmHWM`), in MiB.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
