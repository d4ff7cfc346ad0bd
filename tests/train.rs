//! Training (issue 5): log-probabilities, gradients, DPO start, overfitting, and resume after
//! a kill, all on the tiny random model.

mod common;

use candle_core::{Device, Tensor, Var};
use std::collections::HashSet;
use std::sync::atomic::AtomicBool;

use stancemix::data::export::Record;
use stancemix::model::{tiny, Logits, Pass, WeightFormat};
use stancemix::train::{pack, token_logprobs, tokenize, Method, TrainConfig, Trainer};
use stancemix::Error;

fn record(i: usize, answer: &str, other: &str) -> Record {
    Record {
        id: format!("r{i}"),
        prompt: format!("<|im_start|>user\nq{i}?<|im_end|>\n<|im_start|>assistant\n"),
        chosen: format!("{answer}<|im_end|>"),
        rejected: Some(format!("{other}<|im_end|>")),
    }
}

fn records() -> Vec<Record> {
    vec![
        record(0, "Yes, tax it.", "No, cut it."),
        record(1, "Fund schools.", "Choose schools."),
        record(2, "More rules.", "Fewer rules here."),
        record(3, "Raise pay now.", "Let markets set pay."),
    ]
}

fn config(method: Method) -> TrainConfig {
    TrainConfig {
        method,
        rank: 4,
        alpha: 8.0,
        batch_size: 4,
        grad_accum: 1,
        max_seq_len: 64,
        warmup_steps: 0,
        eval_every: 0,
        ..TrainConfig::default()
    }
}

/// Fill every B with seeded random values so gradients of A are non-zero too.
fn randomize_b(trainer: &Trainer) {
    for (i, p) in trainer.lora().pairs.values().enumerate() {
        let t = stancemix::model::tiny::seeded_randn(i as u64, 0.05, p.b.dims()).unwrap();
        p.b.set(&t).unwrap();
    }
}

/// Backpropagate `loss` and return every LoRA gradient, flattened in `named_vars` order.
fn lora_gradients(trainer: &Trainer, loss: &Tensor) -> Vec<f32> {
    let grads = loss.backward().unwrap();
    let mut g = Vec::new();
    for (_, v) in trainer.lora().named_vars() {
        let t = grads.get(v.as_tensor()).unwrap();
        g.extend(t.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    g
}

fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|x| (x - max).exp()).sum::<f32>().ln() + max;
    row.iter().map(|x| x - lse).collect()
}

