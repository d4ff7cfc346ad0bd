//! Embedding stancemix: load the engine, answer one prompt under three blends.
//! Run: cargo run --release --example embed (builds with `--no-default-features` too).
use stancemix::{util::Paths, Blend, Engine, EngineOptions, GenParams};

fn main() -> stancemix::Result<()> {
    // The default base model plus the adapters and gate shipped in this repository (an
    // embedder names its own folder); the model is fetched into its models/ if missing.
    let paths = Paths::at(env!("CARGO_MANIFEST_DIR"));
    let engine = Engine::load(&EngineOptions::shipped(paths))?;
    let params = GenParams {
        max_tokens: 80,
        ..GenParams::default()
    };
    let prompt = "Should the minimum wage be raised?";
    for blend in [Blend::dial(-1.0)?, Blend::base(), Blend::dial(1.0)?] {
        let mut session = engine.session();
        // A blend that needs experts which are not loaded is refused, with the reason.
        if let Err(e) = session.set_blend(blend) {
            eprintln!("skipped: {e}");
            continue;
        }
        let reply = session.chat(prompt, &params, |_| true)?;
        println!("[{}]\n{}\n", reply.blend, reply.text);
    }
    Ok(())
}
