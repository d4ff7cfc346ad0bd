//! `stancemix sweep`: score every point of a path through the gate weights on an instrument,
//! batched; write CSV, JSON and SVG; print Spearman per axis and the experts' gap.

use std::path::PathBuf;

use stancemix::data::Instrument;
use stancemix::eval::{parse_path, sweep, FcOptions, SweepPath, SweepReport};
use stancemix::Engine;

use super::eval::{progress_bar, EvalEngineArgs, FcArgs, DEFAULT_INSTRUMENT};

/// What a sweep scores, with what (sweep and report).
#[derive(clap::Args, Debug)]
pub struct SweepArgs {
    /// Instrument JSON (see DESIGN.md "Data formats").
    #[arg(long, default_value = DEFAULT_INSTRUMENT)]
    pub instrument: PathBuf,
    /// The path: dial:FROM:TO:N, mix:FROM:TO:N or raw:name=w,..:name=w,..:N [@logits|@contrast]
    /// (the base and both experts are scored beside it).
    #[arg(long, default_value = "dial:-1:1:11", allow_hyphen_values = true)]
    pub path: String,
    #[command(flatten)]
    pub engine: EvalEngineArgs,
    #[command(flatten)]
    pub fc: FcArgs,
}

/// A sweep with its flags checked (path parsed, instrument read), ready to score on an engine.
pub struct SweepJob {
    path: SweepPath,
    instrument: Instrument,
    opts: FcOptions,
    label: String,
}

impl SweepArgs {
    /// Check the flags before the (slow) engine load: set up the scoring threads, parse the
    /// path, read the instrument.
    pub fn job(&self) -> anyhow::Result<SweepJob> {
        let workers = self.fc.setup_threads()?; // first: candle reads its thread settings once
        Ok(SweepJob {
            path: parse_path(&self.path)?,
            instrument: Instrument::load(&self.instrument)?,
            opts: self.fc.options(workers)?,
            label: format!("sweep {}", self.path),
        })
    }
}

impl SweepJob {
    /// The instrument read from `--instrument`.
    pub fn instrument(&self) -> &Instrument {
        &self.instrument
    }

    /// Score every point (and the references) on `engine`, with a progress bar.
    pub fn run(&self, engine: &Engine) -> anyhow::Result<SweepReport> {
        let mut bar = progress_bar(&self.label);
        Ok(sweep(
            engine,
            &self.instrument,
            &self.path,
            &self.opts,
            &mut bar,
        )?)
    }
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Directory for sweep.csv, sweep.json and sweep.svg.
    #[arg(long, default_value = "target/sweep")]
    pub out: PathBuf,
    /// Print `{"points": [...], "spearman": {...}, ...}` to stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Print the sweep's table, Spearman's rho per axis and the experts' gap.
pub fn print_sweep(r: &SweepReport) {
    let axes: Vec<&String> = r.spearman.keys().collect();
    let mut head = format!("{:>7}  {:<28}", "x", "blend");
    for a in &axes {
        head.push_str(&format!(
            " | {:>9} {:>6} {:>7}",
            a.as_str(),
            "+-95%",
            "argmax"
        ));
    }
    head.push_str(" | outside");
    println!("{head}");
    let row = |label: String, p: &stancemix::eval::SweepPoint| {
        let mut line = format!("{label}  {:<28}", p.blend);
        for a in &axes {
            let s = &p.axes[*a];
            line.push_str(&format!(
                " | {:>9.2} {:>6.2} {:>7.2}",
                s.expected, s.expected_ci95, s.argmax
            ));
        }
        line.push_str(&format!(" | {:>7.3}", p.outside_mass));
        println!("{line}");
    };
    for p in &r.points {
        row(format!("{:>7.3}", p.x), p);
    }
    row(format!("{:>7}", "ref"), &r.base);
    for p in [&r.progressive, &r.conservative].into_iter().flatten() {
        row(format!("{:>7}", "ref"), p);
    }
    for (a, rho) in &r.spearman {
        println!(
            "spearman {a}: {}",
            rho.map_or("undefined (constant)".into(), |v| format!("{v:+.3}"))
        );
    }
    match &r.experts_gap {
        Some(g) => {
            for (a, v) in g {
                println!("experts' gap {a} (conservative - progressive): {v:+.2}");
            }
        }
        None => println!("experts' gap: needs a progressive and a conservative expert"),
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let job = a.sweep.job()?;
    let engine = a.sweep.engine.load()?;
    let report = job.run(&engine)?;
    let files = report.write_files(&a.out)?;
    if a.json {
        println!("{}", serde_json::to_string(&report.summary())?);
    } else {
        print_sweep(&report);
    }
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