#[test]
fn answer_logprobs_match_a_full_forward() {
    let model = common::tiny_model(3);
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(&model, config(Method::Sft), &records(), &[], dir.path()).unwrap();
    randomize_b(&trainer);
    let (ex, _) = tokenize(&model.tokenizer, &records()[..2], 64).unwrap();
    let seqs: Vec<_> = ex.iter().map(|e| (&e.prompt[..], &e.chosen[..])).collect();
    let packed = pack(&seqs, 2).unwrap();
    let pass = Pass {
        hook: trainer.lora(),
        logits: Logits::Hidden,
        differentiable: true,
    };
    let got = token_logprobs(&model, &packed, &pass)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    // Independent: each sequence alone, all logits, log-softmax by hand, read the answer tokens.
    let mut want = Vec::new();
    for e in &ex {
        let seq: Vec<u32> = e.prompt.iter().chain(&e.chosen).copied().collect();
        let tokens = Tensor::new(seq.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let pass = Pass {
            hook: trainer.lora(),
            logits: Logits::All,
            differentiable: false,
        };
        let logits = model
            .forward(&tokens, None, &pass)
            .unwrap()
            .squeeze(0)
            .unwrap();
        let rows = logits.to_vec2::<f32>().unwrap();
        for (j, &tok) in e.chosen.iter().enumerate() {
            want.push(log_softmax(&rows[e.prompt.len() + j - 1])[tok as usize]);
        }
    }
    assert_eq!(got.len(), want.len());
    let diff = common::max_abs_diff(&got, &want);
    assert!(
        diff < 1e-4,
        "packed log-probs differ from a full forward by {diff}"
    );
}

/// `layers_from`: an adapter on the upper blocks trains from kept residuals of the lower ones.
/// Loss and gradients equal a full pass of the same adapter from the tokens up (computed here
/// without the trainer's store), and a second batch reuses the store instead of growing it.
#[test]
fn upper_block_training_from_kept_residuals_matches_the_full_pass() {
    let model = common::tiny_model(7);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        layers_from: 1,
        epochs: 2,
        ..config(Method::Sft)
    };
    let trainer = Trainer::new(&model, c, &records(), &[], dir.path()).unwrap();
    randomize_b(&trainer);
    assert!(
        trainer.lora().pairs.keys().all(|k| k.0 == 1),
        "block 0 adapted"
    );
    assert_eq!(trainer.lora().first_layer(), 1);
    let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let grads_of = |loss: &Tensor| lora_gradients(&trainer, loss);
    let (kept, _) = trainer.batch_loss(&refs, true).unwrap();
    assert_eq!(trainer.residuals_stored().unwrap().0, 4);
    let g_kept = grads_of(&kept);
    // Independent: the same adapter over the whole model from the tokens.
    let seqs: Vec<_> = ex.iter().map(|e| (&e.prompt[..], &e.chosen[..])).collect();
    let pad = *model.tokenizer.stop_ids().first().unwrap();
    let packed = pack(&seqs, pad).unwrap();
    let pass = Pass {
        hook: trainer.lora(),
        logits: Logits::Hidden,
        differentiable: true,
    };
    let full = token_logprobs(&model, &packed, &pass)
        .unwrap()
        .mean_all()
        .unwrap()
        .neg()
        .unwrap();
    let g_full = grads_of(&full);
    let (lk, lf) = (
        kept.to_scalar::<f32>().unwrap(),
        full.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (lk - lf).abs() < 1e-5 * lf.abs(),
        "loss {lk} from kept residuals, {lf} in full"
    );
    let scale = g_full.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = common::max_abs_diff(&g_kept, &g_full);
    assert!(
        scale > 0.0 && diff < 1e-4 * scale,
        "gradients differ by {diff} (largest {scale})"
    );
    // The same sequences again, half of them: answered from the store.
    trainer.batch_loss(&refs[..2], false).unwrap();
    assert_eq!(trainer.residuals_stored().unwrap().0, 4);
}

/// A run shorter than an epoch never reads a training example twice: its residuals are not
/// kept for the run, the dev split's are, and DPO's reference pass still reads the batch's own
/// residuals (the loss equals a run that keeps everything).
#[test]
fn a_run_shorter_than_an_epoch_keeps_only_the_dev_residuals() {
    let model = common::tiny_model(7);
    let short = TrainConfig {
        layers_from: 1,
        batch_size: 2,
        max_steps: 1,
        epochs: 1,
        ..config(Method::Dpo)
    };
    let long = TrainConfig {
        max_steps: 0,
        epochs: 2,
        ..short.clone()
    };
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let recs = records();
    let t_short = Trainer::new(&model, short, &recs, &recs[..2], d1.path()).unwrap();
    let t_long = Trainer::new(&model, long, &recs, &recs[..2], d2.path()).unwrap();
    assert!(!t_short.repeats_examples() && t_long.repeats_examples());
    let (ex, _) = tokenize(&model.tokenizer, &recs, 64).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let (a, _) = t_short.batch_loss(&refs[..2], true).unwrap();
    let (b, _) = t_long.batch_loss(&refs[..2], true).unwrap();
    let (a, b) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!(
        (a - b).abs() < 1e-6,
        "loss {a} without keeping, {b} keeping"
    );
    assert_eq!(t_short.residuals_stored().unwrap().0, 0);
    assert_eq!(t_long.residuals_stored().unwrap().0, 4); // 2 chosen + 2 rejected
    t_short.dev_loss(0).unwrap();
    assert_eq!(t_short.residuals_stored().unwrap().0, 4);
}

