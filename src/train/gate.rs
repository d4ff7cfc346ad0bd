//! Training the gate end to end: labelled prompts (plus the stance data's), an optional LoRA
//! fine-tuning of the blocks the gate reads, their hidden states (cached), the classifier, and
//! its report on the dev prompts. Here rather than in `router` because the fine-tuning is
//! training; `stancemix router train` only parses flags and prints.

use std::path::{Path, PathBuf};

use crate::data::{is_dev, load_router_prompts, topics};
use crate::model::{LoadOptions, Model, WeightFormat};
use crate::router::{
    argmax, FeatureConfig, Gate, GateAdapter, GateFeatures, HiddenFeatures, PooledCache, Report,
    Template,
};
use crate::train::finetune;
use crate::util::Paths;
use crate::{Error, Result};

/// The folder of a fine-tuned gate's adapter, beside gate.json.
pub const GATE_ADAPTER: &str = "gate-lora";

/// Every setting of a gate training run (`stancemix router train`'s flags).
#[derive(Debug, Clone)]
pub struct GateTrainConfig {
    /// Labelled prompts (`{"id", "text", "topic"}` JSON Lines); those `is_dev` picks are held out.
    pub data: PathBuf,
    /// Extra training-only prompts: stance files (their `prompt` and `topic`); empty for none.
    pub extra: PathBuf,
    /// Where a fine-tuned reader is written (`OUT/gate-lora`), beside the gate's own file.
    pub out: PathBuf,
    /// Base model GGUF (`None`: the default, fetched into `paths.models` if missing).
    pub model: Option<PathBuf>,
    /// Where fetched models are kept.
    pub paths: Paths,
    /// Hash buckets for word 1-2-grams (0: no n-gram features).
    pub dim: usize,
    /// Factor on the unit-length n-gram vector (the hidden part is standardised).
    pub ngram_scale: f32,
    /// Also read the residual stream after this block (1-based; 0: n-grams only).
    pub layer: usize,
    /// How the prompt is wrapped for the hidden-state pass.
    pub template: Template,
    /// Read at most the first N tokens of each prompt in the hidden-state pass (0: all).
    pub max_tokens: usize,
    /// Base weights for the hidden-state pass.
    pub format: WeightFormat,
    /// Cache of pooled hidden states (`None`: none; unused for a fine-tuned reader).
    pub cache_dir: Option<PathBuf>,
    /// L2 penalty.
    pub alpha: f64,
    pub max_iter: u64,
    /// Restarts of linfa's solver from its last parameters.
    pub restarts: usize,
    /// Epochs of LoRA fine-tuning of the blocks the gate reads (0: the base's own states).
    pub finetune_epochs: usize,
    /// Peak learning rate of the fine-tuning.
    pub finetune_lr: f64,
    /// Count each non-political training prompt this many times (at least 1).
    pub non_political_weight: u32,
}

/// What [`train_gate`] reports while it works.
#[derive(Debug)]
pub enum GateTrainEvent<'a> {
    /// A line saying what it is doing or has done.
    Note(String),
    /// `done` of `total` prompts through the stage `what` (hidden states).
    Progress {
        what: &'a str,
        done: usize,
        total: usize,
    },
}

/// A trained gate (its `notes` filled in) and its report on the dev prompts.
#[derive(Debug)]
pub struct GateTraining {
    pub gate: Gate,
    pub dev_report: Report,
}

