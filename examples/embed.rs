//! Embedding stancemix: load the engine, answer one prompt under three blends.
//! Run: cargo run --release --example embed
use stancemix::{Blend, Engine, EngineOptions, GenParams};

fn main() -> stancemix::Result<()> {
    // Default options: the fetched base model plus the shipped adapters and gate.
    let engine = Engine::load(&EngineOptions::default())?;
    if engine.experts.is_empty() {
        eprintln!("no experts loaded: only the base blend is available");
    }
    let params = GenParams {
        max_tokens: 80,
        ..GenParams::default()
    };
    let prompt = "Should the minimum wage be raised?";
    for blend in ["dial=-1", "base", "dial=1"] {
        let blend: Blend = blend.parse()?;
        let mut session = engine.session();
        if session.set_blend(blend.clone()).is_err() {
            continue; // this blend needs experts that are not loaded
        }
        let reply = session.chat(prompt, &params, |_| true)?;
        println!("[{}]\n{}\n", reply.blend, reply.text);
    }
    Ok(())
}
