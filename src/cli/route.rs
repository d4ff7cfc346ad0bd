//! `stancemix route` (the gate's decision for a prompt) and `stancemix router train`.

use std::io::BufRead;
use std::path::PathBuf;

use stancemix::data::{is_dev, load_router_prompts};
use stancemix::model::{LoadOptions, Model, WeightFormat};
use stancemix::router::{evaluate_with_progress, Gate, Template};
use stancemix::train::gate::{train_gate, GateTrainConfig, GateTrainEvent, GateTraining};

use super::common::EngineArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The prompt to route.
    pub prompt: Option<String>,
    /// Route every line of a file (plain text, or JSON Lines with a `text` field).
    #[arg(long, conflicts_with = "prompt")]
    pub file: Option<PathBuf>,
    /// Policy that maps topics to gate weights.
    #[arg(long, default_value = "libertarian")]
    pub policy: String,
    /// Print JSON (one object per prompt).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let engine = a.engine.load()?;
    let mut prompts = Vec::new();
    if let Some(f) = &a.file {
        let file = std::fs::File::open(f).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?;
        for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
            let line = line.map_err(|e| anyhow::anyhow!("{}:{}: {e}", f.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            if line.trim_start().starts_with('{') {
                let v: serde_json::Value = serde_json::from_str(&line)
                    .map_err(|e| anyhow::anyhow!("{}:{}: json: {e}", f.display(), i + 1))?;
                let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                    anyhow::anyhow!("{}:{}: text: missing or not a string", f.display(), i + 1)
                })?;
                prompts.push(t.to_string());
            } else {
                prompts.push(line);
            }
        }
    } else if let Some(p) = &a.prompt {
        prompts.push(p.clone());
    } else {
        anyhow::bail!("give a prompt or --file FILE");
    }
    for p in prompts {
        let r = engine.route(&p, &a.policy)?;
        if a.json || a.file.is_some() {
            println!("{}", r.to_json());
        } else {
            println!("{}", r.explain());
        }
    }
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum RouterCommand {
    /// Train the gate on labelled prompts; print dev accuracy, recall, confusion matrix.
    Train(TrainArgs),
    /// Score a gate on labelled prompts (by default the held-out test set): accuracy, recall per
    /// topic, confusion matrix, non-political recall.
    Eval(EvalArgs),
}

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// Labelled prompts (`{"id", "text", "topic"}` JSON Lines). The default, written after the
    /// shipped gate and never trained or chosen on, is the held-out test set.
    #[arg(long, default_value = "router-data/test.jsonl")]
    data: PathBuf,
    /// Only the prompts `router train` holds out for dev (`data::is_dev` of their ids).
    #[arg(long)]
    dev: bool,
    /// Gate directory (default: the shipped gate, router-data/).
    #[arg(long)]
    gate: Option<PathBuf>,
    /// Base model: a GGUF file or a base id from `stancemix models` (default: smollm2-135m).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Base weights for the hidden-state pass (the format the runtime routes with).
    #[arg(long, default_value = "q8_0")]
    format: WeightFormat,
    /// Print the report as one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TrainArgs {
    #[arg(long, default_value = "router-data/prompts.jsonl")]
    data: PathBuf,
    #[arg(long, default_value = "router-data")]
    out: PathBuf,
    /// Hash buckets for word 1-2-grams (0: no n-gram features).
    #[arg(long, default_value_t = 1 << 12)]
    dim: usize,
    /// Factor on the unit-length n-gram vector (the hidden part is standardised).
    #[arg(long, default_value_t = 10.0)]
    ngram_scale: f32,
    /// Also read the base model's residual stream after this block (1-based; 0: n-grams only).
    #[arg(long, default_value_t = 8)]
    layer: usize,
    /// How the prompt is wrapped for the hidden-state pass (topic: the model is asked what it
    /// is about).
    #[arg(long, value_enum, default_value = "topic")]
    template: Template,
    /// Read at most the first N tokens of each prompt in the hidden-state pass (0: all): bounds
    /// the routing time of long prompts.
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// Base weights for the hidden-state pass (use the format the runtime loads).
    #[arg(long, default_value = "q8_0")]
    format: WeightFormat,
    /// Base model: a GGUF file or a base id from `stancemix models` (default: smollm2-135m).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Cache of pooled hidden states (empty: none).
    #[arg(long, default_value = "target/router-cache")]
    cache_dir: PathBuf,
    /// L2 penalty.
    #[arg(long, default_value_t = 10.0)]
    alpha: f64,
    #[arg(long, default_value_t = 200)]
    max_iter: u64,
    /// Restart linfa's solver from its last parameters up to this many times.
    #[arg(long, default_value_t = 6)]
    restarts: usize,
    /// Extra training-only prompts: stance files (their `prompt` and `topic`); empty for none.
    #[arg(long, default_value = "adapters/data/stance")]
    extra: PathBuf,
    /// Fine-tune the blocks the gate reads first: epochs of a LoRA adapter (+ a training head)
    /// on the topic labels, saved as OUT/gate-lora and used for every hidden-state pass (0: the
    /// base's own states). The hidden-state cache is not used then.
    #[arg(long, default_value_t = 0)]
    finetune_epochs: usize,
    /// Peak learning rate of the fine-tuning.
    #[arg(long, default_value_t = 1e-3)]
    finetune_lr: f64,
    /// Count each non-political training prompt this many times (in the fine-tuning and the
    /// classifier's fit): a political topic given to a non-political prompt is the costlier
    /// mistake (it sends the prompt to the experts).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    non_political_weight: u32,
}