/// SFT's dev figures: the loss over the own answers' tokens, and the side accuracy (own answer
/// likelier than the other side's), against each sequence scored alone.
#[test]
fn sft_dev_side_accuracy_counts_own_answers_found_likelier() {
    let model = common::tiny_model(11);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        batch_size: 3,
        ..config(Method::Sft)
    };
    let trainer = Trainer::new(&model, c, &records(), &records(), dir.path()).unwrap();
    randomize_b(&trainer);
    let (loss, acc) = trainer.dev_loss(0).unwrap().unwrap();
    let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
    let pass = Pass {
        hook: trainer.lora(),
        logits: Logits::Hidden,
        differentiable: false,
    };
    let sum = |p: &[u32], a: &[u32]| -> f64 {
        let packed = pack(&[(p, a)], 2).unwrap();
        let lp = token_logprobs(&model, &packed, &pass).unwrap();
        lp.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64
    };
    let (mut nll, mut tokens, mut wins) = (0.0, 0, 0);
    for e in &ex {
        let own = sum(&e.prompt, &e.chosen);
        nll -= own;
        tokens += e.chosen.len();
        wins += usize::from(own > sum(&e.prompt, &e.rejected));
    }
    let want = nll / tokens as f64;
    assert!(
        (loss - want).abs() < 1e-4 * want,
        "dev loss {loss}, alone {want}"
    );
    assert_eq!(acc, Some(wins as f64 / ex.len() as f64));
}

/// The int8 base (`--base-format int8`, `model::gemm8`) against the f32 one: the same loss
/// within its rounding, and LoRA gradients pointing the same way.
#[test]
fn int8_base_gradients_track_the_f32_ones() {
    let run = |format: WeightFormat| -> (f32, Vec<f32>) {
        let model = common::tiny_model_as(5, format);
        let dir = tempfile::tempdir().unwrap();
        let trainer =
            Trainer::new(&model, config(Method::Sft), &records(), &[], dir.path()).unwrap();
        // The same B for both (randomize_b draws from candle's global generator).
        for (i, p) in trainer.lora().pairs.values().enumerate() {
            let v: Vec<f32> = (0..p.b.elem_count())
                .map(|j| ((j * 7 + i * 13) as f32 * 0.37).sin() * 0.05)
                .collect();
            p.b.set(&Tensor::from_vec(v, p.b.shape().clone(), &Device::Cpu).unwrap())
                .unwrap();
        }
        let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
        let refs: Vec<_> = ex.iter().collect();
        let (loss, _) = trainer.batch_loss(&refs, true).unwrap();
        let g = lora_gradients(&trainer, &loss);
        (loss.to_scalar::<f32>().unwrap(), g)
    };
    let (l32, g32) = run(WeightFormat::F32);
    let (l8, g8) = run(WeightFormat::Int8);
    assert!((l8 - l32).abs() < 0.01 * l32, "loss int8 {l8} vs f32 {l32}");
    let dot: f64 = g32
        .iter()
        .zip(&g8)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let n32: f64 = g32.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let n8: f64 = g8.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (n32 * n8);
    assert!(cos > 0.99, "gradient cosine {cos}");
    assert!(
        (n8 / n32 - 1.0).abs() < 0.05,
        "gradient norms {n8} vs {n32}"
    );
}

#[test]
fn lora_gradients_match_finite_differences() {
    let model = common::tiny_model(5);
    let dir = tempfile::tempdir().unwrap();
    let trainer = Trainer::new(&model, config(Method::Sft), &records(), &[], dir.path()).unwrap();
    randomize_b(&trainer);
    let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let loss = |t: &Trainer| -> f64 {
        t.batch_loss(&refs, true)
            .unwrap()
            .0
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let (l, _) = trainer.batch_loss(&refs, true).unwrap();
    let grads = l.backward().unwrap();
    let vars: Vec<(String, Var)> = trainer
        .lora()
        .named_vars()
        .into_iter()
        .map(|(n, v)| (n, v.clone()))
        .collect();
    let mut checked = 0;
    // A few tensors across layers and targets; in each, the entry with the largest gradient.
    for (name, var) in vars.iter().step_by(5) {
        let g = grads
            .get(var)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let (idx, &gi) = g
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
            .unwrap();
        let orig = var.as_tensor().copy().unwrap();
        let mut vals = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let eps = 1e-2f32;
        let mut at = |delta: f32| {
            vals[idx] = orig.flatten_all().unwrap().to_vec1::<f32>().unwrap()[idx] + delta;
            var.set(&Tensor::from_vec(vals.clone(), orig.shape(), &Device::Cpu).unwrap())
                .unwrap();
            loss(&trainer)
        };
        let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
        var.set(&orig).unwrap();
        let rel = (numeric - gi as f64).abs() / numeric.abs().max(gi.abs() as f64);
        assert!(
            rel < 1e-2,
            "{name}[{idx}]: autograd {gi}, finite difference {numeric} (relative error {rel})"
        );
        checked += 1;
    }
    assert!(checked >= 4);
}

#[test]
fn first_dpo_loss_is_ln2() {
    let model = common::tiny_model(7);
    let dir = tempfile::tempdir().unwrap();
    let mut trainer = Trainer::new(
        &model,
        config(Method::Dpo),
        &records(),
        &records(),
        dir.path(),
    )
    .unwrap();
    trainer.prepare_reference().unwrap();
    let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let loss = trainer
        .batch_loss(&refs, true)
        .unwrap()
        .0
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (loss as f64 - std::f64::consts::LN_2).abs() < 1e-4,
        "first DPO loss {loss}, expected ln 2"
    );
}

