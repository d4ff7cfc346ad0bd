//! `stancemix eval`: score an instrument by forced choice under one or more blends; print a
//! table, write the full JSON (per item, per template, per answer probabilities).

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use stancemix::data::Instrument;
use stancemix::eval::templates::templates_by_name;
use stancemix::eval::{score_instrument, FcOptions, Order, Report, TEMPLATES};
use stancemix::Blend;

use stancemix::model::WeightFormat;
use stancemix::{Engine, EngineOptions};
use std::sync::Arc;

/// The held-out instrument shipped with the project.
pub const DEFAULT_INSTRUMENT: &str = "adapters/instruments/stance-compass.json";

/// Which model and experts to evaluate.
#[derive(clap::Args, Debug, Clone)]
pub struct EvalEngineArgs {
    /// Base model GGUF (default: the fetched SmolLM2-135M-Instruct).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Expert adapter directories (default: the shipped ones).
    #[arg(long, num_args = 1..)]
    pub adapters: Option<Vec<PathBuf>>,
    /// Load no experts at all.
    #[arg(long, conflicts_with = "adapters")]
    pub no_adapters: bool,
    /// Base weights in memory. f32 (the default here) is the fastest for scoring prompts and
    /// gives the same numbers whatever the batch shape; candle's q8_0 kernels change with the
    /// number of rows, which moves logits between batch shapes.
    #[arg(long, default_value = "f32")]
    pub format: WeightFormat,
}

impl EvalEngineArgs {
    /// Load the engine these flags describe (no gate: evaluation uses fixed blends).
    pub fn load(&self) -> anyhow::Result<Arc<Engine>> {
        Ok(Engine::load(&EngineOptions {
            model: self.model.clone(),
            adapters: if self.no_adapters {
                Some(Vec::new())
            } else {
                self.adapters.clone()
            },
            gate: None,
            format: self.format,
        })?)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Instrument JSON (see DESIGN.md "Data formats").
    #[arg(long, default_value = DEFAULT_INSTRUMENT)]
    pub instrument: PathBuf,
    /// Blend(s) to score: base | dial=D | mix=A | expert=NAME | name=w,... [@mode]. Several are
    /// scored together, as rows of one batched forward pass.
    #[arg(long = "blend", num_args = 1.., default_value = "base", allow_hyphen_values = true)]
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
    /// Templates by id or 1-based number, comma-separated (default: all six).
    #[arg(long, value_delimiter = ',')]
    pub templates: Option<Vec<String>>,
    /// Ask each template with the system prompt, without it, or both.
    #[arg(long, value_enum, default_value = "both")]
    pub system: SystemArg,
    /// List the options in the instrument's order only (default: both orders).
    #[arg(long)]
    pub one_order: bool,
    /// Score only N items, spread evenly over the instrument (quick checks).
    #[arg(long)]
    pub items: Option<usize>,
    /// At most this many batch rows per forward pass.
    #[arg(long, default_value_t = 16)]
    pub max_rows: usize,
}

impl FcArgs {
    /// As library options.
    pub fn options(&self) -> anyhow::Result<FcOptions> {
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
    let mut head = format!("{:<28}", "blend");
    for a in &axes {
        head.push_str(&format!(
            " | {:>9} {:>6} {:>7}",
            format!("{a}"),
            "+-95%",
            "argmax"
        ));
    }
    head.push_str(" | outside  agree  first");
    println!("{head}");
    for b in &r.blends {
        let mut line = format!("{:<28}", b.blend);
        for a in &axes {
            let s = &b.axes[*a];
            line.push_str(&format!(
                " | {:>9.2} {:>6.2} {:>7.2}",
                s.expected, s.expected_ci95, s.argmax
            ));
        }
        line.push_str(&format!(
            " | {:>7.3} {:>6.3} {:>6.3}",
            b.outside_mass, b.agree_share, b.first_option_share
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
    let instrument = Instrument::load(&a.instrument)?;
    let opts = a.fc.options()?;
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
    let value = report_json(&report)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| default_out(&a.instrument, &a.blends));
    stancemix::error::write_atomic(&out, serde_json::to_string_pretty(&value)?.as_bytes())?;
    if a.json {
        println!("{}", serde_json::to_string(&value)?);
    } else {
        print_table(&report);
    }
    eprintln!("wrote {}", out.display());
    Ok(())
}
