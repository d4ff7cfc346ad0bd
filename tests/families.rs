//! Every supported family on its tiny random model: the forward pass against an independent
//! implementation (candle-transformers' own model of that family), decoding with a cache, the
//! gradient path, and the chat template.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use stancemix::model::{
    tiny, Arch, KvCache, LoadOptions, Logits, Message, Model, NoHook, Pass, WeightFormat,
};

fn tiny_of(
    family: Arch,
    seed: u64,
    format: WeightFormat,
) -> (tempfile::TempDir, std::sync::Arc<Model>) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    tiny::write_tiny_gguf_of(&p, seed, family).unwrap();
    let m = Model::load(&p, &LoadOptions { format }).unwrap();
    (dir, m)
}

fn pass(logits: Logits, differentiable: bool) -> Pass<'static> {
    Pass {
        hook: &NoHook,
        logits,
        differentiable,
    }
}

/// Last-position logits of one row, as a vector.
fn last_logits(m: &Model, ids: &[u32]) -> Vec<f32> {
    m.forward(&row(ids), None, &pass(Logits::Last, false))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn row(ids: &[u32]) -> Tensor {
    Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn qwen2_logits_match_candle_quantized_qwen2_prompt_and_decode() {
    use candle_transformers::models::quantized_qwen2::ModelWeights;
    let (dir, m) = tiny_of(Arch::Qwen2, 11, WeightFormat::F32);
    assert_eq!(m.config.family, Arch::Qwen2);
    let path = dir.path().join("tiny.gguf");
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    let mut reference = ModelWeights::from_gguf(ct, &mut f, &Device::Cpu).unwrap();
    let ids = m
        .tokenizer
        .encode("<|im_start|>user\nbiases and halves<|im_end|>\n")
        .unwrap();
    // The prompt in one pass, then four decode steps, each against the reference's.
    let split = ids.len() - 4;
    let mut cache = KvCache::new(m.config.n_layer);
    let mut got = vec![m
        .forward(
            &row(&ids[..split]),
            Some(&mut cache),
            &pass(Logits::Last, false),
        )
        .unwrap()];
    let mut want = vec![reference.forward(&row(&ids[..split]), 0).unwrap()];
    for (i, &id) in ids.iter().enumerate().skip(split) {
        got.push(
            m.forward(&row(&[id]), Some(&mut cache), &pass(Logits::Last, false))
                .unwrap(),
        );
        want.push(reference.forward(&row(&[id]), i).unwrap());
    }
    for (step, (g, w)) in got.iter().zip(&want).enumerate() {
        let (g, w): (Vec<f32>, Vec<f32>) = (
            g.flatten_all().unwrap().to_vec1().unwrap(),
            w.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let d = max_abs_diff(&g, &w);
        assert!(d < 1e-3, "step {step}: max |diff| {d}");
    }
}

#[test]
fn qwen2_biases_and_rope_style_change_the_output() {
    // The same weights read as a LLaMA (no biases, interleaved pairs) must differ: the check
    // above would pass trivially if the family were ignored.
    let (_d1, q) = tiny_of(Arch::Qwen2, 12, WeightFormat::F32);
    let (_d2, l) = tiny_of(Arch::Llama, 12, WeightFormat::F32);
    let ids = q.tokenizer.encode("same ids").unwrap();
    let a = last_logits(&q, &ids);
    let b = last_logits(&l, &ids);
    assert!(max_abs_diff(&a, &b) > 0.1);
}

#[test]
fn differentiable_pass_matches_fused_pass_in_every_family() {
    // The training path (plain ops that carry gradients: RoPE over halves, GELU, the q/k and
    // sandwich norms) against the fused kernels of inference.
    for (family, seed) in [(Arch::Llama, 14), (Arch::Qwen2, 13), (Arch::Gemma3, 23)] {
        let (_d, m) = tiny_of(family, seed, WeightFormat::F32);
        let ids = m.tokenizer.encode("gradients flow through").unwrap();
        let fused = m
            .forward(&row(&ids), None, &pass(Logits::All, false))
            .unwrap();
        let plain = m
            .forward(&row(&ids), None, &pass(Logits::All, true))
            .unwrap();
        let d = max_abs_diff(
            &fused.flatten_all().unwrap().to_vec1().unwrap(),
            &plain.flatten_all().unwrap().to_vec1().unwrap(),
        );
        assert!(d < 1e-4, "{family:?}: {d}");
    }
}

#[test]
fn quantized_block_types_run_on_the_int8_kernels_within_rounding() {
    // Q5_0 / Q4_K / Q6_K files are requantized to int8 blocks in format `stored`: the logits
    // stay within int8 rounding of the f32 pass over the same (dequantized) values.
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    // Rows of 256 and 512 so the K-quants (256-value super-blocks) fit every linear.
    let c = stancemix::model::Config {
        hidden: 256,
        ffn: 512,
        head_dim: 64,
        rope_dim: 64,
        ..tiny::tiny_config_of(Arch::Qwen2)
    };
    for dtype in [GgmlDType::Q5_0, GgmlDType::Q4K, GgmlDType::Q6K] {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("f32.gguf");
        tiny::write_random_gguf(&src, 14, &c).unwrap();
        let mut f = std::fs::File::open(&src).unwrap();
        let ct = gguf_file::Content::read(&mut f).unwrap();
        let md: Vec<(&str, gguf_file::Value)> = ct
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let mut tensors = Vec::new();
        for name in ct.tensor_infos.keys() {
            let t = ct.tensor(&mut f, name, &Device::Cpu).unwrap();
            let q =
                if name.starts_with("blk.") && name.ends_with(".weight") && t.shape().rank() == 2 {
                    QTensor::quantize(&t.dequantize(&Device::Cpu).unwrap(), dtype).unwrap()
                } else {
                    t
                };
            tensors.push((name.clone(), q));
        }
        let p = dir.path().join("q.gguf");
        stancemix::model::write_gguf(&p, &md, &tensors).unwrap();
        let stored = Model::load(
            &p,
            &LoadOptions {
                format: WeightFormat::Stored,
            },
        )
        .unwrap();
        let dense = Model::load(
            &p,
            &LoadOptions {
                format: WeightFormat::F32,
            },
        )
        .unwrap();
        let ids = stored.tokenizer.encode("quantized rows").unwrap();
        let a = last_logits(&stored, &ids);
        let b = last_logits(&dense, &ids);
        let d = max_abs_diff(&a, &b);
        let scale = b.iter().map(|x| x.abs()).fold(0.0, f32::max);
        assert!(
            d > 0.0 && d < 0.05 * scale,
            "{dtype:?}: max |diff| {d} of logits up to {scale}"
        );
        // The weights the model holds are the file's values rounded once more to int8 blocks.
        let w = stored
            .base_weight(0, stancemix::model::Target::Down)
            .unwrap();
        let want = dense
            .base_weight(0, stancemix::model::Target::Down)
            .unwrap();
        let (w, want): (Vec<f32>, Vec<f32>) = (
            w.flatten_all().unwrap().to_vec1().unwrap(),
            want.flatten_all().unwrap().to_vec1().unwrap(),
        );
        let wmax = want.iter().map(|x| x.abs()).fold(0.0, f32::max);
        let dw = max_abs_diff(&w, &want);
        assert!(
            dw > 0.0 && dw <= wmax / 127.0,
            "{dtype:?}: weight rounding {dw} (max |w| {wmax})"
        );
        // Format `mixed` on requantized blocks: every pass on the int8 rows of format `int8`
        // where the CPU has AVX-512 VNNI; without it, prompts of WIDE_ROWS tokens or more on f32
        // and shorter passes on the stored blocks.
        let load = |format| Model::load(&p, &LoadOptions { format }).unwrap();
        let mixed = load(WeightFormat::Mixed);
        let wide = load(if stancemix::model::kernels::has_vnni() {
            WeightFormat::Int8
        } else {
            WeightFormat::F32
        });
        let long = stored
            .tokenizer
            .encode(&"quantized rows ".repeat(20))
            .unwrap();
        assert!(long.len() >= stancemix::model::WIDE_ROWS);
        // (Hidden states: this file's head is f32, which `mixed` keeps dense and `int8` rounds.)
        let hidden = |m: &Model, ids: &[u32]| -> Vec<f32> {
            m.forward(&row(ids), None, &pass(Logits::Hidden, false))
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let h = hidden(&mixed, &long);
        assert_eq!(h, hidden(&wide, &long), "{dtype:?}: prompt");
        assert_ne!(
            h,
            hidden(&stored, &long),
            "{dtype:?}: the prompt took the wide copy"
        );
        let narrow = if stancemix::model::kernels::has_vnni() {
            &wide
        } else {
            &stored
        };
        assert_eq!(
            hidden(&mixed, &ids),
            hidden(narrow, &ids),
            "{dtype:?}: short pass"
        );
    }
}

#[test]
fn qwen2_chat_template_from_the_file_renders_as_transformers_does() {
    // Qwen2.5's template (abridged to the branch without tools), as stored in its GGUF:
    // transformers renders it with trim_blocks and lstrip_blocks and inserts the default system
    // message when the conversation has none.
    let template = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;
    let t =
        stancemix::model::chat::ChatTemplate::new(Some(template), true, "", "<|im_end|>").unwrap();
    let user = |c: &str| Message {
        role: "user".into(),
        content: c.into(),
    };
    assert_eq!(
        t.render(&[user("Hi")], true).unwrap(),
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    );
    let sys = Message {
        role: "system".into(),
        content: "Be brief.".into(),
    };
    assert_eq!(
        t.render(&[sys, user("Hi")], false).unwrap(),
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    );
    // The system prompt the template inserts by default (the eval's "with system" variants).
    assert_eq!(
        t.default_system().as_deref(),
        Some("You are Qwen, created by Alibaba Cloud. You are a helpful assistant.")
    );
    assert_eq!(
        stancemix::model::chat::ChatTemplate::chatml().default_system(),
        None
    );
    // A template error names the template.
    let bad = stancemix::model::chat::ChatTemplate::new(Some("{% if %}"), true, "", "");
    assert!(bad.unwrap_err().to_string().contains("chat template"));
}

/// Gemma 3 written out in plain f64 loops from the GGUF tensors, as llama.cpp's graph reads
/// (independent of the tensor code under test): last-position logits of `ids`, a query seeing
/// keys less than `window` positions back in the sliding layers.
fn reference_gemma3(
    path: &std::path::Path,
    c: &stancemix::model::Config,
    ids: &[u32],
    window: usize,
) -> Vec<f32> {
    use candle_core::quantized::gguf_file::Content;
    let mut f = std::fs::File::open(path).unwrap();
    let ct = Content::read(&mut f).unwrap();
    let mut get = |name: &str| -> Vec<f64> {
        let t = ct
            .tensor(&mut f, name, &Device::Cpu)
            .unwrap()
            .dequantize(&Device::Cpu)
            .unwrap();
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| x as f64)
            .collect()
    };
    // `w` (out, in) row-major times `x` (in).
    let matvec = |w: &[f64], x: &[f64]| -> Vec<f64> {
        w.chunks(x.len())
            .map(|r| r.iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    };
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
        let s = 1.0 / (ms + c.rms_eps).sqrt();
        x.iter().zip(w).map(|(v, g)| v * s * g).collect()
    };
    let gelu = |x: f64| {
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh())
    };
    let (hd, nh, nkv, t) = (c.head_dim, c.n_head, c.n_kv_head, ids.len());
    let rope = |v: &mut [f64], pos: usize, base: f64| {
        for i in 0..hd / 2 {
            let a = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
            let (x0, x1) = (v[i], v[i + hd / 2]);
            v[i] = x0 * a.cos() - x1 * a.sin();
            v[i + hd / 2] = x0 * a.sin() + x1 * a.cos();
        }
    };
    let embed = get("token_embd.weight");
    let mut xs: Vec<Vec<f64>> = ids
        .iter()
        .map(|&id| {
            embed[id as usize * c.hidden..][..c.hidden]
                .iter()
                .map(|v| v * (c.hidden as f64).sqrt())
                .collect()
        })
        .collect();
    let s = c.sliding.unwrap();
    for l in 0..c.n_layer {
        let w = |name: &str| format!("blk.{l}.{name}.weight");
        let (wq, wk, wv, wo) = (
            get(&w("attn_q")),
            get(&w("attn_k")),
            get(&w("attn_v")),
            get(&w("attn_output")),
        );
        let (qn, kn) = (get(&w("attn_q_norm")), get(&w("attn_k_norm")));
        let (an, pan, fnn, pfn) = (
            get(&w("attn_norm")),
            get(&w("post_attention_norm")),
            get(&w("ffn_norm")),
            get(&w("post_ffw_norm")),
        );
        let (wg, wu, wd) = (get(&w("ffn_gate")), get(&w("ffn_up")), get(&w("ffn_down")));
        let sliding = (l + 1) % s.pattern != 0;
        let (base, win) = if sliding {
            (s.rope_base as f64, window)
        } else {
            (c.rope_base as f64, usize::MAX)
        };
        // Per position: q (nh heads), k and v (nkv heads), normed and rotated.
        let mut q = vec![];
        let mut k = vec![];
        let mut v = vec![];
        for (p, x) in xs.iter().enumerate() {
            let h = rms(x, &an);
            let heads = |wm: &[f64], n: usize, norm: Option<&[f64]>| -> Vec<Vec<f64>> {
                let y = matvec(wm, &h);
                (0..n)
                    .map(|i| {
                        let mut hv = y[i * hd..(i + 1) * hd].to_vec();
                        if let Some(g) = norm {
                            hv = rms(&hv, g);
                            rope(&mut hv, p, base);
                        }
                        hv
                    })
                    .collect()
            };
            q.push(heads(&wq, nh, Some(&qn)));
            k.push(heads(&wk, nkv, Some(&kn)));
            v.push(heads(&wv, nkv, None));
        }
        for i in 0..t {
            let mut att = vec![0.0; nh * hd];
            for head in 0..nh {
                let kvh = head / (nh / nkv);
                let keys: Vec<usize> = (0..=i).filter(|&j| i - j < win).collect();
                let sc: Vec<f64> = keys
                    .iter()
                    .map(|&j| {
                        q[i][head]
                            .iter()
                            .zip(&k[j][kvh])
                            .map(|(a, b)| a * b)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let mx = sc.iter().cloned().fold(f64::MIN, f64::max);
                let z: f64 = sc.iter().map(|s| (s - mx).exp()).sum();
                for (n, &j) in keys.iter().enumerate() {
                    let pr = (sc[n] - mx).exp() / z;
                    for d in 0..hd {
                        att[head * hd + d] += pr * v[j][kvh][d];
                    }
                }
            }
            let a = rms(&matvec(&wo, &att), &pan);
            let x: Vec<f64> = xs[i].iter().zip(&a).map(|(x, a)| x + a).collect();
            let h = rms(&x, &fnn);
            let (g, u) = (matvec(&wg, &h), matvec(&wu, &h));
            let m: Vec<f64> = g.iter().zip(&u).map(|(g, u)| gelu(*g) * u).collect();
            let m = rms(&matvec(&wd, &m), &pfn);
            // (later positions read this layer's k/v, computed above from the old x)
            xs[i] = x.iter().zip(&m).map(|(x, m)| x + m).collect();
        }
    }
    let h = rms(&xs[t - 1], &get("output_norm.weight"));
    matvec(&embed, &h).iter().map(|&v| v as f32).collect()
}

#[test]
fn gemma3_logits_match_a_plain_reference_prompt_and_decode() {
    // (candle-transformers' own Gemma 3 models cannot serve here: `quantized_gemma3` uses SiLU
    // where Gemma uses GELU, and `gemma3` fails on CPU appending a strided value tensor to its
    // cache.)
    let (dir, m) = tiny_of(Arch::Gemma3, 21, WeightFormat::F32);
    assert_eq!((m.config.family, m.config.head_dim), (Arch::Gemma3, 32));
    assert!(m.config.is_sliding(0) && !m.config.is_sliding(5));
    let path = dir.path().join("tiny.gguf");
    let ids = m
        .tokenizer
        .encode("<|im_start|>user\nsandwich norms<|im_end|>\n")
        .unwrap();
    // The prompt in one pass, then four decode steps, each against the reference.
    let split = ids.len() - 4;
    let mut cache = KvCache::new(m.config.n_layer);
    let mut got = vec![last_logits_cached(&m, &ids[..split], &mut cache)];
    for &id in &ids[split..] {
        got.push(last_logits_cached(&m, &[id], &mut cache));
    }
    for (step, g) in got.iter().enumerate() {
        let want = reference_gemma3(&path, &m.config, &ids[..split + step], 512);
        let d = max_abs_diff(g, &want);
        assert!(d < 1e-3, "step {step}: max |diff| {d}");
    }
}

fn last_logits_cached(m: &Model, ids: &[u32], cache: &mut KvCache) -> Vec<f32> {
    m.forward(&row(ids), Some(cache), &pass(Logits::Last, false))
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn gemma3_sliding_window_acts_in_prompts_and_in_decoding() {
    // A window of 4 over 12 tokens: the prompt pass must agree with the reference, differ from
    // it without the window, and decoding token by token with the cache must give the prompt
    // pass's logits at every position (the cache is narrowed to the window).
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tiny.gguf");
    let mut c = tiny::tiny_config_of(Arch::Gemma3);
    c.sliding.as_mut().unwrap().window = 4;
    tiny::write_random_gguf(&p, 22, &c).unwrap();
    let m = Model::load(
        &p,
        &LoadOptions {
            format: WeightFormat::F32,
        },
    )
    .unwrap();
    assert_eq!(m.config.sliding.unwrap().window, 4);
    let ids = m.tokenizer.encode("twelve bytes").unwrap();
    assert_eq!(ids.len(), 12);
    let ours = last_logits(&m, &ids);
    let want = reference_gemma3(&p, &m.config, &ids, 4);
    assert!(
        max_abs_diff(&ours, &want) < 1e-3,
        "{}",
        max_abs_diff(&ours, &want)
    );
    let unwindowed = reference_gemma3(&p, &m.config, &ids, 512);
    assert!(
        max_abs_diff(&ours, &unwindowed) > 1e-2,
        "the window changes nothing"
    );
    let all: Vec<Vec<f32>> = m
        .forward(&row(&ids), None, &pass(Logits::All, false))
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut cache = KvCache::new(m.config.n_layer);
    for (i, &id) in ids.iter().enumerate() {
        let step = last_logits_cached(&m, &[id], &mut cache);
        let d = max_abs_diff(&step, &all[i]);
        assert!(
            d < 1e-3,
            "position {i}: decode differs from the prompt pass by {d}"
        );
    }
}

/// SentencePiece as llama.cpp's `llm_tokenizer_spm` does it, written plainly: start from the
/// characters, merge the adjacent pair whose joined piece is a normal token with the highest
/// score (the leftmost on a tie) until none is, then bytes for pieces outside the vocabulary.
fn reference_spm(text: &str, vocab: &[(String, f32, i32)]) -> Vec<u32> {
    let id = |s: &str| vocab.iter().position(|(p, _, t)| p == s && *t == 1);
    let text = text.replace(' ', "\u{2581}");
    let mut syms: Vec<String> = text.chars().map(|c| c.to_string()).collect();
    loop {
        let mut best: Option<(usize, f32)> = None;
        for i in 0..syms.len().saturating_sub(1) {
            if let Some(j) = id(&format!("{}{}", syms[i], syms[i + 1])) {
                if best.is_none_or(|(_, s)| vocab[j].1 > s) {
                    best = Some((i, vocab[j].1));
                }
            }
        }
        let Some((i, _)) = best else { break };
        let right = syms.remove(i + 1);
        syms[i].push_str(&right);
    }
    syms.iter()
        .flat_map(|s| match id(s) {
            Some(j) => vec![j as u32],
            None => s
                .bytes()
                .map(|b| {
                    vocab
                        .iter()
                        .position(|(p, _, _)| *p == format!("<0x{b:02X}>"))
                        .unwrap() as u32
                })
                .collect(),
        })
        .collect()
}

#[test]
fn sentencepiece_tokenizer_merges_by_score_as_llama_cpp() {
    use candle_core::quantized::gguf_file::{Content, Value};
    use rand::{Rng, SeedableRng};
    // Control tokens, the 256 byte tokens, then pieces whose scores do not follow their length
    // (so merge order matters): "▁ab" outranks "ab", "bc" outranks "ab"...
    let mut vocab: Vec<(String, f32, i32)> = vec![
        ("<unk>".into(), 0.0, 2),
        ("<bos>".into(), 0.0, 3),
        ("<eos>".into(), 0.0, 3),
    ];
    vocab.extend((0..=255u8).map(|b| (format!("<0x{b:02X}>"), 0.0, 6)));
    for (p, s) in [
        ("\u{2581}", -1.0),
        ("a", -2.0),
        ("b", -3.0),
        ("c", -4.0),
        ("bc", -5.0),
        ("ab", -6.0),
        ("\u{2581}a", -7.0),
        ("\u{2581}ab", -5.5),
        ("abc", -8.0),
        ("ca", -4.5),
        ("cab", -9.0),
        ("\u{2581}c", -10.0),
        ("bca", -3.5),
        ("é", -11.0),
        ("aé", -12.0),
    ] {
        vocab.push((p.into(), s, 1));
    }
    let md: Vec<(&str, Value)> = vec![
        ("tokenizer.ggml.model", Value::String("llama".into())),
        (
            "tokenizer.ggml.tokens",
            Value::Array(vocab.iter().map(|v| Value::String(v.0.clone())).collect()),
        ),
        (
            "tokenizer.ggml.scores",
            Value::Array(vocab.iter().map(|v| Value::F32(v.1)).collect()),
        ),
        (
            "tokenizer.ggml.token_type",
            Value::Array(vocab.iter().map(|v| Value::I32(v.2)).collect()),
        ),
        ("tokenizer.ggml.eos_token_id", Value::U32(2)),
        ("tokenizer.ggml.bos_token_id", Value::U32(1)),
        ("tokenizer.ggml.add_space_prefix", Value::Bool(false)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("spm.gguf");
    stancemix::model::write_gguf(&p, &md, &[]).unwrap();
    let content = Content::read(&mut std::fs::File::open(&p).unwrap()).unwrap();
    let tok = stancemix::model::Tokenizer::from_gguf(&content, &p).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let alphabet = ['a', 'b', 'c', ' ', 'é', 'x', '✓'];
    for _ in 0..300 {
        let n = rng.random_range(1..14);
        let text: String = (0..n)
            .map(|_| alphabet[rng.random_range(0..alphabet.len())])
            .collect();
        let want = reference_spm(&text, &vocab);
        assert_eq!(tok.encode(&text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), text, "decoding {want:?}");
    }
    // Control tokens written literally are split out whole.
    assert_eq!(
        tok.encode("<bos>ab").unwrap(),
        vec![1, reference_spm("ab", &vocab)[0]]
    );
}
