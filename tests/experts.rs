//! Experts and blending on the real base model with random experts.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use stancemix::lora::{Adapter, ExpertPrecision, ExpertSet};
use stancemix::model::{KvCache, LinearHook, Logits, Model, NoHook, Pass, Target, WeightFormat};
use stancemix::runtime::RowPlan;
use stancemix::util::softmax;
use stancemix::{Blend, Engine, Mode};
use std::sync::Arc;

fn random_experts(model: &Model, rank: usize) -> ExpertSet {
    let pro = Adapter::random(
        &model.config,
        "progressive",
        rank,
        rank as f64,
        &Target::ALL,
        11,
        0.02,
    )
    .unwrap();
    let con = Adapter::random(
        &model.config,
        "conservative",
        rank,
        rank as f64,
        &Target::ALL,
        12,
        0.02,
    )
    .unwrap();
    ExpertSet::new(vec![pro, con]).unwrap()
}

/// The greedy choice: the index of the largest logit.
fn argmax(z: &[f32]) -> u32 {
    z.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i as u32)
        .unwrap()
}

fn prompt_ids(model: &Model) -> Vec<u32> {
    model.tokenizer.encode("<|im_start|>user\nShould taxes on large estates go up?<|im_end|>\n<|im_start|>assistant\n").unwrap()
}

fn logits_rows(engine: &Engine, ids: &[u32], rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
    let z = engine.forward_rows(ids, None, rows, Logits::Last).unwrap();
    (0..rows.len())
        .map(|r| z.i(r).unwrap().to_vec1().unwrap())
        .collect()
}