#[test]
fn sft_overfits_four_examples() {
    let model = common::tiny_model(9);
    let dir = tempfile::tempdir().unwrap();
    let c = TrainConfig {
        lr: 1e-2,
        rank: 8,
        alpha: 16.0,
        epochs: 400,
        max_steps: 150,
        min_lr_ratio: 1.0,
        checkpoint_every: 1000,
        ..config(Method::Sft)
    };
    let mut trainer = Trainer::new(&model, c, &records(), &records(), dir.path()).unwrap();
    let report = trainer
        .run(false, &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    let dev = report.dev_loss.unwrap();
    assert!(
        dev < 0.1,
        "loss on the 4 training examples is {dev} after 150 steps"
    );
    // The saved adapter reloads and is what was trained.
    let a = stancemix::lora::Adapter::load(dir.path(), &model.config).unwrap();
    assert_eq!(a.config.r, 8);
    assert_eq!(a.stance(), Some("progressive"));
}

#[test]
fn early_stopping_keeps_the_adapter_of_the_best_dev_loss() {
    // Train on one side and measure dev on the other: past the first steps (the format) the
    // dev loss rises, so patience must stop the run and keep the best evaluation's adapter.
    let model = common::tiny_model(9);
    let dir = tempfile::tempdir().unwrap();
    let flipped: Vec<Record> = records()
        .into_iter()
        .map(|r| Record {
            chosen: r.rejected.clone().unwrap(),
            rejected: Some(r.chosen),
            ..r
        })
        .collect();
    let c = TrainConfig {
        lr: 1e-2,
        rank: 8,
        alpha: 16.0,
        epochs: 400,
        max_steps: 200,
        min_lr_ratio: 1.0,
        eval_every: 4,
        patience: 3,
        checkpoint_every: 1000,
        ..config(Method::Sft)
    };
    let mut trainer = Trainer::new(&model, c, &records(), &flipped, dir.path()).unwrap();
    let report = trainer
        .run(false, &AtomicBool::new(false), &mut |_| {})
        .unwrap();
    assert!(report.steps < 200, "no early stop: {} steps", report.steps);
    let logged: Vec<(usize, f64)> = std::fs::read_to_string(dir.path().join("train_log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Some((v["step"].as_u64()? as usize, v["dev_loss"].as_f64()?))
        })
        .collect();
    let (best_step, best) = logged
        .iter()
        .cloned()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(report.steps, best_step + 3 * 4, "{logged:?}");
    // The last weights' evaluation is on record too, though the best ones are kept.
    assert_eq!(logged.last().unwrap().0, report.steps, "{logged:?}");
    assert_eq!(report.best_step, Some(best_step));
    // The adapter saved is the best one: its dev loss is the best logged.
    assert!(
        (report.dev_loss.unwrap() - best).abs() < 1e-9,
        "{report:?} vs {best}"
    );
    let saved = stancemix::lora::Adapter::load(dir.path(), &model.config).unwrap();
    let kept = stancemix::lora::Adapter::load(dir.path().join("best"), &model.config).unwrap();
    for (k, p) in &saved.pairs {
        assert_eq!(
            p.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            kept.pairs[k]
                .b
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn bad_train_config_names_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("t.toml");
    let mut text = toml::to_string(&TrainConfig::default()).unwrap();
    text = text.replace("rank = 8", "rank = 0");
    std::fs::write(&p, &text).unwrap();
    let e = TrainConfig::load(&p).unwrap_err();
    assert!(
        matches!(&e, Error::Data { field, line, .. } if field == "rank" && *line > 0),
        "{e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("t.toml") && e.contains("rank"), "{e}");
    // Checked without a file, the setting is named.
    let c = TrainConfig {
        rank: 0,
        ..TrainConfig::default()
    };
    assert!(matches!(c.validate(), Err(Error::Setting { name, .. }) if name == "rank"));
    std::fs::write(&p, "lr = \"fast\"\n").unwrap();
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("t.toml") && e.contains("lr"), "{e}");
    std::fs::write(&p, text.replace("rank = 0", "rank = 4\nranq = 4")).unwrap();
    let e = TrainConfig::load(&p).unwrap_err().to_string();
    assert!(e.contains("ranq"), "{e}");
    // The base format: one gradients flow through, by a name that exists.
    let without_base: String = text
        .replace("rank = 0", "rank = 4")
        .lines()
        .filter(|l| !l.starts_with("base = "))
        .map(|l| format!("{l}\n"))
        .collect();
    for (base, says) in [
        ("stored", "carries no gradients"),
        ("int9", "unknown variant"),
    ] {
        std::fs::write(&p, format!("{without_base}base = \"{base}\"\n")).unwrap();
        let e = TrainConfig::load(&p).unwrap_err().to_string();
        assert!(
            e.contains("t.toml") && e.contains("base") && e.contains(says),
            "{e}"
        );
    }
    std::fs::write(&p, &without_base).unwrap();
    assert_eq!(
        TrainConfig::load(&p).unwrap().base,
        WeightFormat::F32,
        "files without it trained in f32"
    );
}

/// Train through the CLI on the tiny model and a slice of the real stance data.
fn cli_train(dir: &std::path::Path, out: &str, resume: bool) -> std::process::Command {
    let mut c = std::process::Command::new(common::bin());
    c.args(["train", "sft", "--model"])
        .arg(dir.join("tiny.gguf"))
        .arg("--data")
        .arg(dir.join("data"))
        .arg("--out")
        .arg(dir.join(out));
    if resume {
        c.arg("--resume");
    } else {
        c.args([
            "--stance",
            "progressive",
            "--rank",
            "4",
            "--batch-size",
            "4",
            "--grad-accum",
            "1",
            "--max-seq-len",
            "96",
            "--max-steps",
            "60",
            "--checkpoint-every",
            "5",
            "--lr",
            "3e-3",
            "--eval-every",
            "0",
            "--seed",
            "11",
            "--epochs",
            "10",
        ]);
    }
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn dev_loss(dir: &std::path::Path) -> f64 {
    let s = std::fs::read_to_string(dir.join("train_summary.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s).unwrap();
    v["dev_loss"].as_f64().unwrap()
}

#[test]
fn resume_after_kill_matches_an_uninterrupted_run() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write_tiny_gguf(&dir.path().join("tiny.gguf"), 21).unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    std::fs::copy(
        root.join("adapters/data/stance/taxes.jsonl"),
        dir.path().join("data/taxes.jsonl"),
    )
    .unwrap();

    let st = cli_train(dir.path(), "full", false).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let full = dev_loss(&dir.path().join("full"));
    // `--dev-only --init full` scores that adapter as the run's own final evaluation did (dev
    // loss, and the side accuracy SFT dev records allow), writing nothing.
    let st = cli_train(dir.path(), "scored", false)
        .arg("--dev-only")
        .arg("--init")
        .arg(dir.path().join("full"))
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let scored: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let summary: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("full/train_summary.json")).unwrap(),
    )
    .unwrap();
    let d = scored["dev_loss"].as_f64().unwrap();
    assert!(
        (d - full).abs() < 1e-5 * full,
        "--dev-only {d}, the run's own {full}"
    );
    assert!(summary["dev_side_accuracy"].as_f64().is_some(), "{summary}");
    assert_eq!(scored["dev_accuracy"], summary["dev_side_accuracy"]);
    assert!(
        !dir.path().join("scored").exists(),
        "--dev-only wrote its --out"
    );

    let mut child = cli_train(dir.path(), "killed", false)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let ckpt = dir.path().join("killed/checkpoint.safetensors");
    let t0 = std::time::Instant::now();
    while !ckpt.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(ckpt.exists(), "no checkpoint was written before the kill");
    assert!(
        !dir.path().join("killed/train_summary.json").exists(),
        "the run finished before it could be killed"
    );
    let st = cli_train(dir.path(), "killed", true).output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let resumed = dev_loss(&dir.path().join("killed"));
    assert!(
        (resumed - full).abs() < 1e-3 * full.abs().max(1.0),
        "resumed run's dev loss {resumed} vs uninterrupted {full}"
    );
}

/// The records a run reads: SFT trains on own answers only, dev records carry both sides'
/// answers, survey records join both splits, and the dev split alternates long-form and survey
/// records (so a limited dev loss sees both kinds). Read from the shipped stance data.
#[test]
fn a_runs_records_mix_long_form_and_survey_and_dev_carries_both_sides() {
    let pairs = stancemix::data::load_stance_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/adapters/data/stance"
    )))
    .unwrap();
    let chat = stancemix::model::chat::ChatTemplate::chatml();
    let c = TrainConfig {
        survey: 1,
        long_form: true,
        ..config(Method::Sft)
    };
    let (train, dev) = c.records(&pairs, &chat).unwrap();
    let is_survey = |r: &Record| r.id.contains("#survey");
    assert!(train.iter().all(|r| r.rejected.is_none()));
    assert!(dev.iter().all(|r| r.rejected.is_some()));
    assert!(train.iter().any(is_survey) && train.iter().any(|r| !is_survey(r)));
    assert!(!is_survey(&dev[0]) && is_survey(&dev[1]) && !is_survey(&dev[2]));
    let ids = |rs: &[Record]| rs.iter().map(|r| r.id.clone()).collect::<HashSet<_>>();
    assert!(
        ids(&train).is_disjoint(&ids(&dev)),
        "a record in both splits"
    );
    let survey_only = TrainConfig {
        long_form: false,
        ..c.clone()
    };
    let (t2, d2) = survey_only.records(&pairs, &chat).unwrap();
    assert!(t2.iter().chain(&d2).all(is_survey));
    assert_eq!(t2.len(), train.iter().filter(|r| is_survey(r)).count());
}

