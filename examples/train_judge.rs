//! Train the open-ended stance judge (`adapters/judge/judge.json`, used by
//! `stancemix eval --open-ended`) on the stance pairs' train split and report its accuracy on
//! the dev split's answers.
//!
//! ```sh
//! cargo run --release --example train_judge                      # the shipped settings
//! cargo run --release --example train_judge -- --layers 8 --context answer --out /tmp/j.json
//! ```

use std::path::PathBuf;

use clap::Parser;
use stancemix::eval::judge::{Context, Judge, JudgeConfig, DEFAULT_JUDGE};
use stancemix::model::{LoadOptions, Model, WeightFormat};
use stancemix::router::FeatureConfig;

#[derive(Parser, Debug)]
struct Args {
    /// Stance pairs (directory of JSON Lines, or one file).
    #[arg(long, default_value = "adapters/data/stance")]
    stance_data: PathBuf,
    /// Where to save the judge (nothing saved with --dry-run).
    #[arg(long, default_value = DEFAULT_JUDGE)]
    out: PathBuf,
    #[arg(long)]
    dry_run: bool,
    /// Base model GGUF (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weights while reading features: stored | q8_0 | f32.
    #[arg(long, default_value = "f32")]
    format: WeightFormat,
    /// Hidden-state layers (residual stream after N blocks), comma-separated; "" for none.
    #[arg(long)]
    layers: Option<String>,
    /// chat (question, then the answer) or answer (the answer alone).
    #[arg(long)]
    context: Option<String>,
    /// Hashed word n-gram buckets (0: no n-grams).
    #[arg(long)]
    ngrams: Option<usize>,
    #[arg(long)]
    bigrams: bool,
    #[arg(long)]
    ngram_scale: Option<f32>,
    #[arg(long)]
    alpha: Option<f64>,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut cfg = JudgeConfig::default();
    if let Some(l) = &a.layers {
        cfg.layers = l
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.trim().parse())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("--layers {l:?}: {e}"))?;
    }
    if let Some(c) = &a.context {
        cfg.context = match c.as_str() {
            "chat" => Context::Chat,
            "answer" => Context::Answer,
            _ => anyhow::bail!("--context {c:?}: expected chat or answer"),
        };
    }
    if let Some(d) = a.ngrams {
        cfg.ngrams = (d > 0).then_some(FeatureConfig {
            dim: d,
            bigrams: a.bigrams,
        });
    }
    if let Some(s) = a.ngram_scale {
        cfg.ngram_scale = s;
    }
    if let Some(al) = a.alpha {
        cfg.alpha = al;
    }
    let path = match &a.model {
        Some(p) => p.clone(),
        None => stancemix::model::fetch::ensure_default_model(&stancemix::util::Paths::at(env!(
            "CARGO_MANIFEST_DIR"
        )))?,
    };
    let model = Model::load(&path, &LoadOptions { format: a.format })?;
    let pairs = stancemix::data::load_stance_dir(&a.stance_data)?;
    eprintln!("{cfg:?}");
    let mut last = std::time::Instant::now();
    let (mut judge, r) = Judge::train(&model, &pairs, &cfg, &mut |done, total| {
        if last.elapsed().as_secs() >= 30 || done == total {
            eprintln!("features {done}/{total}");
            last = std::time::Instant::now();
        }
    })?;
    judge.model = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    println!(
        "train {} answers, accuracy {:.3}; dev {} answers, accuracy {:.3} (pairs ordered right {:.3}); {:.0} s",
        r.train_answers, r.train_accuracy, r.dev_answers, r.dev_accuracy, r.dev_pair_accuracy, r.train_seconds
    );
    if !a.dry_run {
        judge.save(&a.out)?;
        println!("saved {}", a.out.display());
    }
    Ok(())
}
