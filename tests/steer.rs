//! Steering-vector experts on the tiny model: directions from forward passes, the control-vector
//! file, and the residual-stream addition, each against a direct computation.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use stancemix::lora::steer::{self, Contrast};
use stancemix::lora::{Adapter, ExpertSet};
use stancemix::model::{Logits, Model, NoHook, Pass};
use std::collections::BTreeMap;

fn residual(m: &Model, ids: &[u32], blocks: usize) -> Tensor {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    m.forward(
        &x,
        None,
        &Pass {
            hook: &NoHook,
            logits: Logits::Layer(blocks),
            differentiable: false,
        },
    )
    .unwrap()
    .i(0)
    .unwrap() // (t, hidden)
}

#[test]
fn directions_are_the_mean_difference_of_answer_residuals() {
    let m = tiny_model(21);
    let examples = [
        Contrast {
            prompt: "<|im_start|>user\nq one<|im_end|>\n<|im_start|>assistant\n".into(),
            toward: "yes, because",
            away: "no, since it",
        },
        Contrast {
            prompt: "<|im_start|>user\nsecond<|im_end|>\n<|im_start|>assistant\n".into(),
            toward: "agree",
            away: "disagree strongly",
        },
    ];
    let got = steer::compute(&m, &examples, &mut |_, _| true).unwrap();
    assert_eq!(got.len(), m.config.n_layer);
    for (layer, v) in &got {
        // Direct: residual after block `layer` from a truncated pass, mean over answer tokens.
        let mut want = vec![0f32; m.config.hidden];
        for ex in &examples {
            let p = m.tokenizer.encode(&ex.prompt).unwrap();
            for (answer, sign) in [(ex.toward, 1.0), (ex.away, -1.0)] {
                let ids = [p.clone(), m.tokenizer.encode(answer).unwrap()].concat();
                let h = residual(&m, &ids, layer + 1);
                let t = ids.len() - p.len();
                let mean: Vec<f32> = h
                    .narrow(0, p.len(), t)
                    .unwrap()
                    .mean(0)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (w, x) in want.iter_mut().zip(mean) {
                    *w += sign * x / examples.len() as f32;
                }
            }
        }
        let d = max_abs_diff(v, &want);
        assert!(d < 1e-4, "block {layer}: {d}");
    }
}

#[test]
fn control_vector_round_trips_in_llama_cpp_layout_and_adds_g_times_v_after_its_block() {
    let m = tiny_model(22);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("progressive.gguf");
    let v: Vec<f32> = (0..m.config.hidden)
        .map(|i| (i as f32 * 0.37).sin())
        .collect();
    let dirs = BTreeMap::from([(1usize, v.clone())]);
    steer::save(&path, &dirs, &m.config, "progressive").unwrap();
    // llama.cpp's layout: general.architecture, a model hint, direction.N tensors.
    let mut f = std::fs::File::open(&path).unwrap();
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
    assert_eq!(
        ct.metadata["general.architecture"].to_string().unwrap(),
        "controlvector"
    );
    assert_eq!(
        ct.metadata["controlvector.model_hint"].to_string().unwrap(),
        "llama"
    );
    assert_eq!(
        ct.tensor_infos.keys().collect::<Vec<_>>(),
        vec!["direction.1"]
    );

    let ad = Adapter::load(&path, &m.config).unwrap();
    assert_eq!(ad.name(), "progressive");
    assert_eq!(
        max_abs_diff(&ad.steer[&1].to_vec1::<f32>().unwrap(), &v),
        0.0
    );
    let set = ExpertSet::new(vec![ad]).unwrap();
    let ids = m.tokenizer.encode("steer me").unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let g = 0.6f32;
    let rows = vec![vec![g]];
    let hook = set.hook(&rows).unwrap();
    let steered = m
        .forward(
            &x,
            None,
            &Pass {
                hook: &hook,
                logits: Logits::Layer(2),
                differentiable: false,
            },
        )
        .unwrap()
        .i(0)
        .unwrap();
    let base = residual(&m, &ids, 2);
    for t in 0..ids.len() {
        let diff: Vec<f32> = (steered.i(t).unwrap() - base.i(t).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        let want: Vec<f32> = v.iter().map(|x| g * x).collect();
        assert!(max_abs_diff(&diff, &want) < 1e-5, "token {t}");
    }
    // Before the steered block's output nothing changes.
    let before = m
        .forward(
            &x,
            None,
            &Pass {
                hook: &hook,
                logits: Logits::Layer(1),
                differentiable: false,
            },
        )
        .unwrap()
        .i(0)
        .unwrap();
    let d = max_abs_diff(
        &before.flatten_all().unwrap().to_vec1().unwrap(),
        &residual(&m, &ids, 1)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
    );
    assert_eq!(d, 0.0);
}

#[test]
fn control_vector_for_another_base_or_out_of_range_block_is_a_clear_error() {
    let m = tiny_model(23);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let dirs = BTreeMap::from([(m.config.n_layer, vec![0.0; m.config.hidden])]);
    steer::save(&path, &dirs, &m.config, "progressive").unwrap();
    let e = Adapter::load(&path, &m.config).unwrap_err().to_string();
    assert!(
        e.contains("direction.2") && e.contains("out of range"),
        "{e}"
    );
    let mut other = m.config.clone();
    other.arch = "qwen2".into();
    let dirs = BTreeMap::from([(1usize, vec![0.0; m.config.hidden])]);
    steer::save(&path, &dirs, &other, "progressive").unwrap();
    let e = Adapter::load(&path, &m.config).unwrap_err().to_string();
    assert!(e.contains("made for a 'qwen2' model"), "{e}");
}
