//! `stancemix generate`: answer one prompt, streaming, and say which blend produced it.

use std::io::Write;

use super::common::TurnArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The user prompt.
    #[arg(long)]
    pub prompt: String,
    #[command(flatten)]
    pub turn: TurnArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = a.turn.gen.params()?;
    let blend = a.turn.blend.blend()?;
    let engine = a.turn.engine.load()?;
    let mut s = engine.session();
    if let Some(sys) = a.turn.system {
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
    if a.turn.explain {
        match &reply.route {
            Some(r) => eprintln!("route: {}", r.explain()),
            None => eprintln!("route: none (fixed blend {})", reply.blend),
        }
    }
    Ok(())
}
