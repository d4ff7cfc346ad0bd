//! `stancemix generate`: answer one prompt, streaming, and say which blend produced it.

use std::io::Write;

use super::common::{BlendArgs, EngineArgs, GenArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The user prompt.
    #[arg(long)]
    pub prompt: String,
    /// System prompt (default: none).
    #[arg(long)]
    pub system: Option<String>,
    /// Print the routing decision and gate weights.
    #[arg(long)]
    pub explain: bool,
    #[command(flatten)]
    pub engine: EngineArgs,
    #[command(flatten)]
    pub blend: BlendArgs,
    #[command(flatten)]
    pub gen: GenArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = a.gen.params()?;
    let blend = a.blend.blend()?;
    let engine = a.engine.load()?;
    let mut s = engine.session();
    if let Some(sys) = a.system {
        s.set_system(Some(sys));
    }
    if blend.extrapolates() {
        eprintln!(
            "warning: blend {blend} extrapolates beyond the experts (weights outside [0, 1])"
        );
    }
    s.set_blend(blend)?;
    let mut out = std::io::stdout();
    let reply = s.chat(&a.prompt, &params, |piece| {
        let _ = out.write_all(piece.as_bytes());
        let _ = out.flush();
        true
    })?;
    println!();
    let mut meta = format!("[{}]", reply.blend);
    if !reply.weights.is_empty() {
        let w: Vec<String> = reply
            .weights
            .iter()
            .map(|(k, v)| format!("{k}={v:.2}"))
            .collect();
        meta.push_str(&format!(" gate: {}", w.join(", ")));
    }
    eprintln!("{meta}");
    if a.explain {
        match &reply.route {
            Some(r) => eprintln!("route: {}", r.explain()),
            None => eprintln!("route: none (fixed blend {})", reply.blend),
        }
    }
    Ok(())
}
