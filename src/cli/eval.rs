//! `stancemix eval`: score an instrument by forced choice under one or more blends; print a
//! table, write the full JSON (per item, per template, per answer probabilities).

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use stancemix::data::Instrument;
use stancemix::eval::judge::{self, Judge};
use stancemix::eval::report::{OpenEndedSection, SideEffects};
use stancemix::eval::sections::SectionConfig;
use stancemix::eval::templates::templates_by_name;
use stancemix::eval::{score_instrument, FcOptions, Order, Report, TEMPLATES};
use stancemix::Blend;

use stancemix::model::WeightFormat;
use stancemix::Engine;
use std::sync::Arc;

/// The held-out instrument shipped with the project.
pub const DEFAULT_INSTRUMENT: &str = "adapters/instruments/stance-compass.json";

/// Which model and experts to evaluate.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalEngineArgs {
    #[command(flatten)]
    pub base: super::common::ModelArgs,
    /// Base weights in memory. f32 (the default here) is the fastest for scoring prompts and
    /// gives the same numbers whatever the batch shape; candle's q8_0 kernels change with the
    /// number of rows, which moves logits between batch shapes.
    #[arg(long, default_value = "f32")]
    pub format: WeightFormat,
    /// Base weights for generating answers (open-ended, adversarial): stored (the file's
    /// blocks) decodes fastest.
    #[arg(long, default_value = "stored")]
    pub gen_format: WeightFormat,
}

impl EvalEngineArgs {
    /// Load the engine these flags describe (no gate: evaluation uses fixed blends).
    pub fn load(&self) -> anyhow::Result<Arc<Engine>> {
        self.load_as(self.format)
    }

    /// The engine for generating answers (`--gen-format`); `scoring` when the formats agree.
    pub fn load_generator(&self, scoring: &Arc<Engine>) -> anyhow::Result<Arc<Engine>> {
        if self.gen_format == self.format {
            Ok(scoring.clone())
        } else {
            self.load_as(self.gen_format)
        }
    }

    fn load_as(&self, format: WeightFormat) -> anyhow::Result<Arc<Engine>> {
        Ok(Engine::load(&self.base.options(format, None)?)?)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Instrument JSON (see DESIGN.md "Data formats").
    #[arg(long, default_value = DEFAULT_INSTRUMENT)]
    pub instrument: PathBuf,
    /// Blend(s) to score: base | dial=D | mix=A | expert=NAME | name=w,... [@mode]. Several are
    /// scored together, as rows of one batched forward pass.
    #[arg(long = "blend", num_args = 1.., default_value = "base")]
    pub blends: Vec<Blend>,
    #[command(flatten)]
    pub engine: EvalEngineArgs,
    #[command(flatten)]
    pub fc: FcArgs,
    /// Where to write the full JSON (default: target/eval/<instrument>-<blend>.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Print one JSON object to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also generate answers and judge their stance, per blend.
    #[arg(long)]
    pub open_ended: bool,
    /// Also measure side effects per blend: perplexity on neutral text; flagged and refusing
    /// answers to adversarial prompts.
    #[arg(long)]
    pub side_effects: bool,
    #[command(flatten)]
    pub extra: ExtraArgs,
}

/// Settings of the open-ended and side-effect checks.
#[derive(clap::Args, Debug, Clone)]
pub struct ExtraArgs {
    /// Stance pairs whose dev prompts are answered openly.
    #[arg(long, default_value = "adapters/data/stance")]
    pub stance_data: PathBuf,
    /// The open-ended stance judge (trained by `cargo run --release --example train_judge`).
    #[arg(long, default_value = judge::DEFAULT_JUDGE)]
    pub judge: PathBuf,
    /// Open-ended: instrument items to answer, spread evenly (0 = all).
    #[arg(long, default_value_t = 8)]
    pub open_items: usize,
    /// Open-ended: stance-data dev prompts to answer, spread evenly (0 = all).
    #[arg(long, default_value_t = 8)]
    pub dev_prompts: usize,
    #[arg(long, default_value = "adapters/data/neutral.jsonl")]
    pub neutral: PathBuf,
    /// Neutral texts for perplexity, spread evenly (0 = all).
    #[arg(long, default_value_t = 0)]
    pub neutral_limit: usize,
    #[arg(long, default_value = "adapters/data/adversarial.jsonl")]
    pub adversarial: PathBuf,
    /// Adversarial prompts to answer, spread evenly (0 = all).
    #[arg(long, default_value_t = 16)]
    pub adversarial_limit: usize,
    /// Longest generated answer, in tokens (greedy decoding).
    #[arg(long, default_value_t = 80)]
    pub max_tokens: usize,
}

impl ExtraArgs {
    /// As library settings.
    pub fn config(&self) -> SectionConfig {
        SectionConfig {
            stance_data: self.stance_data.clone(),
            open_items: self.open_items,
            dev_prompts: self.dev_prompts,
            neutral: self.neutral.clone(),
            neutral_limit: self.neutral_limit,
            adversarial: self.adversarial.clone(),
            adversarial_limit: self.adversarial_limit,
            max_tokens: self.max_tokens,
        }
    }

