//! Train the open-ended stance judge (`adapters/judge/judge.json`, used by
//! `stancemix eval --open-ended`) on the stance pairs' train split and report its accuracy on
//! the dev split's answers.
//!
//! ```sh
//! cargo run --release --example train_judge                      # the shipped settings
//! cargo run --release --example train_judge -- --layers 8 --context answer --out /tmp/j.json
//! cargo run --release --example train_judge -- --score adapters/judge/judge.json   # no training
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
    /// Score this judge file on the dev split's answers instead of training one (accuracy on
    /// all of them, and on the first batch's and the later batches' apart).
    #[arg(long)]
    score: Option<PathBuf>,
    /// With --score: judge the answers stored in these `eval --open-ended` JSON files instead,
    /// printing per blend how many it calls conservative and their mean p(conservative).
    #[arg(long, num_args = 1.., requires = "score")]
    answers: Vec<PathBuf>,
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
    if let Some(file) = &a.score {
        let judge = Judge::load(file)?;
        if !a.answers.is_empty() {
            return rejudge(&judge, &model, &a.answers);
        }
        return score(&judge, &model, &pairs);
    }
    eprintln!("{cfg:?}");
    let mut last = std::time::Instant::now();
    let (mut judge, r) = Judge::train(&model, &pairs, &cfg, &mut |done, total| {
        if last.elapsed().as_secs() >= 30 || done == total {
            eprintln!("features {done}/{total}");
            last = std::time::Instant::now();
        }
    })?;
    // The base its hidden features come from; an n-gram judge reads no model.
    if !cfg.layers.is_empty() {
        judge.model = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
    }
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

/// Accuracy of `judge` on the dev split's answers (p > 0.5 means conservative) and the share of
/// dev pairs whose conservative answer it scores higher, for the first batch (pairs without a
/// sub-issue, the shipped judge's own dev split), the later batches, and all.
fn score(
    judge: &Judge,
    model: &Model,
    pairs: &[stancemix::data::StancePair],
) -> anyhow::Result<()> {
    let (_, dev) = stancemix::eval::judge::split(pairs);
    // (answers right, pairs ordered right, pairs) per batch: first, later.
    let mut tally = [(0usize, 0usize, 0usize); 2];
    let mut last = std::time::Instant::now();
    for (i, p) in dev.iter().enumerate() {
        let pro = judge.p_conservative(model, &p.prompt, &p.progressive)?;
        let con = judge.p_conservative(model, &p.prompt, &p.conservative)?;
        let t = &mut tally[usize::from(p.subissue.is_some())];
        t.0 += usize::from(pro <= 0.5) + usize::from(con > 0.5);
        t.1 += usize::from(con > pro);
        t.2 += 1;
        if last.elapsed().as_secs() >= 30 {
            eprintln!("scored {}/{} dev pairs", i + 1, dev.len());
            last = std::time::Instant::now();
        }
    }
    let all = (
        tally[0].0 + tally[1].0,
        tally[0].1 + tally[1].1,
        tally[0].2 + tally[1].2,
    );
    for (name, (right, ordered, n)) in [
        ("first batch", tally[0]),
        ("later batches", tally[1]),
        ("all", all),
    ] {
        if n > 0 {
            println!(
                "{name}: {} dev answers, accuracy {:.3}; pairs ordered right {:.3}",
                2 * n,
                right as f64 / (2 * n) as f64,
                ordered as f64 / n as f64
            );
        }
    }
    Ok(())
}

/// Judge again the answers an `eval --open-ended` run stored (`open_ended.blends[].answers[]`).
/// The file keeps no question text, so only a judge that reads the answer alone can do it.
fn rejudge(judge: &Judge, model: &Model, files: &[PathBuf]) -> anyhow::Result<()> {
    if judge.config.context != Context::Answer {
        anyhow::bail!(
            "--answers: this judge reads the question too, which the eval JSON does not keep"
        );
    }
    for file in files {
        let text = std::fs::read_to_string(file)
            .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", file.display()))?;
        let blends = v["open_ended"]["blends"].as_array().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: no open_ended.blends (not an `eval --open-ended` JSON)",
                file.display()
            )
        })?;
        println!("{}", file.display());
        for b in blends {
            let (mut n, mut con, mut sum) = (0, 0, 0.0);
            for answer in b["answers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| a["answer"].as_str())
            {
                let p = judge.p_conservative(model, "", answer)?;
                n += 1;
                con += usize::from(p > 0.5);
                sum += p;
            }
            let name = b["blend"].as_str().unwrap_or("?");
            println!(
                "  {name}: {con} of {n} judged conservative, mean p {:.3}",
                sum / n.max(1) as f64
            );
        }
    }
    Ok(())
}
