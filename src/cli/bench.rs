//! `stancemix bench`: stancemix's side of the performance table (docs/BENCHMARKS.md), each figure
//! the median of several repeats, as a table or one JSON object.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use stancemix::data::export::{export, Split, View};
use stancemix::data::load_stance_dir;
use stancemix::lora::{Adapter, ExpertSet};
use stancemix::model::{KvCache, LoadOptions, Logits, Model, Target, WeightFormat};
use stancemix::router::{load_policies, policies_dir, shipped_gate_dir, Gate, GATE_FILE};
use stancemix::train::{Method, TrainConfig, Trainer};
use stancemix::{Blend, Engine};

const N: usize = 64;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Base model: a GGUF file or a base id from `stancemix models` (default: smollm2-135m).
    /// With another base, the routing figures need `--gate` (the shipped gate reads the default
    /// base's hidden states) and the shipped experts count only if made for it.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// CPU threads (default: all cores).
    #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub threads: Option<usize>,
    /// Repeats per figure (the median is reported).
    #[arg(long, default_value_t = 5,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub repeats: usize,
    /// Base weights for inference: stored, q8_0, f32 or mixed (the runtime's default).
    #[arg(long, default_value = "mixed")]
    pub format: WeightFormat,
    /// Optimizer steps per training repeat (after one uncounted warm-up repeat).
    #[arg(long, default_value_t = 4)]
    pub train_steps: usize,
    /// Skip the training figure (the slowest).
    #[arg(long)]
    pub no_train: bool,
    /// Base weights for the training figure: f32 or int8 (default: int8 where the CPU has
    /// AVX-512 VNNI, else f32; as `stancemix train`).
    #[arg(long, value_name = "FORMAT")]
    pub train_format: Option<WeightFormat>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Gate folder for the routing figures (default: the shipped router-data/).
    #[arg(long)]
    pub gate: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median seconds of `f` over `repeats` runs, after one warm-up run.
fn time(repeats: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    f()?;
    let mut v = Vec::new();
    for _ in 0..repeats {
        let t = Instant::now();
        f()?;
        v.push(t.elapsed().as_secs_f64());
    }
    Ok(median(v))
}

/// A long user message (~270 tokens) for the routing figure of long prompts.
const LONG_MESSAGE: &str =
    "I need some advice and I'm not sure where else to ask. My partner and I have \
rented the same two-bedroom flat for six years. When we moved in the rent was manageable, but \
the landlord has raised it every single year, and this spring's increase was the biggest yet. \
We both work full time, I'm a nurse on rotating shifts and my partner drives deliveries, and \
after rent, childcare for our daughter, the car and groceries there is almost nothing left at \
the end of the month. We've looked at other places nearby and they all cost the same or more, \
and moving further out would mean a long commute for both of us and a new school for our \
daughter, who has finally settled in and made friends. Buying seems impossible: every time we \
save a little, prices go up faster than our savings do, and the deposit alone is more than we \
earn in a year. Some of our neighbours have started talking about forming a tenants' group to \
push back on the increases together, and others say the council should build more homes or cap \
how much rents can rise each year. My parents think we should just tighten our belts and wait. \
I honestly don't know what is realistic any more. Is there anything ordinary renters like us can \
actually do, and what would make housing affordable again for families like ours?";

fn prompt_ids(model: &Model) -> anyhow::Result<Vec<u32>> {
    let text = "The history of bread is long and varied. People have baked flat loaves from ground grain for thousands of years, and every region developed its own methods, ovens and recipes. Today bakers still argue about";
    let mut ids = model.tokenizer.encode(text)?;
    while ids.len() < N {
        ids.extend(ids.clone());
    }
    ids.truncate(N);
    Ok(ids)
}

/// Median seconds of one prompt pass over `ids` with a fresh cache.
fn prompt_pass(engine: &Engine, ids: &[u32], repeats: usize) -> anyhow::Result<f64> {
    time(repeats, || {
        let mut cache = KvCache::new(engine.model.config.n_layer);
        engine.forward_rows(ids, Some(&mut cache), &[], Logits::Last)?;
        Ok(())
    })
}