    /// The `--judge` file, loaded before any long work so a bad path fails at once.
    pub fn load_judge(&self) -> anyhow::Result<Judge> {
        Ok(Judge::load(&self.judge)?)
    }
}

/// Which system-prompt settings to ask each template with.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum SystemArg {
    Both,
    With,
    Without,
}

/// Forced-choice settings shared by `eval`, `sweep` and `report`.
#[derive(clap::Args, Debug, Clone)]
pub struct FcArgs {
    /// Templates by id or 1-based number, comma-separated (default: all six): agree-or-disagree,
    /// survey, best-describes, choose-one, respond, how-much; opt-in: first-words (the stance
    /// data's question, the reply's first words scored).
    #[arg(long, value_delimiter = ',')]
    pub templates: Option<Vec<String>>,
    /// Ask each template with the system prompt, without it, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub system: SystemArg,
    /// List the options in the instrument's order only (default: both orders).
    #[arg(long)]
    pub one_order: bool,
    /// Score only N items, balanced over axes and keying (quick checks).
    #[arg(long)]
    pub items: Option<usize>,
    /// At most this many batch rows per forward pass.
    #[arg(long, default_value_t = 16)]
    pub max_rows: usize,
    /// Scoring threads, each scoring its own share of the prompts (default: one per core; with
    /// more than one, candle runs single-threaded in each unless RAYON_NUM_THREADS or
    /// CANDLE_NUM_THREADS is set).
    #[arg(long)]
    pub workers: Option<usize>,
}

impl FcArgs {
    /// Set up candle's threads for scoring: call first, before any tensor work (see
    /// `stancemix::runtime::threads`). Returns the number of scoring workers.
    pub fn setup_threads(&self) -> anyhow::Result<usize> {
        if self.workers == Some(0) {
            anyhow::bail!("--workers: give at least 1");
        }
        Ok(stancemix::runtime::threads::setup_for_scoring(self.workers).workers)
    }

    /// As library options, scoring on `workers` threads.
    pub fn options(&self, workers: usize) -> anyhow::Result<FcOptions> {
        Ok(FcOptions {
            templates: match &self.templates {
                Some(t) => templates_by_name(t)?,
                None => TEMPLATES.to_vec(),
            },
            system: match self.system {
                SystemArg::Both => vec![false, true],
                SystemArg::With => vec![true],
                SystemArg::Without => vec![false],
            },
            orders: if self.one_order {
                vec![Order::Forward]
            } else {
                vec![Order::Forward, Order::Reversed]
            },
            items: self.items,
            max_rows: self.max_rows,
            workers,
            ..FcOptions::default()
        })
    }
}

/// A progress bar with ETA on stderr, driven by `(done, total)` calls.
pub fn progress_bar(what: &str) -> impl FnMut(usize, usize) {
    let what = what.to_string();
    let mut bar: Option<ProgressBar> = None;
    move |done, total| {
        let b = bar.get_or_insert_with(|| {
            let b = ProgressBar::new(total as u64);
            if let Ok(s) = ProgressStyle::with_template(
                "{msg} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}",
            ) {
                b.set_style(s.progress_chars("=> "));
            }
            b.set_message(what.clone());
            b
        });
        b.set_position(done as u64);
        if done >= total {
            b.finish_and_clear();
        }
    }
}

