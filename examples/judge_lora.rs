//! Experiment: a stance judge fine-tuned end to end. A LoRA adapter on the base learns to answer
//! "progressive" or "conservative" for a stance answer (its opening stripped, as the shipped
//! judge reads it), trained with the project's SFT trainer on the train split's answers; scored
//! on the dev answers by comparing the two labels' log-probabilities.
//!
//! `cargo run --release --example judge_lora -- [OUT] [EPOCHS]` (default `target/judge-lora`, 2);
//! rerun to resume (checkpoints) or, when finished, to score only.
use indicatif::ProgressBar;
use stancemix::data::export::Record;
use stancemix::data::load_stance_dir;
use stancemix::eval::judge::{split, strip_opening};
use stancemix::lora::Adapter;
use stancemix::model::{chatml_prompt, fetch, LoadOptions, Logits, Message, Model, Pass};
use stancemix::train::{
    default_base, pack, row_sums, token_logprobs, tokenize, Method, TrainConfig, TrainLora, Trainer,
};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

const ANSWER_TOKENS: usize = 96;
const SIDES: [&str; 2] = ["progressive", "conservative"];

fn records(model: &Model, pairs: &[&stancemix::data::StancePair]) -> anyhow::Result<Vec<Record>> {
    let tok = &model.tokenizer;
    let mut out = Vec::new();
    for p in pairs {
        for (i, side) in SIDES.iter().enumerate() {
            let answer = if i == 0 {
                &p.progressive
            } else {
                &p.conservative
            };
            let mut ids = tok.encode(strip_opening(answer).trim())?;
            ids.truncate(ANSWER_TOKENS);
            let text = tok.decode(&ids, false)?;
            out.push(Record {
                id: format!("{}-{side}", p.id),
                prompt: chatml_prompt(&[Message {
                    role: "user".into(),
                    content: format!(
                        "Which side of the political debate does this answer argue: progressive or conservative?\n\n{text}"
                    ),
                }]),
                chosen: format!("{side}<|im_end|>"),
                rejected: Some(format!("{}<|im_end|>", SIDES[1 - i])),
            });
        }
    }
    Ok(out)
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let out = PathBuf::from(args.next().unwrap_or_else(|| "target/judge-lora".into()));
    let epochs: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(2);
    let model = Model::load(
        &fetch::ensure_default_model()?,
        &LoadOptions {
            format: default_base(),
        },
    )?;
    let pairs = load_stance_dir(std::path::Path::new("adapters/data/stance"))?;
    let (train, dev) = split(&pairs);
    let (train, dev) = (records(&model, &train)?, records(&model, &dev)?);
    let config = TrainConfig {
        method: Method::Sft,
        rank: 8,
        alpha: 16.0,
        lr: 4e-4,
        warmup_steps: 10,
        batch_size: 8,
        grad_accum: 1,
        max_seq_len: ANSWER_TOKENS + 64,
        epochs,
        eval_every: 50,
        eval_limit: 64,
        checkpoint_every: 25,
        seed: 1,
        ..TrainConfig::default()
    };
    let finished = out.join("adapter_config.json").exists();
    let lora = if finished {
        TrainLora::from_adapter(&Adapter::load(&out, &model.config)?, 0.0)?
    } else {
        let resume = out.join("checkpoint.safetensors").exists();
        let mut t = Trainer::new(&model, config, &train, &dev, &out)?;
        let bar = ProgressBar::new(t.total_steps() as u64);
        let rep = t.run(resume, &AtomicBool::new(false), &bar)?;
        bar.finish();
        println!("{rep:?}");
        TrainLora::from_adapter(&Adapter::load(&out, &model.config)?, 0.0)?
    };
    // Score: the right label's log-probability against the wrong one's, per dev answer.
    let (ex, _) = tokenize(&model.tokenizer, &dev, 1024)?;
    let pass = Pass {
        hook: &lora,
        logits: Logits::Hidden,
        differentiable: false,
    };
    let (mut right, mut total) = (0, 0);
    for chunk in ex.chunks(8) {
        let mut seqs: Vec<_> = chunk
            .iter()
            .map(|e| (&e.prompt[..], &e.chosen[..]))
            .collect();
        seqs.extend(chunk.iter().map(|e| (&e.prompt[..], &e.rejected[..])));
        let packed = pack(&seqs, 2)?;
        let sums = row_sums(&packed, &token_logprobs(&model, &packed, &pass)?)?.to_vec1::<f32>()?;
        let b = chunk.len();
        for i in 0..b {
            total += 1;
            if sums[i] > sums[b + i] {
                right += 1;
            }
        }
    }
    println!(
        "dev accuracy {:.3} ({right} of {total} answers), base format {}",
        right as f64 / total as f64,
        model.format.name()
    );
    Ok(())
}
