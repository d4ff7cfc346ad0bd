//! `stancemix merge`: the exact blend `W + sum_i g_i s_i B_i A_i` as a new GGUF.

use std::path::PathBuf;

use stancemix::lora::merge_to_gguf;
use stancemix::Blend;

use super::common::EngineArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Fixed blend to merge (base | dial=D | mix=A | name=w,...).
    #[arg(long)]
    pub blend: Blend,
    /// Output directory (gets model.gguf) or a path ending in .gguf.
    #[arg(long)]
    pub out: PathBuf,
    /// Store merged linears as F32 instead of F16.
    #[arg(long)]
    pub f32: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let engine = a.engine.load()?;
    let g = a.blend.gates(&engine.experts)?;
    let out = if a.out.extension().is_some_and(|e| e == "gguf") {
        a.out.clone()
    } else {
        a.out.join("model.gguf")
    };
    let w: Vec<String> = engine
        .expert_names()
        .iter()
        .zip(&g)
        .map(|(n, x)| format!("{n}={x}"))
        .collect();
    let note = format!(
        "merged by stancemix: blend {} (g: {})",
        a.blend,
        w.join(", ")
    );
    merge_to_gguf(&engine.model, &engine.experts, &g, &out, a.f32, &note)?;
    println!("wrote {} ({note})", out.display());
    Ok(())
}