/// Progress bars for a run of stages, driven by `(stage, done, total)` calls: a new bar when
/// the stage changes or the last one finished.
pub fn progress_bars() -> impl FnMut(&str, usize, usize) {
    type Bar = Box<dyn FnMut(usize, usize)>;
    let mut current: Option<(String, usize, Bar)> = None;
    move |stage, done, total| {
        let fresh = match &current {
            Some((s, last, _)) => s != stage || done <= *last,
            None => true,
        };
        if fresh {
            current = Some((stage.to_string(), 0, Box::new(progress_bar(stage))));
        }
        if let Some((_, last, bar)) = current.as_mut() {
            *last = done;
            bar(done, total);
        }
    }
}

/// A file-name-safe form of a blend (`dial +0.60 | weights` -> `dial+0.60-weights`).
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || "+-.=".contains(c) {
            out.push(c);
        } else if !out.ends_with('-') && !out.is_empty() {
            out.push('-');
        }
    }
    out.trim_end_matches('-').to_string()
}

/// The report as one JSON object; a single blend's fields sit at the top level
/// (`axes.<axis>.expected`), several blends go in `blends`.
pub fn report_json(r: &Report) -> anyhow::Result<serde_json::Value> {
    let mut v = serde_json::to_value(r)?;
    if r.blends.len() == 1 {
        if let (Some(obj), Ok(serde_json::Value::Object(b))) =
            (v.as_object_mut(), serde_json::to_value(&r.blends[0]))
        {
            obj.remove("blends");
            obj.extend(b);
        }
    }
    Ok(v)
}

/// Print the score table of a report.
pub fn print_table(r: &Report) {
    let axes: Vec<&String> = r.blends[0].axes.keys().collect();
    println!(
        "{} ({} items, {} variants) | model {} | experts {} | {:.0} s",
        r.instrument,
        r.items,
        r.variants.len(),
        r.model,
        if r.experts.is_empty() {
            "none".into()
        } else {
            r.experts.join(", ")
        },
        r.elapsed_s
    );
    if !r.sign.is_empty() {
        println!("sign: {}", r.sign);
    }
    let w = r
        .blends
        .iter()
        .map(|b| b.blend.len())
        .max()
        .unwrap_or(0)
        .max(28);
    let mut head = format!("{:<w$}", "blend");
    for a in &axes {
        head.push_str(&format!(
            " | {:>9} {:>6} {:>7}",
            format!("{a}"),
            "+-95%",
            "argmax"
        ));
    }
    head.push_str(" | outside  agree  first | pro-side | agrees: pro-agree pro-disagree   AUC");
    println!("{head}");
    for b in &r.blends {
        let mut line = format!("{:<w$}", b.blend);
        for a in &axes {
            let s = &b.axes[*a];
            line.push_str(&format!(
                " | {:>9.2} {:>6.2} {:>7.2}",
                s.expected, s.expected_ci95, s.argmax
            ));
        }
        let k = &b.keying;
        line.push_str(&format!(
            " | {:>7.3} {:>6.3} {:>6.3} | {:>8.3} | {:>17} {:>12} {:>5}",
            b.outside_mass,
            b.agree_share,
            b.first_option_share,
            b.progressive_side,
            format!("{}/{}", k.agrees_with_pro_agree, k.pro_agree_items),
            format!("{}/{}", k.agrees_with_pro_disagree, k.pro_disagree_items),
            k.agree_auc.map_or("-".into(), |a| format!("{a:.3}")),
        ));
        println!("{line}");
    }
    let mut line = format!(
        "{:<28}",
        format!("always '{}' (control)", r.always_agree.answer)
    );
    for a in &axes {
        line.push_str(&format!(
            " | {:>9.2} {:>6} {:>7}",
            r.always_agree.axes.get(*a).copied().unwrap_or(f64::NAN),
            "",
            ""
        ));
    }
    println!("{line}");
    println!(
        "outside: probability off the options; agree: mass on agreeing options; first: mass on the option listed first (unbiased {:.3})",
        1.0 / r.answers.len() as f64
    );
    println!(
        "pro-side: share of items whose forced choice falls on the progressive side; agrees: items agreed with, of those the progressive side agrees with / rejects (a reader of sides agrees more with the first); AUC: chance that a pro-agree item gets more agreeing probability than a pro-disagree one (0.5 reads nothing; progressive above, conservative below)"
    );
}