/// Train a gate as `cfg` says: writes the fine-tuned reader (if any) under `cfg.out` and the
/// hidden-state cache; the caller saves the gate.
pub fn train_gate(
    cfg: &GateTrainConfig,
    on: &mut dyn FnMut(GateTrainEvent),
) -> Result<GateTraining> {
    if cfg.non_political_weight == 0 {
        return Err(Error::setting("non_political_weight", "give at least 1"));
    }
    let prompts = load_router_prompts(&cfg.data)?;
    let all = topics::all_topics();
    let (dev, train): (Vec<_>, Vec<_>) = prompts.iter().partition(|p| is_dev(&p.id));
    let mut ex: Vec<(String, String)> = train
        .iter()
        .map(|p| (p.text.clone(), p.topic.clone()))
        .collect();
    let n_extra = add_stance_prompts(&cfg.extra, &mut ex)?;
    // Index of the original of each added copy: the copies reuse its hidden states.
    let repeat_of: Vec<usize> = (0..ex.len())
        .filter(|&i| ex[i].1 == topics::NON_POLITICAL)
        .flat_map(|i| std::iter::repeat_n(i, cfg.non_political_weight as usize - 1))
        .collect();
    let distinct = ex.len();
    let copies: Vec<_> = repeat_of.iter().map(|&i| ex[i].clone()).collect();
    ex.extend(copies);
    let dev_ex: Vec<(String, String)> = dev
        .iter()
        .map(|p| (p.text.clone(), p.topic.clone()))
        .collect();

    // Hidden states of every training and dev prompt (cached), if the gate reads them.
    let mut features = GateFeatures {
        ngrams: FeatureConfig {
            dim: cfg.dim,
            bigrams: true,
        },
        ngram_scale: cfg.ngram_scale,
        hidden: None,
    };
    let (pooled_train, pooled_dev) = if cfg.layer > 0 {
        let (h, pt, pd) = hidden_states(cfg, &ex, distinct, &repeat_of, &dev_ex, on)?;
        features.hidden = Some(h);
        (Some(pt), Some(pd))
    } else {
        (None, None)
    };

    on(GateTrainEvent::Note(format!(
        "training on {distinct} prompts ({} from {}; non-political ones counted {} times; {} held \
         out for dev)...",
        n_extra,
        cfg.extra.display(),
        cfg.non_political_weight,
        dev.len()
    )));
    let t0 = std::time::Instant::now();
    let mut gate = Gate::train(
        &ex,
        pooled_train.as_deref(),
        &all,
        &features,
        cfg.alpha,
        cfg.max_iter,
        cfg.restarts,
    )?;
    on(GateTrainEvent::Note(format!(
        "trained in {:.1}s (loss after each solver run: {})",
        t0.elapsed().as_secs_f64(),
        gate.notes.get("train_loss").cloned().unwrap_or_default()
    )));
    let mut pairs = Vec::with_capacity(dev_ex.len());
    for (i, (text, topic)) in dev_ex.iter().enumerate() {
        let pooled = pooled_dev.as_ref().map(|p| p[i].as_slice());
        let p = gate.probabilities_pooled(text, pooled)?;
        pairs.push((topic_index(&gate.topics, topic)?, argmax(&p)));
    }
    let report = Report::from_predictions(&gate.topics, pairs);
    let notes = [
        ("dev_accuracy", serde_json::json!(report.accuracy)),
        (
            "non_political_recall",
            serde_json::json!(report.recall(topics::NON_POLITICAL)),
        ),
        ("train_examples", serde_json::json!(distinct)),
        ("extra_train_examples", serde_json::json!(n_extra)),
        ("dev_examples", serde_json::json!(dev.len())),
    ];
    gate.notes
        .extend(notes.into_iter().map(|(k, v)| (k.to_string(), v)));
    Ok(GateTraining {
        gate,
        dev_report: report,
    })
}

/// Pooled hidden states, one vector per prompt.
type Pooled = Vec<Vec<f32>>;

/// The hidden-state reader and the pooled states of the training prompts (`ex`, whose first
/// `distinct` are the originals and the rest copies of `repeat_of`) and of the dev prompts; the
/// reader fine-tuned first when `cfg.finetune_epochs > 0`.
fn hidden_states(
    cfg: &GateTrainConfig,
    ex: &[(String, String)],
    distinct: usize,
    repeat_of: &[usize],
    dev_ex: &[(String, String)],
    on: &mut dyn FnMut(GateTrainEvent),
) -> Result<(HiddenFeatures, Pooled, Pooled)> {
    let path = crate::model::fetch::model_path(&cfg.paths, cfg.model.as_deref(), &mut |_| {})?;
    let model = Model::load(&path, &LoadOptions { format: cfg.format })?;
    if cfg.layer > model.config.n_layer {
        return Err(Error::setting(
            "layer",
            format!(
                "{}, but the model has {} layers",
                cfg.layer, model.config.n_layer
            ),
        ));
    }
    let mut h = HiddenFeatures {
        layer: cfg.layer,
        template: cfg.template,
        size: model.config.hidden,
        mean: Vec::new(),
        std: Vec::new(),
        max_tokens: (cfg.max_tokens > 0).then_some(cfg.max_tokens),
        adapter: None,
        reader: Default::default(),
    };
    if cfg.finetune_epochs > 0 {
        finetune_reader(cfg, &path, ex, &mut h, on)?;
    }
    let mut cache = match &cfg.cache_dir {
        Some(dir) if h.adapter.is_none() => Some(PooledCache::open(dir, &model, &h)?),
        _ => None,
    };
    on(GateTrainEvent::Note(format!(
        "hidden states after block {} of {} ({:?} template) for {} prompts{}...",
        cfg.layer,
        model.config.n_layer,
        cfg.template,
        distinct + dev_ex.len(),
        cache
            .as_ref()
            .map(|c| format!(" ({} cached)", c.len()))
            .unwrap_or_default()
    )));
    let t0 = std::time::Instant::now();
    let mut get = |set: &[(String, String)], what: &str| -> Result<Vec<Vec<f32>>> {
        let mut out = Vec::with_capacity(set.len());
        for (i, (text, _)) in set.iter().enumerate() {
            out.push(match cache.as_mut() {
                Some(c) => c.pooled(&model, &h, text)?,
                None => h.pooled(&model, text)?,
            });
            on(GateTrainEvent::Progress {
                what,
                done: i + 1,
                total: set.len(),
            });
            if (i + 1) % 250 == 0 {
                // Keep what was computed if the run is interrupted.
                if let Some(c) = cache.as_mut() {
                    c.save()?;
                }
            }
        }
        Ok(out)
    };
    let mut pt = get(&ex[..distinct], "hidden states, train")?;
    let copies: Vec<_> = repeat_of.iter().map(|&i| pt[i].clone()).collect();
    pt.extend(copies);
    let pd = get(dev_ex, "hidden states, dev")?;
    if let Some(c) = cache.as_mut() {
        c.save()?;
    }
    on(GateTrainEvent::Note(format!(
        "hidden states done in {:.0}s",
        t0.elapsed().as_secs_f64()
    )));
    Ok((h, pt, pd))
}