/// DPO from a starting adapter measures its implicit reward from that adapter by default
/// (`Reference::Init`): at the first step policy and reference are the same model, so every
/// pair's margin is 0 and the loss is exactly ln 2; against the base (`Reference::Base`) the
/// starting adapter's own shift already counts.
#[test]
fn dpo_from_an_adapter_starts_at_ln2_against_it_and_not_against_the_base() {
    let model = common::tiny_model(5);
    let init = tempfile::tempdir().unwrap();
    {
        let dir = tempfile::tempdir().unwrap();
        let t = Trainer::new(&model, config(Method::Sft), &records(), &[], dir.path()).unwrap();
        randomize_b(&t);
        t.lora()
            .to_adapter()
            .unwrap()
            .save(init.path(), &model.config)
            .unwrap();
    }
    let (ex, _) = tokenize(&model.tokenizer, &records(), 64).unwrap();
    let refs: Vec<_> = ex.iter().collect();
    let loss = |reference: stancemix::train::Reference| {
        let dir = tempfile::tempdir().unwrap();
        let c = TrainConfig {
            init: Some(init.path().to_path_buf()),
            reference,
            ..config(Method::Dpo)
        };
        let t = Trainer::new(&model, c, &records(), &[], dir.path()).unwrap();
        let (l, _) = t.batch_loss(&refs, false).unwrap();
        l.to_scalar::<f32>().unwrap()
    };
    let ln2 = std::f32::consts::LN_2;
    let (against_init, against_base) = (
        loss(stancemix::train::Reference::Init),
        loss(stancemix::train::Reference::Base),
    );
    assert!((against_init - ln2).abs() < 1e-6, "{against_init}");
    assert!((against_base - ln2).abs() > 1e-3, "{against_base}");
}