pub fn run_router(c: RouterCommand) -> anyhow::Result<()> {
    match c {
        RouterCommand::Train(a) => train(a),
        RouterCommand::Eval(a) => eval(a),
    }
}

fn eval(a: EvalArgs) -> anyhow::Result<()> {
    let dir = a
        .gate
        .clone()
        .unwrap_or_else(|| stancemix::router::shipped_gate_dir(&crate::cli::paths()));
    let gate = Gate::load(&dir)?;
    let mut prompts = load_router_prompts(&a.data)?;
    if a.dev {
        prompts.retain(|p| is_dev(&p.id));
    }
    if prompts.is_empty() {
        anyhow::bail!("{}: no prompts to score", a.data.display());
    }
    let model = if gate.needs_model() {
        let path = crate::cli::model_path(a.model.as_deref())?;
        Some(Model::load(&path, &LoadOptions { format: a.format })?)
    } else {
        None
    };
    if let Some(p) = prompts.iter().find(|p| !gate.topics.contains(&p.topic)) {
        anyhow::bail!(
            "{}: topic '{}' of prompt '{}' is not one of the gate's ({})",
            a.data.display(),
            p.topic,
            p.id,
            dir.display()
        );
    }
    let report = evaluate_with_progress(
        &gate,
        model.as_deref(),
        prompts.iter().map(|p| (p.text.as_str(), p.topic.as_str())),
        &mut super::eval::progress_bar("routing"),
    )?;
    if a.json {
        let mut v = report.to_json();
        v["data"] = serde_json::json!(a.data.display().to_string());
        v["gate"] = serde_json::json!(dir.display().to_string());
        println!("{v}");
    } else {
        let split = if a.dev { "dev" } else { "" };
        println!("{} (gate {})", a.data.display(), dir.display());
        print!("{}", report.render(split));
    }
    Ok(())
}

fn train(a: TrainArgs) -> anyhow::Result<()> {
    let cfg = GateTrainConfig {
        data: a.data.clone(),
        extra: a.extra.clone(),
        out: a.out.clone(),
        model: a.model.clone(),
        paths: crate::cli::paths(),
        dim: a.dim,
        ngram_scale: a.ngram_scale,
        layer: a.layer,
        template: a.template,
        max_tokens: a.max_tokens,
        format: a.format,
        cache_dir: (!a.cache_dir.as_os_str().is_empty()).then(|| a.cache_dir.clone()),
        alpha: a.alpha,
        max_iter: a.max_iter,
        restarts: a.restarts,
        finetune_epochs: a.finetune_epochs,
        finetune_lr: a.finetune_lr,
        non_political_weight: a.non_political_weight,
    };
    let mut bars = super::eval::progress_bars();
    let GateTraining {
        mut gate,
        dev_report,
    } = train_gate(&cfg, &mut |e| match e {
        GateTrainEvent::Note(line) => eprintln!("{line}"),
        GateTrainEvent::Progress { what, done, total } => bars(what, done, total),
    })?;
    print!("{}", dev_report.render("dev"));
    let template = format!("{:?}", a.template).to_lowercase();
    gate.notes.insert(
        "command".into(),
        serde_json::json!(format!(
            "stancemix router train --data {} --dim {} --ngram-scale {} --layer {} --template {template} --max-tokens {} --format {} --alpha {} --max-iter {} --restarts {} --extra {} --finetune-epochs {} --finetune-lr {} --non-political-weight {}",
            a.data.display(),
            a.dim,
            a.ngram_scale,
            a.layer,
            a.max_tokens,
            a.format.name(),
            a.alpha,
            a.max_iter,
            a.restarts,
            a.extra.display(),
            a.finetune_epochs,
            a.finetune_lr,
            a.non_political_weight
        )),
    );
    gate.save(&a.out)?;
    println!(
        "wrote {}",
        a.out.join(stancemix::router::GATE_FILE).display()
    );
    Ok(())
}
