//! `stancemix report --out DIR`: one Markdown page with the tables and SVG plot for the base,
//! both experts and a dial sweep, plus side effects and open-ended stance.

use std::path::PathBuf;
use std::time::Instant;

use stancemix::eval::report::{markdown, Page};
use stancemix::runtime::{CONSERVATIVE, PROGRESSIVE};
use stancemix::Blend;

use super::eval::{progress_bars, ExtraArgs};
use super::sweep::SweepArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Directory for README.md, report.json and the sweep's CSV, JSON and SVG.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub sweep: SweepArgs,
    /// Skip perplexity and the adversarial check.
    #[arg(long)]
    pub no_side_effects: bool,
    /// Skip the open-ended answers and their judged stance.
    #[arg(long)]
    pub no_open_ended: bool,
    #[command(flatten)]
    pub extra: ExtraArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let job = a.sweep.job()?;
    let start = Instant::now();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let judge = (!a.no_open_ended)
        .then(|| a.extra.load_judge())
        .transpose()?;
    let engine = a.sweep.engine.load()?;
    for stance in [PROGRESSIVE, CONSERVATIVE] {
        if engine.experts.by_stance(stance).is_none() {
            anyhow::bail!(
                "the report needs a {stance} expert: pass --adapters DIR... whose adapter_config.json says \"stance\": \"{stance}\""
            );
        }
    }
    let r = job.run(&engine)?;
    let mut files = r.write_files(&a.out)?;
    let refs = [
        Blend::base(),
        Blend::expert(PROGRESSIVE),
        Blend::expert(CONSERVATIVE),
    ];
    let gen = if a.no_side_effects && a.no_open_ended {
        engine.clone()
    } else {
        a.sweep.engine.load_generator(&engine)?
    };
    let side_effects = if a.no_side_effects {
        None
    } else {
        Some(
            a.extra
                .config()
                .side_effects(&engine, &gen, &refs, &mut progress_bars())?,
        )
    };
    let open_ended = match &judge {
        Some(judge) => Some(a.extra.config().open_ended(
            judge,
            &*judge.reader_for(&gen.model, &crate::cli::paths())?,
            &gen,
            job.instrument(),
            &refs,
            &mut progress_bars(),
        )?),
        None => None,
    };
    let fc = r.forced_choice.as_ref();
    let page = Page {
        command,
        model: fc.map(|f| f.model.clone()).unwrap_or_default(),
        experts: engine.expert_names().to_vec(),
        method: fc.map(|f| f.method.clone()).unwrap_or_default(),
        variants: fc.map_or(0, |f| f.variants.len()),
        items: fc.map_or(0, |f| f.items),
        always_agree: fc.map(|f| f.always_agree.clone()),
        sweep: r.summary(),
        side_effects,
        open_ended,
        elapsed_s: start.elapsed().as_secs_f64(),
    };
    let md = a.out.join("README.md");
    stancemix::error::write_atomic(&md, markdown(&page, "sweep.svg").as_bytes())?;
    let json = a.out.join("report.json");
    stancemix::error::write_atomic(&json, serde_json::to_string_pretty(&page)?.as_bytes())?;
    files.extend([md.clone(), json]);
    println!("{}", std::fs::read_to_string(&md)?);
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}
