//! `stancemix serve`: OpenAI-compatible HTTP server (see `stancemix::serve`).

use stancemix::serve::{self, ServeOptions};

use super::common::EngineArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Address to listen on (loopback by default; 0.0.0.0 to accept other machines).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port (0: any free port; the one chosen is printed).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Requests decoded at once, each in its own session on its own thread.
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
    /// Requests that may wait for a slot; past them the server answers 429 with Retry-After.
    #[arg(long, default_value_t = 16)]
    pub queue: usize,
    /// Require `Authorization: Bearer KEY` on every endpoint but /health (also read from
    /// STANCEMIX_API_KEY).
    #[arg(long, env = "STANCEMIX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 4 << 20)]
    pub max_body: usize,
    /// Memory for whole prompts kept with their KV caches, in MiB: a prompt seen before under
    /// the same blend skips its prefill, with the same answer (0: off).
    #[arg(long, default_value_t = 256)]
    pub prompt_cache_mib: usize,
    #[command(flatten)]
    pub engine: EngineArgs,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.parallel == 0 {
        anyhow::bail!("--parallel must be at least 1");
    }
    if a.api_key.as_deref() == Some("") {
        anyhow::bail!("--api-key must not be empty");
    }
    let engine = a.engine.load()?;
    let opts = ServeOptions {
        parallel: a.parallel,
        queue: a.queue,
        api_key: a.api_key.clone(),
        max_body: a.max_body,
        prompt_cache: a.prompt_cache_mib << 20,
    };
    // Decoding runs on tokio's blocking threads: keep as many as can work at once (slots, plus a
    // few for tokenizing) and keep them alive, so that each slot's thread, and its allocator
    // arena, is reused rather than made anew for each burst of requests.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(a.parallel + 4)
        .thread_keep_alive(std::time::Duration::from_secs(24 * 3600))
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind((a.host.as_str(), a.port))
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}:{}: {e}", a.host, a.port))?;
        let addr = listener.local_addr()?;
        eprintln!(
            "stancemix serve: listening on http://{addr} ({} experts: {}; gate: {}; {} slots, queue {}; prompt cache {} MiB{})",
            engine.experts.len(),
            engine.expert_names().join(", "),
            if engine.gate.is_some() { "loaded" } else { "none" },
            opts.parallel,
            opts.queue,
            a.prompt_cache_mib,
            if opts.api_key.is_some() { ", API key required" } else { "" },
        );
        serve::serve(listener, serve::app(engine, opts)?).await?;
        eprintln!("stancemix serve: stopped");
        Ok(())
    })
}
