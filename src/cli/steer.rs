//! `stancemix steer`: steering-vector experts from the counterfactual pairs (forward passes only).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use stancemix::data::export::{Split, View};
use stancemix::data::load_stance_dir;
use stancemix::data::survey::survey;
use stancemix::lora::steer::{self, Contrast};
use stancemix::model::{LoadOptions, Model, WeightFormat};

/// Flags of `steer`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a GGUF file or a base id from `stancemix models` (default: smollm2-135m).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Stance pairs (their train split is used; dev pairs never are).
    #[arg(long, default_value = "adapters/data/stance")]
    pub data: PathBuf,
    /// Blocks to steer, `FIRST-LAST` (0-based, inclusive; block 0 is never steered, as in
    /// llama.cpp). Default: the middle half of the model.
    #[arg(long)]
    pub layers: Option<String>,
    /// Scale of the summed directions: at gate weight 1 the steered blocks together add
    /// `strength` times the mean difference between the sides (spread evenly over the blocks).
    #[arg(long, default_value_t = 1.0)]
    pub strength: f32,
    /// Use at most this many examples, spread evenly over the train split (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// What the two sides' residual streams are read on: `survey` (the default; a proposition
    /// asked as a poll, each side's Likert option as the answer: contrastive activation
    /// addition, the option's agree/disagree cancelling out over the balanced keying) or
    /// `answers` (every pair's prompt with each side's whole answer).
    #[arg(long, value_enum, default_value = "survey")]
    pub source: Source,
    /// Folder for `progressive.gguf` and `conservative.gguf` (llama.cpp control vectors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Where the contrast is read.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Survey,
    Answers,
}

fn parse_layers(s: &str, n: usize) -> anyhow::Result<(usize, usize)> {
    let (a, b) = s
        .split_once('-')
        .ok_or_else(|| anyhow::anyhow!("--layers: expected FIRST-LAST, got '{s}'"))?;
    let (a, b): (usize, usize) = (
        a.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--layers: '{a}' is not a block number"))?,
        b.trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--layers: '{b}' is not a block number"))?,
    );
    if a == 0 || a > b || b >= n {
        anyhow::bail!(
            "--layers: {s} must satisfy 1 <= FIRST <= LAST <= {} for this model",
            n - 1
        );
    }
    Ok((a, b))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if !a.strength.is_finite() || a.strength <= 0.0 {
        anyhow::bail!("--strength must be a positive number, got {}", a.strength);
    }
    let path = crate::cli::model_path(a.model.as_deref())?;
    let model = Model::load(
        &path,
        &LoadOptions {
            format: WeightFormat::F32,
        },
    )?;
    let n = model.config.n_layer;
    let (first, last) = match &a.layers {
        Some(s) => parse_layers(s, n)?,
        None => ((n / 4).max(1), (3 * n / 4).min(n - 1)),
    };
    let pairs = load_stance_dir(&a.data)?;
    let chat = &model.tokenizer.chat;
    // (prompt, progressive side, conservative side), train split only.
    let all: Vec<(String, String, String)> = match a.source {
        Source::Survey => survey(&pairs, View::Dpo, "progressive", Split::Train, 1, chat)?
            .into_iter()
            .map(|r| {
                let strip = |s: &str| chat.strip_completion(s).to_string();
                let away = r.rejected.as_deref().map(strip).unwrap_or_default();
                (r.prompt, strip(&r.chosen), away)
            })
            .collect(),
        Source::Answers => pairs
            .iter()
            .filter(|p| !p.is_dev())
            .map(|p| {
                Ok((
                    chat.user_prompt(&p.prompt)?,
                    p.progressive.clone(),
                    p.conservative.clone(),
                ))
            })
            .collect::<stancemix::Result<_>>()?,
    };
    let take = if a.limit == 0 {
        all.len()
    } else {
        a.limit.min(all.len())
    };
    let examples: Vec<Contrast> = (0..take)
        .map(|i| {
            let (prompt, toward, away) = &all[i * all.len() / take];
            Contrast {
                prompt: prompt.clone(),
                toward,
                away,
            }
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst))?;
    let start = std::time::Instant::now();
    let diff = steer::compute(&model, &examples, &mut |done, total| {
        if done % 25 == 0 || done == total {
            eprintln!(
                "{done}/{total} examples, {:.0} s",
                start.elapsed().as_secs_f64()
            );
        }
        !stop.load(Ordering::SeqCst)
    })?;
    let k = a.strength / (last - first + 1) as f32;
    let band = |sign: f32| -> BTreeMap<usize, Vec<f32>> {
        diff.iter()
            .filter(|(l, _)| (first..=last).contains(*l))
            .map(|(l, v)| (*l, v.iter().map(|x| sign * k * x).collect()))
            .collect()
    };
    std::fs::create_dir_all(&a.out)?;
    for (stance, sign) in [("progressive", 1.0), ("conservative", -1.0)] {
        let p = a.out.join(format!("{stance}.gguf"));
        steer::save(&p, &band(sign), &model.config, stance)?;
        println!("{}", p.display());
    }
    let norms: Vec<String> = diff
        .iter()
        .filter(|(l, _)| (first..=last).contains(*l))
        .map(|(l, v)| format!("{l}:{:.2}", v.iter().map(|x| x * x).sum::<f32>().sqrt()))
        .collect();
    eprintln!(
        "{} examples ({:?}), blocks {first}-{last}, strength {}; |mean difference| per block: {}",
        examples.len(),
        a.source,
        a.strength,
        norms.join(" ")
    );
    Ok(())
}