/// Fine-tune a LoRA adapter on blocks `1..=cfg.layer` of the base at `path` on the topic labels
/// of `ex`, save it as `cfg.out/gate-lora`, and make `h` read through it.
fn finetune_reader(
    cfg: &GateTrainConfig,
    path: &Path,
    ex: &[(String, String)],
    h: &mut HiddenFeatures,
    on: &mut dyn FnMut(GateTrainEvent),
) -> Result<()> {
    let all = topics::all_topics();
    // Training needs weights gradients flow through; the states are then read in `cfg.format`.
    let trainable = Model::load(
        path,
        &LoadOptions {
            format: crate::train::default_base(),
        },
    )?;
    let labelled = ex
        .iter()
        .map(|(text, topic)| {
            Ok((
                h.read_text(&trainable.tokenizer, text)?,
                topic_index(&all, topic)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let defaults = finetune::FinetuneConfig::default();
    let fc = finetune::FinetuneConfig {
        epochs: cfg.finetune_epochs,
        lr: cfg.finetune_lr,
        // The texts are already cut as the gate reads them (`read_text`).
        max_tokens: if h.max_tokens.is_some() {
            usize::MAX
        } else {
            defaults.max_tokens
        },
        ..defaults
    };
    on(GateTrainEvent::Note(format!(
        "fine-tuning blocks 1-{} on {} prompts, {} epochs ({} base)...",
        cfg.layer,
        labelled.len(),
        fc.epochs,
        trainable.format.name()
    )));
    let t0 = std::time::Instant::now();
    let adapter = finetune::finetune(
        &trainable,
        cfg.layer,
        &labelled,
        &[],
        all.len(),
        &fc,
        &mut |r| {
            on(GateTrainEvent::Note(format!(
                "  epoch {}: train loss {:.4} ({:.0} s)",
                r.epoch,
                r.train_loss,
                t0.elapsed().as_secs_f64()
            )))
        },
    )?;
    let dir = cfg.out.join(GATE_ADAPTER);
    adapter.save(&dir, &trainable.config)?;
    h.adapter = Some(GATE_ADAPTER.into());
    h.reader = GateAdapter::at(dir);
    Ok(())
}

/// The index of `topic` in `topics`.
fn topic_index<S: AsRef<str>>(topics: &[S], topic: &str) -> Result<usize> {
    topics
        .iter()
        .position(|t| t.as_ref() == topic)
        .ok_or_else(|| Error::unknown("topic", topic, topics.iter().map(AsRef::as_ref)))
}

/// Append the `prompt`/`topic` of every stance pair under `dir` (training only); returns how many.
fn add_stance_prompts(dir: &Path, ex: &mut Vec<(String, String)>) -> Result<usize> {
    if dir.as_os_str().is_empty() {
        return Ok(0);
    }
    let files = crate::util::files_with_extension(dir, "jsonl")?;
    let before = ex.len();
    for f in files {
        for (_, p) in crate::data::load_stance_pairs(&f)? {
            if topics::is_political(&p.topic) {
                ex.push((p.prompt, p.topic));
            }
        }
    }
    Ok(ex.len() - before)
}
