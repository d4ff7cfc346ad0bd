//! `stancemix route` (the gate's decision for a prompt) and `stancemix router train`.

use std::io::BufRead;
use std::path::PathBuf;

use stancemix::data::{is_dev, load_router_prompts, topics};
use stancemix::router::{FeatureConfig, Gate};

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
    Train {
        #[arg(long, default_value = "router-data/prompts.jsonl")]
        data: PathBuf,
        #[arg(long, default_value = "router-data")]
        out: PathBuf,
        /// Hash buckets.
        #[arg(long, default_value_t = 1 << 12)]
        dim: usize,
        /// L2 penalty.
        #[arg(long, default_value_t = 1e-4)]
        alpha: f64,
        #[arg(long, default_value_t = 200)]
        max_iter: u64,
        /// Restart linfa's solver from its last parameters up to this many times.
        #[arg(long, default_value_t = 6)]
        restarts: usize,
        /// Extra training-only prompts: stance files (their `prompt` and `topic`); empty for none.
        #[arg(long, default_value = "adapters/data/stance")]
        extra: PathBuf,
    },
}

pub fn run_router(c: RouterCommand) -> anyhow::Result<()> {
    let RouterCommand::Train {
        data,
        out,
        dim,
        alpha,
        max_iter,
        restarts,
        extra,
    } = c;
    let prompts = load_router_prompts(&data)?;
    let all = topics::all_topics();
    let (dev, train): (Vec<_>, Vec<_>) = prompts.iter().partition(|p| is_dev(&p.id));
    let cfg = FeatureConfig { dim, bigrams: true };
    let mut ex: Vec<(String, String)> = train
        .iter()
        .map(|p| (p.text.clone(), p.topic.clone()))
        .collect();
    let n_extra = add_stance_prompts(&extra, &mut ex)?;
    eprintln!(
        "training on {} prompts ({} from {}; {} held out for dev)...",
        ex.len(),
        n_extra,
        extra.display(),
        dev.len()
    );
    let t0 = std::time::Instant::now();
    let mut gate = Gate::train(&ex, &all, &cfg, alpha, max_iter, restarts)?;
    eprintln!(
        "trained in {:.1}s (loss after each solver run: {})",
        t0.elapsed().as_secs_f64(),
        gate.notes.get("train_loss").cloned().unwrap_or_default()
    );
    let report = stancemix::router::evaluate(
        &gate,
        dev.iter().map(|p| (p.text.as_str(), p.topic.as_str())),
    );
    print!("{}", report.render());
    gate.notes
        .insert("dev_accuracy".into(), serde_json::json!(report.accuracy));
    gate.notes.insert(
        "non_political_recall".into(),
        serde_json::json!(report.recall(topics::NON_POLITICAL)),
    );
    gate.notes
        .insert("train_examples".into(), serde_json::json!(ex.len()));
    gate.notes
        .insert("extra_train_examples".into(), serde_json::json!(n_extra));
    gate.notes
        .insert("dev_examples".into(), serde_json::json!(dev.len()));
    gate.notes.insert(
        "command".into(),
        serde_json::json!(format!(
            "stancemix router train --data {} --dim {dim} --alpha {alpha} --max-iter {max_iter} --restarts {restarts} --extra {}",
            data.display(),
            extra.display()
        )),
    );
    gate.save(&out)?;
    println!("wrote {}", out.join(stancemix::router::GATE_FILE).display());
    Ok(())
}

/// Append the `prompt`/`topic` of every stance pair under `dir` (training only); returns how many.
fn add_stance_prompts(
    dir: &std::path::Path,
    ex: &mut Vec<(String, String)>,
) -> anyhow::Result<usize> {
    if dir.as_os_str().is_empty() {
        return Ok(0);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .collect();
    files.sort();
    let before = ex.len();
    for f in files {
        for (_, p) in stancemix::data::load_stance_pairs(&f)? {
            if topics::is_political(&p.topic) {
                ex.push((p.prompt, p.topic));
            }
        }
    }
    Ok(ex.len() - before)
}
