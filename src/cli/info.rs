//! `stancemix info`: what a model file holds.

use std::path::PathBuf;

use stancemix::model::{fetch, LoadOptions, Model};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a GGUF file or a base id from `stancemix models` (default: smollm2-135m).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let path = crate::cli::model_path(a.model.as_deref())?;
    let model = Model::load(&path, &LoadOptions::default())?;
    let c = &model.config;
    let size = std::fs::metadata(&path)?.len();
    let hash = fetch::sha256_file(&path)?;
    let params = c.vocab_size * c.hidden
        + c.n_layer
            * (2 * c.hidden
                + stancemix::model::Target::ALL
                    .iter()
                    .map(|&t| c.in_features(t) * c.out_features(t))
                    .sum::<usize>())
        + c.hidden;
    if a.json {
        println!(
            "{}",
            serde_json::json!({"path": path, "config": c, "parameters": params, "file_bytes": size, "sha256": hash})
        );
        return Ok(());
    }
    println!("file           {}", path.display());
    println!("name           {}", c.name.as_deref().unwrap_or("-"));
    println!(
        "architecture   {} ({} layers, hidden {}, FFN {})",
        c.arch, c.n_layer, c.hidden, c.ffn
    );
    println!(
        "attention      {} heads, {} KV heads, head dim {}, rope base {}",
        c.n_head, c.n_kv_head, c.head_dim, c.rope_base
    );
    println!("context        {} tokens", c.context_len);
    println!(
        "vocabulary     {} tokens (eos {})",
        c.vocab_size, model.tokenizer.eos_id
    );
    println!("parameters     {:.1} M", params as f64 / 1e6);
    println!("file size      {:.1} MiB", size as f64 / (1 << 20) as f64);
    println!("sha256         {hash}");
    Ok(())
}