/// Print the side-effect and open-ended sections of an eval's JSON, when present.
fn print_extras(v: &serde_json::Value) {
    if let Ok(se) = serde_json::from_value::<SideEffects>(v["side_effects"].clone()) {
        println!("side effects ({} neutral texts):", se.neutral_texts);
        for ((b, ppl), s) in se.perplexity.iter().zip(&se.safety) {
            println!(
                "  {b:<28} perplexity {ppl:>7.2} | adversarial {}: flagged {:.1}%, refused {:.1}%",
                s.prompts,
                100.0 * s.flagged_share,
                100.0 * s.refusal_share
            );
        }
    }
    if let Ok(oe) = serde_json::from_value::<OpenEndedSection>(v["open_ended"].clone()) {
        println!(
            "open-ended ({} prompts; judge dev accuracy {:.1}% on {} answers):",
            oe.prompts,
            100.0 * oe.judge.dev_accuracy,
            oe.judge.dev_answers
        );
        for b in &oe.blends {
            let axes: Vec<String> = b
                .by_axis
                .iter()
                .map(|(a, j)| format!("{a} {:+.2}", j.stance))
                .collect();
            println!(
                "  {:<28} stance {:+.2} ({}) | judged conservative {:.0}%",
                b.blend,
                b.overall.stance,
                axes.join(", "),
                100.0 * b.overall.share_conservative
            );
        }
    }
}

fn default_out(instrument: &Path, blends: &[Blend]) -> PathBuf {
    let name = instrument
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "instrument".into());
    let b = if blends.len() == 1 {
        slug(&blends[0].to_string())
    } else {
        format!("{}-blends", blends.len())
    };
    PathBuf::from("target/eval").join(format!("{name}-{b}.json"))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let workers = a.fc.setup_threads()?; // first: candle reads its thread settings once
    let instrument = Instrument::load(&a.instrument)?;
    let opts = a.fc.options(workers)?;
    let judge = a.open_ended.then(|| a.extra.load_judge()).transpose()?;
    let engine = a.engine.load()?;
    for b in &a.blends {
        if b.extrapolates() {
            eprintln!(
                "warning: blend {b} extrapolates beyond the experts (weights outside [0, 1])"
            );
        }
    }
    let report = score_instrument(
        &engine,
        &instrument,
        &a.blends,
        &opts,
        &mut progress_bar("forced choice"),
    )?;
    let mut value = report_json(&report)?;
    if a.side_effects || a.open_ended {
        let gen = a.engine.load_generator(&engine)?;
        if a.side_effects {
            let se =
                a.extra
                    .config()
                    .side_effects(&engine, &gen, &a.blends, &mut progress_bars())?;
            value["side_effects"] = serde_json::to_value(&se)?;
        }
        if let Some(judge) = &judge {
            let reader = judge.reader_for(&gen.model, &crate::cli::paths())?;
            let oe = (a.extra.config()).open_ended(
                judge,
                &reader,
                &gen,
                &instrument,
                &a.blends,
                &mut progress_bars(),
            )?;
            value["open_ended"] = serde_json::to_value(&oe)?;
        }
    }
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_out(&a.instrument, &a.blends));
    stancemix::error::write_atomic(&out, serde_json::to_string_pretty(&value)?.as_bytes())?;
    if a.json {
        println!("{}", serde_json::to_string(&value)?);
    } else {
        print_table(&report);
        print_extras(&value);
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
