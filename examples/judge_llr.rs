//! Experiment: judge a stance answer by a likelihood ratio between two experts.
//!
//! For every dev-split stance pair and each of its two answers, the sum of the answer tokens'
//! log-probabilities after the question (ChatML user turn, as in training) under the
//! progressive and the conservative expert (a generative classifier: each expert was trained
//! on its side's train-split answers). Prints the accuracy of
//! `sign(lp_conservative - lp_progressive)` answer by answer, and how often a pair is
//! ordered right.
//!
//! ```sh
//! cargo run --release --example judge_llr [-- ADAPTER_PRO ADAPTER_CON [MAX_ANSWER_TOKENS]]
//! ```

use std::path::PathBuf;

use candle_nn::ops::log_softmax;
use stancemix::data::{is_dev, load_stance_dir};
use stancemix::model::{chatml_prompt, Logits, Message};
use stancemix::util::Paths;
use stancemix::{Engine, EngineOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let adapters = if args.len() >= 2 {
        vec![PathBuf::from(&args[0]), PathBuf::from(&args[1])]
    } else {
        vec![
            repo_dir().join("adapters/progressive"),
            repo_dir().join("adapters/conservative"),
        ]
    };
    let max_answer: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let engine = Engine::load(&EngineOptions {
        adapters: Some(adapters),
        ..EngineOptions::shipped(Paths::at(repo_dir()))
    })?;
    // Rows: progressive only, conservative only.
    let rows = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
    let tok = &engine.model.tokenizer;
    let pairs: Vec<_> = load_stance_dir(&repo_dir().join("adapters/data/stance"))?
        .into_iter()
        .filter(|p| is_dev(&p.id))
        .collect();
    let (mut right_llr, mut n, mut pair_llr) = (0usize, 0usize, 0usize);
    let mut llrs = Vec::new();
    for (k, p) in pairs.iter().enumerate() {
        let prompt = tok.encode(&chatml_prompt(&[Message {
            role: "user".into(),
            content: p.prompt.clone(),
        }]))?;
        let mut scores = Vec::new(); // log p_con - log p_pro per side
        for side in ["progressive", "conservative"] {
            let mut answer = tok.encode(&format!("{}<|im_end|>", p.answer(side).unwrap_or("")))?;
            answer.truncate(max_answer);
            let ids: Vec<u32> = prompt.iter().chain(&answer).copied().collect();
            let z = engine.forward_rows(&ids[..ids.len() - 1], None, &rows, Logits::All)?;
            let lp = log_softmax(&z, 2)?.to_vec3::<f32>()?; // (2, t, vocab)
            let mut sum = [0f64; 2];
            for (j, &target) in answer.iter().enumerate() {
                let pos = prompt.len() - 1 + j;
                for (r, s) in sum.iter_mut().enumerate() {
                    *s += lp[r][pos][target as usize] as f64;
                }
            }
            let llr = sum[1] - sum[0];
            scores.push(llr);
            llrs.push((llr, side == "conservative"));
            right_llr += usize::from((llr > 0.0) == (side == "conservative"));
            n += 1;
        }
        pair_llr += usize::from(scores[1] > scores[0]);
        if (k + 1) % 20 == 0 {
            eprintln!(
                "{}/{}: answer acc {:.3}, pair acc {:.3}",
                k + 1,
                pairs.len(),
                right_llr as f64 / n as f64,
                pair_llr as f64 / (k + 1) as f64
            );
        }
    }
    // Best single threshold in hindsight (an upper bound on what calibration could add).
    let mut best = 0usize;
    for &(t, _) in &llrs {
        let ok = llrs.iter().filter(|&&(l, c)| (l > t) == c).count();
        best = best.max(ok);
    }
    println!("best threshold in hindsight: {:.3}", best as f64 / n as f64);
    println!(
        "dev pairs {}: answer accuracy (sign of log p_con - log p_pro) {:.3}; pairs ordered {:.3}",
        pairs.len(),
        right_llr as f64 / n as f64,
        pair_llr as f64 / pairs.len() as f64
    );
    Ok(())
}

/// The repository this example was built in (its shipped adapters and data).
fn repo_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}
