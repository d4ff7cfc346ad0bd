//! `stancemix adapter init|inspect|export-blend`.

use std::path::PathBuf;

use stancemix::lora::Adapter;
use stancemix::model::{LoadOptions, Model, Target};

#[derive(clap::Subcommand, Debug)]
pub enum Command {
    /// Create an adapter (random, non-zero; for tests and benchmarks).
    Init {
        /// Random A and B (the only initialisation offered here; training starts its own).
        #[arg(long, required = true)]
        random: bool,
        #[arg(long)]
        stance: String,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long)]
        alpha: Option<f64>,
        /// Comma-separated PEFT module names, or "all".
        #[arg(long, default_value = "all")]
        targets: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Standard deviation of B's entries.
        #[arg(long, default_value_t = 0.02)]
        std: f32,
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Print an adapter's config, targets, ranks and weight norms.
    Inspect {
        dir: PathBuf,
        #[arg(long)]
        model: Option<PathBuf>,
    },
    /// Write a blend of the experts as one PEFT LoRA adapter (exact: A stacked, B scaled and
    /// concatenated, rank r1+r2), for servers with multi-LoRA support.
    ExportBlend(ExportArgs),
}

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub blend: super::common::BlendArgs,
    #[command(flatten)]
    pub engine: super::common::EngineArgs,
    /// Output directory (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Parse `q_proj,v_proj` or `all`.
pub fn parse_targets(s: &str) -> anyhow::Result<Vec<Target>> {
    if s == "all" {
        return Ok(Target::ALL.to_vec());
    }
    s.split(',')
        .map(|m| Target::parse(m.trim()).ok_or_else(|| anyhow::anyhow!("--targets: unknown module '{m}' (expected q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj or all)")))
        .collect()
}

fn load_model(p: Option<PathBuf>) -> anyhow::Result<std::sync::Arc<Model>> {
    let p = crate::cli::model_path(p.as_deref())?;
    Ok(Model::load(p, &LoadOptions::default())?)
}

pub fn run(c: Command) -> anyhow::Result<()> {
    match c {
        Command::Init {
            random: _,
            stance,
            rank,
            alpha,
            targets,
            seed,
            std,
            model,
            out,
        } => {
            let model = load_model(model)?;
            let targets = parse_targets(&targets)?;
            let a = Adapter::random(
                &model.config,
                &stance,
                rank,
                alpha.unwrap_or(rank as f64),
                &targets,
                seed,
                std,
            )?;
            a.save(&out, &model.config)?;
            println!(
                "wrote {} ({} linears, rank {rank}, stance {stance})",
                out.display(),
                a.pairs.len()
            );
            Ok(())
        }
        Command::ExportBlend(a) => export_blend(a),
        Command::Inspect { dir, model } => {
            let model = load_model(model)?;
            let a = Adapter::load(&dir, &model.config)?;
            let c = &a.config;
            println!("adapter        {}", dir.display());
            println!("stance         {}", c.stance.as_deref().unwrap_or("-"));
            println!("description    {}", c.description.as_deref().unwrap_or("-"));
            println!(
                "base           {}",
                c.base_model_name_or_path.as_deref().unwrap_or("-")
            );
            println!(
                "rank / alpha   {} / {} (scale {:.4}{})",
                c.r,
                c.lora_alpha,
                a.scale(),
                if c.use_rslora { ", rsLoRA" } else { "" }
            );
            println!("targets        {}", c.target_modules.join(", "));
            println!("linears        {}", a.pairs.len());
            let mut params = 0;
            let mut norm2 = 0f64;
            for ((l, t), p) in &a.pairs {
                params += p.a.elem_count() + p.b.elem_count();
                if let Some(d) = a.delta(*l, *t)? {
                    norm2 += d.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
                }
            }
            println!("parameters     {params}");
            println!("|delta W|_F    {:.4}", norm2.sqrt());
            Ok(())
        }
    }
}

fn export_blend(a: ExportArgs) -> anyhow::Result<()> {
    let blend = a.blend.blend()?;
    if blend.mode != stancemix::Mode::Weights {
        anyhow::bail!(
            "blend {blend}: only weights mode is one LoRA (logits and contrast mix several passes)"
        );
    }
    if matches!(blend.view, stancemix::runtime::View::Auto(_)) {
        anyhow::bail!("blend {blend}: a routed blend changes per prompt; export a fixed one");
    }
    let engine = a.engine.load()?;
    let g = blend.gates(&engine.experts)?;
    let weights: Vec<String> = engine
        .expert_names()
        .iter()
        .zip(&g)
        .map(|(n, w)| format!("{n}={w}"))
        .collect();
    let description = format!(
        "Blend '{blend}' of stancemix's experts ({}), exported exactly as one LoRA by `stancemix \
         adapter export-blend`. The experts are deliberately biased, for research and comparison.",
        weights.join(", ")
    );
    let adapter =
        stancemix::lora::export_blend(&engine.experts, &g, &engine.model.config, &description)?;
    adapter.save(&a.out, &engine.model.config)?;
    println!(
        "wrote {} (blend {blend}; rank {}, {} linears)",
        a.out.display(),
        adapter.config.r,
        adapter.pairs.len()
    );
    Ok(())
}
