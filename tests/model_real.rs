//! The real base model: parity with an independent implementation, sessions, the CLI.

mod common;

use candle_core::{Device, Tensor};
use candle_transformers::models::quantized_llama::ModelWeights;
use common::*;
use stancemix::lora::ExpertSet;
use stancemix::model::{
    chatml_prompt, KvCache, Logits, Message, NoHook, Pass, Target, WeightFormat,
};
use stancemix::{Engine, GenParams};

const PROMPTS: [&str; 3] = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Explain in one sentence why the sky is blue.",
];

fn user(p: &str) -> String {
    chatml_prompt(&[Message {
        role: "user".into(),
        content: p.into(),
    }])
}

fn argmax(t: &Tensor) -> u32 {
    t.argmax(0).unwrap().to_scalar::<u32>().unwrap()
}

#[test]
fn logits_and_decoding_match_candle_quantized_llama() {
    let path = real_model_path();
    let model = real_model(WeightFormat::Stored);
    for p in PROMPTS {
        let ids = model.tokenizer.encode(&user(p)).unwrap();
        let mut f = std::fs::File::open(&path).unwrap();
        let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
        let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
        let x = Tensor::new(ids.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let want = reference.forward(&x, 0).unwrap().squeeze(0).unwrap();
        let mut cache = KvCache::new(model.config.n_layer);
        let pass = Pass {
            hook: &NoHook,
            logits: Logits::Last,
            differentiable: false,
        };
        let got = model
            .forward(&x, Some(&mut cache), &pass)
            .unwrap()
            .squeeze(0)
            .unwrap();
        // Both multiply the file's Q4_1 weights by activations rounded to int8 before each
        // matmul, but round them differently (candle: Q8_1 blocks with f16 scales, rounding
        // half away from zero; ours: f32 scales, half to even) and sum in other orders, and
        // this model turns such rounding differences into logit moves of tenths (measured on
        // these prompts: mean |diff| 0.1-0.4, max ~0.9; in f32 the paths agree within 4e-5, see
        // `decode_steps_match_full_recompute_in_f32`; the weights themselves are checked exactly
        // in `stored_weights_are_the_files_q4_1_blocks`). So, here and at each of 32 decode
        // steps along the reference's greedy continuation (teacher forcing, each model with its
        // own cache): the same choice except at near-ties, and a bounded mean difference.
        let top = |v: &[f32]| {
            let mut s: Vec<(f32, u32)> = v.iter().cloned().zip(0..).collect();
            s.sort_by(|a, b| b.0.total_cmp(&a.0));
            (s[0].1, s[0].0 - s[1].0)
        };
        let (w0, g0): (Vec<f32>, Vec<f32>) = (want.to_vec1().unwrap(), got.to_vec1().unwrap());
        let mean0 = w0.iter().zip(&g0).map(|(a, b)| (a - b).abs()).sum::<f32>() / w0.len() as f32;
        let ((tw, margin), (tg, _)) = (top(&w0), top(&g0));
        assert!(
            tw == tg || margin < 1.0,
            "{p}: prompt: we pick {tg}, the reference {tw}"
        );
        let mut next = argmax(&want);
        let mut worst_mean = mean0;
        for i in 0..32 {
            let x1 = Tensor::new(&[next], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let w: Vec<f32> = reference
                .forward(&x1, ids.len() + i)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let g: Vec<f32> = model
                .forward(&x1, Some(&mut cache), &pass)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec1()
                .unwrap();
            let mean = w.iter().zip(&g).map(|(a, b)| (a - b).abs()).sum::<f32>() / w.len() as f32;
            worst_mean = worst_mean.max(mean);
            let ((tw, margin), (tg, _)) = (top(&w), top(&g));
            assert!(
                tw == tg || margin < 1.0,
                "{p}: step {i}: we pick {tg}, the reference {tw} by a margin of {margin}"
            );
            next = tw;
        }
        assert!(
            worst_mean < 1.0,
            "{p}: mean |logit difference| up to {worst_mean}"
        );
    }
}

#[test]
fn stored_weights_are_the_files_q4_1_blocks() {
    // Formats `stored` and `mixed` keep the file's Q4_1 blocks (the Q8_0 embedding too) for our
    // kernels, repacked four rows together: dequantized back, every adaptable weight must equal
    // candle's dequantization of the tensor read straight from the file.
    let path = real_model_path();
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    for format in [WeightFormat::Stored, WeightFormat::Mixed] {
        let model = real_model(format);
        for (layer, target) in [
            (0, Target::Q),
            (7, Target::K),
            (13, Target::Down),
            (29, Target::Up),
        ] {
            let name = format!("blk.{layer}.{}.weight", target.gguf_name());
            let q = ct.tensor(&mut f, &name, &Device::Cpu).unwrap();
            assert_eq!(q.dtype(), candle_core::quantized::GgmlDType::Q4_1);
            let want = q.dequantize(&Device::Cpu).unwrap();
            let got = model.base_weight(layer, target).unwrap();
            assert_eq!(
                max_abs_diff(
                    &got.flatten_all().unwrap().to_vec1().unwrap(),
                    &want.flatten_all().unwrap().to_vec1().unwrap()
                ),
                0.0,
                "{format:?} {name}"
            );
        }
    }
}

#[test]
fn decode_steps_match_full_recompute_in_f32() {
    // A cached one-token step (the decode attention op) against the whole sequence recomputed
    // without a cache (the general attention path), with f32 weights so no int8 rounding hides
    // or amplifies differences.
    let model = real_model(WeightFormat::F32);
    let mut ids = model.tokenizer.encode(&user(PROMPTS[1])).unwrap();
    let pass = Pass {
        hook: &NoHook,
        logits: Logits::Last,
        differentiable: false,
    };
    let row = |ids: &[u32]| {
        Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
    };
    let mut cache = KvCache::new(model.config.n_layer);
    let mut z = model.forward(&row(&ids), Some(&mut cache), &pass).unwrap();
    for step in 0..16 {
        ids.push(argmax(&z.squeeze(0).unwrap()));
        z = model
            .forward(&row(&ids[ids.len() - 1..]), Some(&mut cache), &pass)
            .unwrap();
        let full = model.forward(&row(&ids), None, &pass).unwrap();
        let d = max_abs_diff(
            &z.flatten_all().unwrap().to_vec1().unwrap(),
            &full.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(
            d < 1e-3,
            "step {step}: cached decode vs full recompute differ by {d}"
        );
    }
}

#[test]
fn interleaved_sessions_match_each_run_alone() {
    let engine = Engine::new(real_model(WeightFormat::Q8_0), ExpertSet::empty());
    let params = GenParams {
        max_tokens: 20,
        temperature: 0.0,
        ..GenParams::default()
    };
    let alone: Vec<Vec<u32>> = PROMPTS[..2]
        .iter()
        .map(|p| engine.session().chat(p, &params, |_| true).unwrap().tokens)
        .collect();
    let (mut s1, mut s2) = (engine.session(), engine.session());
    let mut t1 = s1.begin(PROMPTS[0], &params).unwrap();
    let mut t2 = s2.begin(PROMPTS[1], &params).unwrap();
    let (mut o1, mut o2) = (vec![], vec![]);
    loop {
        let a = t1.next_token().unwrap();
        let b = t2.next_token().unwrap();
        if let Some(a) = &a {
            o1.push(a.id);
        }
        if let Some(b) = &b {
            o2.push(b.id);
        }
        if a.is_none() && b.is_none() {
            break;
        }
    }
    assert_eq!(o1, alone[0]);
    assert_eq!(o2, alone[1]);
}

#[test]
fn generate_cli_answers_paris() {
    real_model_path();
    let out = std::process::Command::new(bin())
        .args([
            "generate",
            "--prompt",
            "What is the capital of France?",
            "--max-tokens",
            "24",
            "--temperature",
            "0",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Paris"), "answer was: {text}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("[base | weights]"),
        "the blend is shown"
    );
}

#[test]
fn tokenizer_matches_smollm2_conventions() {
    let model = real_model(WeightFormat::Stored);
    let t = &model.tokenizer;
    // ChatML specials are single tokens with the ids llama.cpp reports.
    assert_eq!(t.encode("<|im_start|>").unwrap(), vec![1]);
    assert_eq!(t.encode("<|im_end|>").unwrap(), vec![2]);
    assert_eq!(t.eos_id, 2);
    // Digits are split one per token; no prefix space is added.
    let ids = t.encode("12345").unwrap();
    assert_eq!(ids.len(), 5);
    let toks: Vec<String> = t
        .encode("Hello world")
        .unwrap()
        .iter()
        .map(|&i| t.id_to_token(i).unwrap())
        .collect();
    assert_eq!(toks, vec!["Hello", "Ġworld"]);
    for s in [
        "naïve café, 3.14 — ok?\n\tdone",
        "<|im_start|>user\nhi<|im_end|>\n",
    ] {
        assert_eq!(t.decode(&t.encode(s).unwrap(), true).unwrap(), s);
    }
}

#[test]
fn pooled_hidden_is_the_mean_of_the_last_residual_stream() {
    // Independent check of Logits::Layer(n_layer): RMS-normalising its states by hand must give
    // the final-norm Hidden states up to one per-channel weight, the same at every position.
    use stancemix::model::features::pooled_hidden_ids;
    let model = real_model(WeightFormat::Q8_0);
    let ids = model
        .tokenizer
        .encode("Taxes, tariffs and the price of bread")
        .unwrap();
    let (n, hd, t) = (model.config.n_layer, model.config.hidden, ids.len());
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let run = |logits| forward_flat(&model, &x, None, &NoHook, logits);
    let (raw, normed) = (run(Logits::Layer(n)), run(Logits::Hidden));
    let mut weight: Vec<f32> = Vec::new();
    for p in 0..t {
        let row = &raw[p * hd..(p + 1) * hd];
        let rms = (row.iter().map(|v| v * v).sum::<f32>() / hd as f32 + 1e-5).sqrt();
        let w: Vec<f32> = (0..hd)
            .map(|c| normed[p * hd + c] / (row[c] / rms))
            .collect();
        if weight.is_empty() {
            weight = w;
        } else {
            let close = w
                .iter()
                .zip(&weight)
                .filter(|(a, b)| (*a - *b).abs() <= 1e-2 * b.abs().max(1e-3))
                .count();
            assert!(
                close as f32 >= 0.99 * hd as f32,
                "position {p}: {close}/{hd} channels agree"
            );
        }
    }
    let mean: Vec<f32> = (0..hd)
        .map(|c| (0..t).map(|p| raw[p * hd + c]).sum::<f32>() / t as f32)
        .collect();
    assert!(max_abs_diff(&mean, &pooled_hidden_ids(&model, &ids, n).unwrap()) < 1e-4);
    assert!(pooled_hidden_ids(&model, &ids, n + 1).is_err());
    assert!(pooled_hidden_ids(&model, &[], 3).is_err());
    assert!(max_abs_diff(&pooled_hidden_ids(&model, &ids, 3).unwrap(), &mean) > 1e-2);
}

#[test]
fn mixed_format_uses_f32_for_wide_passes_and_the_stored_blocks_for_decoding() {
    // `mixed` must give exactly the f32 model's hidden states for a pass of WIDE_ROWS tokens or
    // more (on this Q4_1 file; K-quant block types take int8 rows, checked on tiny models in
    // tests/families.rs), and exactly the `stored` model's logits (the file's Q4_1 blocks, our
    // kernel) for a decode step on the same cache.
    use stancemix::model::{Model, WIDE_ROWS};
    let (mixed, f32m, stored) = (
        real_model(WeightFormat::Mixed),
        real_model(WeightFormat::F32),
        real_model(WeightFormat::Stored),
    );
    let text = "People have baked flat loaves from ground grain for thousands of years. ".repeat(6);
    let ids = mixed.tokenizer.encode(&text).unwrap();
    assert!(ids.len() > WIDE_ROWS);
    let feed = |m: &Model, ids: &[u32], cache: &mut KvCache, logits| -> Vec<f32> {
        let pass = Pass {
            hook: &NoHook,
            logits,
            differentiable: false,
        };
        let x = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let z = m.forward(&x, Some(cache), &pass).unwrap();
        z.flatten_all().unwrap().to_vec1().unwrap()
    };
    let (prompt, next) = (&ids[..WIDE_ROWS], &ids[WIDE_ROWS..WIDE_ROWS + 1]);
    let n = mixed.config.n_layer;
    let (mut cm, mut cf, mut cq) = (KvCache::new(n), KvCache::new(n), KvCache::new(n));
    let hm = feed(&mixed, prompt, &mut cm, Logits::Hidden);
    let hf = feed(&f32m, prompt, &mut cf, Logits::Hidden);
    let hq = feed(&stored, prompt, &mut cq, Logits::Hidden);
    assert_eq!(max_abs_diff(&hm, &hf), 0.0, "wide pass: mixed vs f32");
    assert!(
        max_abs_diff(&hm, &hq) > 1e-3,
        "f32 and quantized weights should differ a little"
    );
    // One token on top of the f32-built cache: mixed must match the stored blocks on that cache.
    let dm = feed(&mixed, next, &mut cm, Logits::Last);
    let dq = feed(&stored, next, &mut cf, Logits::Last);
    assert_eq!(max_abs_diff(&dm, &dq), 0.0, "decode step: mixed vs stored");
}

/// Every fetched Qwen2 base against an independent exact computation: candle-transformers'
/// plain f32 `qwen2` over the file's weights dequantized. Our forward pass in the format we
/// serve (int8 products over the file's blocks) stays within the rounding of its activations:
/// 0.049 nats mean |difference| measured on Qwen2.5-Coder-1.5B, 0.042 on -0.5B; a wrong forward
/// pass is off by nats. Bases not fetched are skipped with a message (CI fetches only SmolLM2);
/// the 1.5B needs ~7 GB of memory for the reference.
#[test]
fn fetched_qwen2_bases_match_an_exact_f32_reference() {
    use common::reference::{mad, qwen2_f32_logprobs, PARITY_TEXT};
    use stancemix::model::{fetch, LoadOptions, Model, WeightFormat};
    let mut checked = 0;
    for base in fetch::BASES.iter().filter(|b| b.arch == "qwen2") {
        if !base.is_fetched(&common::paths()) {
            eprintln!(
                "skipped {}: not fetched (stancemix fetch-model {})",
                base.id, base.id
            );
            continue;
        }
        let path = base.path(&common::paths());
        // Both copies the runtime multiplies by: the stored blocks, and the int8 rows format
        // `mixed` runs this base on where the CPU has AVX-512 VNNI. The int8 rows round each weight row with one scale
        // (0.081 nats measured on the 1.5B), so their bound is llama.cpp's own distance from
        // the exact computation on that base (0.130, docs/EVAL.md) less a margin.
        let mut ours = Vec::new();
        let mut ids = Vec::new();
        for (format, bound) in [(WeightFormat::Stored, 0.08), (WeightFormat::Int8, 0.10)] {
            let m = Model::load(&path, &LoadOptions { format }).unwrap();
            ids = m.tokenizer.encode(PARITY_TEXT).unwrap()[..64].to_vec();
            ours.push((format, bound, common::reference::model_logprobs(&m, &ids)));
        }
        let exact = qwen2_f32_logprobs(&path, &ids).unwrap();
        for (format, bound, ours) in &ours {
            let d = mad(ours, &exact);
            eprintln!(
                "{} ({}): {d:.4} nats from the exact f32 reference",
                base.id,
                format.name()
            );
            assert!(
                d < *bound,
                "{} ({}): {d} nats from the exact f32 reference",
                base.id,
                format.name()
            );
        }
        checked += 1;
    }
    eprintln!("{checked} Qwen2 bases checked");
}

/// Each copy the runtime multiplies by, on the default base, against our f32 pass over the
/// file's weights dequantized (itself checked against candle's f32 path in
/// `decode_steps_match_full_recompute_in_f32`): next-token log-probabilities of the 64-token
/// parity text, mean |difference| in nats.
#[test]
fn default_base_copies_stay_near_the_f32_pass() {
    use common::reference::{mad, PARITY_TEXT};
    let f32m = real_model(WeightFormat::F32);
    let ids = f32m.tokenizer.encode(PARITY_TEXT).unwrap()[..64].to_vec();
    let exact = common::reference::model_logprobs(&f32m, &ids);
    drop(f32m);
    // Measured: stored 0.064, int8 rows 0.120 (format `int8`, the training base; `mixed` keeps
    // f32 prompts on this Q4_1 file for that reason).
    for (format, bound) in [(WeightFormat::Stored, 0.10), (WeightFormat::Int8, 0.15)] {
        let m = real_model(format);
        let d = mad(&common::reference::model_logprobs(&m, &ids), &exact);
        eprintln!("SmolLM2 ({}): {d:.4} nats from the f32 pass", format.name());
        assert!(
            d < bound,
            "SmolLM2 ({}): {d} nats from the f32 pass",
            format.name()
        );
    }
}

/// Every fetched base whose blocks format `mixed` runs as int8 rows (the K-quant files): the
/// stored blocks and the rows against our f32 pass over the same values, on the 64-token parity
/// text. Measured (nats): Qwen-0.5B 0.042 / 0.059, Qwen-1.5B 0.049 / 0.081, Gemma 270M 0.142 /
/// 0.182; the rows may add at most 70% to the blocks' error (SmolLM2's Q4_1 would add 88%, which
/// is why `mixed` keeps f32 there). Bases not fetched are skipped with a message.
#[test]
fn fetched_k_quant_bases_int8_rows_stay_near_the_f32_pass() {
    use common::reference::{mad, PARITY_TEXT};
    use stancemix::model::{fetch, LoadOptions, Model};
    for base in fetch::BASES.iter().filter(|b| b.arch != "llama") {
        if !base.is_fetched(&common::paths()) {
            eprintln!("skipped {}: not fetched", base.id);
            continue;
        }
        let path = base.path(&common::paths());
        let load = |format| Model::load(&path, &LoadOptions { format }).unwrap();
        let f32m = load(WeightFormat::F32);
        let ids = f32m.tokenizer.encode(PARITY_TEXT).unwrap()[..64].to_vec();
        let exact = common::reference::model_logprobs(&f32m, &ids);
        drop(f32m);
        let d = [WeightFormat::Stored, WeightFormat::Mixed].map(|format| {
            let d = mad(
                &common::reference::model_logprobs(&load(format), &ids),
                &exact,
            );
            eprintln!(
                "{} ({}): {d:.4} nats from the f32 pass",
                base.id,
                format.name()
            );
            d
        });
        assert!(
            d[0] < 0.2,
            "{}: stored blocks {} nats from the f32 pass",
            base.id,
            d[0]
        );
        assert!(
            d[1] < 1.7 * d[0],
            "{}: int8 rows {} nats from the f32 pass, the stored blocks {}",
            base.id,
            d[1],
            d[0]
        );
    }
}
