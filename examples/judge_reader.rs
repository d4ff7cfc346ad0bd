//! Experiment: the stance judge's reader fine-tuned end to end, as the gate's
//! (`train::finetune`): a LoRA on the first `LAYER` blocks and a linear head on the mean-pooled,
//! per-token RMS-normalised residual stream after them, trained with cross-entropy on the train
//! split's answers (opening stripped, as the shipped judge reads them); the head's dev accuracy
//! after each epoch.
//!
//! `cargo run --release --example judge_reader -- [LAYER] [EPOCHS] [LR] [TOKENS] [OUT] [CONTEXT]`
//! where CONTEXT is `answer` (the answer alone, opening stripped) or `chat` (the question as a
//! user turn, then the whole answer as the assistant's; pooled over both).
use stancemix::data::load_stance_dir;
use stancemix::eval::judge::{split, strip_opening};
use stancemix::model::{chatml_message, fetch, LoadOptions, Model, CHATML_ASSISTANT};
use stancemix::train::default_base;
use stancemix::train::finetune::{finetune, FinetuneConfig};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or_else(|| d.to_string());
    let layer: usize = arg(0, "12").parse()?;
    let epochs: usize = arg(1, "3").parse()?;
    let lr: f64 = arg(2, "1e-3").parse()?;
    let tokens: usize = arg(3, "128").parse()?;
    let out = arg(4, "target/judge-reader");
    let chat = match arg(5, "answer").as_str() {
        "answer" => false,
        "chat" => true,
        other => anyhow::bail!("context '{other}': answer or chat"),
    };
    let model = Model::load(
        &fetch::ensure_default_model(&stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR")))?,
        &LoadOptions {
            format: default_base(),
        },
    )?;
    let pairs = load_stance_dir("adapters/data/stance".as_ref())?;
    let (train, dev) = split(&pairs);
    let text = |p: &stancemix::data::StancePair, a: &str| -> String {
        if chat {
            format!(
                "{}{CHATML_ASSISTANT}{}",
                chatml_message("user", p.prompt.trim()),
                a.trim()
            )
        } else {
            strip_opening(a).trim().to_string()
        }
    };
    let ex = |ps: &[&stancemix::data::StancePair]| -> Vec<(String, usize)> {
        ps.iter()
            .flat_map(|p| [(text(p, &p.progressive), 0), (text(p, &p.conservative), 1)])
            .collect()
    };
    let (train_ex, dev_ex) = (ex(&train), ex(&dev));
    eprintln!(
        "layer {layer}, {epochs} epochs, lr {lr}, {tokens} tokens, {} train / {} dev answers, {} base",
        train_ex.len(),
        dev_ex.len(),
        model.format.name()
    );
    let cfg = FinetuneConfig {
        epochs,
        lr,
        max_tokens: tokens,
        ..Default::default()
    };
    let t0 = std::time::Instant::now();
    let adapter = finetune(&model, layer, &train_ex, &dev_ex, 2, &cfg, &mut |r| {
        eprintln!(
            "epoch {}: train loss {:.4}, dev accuracy {:.3} ({:.0} s)",
            r.epoch,
            r.train_loss,
            r.dev_accuracy.unwrap_or(f64::NAN),
            t0.elapsed().as_secs_f64()
        )
    })?;
    adapter.save(&out, &model.config)?;
    eprintln!("saved {out}");
    Ok(())
}
