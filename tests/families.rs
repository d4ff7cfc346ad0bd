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
fn qwen2_differentiable_pass_matches_fused_pass() {
    let (_d, m) = tiny_of(Arch::Qwen2, 13, WeightFormat::F32);
    let ids = m.tokenizer.encode("gradients flow through halves").unwrap();
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
    assert!(d < 1e-4, "{d}");
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
        tiny::write_gguf(&p, &md, &tensors).unwrap();
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