fn base_logits(model: &Model, ids: &[u32]) -> Vec<f32> {
    let x = Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    model
        .forward(
            &x,
            None,
            &Pass {
                hook: &NoHook,
                logits: Logits::Last,
                differentiable: false,
            },
        )
        .unwrap()
        .i(0)
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn dial_zero_matches_base_logits() {
    let model = real_model(WeightFormat::Q8_0);
    let engine = Engine::new(model.clone(), random_experts(&model, 8));
    let ids = prompt_ids(&model);
    let g = Blend::dial(0.0).unwrap().gates(&engine.experts).unwrap();
    let with = logits_rows(&engine, &ids, &[g]);
    let base = base_logits(&model, &ids);
    assert_eq!(
        max_abs_diff(&with[0], &base),
        0.0,
        "dial 0 must be bit-exact"
    );
    // ...and a non-zero dial really changes the output.
    let g = Blend::dial(1.0).unwrap().gates(&engine.experts).unwrap();
    assert!(max_abs_diff(&logits_rows(&engine, &ids, &[g])[0], &base) > 1e-2);
}

#[test]
fn unmerged_expert_matches_merged_weights_and_merged_file() {
    let model = real_model(WeightFormat::F32);
    let experts = random_experts(&model, 8);
    let ids = prompt_ids(&model);
    let g = vec![1.0, 0.0];
    let engine = Engine::new(model.clone(), experts);
    let unmerged = logits_rows(&engine, &ids, std::slice::from_ref(&g)).remove(0);
    let dir = tempfile::tempdir().unwrap();
    for (f32, tol) in [(true, 1e-3), (false, 5e-2)] {
        let out = dir.path().join(format!("merged-{f32}.gguf"));
        stancemix::lora::merge_to_gguf(&model, &engine.experts, &g, &out, f32, "test").unwrap();
        let merged = Model::load(
            &out,
            &stancemix::model::LoadOptions {
                format: WeightFormat::F32,
            },
        )
        .unwrap();
        let d = max_abs_diff(&base_logits(&merged, &ids), &unmerged);
        assert!(d <= tol, "merged (f32 = {f32}) vs unmerged: {d}");
    }
    // Independent of the merge code: W + s B A built here, per linear, matches too.
    let a = &engine.experts.adapters()[0];
    let (layer, t) = (3, Target::Up);
    let w = model.base_weight(layer, t).unwrap();
    let p = &a.pairs[&(layer, t)];
    let merged_w = (w.clone() + (p.b.matmul(&p.a).unwrap() * a.scale()).unwrap()).unwrap();
    let x = stancemix::model::tiny::seeded_randn(1, 1.0, &[1, 4, model.config.hidden]).unwrap();
    let y_merged = x.broadcast_matmul(&merged_w.t().unwrap()).unwrap();
    let rows = vec![g.clone()];
    let hook = engine.experts.hook(&rows).unwrap();
    let y_hook = hook
        .after_linear(layer, t, &x, x.broadcast_matmul(&w.t().unwrap()).unwrap())
        .unwrap();
    let d = max_abs_diff(
        &y_merged.flatten_all().unwrap().to_vec1().unwrap(),
        &y_hook.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(d < 1e-4, "{d}");
}

#[test]
fn blend_is_linear_in_gate_weights() {
    let model = real_model(WeightFormat::Q8_0);
    let experts = random_experts(&model, 8);
    let x = stancemix::model::tiny::seeded_randn(2, 1.0, &[1, 5, model.config.hidden]).unwrap();
    let zero = Tensor::zeros(
        (1, 5, model.config.out_features(Target::Q)),
        candle_core::DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let change = |g: Vec<f32>| -> Vec<f32> {
        let rows = vec![g];
        let h = experts.hook(&rows).unwrap();
        h.after_linear(7, Target::Q, &x, zero.clone())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (e1, e2) = (change(vec![1.0, 0.0]), change(vec![0.0, 1.0]));
    for (gx, gy) in [(0.3f32, 0.5f32), (-0.7, 1.4), (2.0, -1.0)] {
        let got = change(vec![gx, gy]);
        let want: Vec<f32> = e1.iter().zip(&e2).map(|(a, b)| gx * a + gy * b).collect();
        assert!(max_abs_diff(&got, &want) <= 1e-5, "g = ({gx}, {gy})");
    }
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The int8 decode path (used with a quantized base) against the f32 one, computed here from
/// the same hook in f32: close on every target; exactly linear in one expert's gate; with both
/// experts on (one stacked pass, one rounding of `h` for both) linear within that rounding; and
/// zero gates leave the output untouched. (The f32 path's exact linearity in both gates is
/// `blend_is_linear_in_gate_weights`.)
#[test]
fn int8_expert_deltas_track_f32_and_stay_linear() {
    let model = real_model(WeightFormat::Q8_0);
    // Rank 8 as shipped, and 70 (past the kernels' on-stack buffers, padded to 72 rows).
    for rank in [8, 70] {
        int8_deltas_for_rank(&model, rank);
    }
}

fn int8_deltas_for_rank(model: &Model, rank: usize) {
    let experts = random_experts(model, rank);
    let delta = |target: Target, g: Vec<f32>, precision, x: &Tensor| -> Vec<f32> {
        let rows = vec![g];
        let zero = Tensor::zeros(
            (1, 1, model.config.out_features(target)),
            candle_core::DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        experts
            .hook_with(&rows, precision)
            .unwrap()
            .after_linear(5, target, x, zero)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    for target in Target::ALL {
        let n_in = model.config.in_features(target);
        // A fixed input: with a fresh random one, a rare rounding tie in the int8 quantization
        // of the scaled input broke the 1e-5 linearity bound below on rare runs (typical: 1e-7).
        let xs: Vec<f32> = (0..n_in)
            .map(|i| ((i as f32 * 0.618_034 + rank as f32).sin() * 43_758.547).fract() * 2.0)
            .collect();
        let x = Tensor::from_vec(xs, (1, 1, n_in), &Device::Cpu).unwrap();
        for g in [vec![1.0, 0.0], vec![0.0, -0.7], vec![0.6, 0.4]] {
            let want = delta(target, g.clone(), ExpertPrecision::F32, &x);
            let got = delta(target, g.clone(), ExpertPrecision::Int8, &x);
            let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let rel = norm(&err) / norm(&want);
            assert!(
                rel < 0.03,
                "rank {rank}, {target:?} g = {g:?}: relative error {rel}"
            );
        }
        let e1 = delta(target, vec![1.0, 0.0], ExpertPrecision::Int8, &x);
        let e2 = delta(target, vec![0.0, 1.0], ExpertPrecision::Int8, &x);
        let scale = e1.iter().chain(&e2).fold(0f32, |m, v| m.max(v.abs()));
        for g in [-0.7f32, 0.3, 2.0] {
            let got = delta(target, vec![g, 0.0], ExpertPrecision::Int8, &x);
            let want: Vec<f32> = e1.iter().map(|a| g * a).collect();
            assert!(
                max_abs_diff(&got, &want) <= 1e-5 * scale,
                "{target:?} g = ({g}, 0)"
            );
        }
        for (gx, gy) in [(0.3f32, 0.5f32), (-0.7, 1.4)] {
            let got = delta(target, vec![gx, gy], ExpertPrecision::Int8, &x);
            let want: Vec<f32> = e1.iter().zip(&e2).map(|(a, b)| gx * a + gy * b).collect();
            let err: Vec<f32> = got.iter().zip(&want).map(|(a, b)| a - b).collect();
            let rel = norm(&err) / norm(&want);
            assert!(rel < 0.02, "{target:?} g = ({gx}, {gy}): {rel} from linear");
        }
        let none = delta(target, vec![0.0, 0.0], ExpertPrecision::Int8, &x);
        assert!(none.iter().all(|&v| v == 0.0));
    }
}

/// A decode step of the Q8_0 engine uses the int8 experts; an f32 engine uses the f32 ones.
/// (Their accuracy is checked per linear above: through the whole Q8_0 model any rounding,
/// even a 1e-4 change of one gate weight, moves the logits' norm by tens, so a logit-level
/// comparison would test the base's sensitivity, not the experts.)
#[test]
fn engine_decode_picks_the_experts_precision_of_its_base() {
    let step = |model: &Arc<Model>, precision: Option<ExpertPrecision>| {
        let ids = prompt_ids(model);
        let rows = vec![vec![0.6f32, 0.4]];
        let engine = Engine::new(model.clone(), random_experts(model, 8));
        let mut c = KvCache::new(model.config.n_layer);
        engine
            .forward_rows(&ids, Some(&mut c), &rows, Logits::Last)
            .unwrap();
        let z = match precision {
            None => engine
                .forward_rows(&[ids[3]], Some(&mut c), &rows, Logits::Last)
                .unwrap(),
            Some(p) => {
                let hook = engine.experts.hook_with(&rows, p).unwrap();
                let pass = Pass {
                    hook: &hook,
                    logits: Logits::Last,
                    differentiable: false,
                };
                let x = Tensor::new(&[ids[3]], &Device::Cpu)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                model.forward(&x, Some(&mut c), &pass).unwrap()
            }
        };
        z.i(0).unwrap().to_vec1::<f32>().unwrap()
    };
    let q8 = real_model(WeightFormat::Q8_0);
    assert_eq!(
        Engine::new(q8.clone(), ExpertSet::empty()).expert_precision(),
        ExpertPrecision::Int8
    );
    let int8 = step(&q8, Some(ExpertPrecision::Int8));
    assert_eq!(step(&q8, None), int8);
    assert_ne!(step(&q8, Some(ExpertPrecision::F32)), int8);
    let f32_model = real_model(WeightFormat::F32);
    assert_eq!(
        step(&f32_model, None),
        step(&f32_model, Some(ExpertPrecision::F32))
    );
}

#[test]
fn logits_and_contrast_modes_match_separate_runs() {
    let model = real_model(WeightFormat::Q8_0);
    let engine = Engine::new(model.clone(), random_experts(&model, 8));
    let ids = prompt_ids(&model);
    // Separate single-row runs: base, progressive only, conservative only.
    let base = logits_rows(&engine, &ids, &[vec![0.0, 0.0]]).remove(0);
    let pro = logits_rows(&engine, &ids, &[vec![1.0, 0.0]]).remove(0);
    let con = logits_rows(&engine, &ids, &[vec![0.0, 1.0]]).remove(0);
    let (pb, pp, pc) = (softmax(&base), softmax(&pro), softmax(&con));

    // logits mode, dial 0.6: 0.4 base + 0.6 progressive.
    let blend = Blend::dial(0.6).unwrap().with_mode(Mode::Logits);
    let plan = RowPlan::new(
        &blend.gates(&engine.experts).unwrap(),
        Mode::Logits,
        &engine.experts,
    )
    .unwrap();
    let mut s = engine.session();
    let got: Vec<f32> = s
        .feed(&ids, &plan)
        .unwrap()
        .iter()
        .map(|x| x.exp())
        .collect();
    let want: Vec<f32> = pb.iter().zip(&pp).map(|(b, p)| 0.4 * b + 0.6 * p).collect();
    assert!(max_abs_diff(&got, &want) <= 1e-5);
    // logits mode, mix 0.25: 0.25 progressive + 0.75 conservative.
    let plan = RowPlan::new(
        &Blend::mix(0.25).unwrap().gates(&engine.experts).unwrap(),
        Mode::Logits,
        &engine.experts,
    )
    .unwrap();
    let got: Vec<f32> = engine
        .session()
        .feed(&ids, &plan)
        .unwrap()
        .iter()
        .map(|x| x.exp())
        .collect();
    let want: Vec<f32> = pp
        .iter()
        .zip(&pc)
        .map(|(p, c)| 0.25 * p + 0.75 * c)
        .collect();
    assert!(max_abs_diff(&got, &want) <= 1e-5);

    // contrast mode, dial -0.5: z_base + l (z_pro - z_con) with l = -0.5.
    let plan = RowPlan::new(
        &Blend::dial(-0.5).unwrap().gates(&engine.experts).unwrap(),
        Mode::Contrast,
        &engine.experts,
    )
    .unwrap();
    let got = engine.session().feed(&ids, &plan).unwrap();
    let want: Vec<f32> = base
        .iter()
        .zip(&pro)
        .zip(&con)
        .map(|((b, p), c)| b - 0.5 * (p - c))
        .collect();
    assert!(max_abs_diff(&got, &want) <= 1e-4);
}

#[test]
fn blend_changes_between_tokens_without_reload() {
    let model = real_model(WeightFormat::Q8_0);
    let engine: Arc<Engine> = Engine::new(model.clone(), random_experts(&model, 8));
    let mut s = engine.session();
    s.set_blend(Blend::dial(0.8).unwrap()).unwrap();
    let params = stancemix::GenParams {
        max_tokens: 4,
        ..Default::default()
    };
    let r1 = s.chat("Hi", &params, |_| true).unwrap();
    // (How long a switch takes is a benchmark figure: `stancemix bench`, switch_ms.)
    s.set_blend(Blend::dial(-0.8).unwrap()).unwrap();
    let r2 = s.chat("And now?", &params, |_| true).unwrap();
    assert_eq!(r1.blend.to_string(), "dial +0.80 | weights");
    assert_eq!(r2.blend.to_string(), "dial -0.80 | weights");
}

#[test]
fn adapter_save_load_round_trip_is_identical() {
    let model = real_model(WeightFormat::Q8_0);
    let a = Adapter::random(&model.config, "progressive", 4, 8.0, &Target::ALL, 5, 0.02).unwrap();
    let dir = tempfile::tempdir().unwrap();
    a.save(dir.path(), &model.config).unwrap();
    let b = Adapter::load(dir.path(), &model.config).unwrap();
    assert_eq!(a.config, b.config);
    for (k, p) in &a.pairs {
        let q = &b.pairs[k];
        assert_eq!(
            p.a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q.a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        assert_eq!(
            p.b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            q.b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}

/// Run the numpy fixture for a base of shape `c` and family `arch`, load its adapter for `c`, and
/// check the q/k/v deltas of layer 1 against numpy's. Returns the adapter and its folder.
fn peft_fixture_matches_numpy(
    c: &stancemix::model::Config,
    arch: &str,
) -> (Adapter, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/make_peft_adapter.py"
    );
    let out = python_with_deps()
        .arg(script)
        .arg(dir.path())
        .args([c.n_layer, c.hidden, c.n_head, c.n_kv_head].map(|x| x.to_string()))
        .arg(arch)
        .arg(c.head_dim.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python fixture failed (scripts/test installs numpy and safetensors): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = Adapter::load(dir.path(), c).unwrap();
    let expected = candle_core::safetensors::load(
        dir.path().join("expected_deltas.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (name, t) in [
        ("q_proj", Target::Q),
        ("k_proj", Target::K),
        ("v_proj", Target::V),
    ] {
        let got = a
            .delta(1, t)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = expected[name]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(max_abs_diff(&got, &want) < 1e-6, "{arch}: {name}");
    }
    (a, dir)
}

#[test]
fn peft_adapter_written_by_python_gives_numpy_delta() {
    let model = real_model(WeightFormat::Q8_0);
    peft_fixture_matches_numpy(&model.config, "llama");
}

fn write_bad(dir: &std::path::Path, config: serde_json::Value, tensors: Vec<(String, Tensor)>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join("adapter_model.safetensors")).unwrap();
}

#[test]
fn bad_adapters_name_the_file_and_tensor() {
    let model = real_model(WeightFormat::Q8_0);
    let c = &model.config;
    let good = |r: usize| -> Vec<(String, Tensor)> {
        (0..c.n_layer)
            .flat_map(|l| {
                [
                    (
                        stancemix::lora::peft_tensor_name(l, Target::V, 'A'),
                        Tensor::zeros((r, c.hidden), candle_core::DType::F32, &Device::Cpu)
                            .unwrap(),
                    ),
                    (
                        stancemix::lora::peft_tensor_name(l, Target::V, 'B'),
                        Tensor::zeros(
                            (c.out_features(Target::V), r),
                            candle_core::DType::F32,
                            &Device::Cpu,
                        )
                        .unwrap(),
                    ),
                ]
            })
            .collect()
    };
    let cfg =
        |r: usize, m: &str| serde_json::json!({"r": r, "lora_alpha": 8, "target_modules": [m]});
    let root = tempfile::tempdir().unwrap();
    let check =
        |name: &str, config: serde_json::Value, tensors: Vec<(String, Tensor)>, needle: &str| {
            let d = root.path().join(name);
            write_bad(&d, config, tensors);
            let e = Adapter::load(&d, c).unwrap_err().to_string();
            assert!(
                e.contains(&d.display().to_string()),
                "{name}: names the file: {e}"
            );
            assert!(e.contains(needle), "{name}: says '{needle}': {e}");
        };
    let v3b = stancemix::lora::peft_tensor_name(3, Target::V, 'B');
    let mut wrong = good(4);
    wrong.retain(|(n, _)| *n != v3b);
    wrong.push((
        v3b.clone(),
        Tensor::zeros((5, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
    ));
    check(
        "wrong-shape",
        cfg(4, "v_proj"),
        wrong,
        &format!("{v3b}: wrong shape"),
    );
    let mut missing = good(4);
    missing.retain(|(n, _)| *n != v3b);
    check(
        "missing",
        cfg(4, "v_proj"),
        missing,
        &format!("{v3b}: missing tensor"),
    );
    check(
        "unknown-module",
        cfg(4, "w_proj"),
        good(4),
        "unknown target module 'w_proj'",
    );
    check("rank", cfg(8, "v_proj"), good(4), "rank mismatch");
    check(
        "alpha",
        serde_json::json!({"r": 4, "target_modules": ["v_proj"]}),
        good(4),
        "lora_alpha",
    );
    // Some blocks only (PEFT's layers_to_transform): the others' tensors are extra, a block
    // past the model's is named.
    let mut some = cfg(4, "v_proj");
    some["layers_to_transform"] = serde_json::json!([0, 1]);
    check("extra-layers", some.clone(), good(4), "unexpected tensor");
    some["layers_to_transform"] = serde_json::json!([0, c.n_layer]);
    check("layer-range", some.clone(), good(4), "layers_to_transform");
    let d = root.path().join("two-blocks");
    let mut two = good(4);
    two.retain(|(n, _)| n.contains(".layers.0.") || n.contains(".layers.1."));
    some["layers_to_transform"] = serde_json::json!([0, 1]);
    write_bad(&d, some, two);
    let a = Adapter::load(&d, c).unwrap();
    assert_eq!(a.pairs.len(), 2, "{:?}", a.pairs.keys().collect::<Vec<_>>());
}

#[test]
fn decode_fast_path_matches_the_batched_prompt_path() {
    // Feeding a prompt token by token (one row: the plain-loop decode path) must give the same
    // last logits as feeding it at once (the candle matmul path), for two rows of gate weights.
    let model = real_model(WeightFormat::F32);
    let engine = Engine::new(model.clone(), random_experts(&model, 8));
    let ids = prompt_ids(&model);
    let rows = vec![vec![0.6f32, 0.4], vec![0.0, 1.0]];
    let at_once = logits_rows(&engine, &ids, &rows);
    let mut cache = stancemix::model::KvCache::new(model.config.n_layer);
    let mut last = None;
    for &id in &ids {
        last = Some(
            engine
                .forward_rows(&[id], Some(&mut cache), &rows, Logits::Last)
                .unwrap(),
        );
    }
    let last = last.unwrap();
    for (r, want) in at_once.iter().enumerate() {
        let got: Vec<f32> = last.i(r).unwrap().to_vec1().unwrap();
        let d = max_abs_diff(&got, want);
        assert!(d < 1e-3, "row {r}: token-by-token logits differ by {d}");
    }
}

/// The int8 experts inside the base matmul's dispatch (`side_work`, used for decode steps over
/// our int8 weights) give exactly the logits of the same int8 arithmetic run after the matmul
/// (`after_linear`): the same rounded input, the same sums, added in the same order.
#[test]
fn experts_inside_the_matmul_dispatch_equal_the_after_matmul_path() {
    /// Forwards `after_linear` only, so the model takes the after-matmul path.
    struct AfterOnly<'a>(stancemix::lora::ExpertHook<'a>);
    impl LinearHook for AfterOnly<'_> {
        fn after_linear(
            &self,
            layer: usize,
            target: Target,
            x: &Tensor,
            y: Tensor,
        ) -> candle_core::Result<Tensor> {
            self.0.after_linear(layer, target, x, y)
        }
    }
    for format in [WeightFormat::Q8_0, WeightFormat::Stored] {
        let model = real_model(format);
        let experts = random_experts(&model, 8);
        let ids = prompt_ids(&model);
        // Two batch rows with their own gates, two tokens each: 4 token rows, both experts.
        let rows = vec![vec![0.6f32, 0.4], vec![-0.3, 1.0]];
        let run = |hook: &dyn LinearHook| -> Vec<f32> {
            let x = Tensor::new(&ids[..2], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .repeat((2, 1))
                .unwrap();
            forward_flat(&model, &x, None, hook, Logits::Last)
        };
        let hook = experts.hook_with(&rows, ExpertPrecision::Int8).unwrap();
        let inside = run(&hook);
        let after = run(&AfterOnly(
            experts.hook_with(&rows, ExpertPrecision::Int8).unwrap(),
        ));
        assert_eq!(inside, after, "{format:?}");
        let off = vec![vec![0.0f32, 0.0]; 2];
        assert_ne!(
            inside,
            run(&experts.hook(&off).unwrap()),
            "{format:?}: experts must act"
        );
    }
}

#[test]
fn peft_adapter_for_a_qwen2_base_keeps_hugging_face_row_order() {
    // Qwen2's GGUF keeps q/k rows in Hugging Face order (RoPE over halves), so PEFT's B applies
    // unpermuted: the deltas equal numpy's s * B @ A as they are.
    let c = stancemix::model::tiny::tiny_config_of(stancemix::model::Arch::Qwen2);
    let (a, dir) = peft_fixture_matches_numpy(&c, "qwen2");
    // The same file read for a LLaMA base permutes q: the two readings must differ there.
    let llama = stancemix::model::tiny::tiny_config();
    let b = Adapter::load(dir.path(), &llama).unwrap();
    let q = |x: &Adapter| {
        x.delta(1, Target::Q)
            .unwrap()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    assert!(max_abs_diff(&q(&a), &q(&b)) > 1e-4);
}

#[test]
fn peft_adapter_for_a_gemma3_base_reads_its_wider_heads_in_hugging_face_order() {
    // Gemma 3's q has heads * head_dim rows (128 here, hidden 64), kept in Hugging Face order.
    let c = stancemix::model::tiny::tiny_config_of(stancemix::model::Arch::Gemma3);
    assert_ne!(c.n_head * c.head_dim, c.hidden);
    peft_fixture_matches_numpy(&c, "gemma3");
}

#[test]
fn sessions_decoded_together_match_each_decoded_alone() {
    // Three sessions at different positions under blends of one, two and three rows: a step
    // batched across them must give each what it gets alone, bit for bit (the int8 kernels
    // round and multiply row by row).
    use stancemix::runtime::feed_together;
    let model = tiny_model_as(31, WeightFormat::Q8_0);
    let engine = stancemix::Engine::new(model.clone(), random_experts(&model, 4));
    let cases = [
        ("a short one", "dial=0.6"),
        ("a somewhat longer prompt here", "mix=0.3@logits"),
        ("mid length", "dial=-1@contrast"),
    ];
    let plans: Vec<_> = cases
        .iter()
        .map(|(p, b)| engine.plan(&b.parse().unwrap(), p).unwrap().1)
        .collect();
    assert_eq!(
        plans.iter().map(|p| p.rows.len()).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    let prompt = |p: &str| model.tokenizer.encode(p).unwrap();
    // Alone: prompt, then six greedy steps.
    let mut alone: Vec<Vec<Vec<f32>>> = Vec::new();
    for ((p, _), plan) in cases.iter().zip(&plans) {
        let mut s = engine.session();
        let mut z = s.feed(&prompt(p), plan).unwrap();
        let mut steps = vec![z.clone()];
        for _ in 0..6 {
            z = s.feed(&[argmax(&z)], plan).unwrap();
            steps.push(z.clone());
        }
        alone.push(steps);
    }
    // Together: the same prompts, then the six steps batched.
    let mut sessions: Vec<_> = cases.iter().map(|_| engine.session()).collect();
    let mut last: Vec<Vec<f32>> = sessions
        .iter_mut()
        .zip(cases.iter().zip(&plans))
        .map(|(s, ((p, _), plan))| s.feed(&prompt(p), plan).unwrap())
        .collect();
    for (step, _) in alone[0].iter().enumerate().skip(1) {
        let mut items: Vec<_> = sessions
            .iter_mut()
            .zip(&last)
            .zip(&plans)
            .map(|((s, z), plan)| (s, argmax(z), plan))
            .collect();
        last = feed_together(&mut items)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        for (i, z) in last.iter().enumerate() {
            assert_eq!(z, &alone[i][step], "session {i}, step {step}");
        }
    }
}

#[test]
fn prompts_from_the_prompt_cache_decode_as_prompts_computed_afresh() {
    // A prompt found in the cache must give the logits and the KV cache its own prefill gives,
    // bit for bit: the answer a server gives from a hit is the answer it gives from scratch.
    // A session extending a hit must not change the kept entry; another blend's rows miss.
    use stancemix::runtime::PromptCache;
    let model = tiny_model_as(32, WeightFormat::Q8_0);
    let engine = stancemix::Engine::new(model.clone(), random_experts(&model, 4));
    let prompt = model.tokenizer.encode("a prompt asked twice").unwrap();
    let store = PromptCache::new(64 << 20);
    for blend in ["dial=0.6", "mix=0.3@logits", "dial=-1@contrast"] {
        let plan = engine.plan(&blend.parse().unwrap(), "").unwrap().1;
        let decode = |s: &mut stancemix::Session, mut z: Vec<f32>| {
            let mut steps = vec![z.clone()];
            for _ in 0..6 {
                z = s.feed(&[argmax(&z)], &plan).unwrap();
                steps.push(z.clone());
            }
            steps
        };
        let mut fresh = engine.session();
        let z = fresh.feed(&prompt, &plan).unwrap();
        let alone = decode(&mut fresh, z);
        let before = store.stats();
        for round in 0..3 {
            // Round 0 computes and keeps the prompt; rounds 1 and 2 take it from the store.
            let mut s = engine.session();
            let z = s.feed_prompt(&prompt, &plan, &store).unwrap();
            assert_eq!(decode(&mut s, z), alone, "{blend}, round {round}");
        }
        let after = store.stats();
        assert_eq!(after.misses - before.misses, 1, "{blend}");
        assert_eq!(after.hits - before.hits, 2, "{blend}");
        assert_eq!(
            after.entries,
            before.entries + 1,
            "{blend}: one entry per blend's rows"
        );
    }
    // A budget that holds one entry keeps the latest; no budget keeps nothing.
    let plan = engine.plan(&"dial=0.6".parse().unwrap(), "").unwrap().1;
    let [first, second] =
        ["first prompt", "second prompt"].map(|t| model.tokenizer.encode(t).unwrap());
    let probe = PromptCache::new(usize::MAX);
    engine.session().feed_prompt(&first, &plan, &probe).unwrap();
    let size = probe.stats().bytes;
    let one = PromptCache::new(size + size / 2);
    let nothing = PromptCache::new(0);
    for tokens in [&first, &second, &second] {
        let want = engine.session().feed(tokens, &plan).unwrap();
        for s in [&one, &nothing] {
            assert_eq!(
                engine.session().feed_prompt(tokens, &plan, s).unwrap(),
                want
            );
        }
    }
    let kept = one.stats();
    assert_eq!(
        (kept.entries, kept.hits, kept.misses),
        (1, 1, 2),
        "the second prompt evicted the first"
    );
    assert_eq!(nothing.stats().entries, 0);
}