/// Four requests with different blends (dial 1, -1, 0.5, base) decoding 64 steps each after
/// their 8-token prompts: one batched step for the four (as the server runs them) when
/// `together`, else one after another. Returns the seconds.
fn decode_four(
    engine: &std::sync::Arc<Engine>,
    ids: &[u32],
    together: bool,
) -> anyhow::Result<f64> {
    let plans: Vec<_> = [
        Blend::dial(1.0)?,
        Blend::dial(-1.0)?,
        Blend::dial(0.5)?,
        Blend::base(),
    ]
    .iter()
    .map(|b| Ok(engine.plan(b, "")?.1))
    .collect::<anyhow::Result<_>>()?;
    let mut sessions: Vec<_> = plans.iter().map(|_| engine.session()).collect();
    for (s, p) in sessions.iter_mut().zip(&plans) {
        s.feed(&ids[..8], p)?;
    }
    let t = Instant::now();
    for &id in &ids[..N] {
        if together {
            let mut items: Vec<_> = sessions
                .iter_mut()
                .zip(&plans)
                .map(|(s, p)| (s, id, p))
                .collect();
            for z in stancemix::runtime::feed_together(&mut items) {
                z?;
            }
        } else {
            for (s, p) in sessions.iter_mut().zip(&plans) {
                s.feed(&[id], p)?;
            }
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

/// 64 decode steps after an 8-token prompt.
fn decode(engine: &Engine, ids: &[u32], rows: &[Vec<f32>]) -> anyhow::Result<()> {
    let mut cache = KvCache::new(engine.model.config.n_layer);
    engine.forward_rows(&ids[..8], Some(&mut cache), rows, Logits::Last)?;
    for &id in &ids[..N] {
        engine.forward_rows(&[id], Some(&mut cache), rows, Logits::Last)?;
    }
    Ok(())
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // Checked first: a wrong --gate should not cost the minutes before the routing figures.
    // The gate for the routing figures: --gate, else the shipped one on the default base, else
    // none (another base, no gate asked for).
    let gate_dir = match (&a.gate, &a.model) {
        (Some(g), _) => {
            if !g.join(GATE_FILE).exists() {
                anyhow::bail!(
                    "--gate {}: no {GATE_FILE} there (a folder written by `stancemix router train --out`)",
                    g.display()
                );
            }
            Some(g.clone())
        }
        (None, None) => {
            Some(shipped_gate_dir(&crate::cli::paths())).filter(|g| g.join(GATE_FILE).exists())
        }
        (None, Some(_)) => None,
    };
    if let Some(t) = a.threads {
        // candle reads this when its thread pool starts, which has not happened yet.
        std::env::set_var("RAYON_NUM_THREADS", t.to_string());
    }
    let threads = candle_core::utils::get_num_threads();
    let path = crate::cli::model_path(a.model.as_deref())?;
    let r = a.repeats;
    let say = |s: &str| {
        if !a.json {
            eprintln!("{s}")
        }
    };
    // Training first, before the inference models are loaded, so the peak memory it reports is
    // the training's own.
    let train_format = a
        .train_format
        .unwrap_or_else(stancemix::train::default_base);
    let train = if a.no_train {
        None
    } else {
        say(&format!(
            "training (rank 8, q/v, batch 4 x 64, base {})...",
            train_format.name()
        ));
        Some(train_figure(&path, train_format, r.min(3), a.train_steps)?)
    };
    let model = Model::load(&path, &LoadOptions { format: a.format })?;
    let ids = prompt_ids(&model)?;

    say("prompt processing...");
    let base = Engine::new(model.clone(), ExpertSet::empty());
    let prompt_s = prompt_pass(&base, &ids, r)?;
    say("decode: base, two rank-16 experts blended, the shipped experts blended, alternately...");
    let random = |stance: &str, seed| {
        Adapter::random(&model.config, stance, 16, 16.0, &Target::ALL, seed, 0.02)
    };
    let experts = ExpertSet::new(vec![random("progressive", 1)?, random("conservative", 2)?])?;
    let engine = if let Some(gate_dir) = &gate_dir {
        Engine::with_gate(
            model.clone(),
            experts,
            Gate::load(gate_dir)?,
            load_policies(&policies_dir(&crate::cli::paths()))?,
        )
    } else {
        Engine::new(model.clone(), experts)
    };
    // The shipped experts (rank 8), blended the same way, when both are there.
    let shipped_paths: Vec<PathBuf> = stancemix::runtime::shipped_adapters(&crate::cli::paths())
        .into_iter()
        .filter(|p| stancemix::runtime::adapter_fits(p, &model.config))
        .collect();
    let shipped = if shipped_paths.len() == 2 {
        let adapters = shipped_paths
            .iter()
            .map(|p| Adapter::load(p, &model.config))
            .collect::<stancemix::Result<Vec<_>>>()?;
        Some(Engine::new(model.clone(), ExpertSet::new(adapters)?))
    } else {
        None
    };
    // Base and blends alternate within each repeat, and each cost is the median of the
    // per-repeat ratios: on a shared or throttled machine speed drifts between runs a minute apart.
    let (mut base_t, mut blend_t, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    let mut shipped_ratio = Vec::new();
    for i in 0..=r.max(1) {
        let t = Instant::now();
        decode(&base, &ids, &[])?;
        let tb = t.elapsed().as_secs_f64();
        let t = Instant::now();
        decode(&engine, &ids, &[vec![0.6, 0.4]])?;
        let te = t.elapsed().as_secs_f64();
        let ts = match &shipped {
            Some(s) => {
                let t = Instant::now();
                decode(s, &ids, &[vec![0.6, 0.4]])?;
                Some(t.elapsed().as_secs_f64())
            }
            None => None,
        };
        if i > 0 {
            // The first round warms up.
            base_t.push(tb);
            blend_t.push(te);
            ratio.push(te / tb);
            shipped_ratio.extend(ts.map(|ts| ts / tb));
        }
    }
    let (decode_s, blend2_s) = (median(base_t), median(blend_t));
    // Four requests decoding at once: batched steps against one by one, alternating.
    let (mut alone4, mut together4) = (Vec::new(), Vec::new());
    for i in 0..=r.max(1) {
        let a = decode_four(&engine, &ids, false)?;
        let t = decode_four(&engine, &ids, true)?;
        if i > 0 {
            alone4.push(a);
            together4.push(t);
        }
    }
    let (alone4_s, together4_s) = (median(alone4), median(together4));
    let blend2_cost = median(ratio) - 1.0;
    let shipped_cost = (!shipped_ratio.is_empty()).then(|| median(shipped_ratio) - 1.0);

    let mut session = engine.session();
    let (b1, b2) = (Blend::dial(0.7)?, Blend::dial(-0.3)?);
    let switch_s = time(r, || {
        for _ in 0..500 {
            session.set_blend(b1.clone())?;
            session.set_blend(b2.clone())?;
        }
        Ok(())
    })? / 1000.0;

    let route_s = if engine.gate.is_some() {
        let text = "My landlord raised the rent again and I can barely cover it.";
        Some(
            time(r, || {
                for _ in 0..20 {
                    engine.route(text, "libertarian")?;
                }
                Ok(())
            })? / 20.0,
        )
    } else {
        None
    };
    // A long message: its route against its own prompt pass plus the 64 decode steps (the
    // answer to it), since a long prompt lengthens both.
    let long = if engine.gate.is_some() {
        let ids = model.tokenizer.encode(LONG_MESSAGE)?;
        let prompt = prompt_pass(&base, &ids, r)?;
        let route = time(r, || {
            engine.route(LONG_MESSAGE, "libertarian")?;
            Ok(())
        })?;
        Some((ids.len(), route, route / (prompt + decode_s)))
    } else {
        None
    };

    let j = serde_json::json!({
        "model": model.config.name.clone().unwrap_or_else(|| path.display().to_string()),
        "threads": threads,
        "format": format!("{:?}", a.format),
        "repeats": r,
        "prompt_tok_s": N as f64 / prompt_s,
        "decode_tok_s": N as f64 / decode_s,
        "decode_tok_s_blend2": N as f64 / blend2_s,
        "decode_tok_s_4_requests_one_by_one": 4.0 * N as f64 / alone4_s,
        "decode_tok_s_4_requests_batched": 4.0 * N as f64 / together4_s,
        "blend2_cost": blend2_cost,
        "shipped_blend_cost": shipped_cost,
        "switch_ms": switch_s * 1e3,
        "route_ms": route_s.map(|s| s * 1e3),
        "route_share_of_64_token_answer": route_s.map(|s| s / (prompt_s + decode_s)),
        "long_prompt_tokens": long.map(|l| l.0),
        "route_ms_long_prompt": long.map(|l| l.1 * 1e3),
        "route_share_long_prompt": long.map(|l| l.2),
        "train_tok_s": train.map(|t| t.0),
        "train_peak_rss_mb": train.and_then(|t| t.1),
        "train_format": train.map(|_| train_format.name()),
    });
    if a.json {
        println!("{j}");
    } else {
        for (k, v) in j.as_object().into_iter().flatten() {
            println!("{k:<32} {v}");
        }
    }
    Ok(())
}

/// Training tokens/s (median over repeats) and the process's peak memory.
fn train_figure(
    path: &std::path::Path,
    format: WeightFormat,
    repeats: usize,
    steps: usize,
) -> anyhow::Result<(f64, Option<f64>)> {
    let model = Model::load(path, &LoadOptions { format })?;
    let pairs = load_stance_dir(&crate::cli::paths().root.join("adapters/data/stance"))?;
    let records = export(
        &pairs,
        View::Sft,
        "progressive",
        Split::Train,
        &model.tokenizer.chat,
    )?;
    let mut rates = Vec::new();
    // Repeat 0 warms up (allocator, thread pool) and is not counted.
    for i in 0..=repeats.max(1) {
        let dir = tempfile_dir(i)?;
        let c = TrainConfig {
            method: Method::Sft,
            rank: 8,
            alpha: 16.0,
            targets: vec!["q_proj".into(), "v_proj".into()],
            batch_size: 4,
            grad_accum: 1,
            max_seq_len: 64,
            max_steps: steps.max(1),
            eval_every: 0,
            checkpoint_every: 1000,
            seed: i as u64 + 1,
            ..TrainConfig::default()
        };
        let mut t = Trainer::new(&model, c, &records, &[], &dir)?;
        let rep = t.run(false, &AtomicBool::new(false), &mut |_| {})?;
        if i > 0 {
            rates.push(rep.tokens_per_second);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok((median(rates), stancemix::train::peak_rss_mb()))
}

fn tempfile_dir(rep: usize) -> anyhow::Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!(
        "stancemix-bench-train-{}-{rep}",
        std::process::id()
    ));
    std::fs::create_dir_all(&d)?;
    Ok(d)
}
