//! Evaluation: instrument scoring checked by hand, forced-choice batching, the eval CLI.

mod common;

use common::*;
use stancemix::data::{Instrument, Item, Scale};
use stancemix::eval::{score_instrument, FcOptions, Order, TEMPLATES};
use stancemix::lora::{Adapter, ExpertSet};
use stancemix::model::{Model, Target, WeightFormat};
use stancemix::{Blend, Engine};
use std::collections::BTreeMap;
use std::sync::Arc;

fn item(id: &str, effects: &[(&str, Vec<f64>)]) -> Item {
    Item {
        id: id.into(),
        text: format!("Proposition {id}."),
        effects: effects
            .iter()
            .map(|(a, e)| (a.to_string(), e.clone()))
            .collect(),
    }
}

fn instrument(answers: &[&str], axes: &[(&str, Scale)], items: Vec<Item>) -> Instrument {
    Instrument {
        name: "test".into(),
        description: String::new(),
        sign: String::new(),
        answers: answers.iter().map(|s| s.to_string()).collect(),
        axes: axes
            .iter()
            .map(|(a, s)| (a.to_string(), stancemix::data::Axis { scale: s.clone() }))
            .collect(),
        items,
    }
}

#[test]
fn affine_and_range_scores_match_hand_computation() {
    // Three answers, two axes: `econ` affine [2, 1], `soc` range [-10, 10].
    let ins = instrument(
        &["No", "Unsure", "Yes"],
        &[
            ("econ", Scale::Affine([2.0, 1.0])),
            ("soc", Scale::Range([-10.0, 10.0])),
        ],
        vec![
            item("a", &[("econ", vec![-2.0, 0.0, 2.0])]),
            item(
                "b",
                &[("econ", vec![1.0, 0.0, -1.0]), ("soc", vec![3.0, 1.0, 0.0])],
            ),
            item("c", &[("soc", vec![-1.0, 0.0, 1.0])]),
        ],
    );
    let sheet = vec![
        vec![0.25, 0.25, 0.5],
        vec![0.0, 0.5, 0.5],
        vec![1.0, 0.0, 0.0],
    ];
    let s = ins.score(&sheet);
    // econ sum: a: -2*.25 + 0 + 2*.5 = 0.5; b: 1*0 + 0 + -1*.5 = -0.5 -> 0 -> 0/2 + 1 = 1.
    assert!((s["econ"] - 1.0).abs() < 1e-12, "{s:?}");
    // soc sum: b: 0*3 + .5*1 + .5*0 = 0.5; c: -1 -> -0.5. Attainable: min 0 + -1 = -1,
    // max 3 + 1 = 4; (-0.5 - -1) / 5 = 0.1 of the way from -10 to 10 -> -8.
    assert!((s["soc"] + 8.0).abs() < 1e-12, "{s:?}");
}

#[test]
fn four_answer_affine_form_reproduces_published_political_compass_scoring() {
    // The Political Compass's published (reverse-engineered) scoring, as used by Röttger et
    // al. 2024 ("Political Compass or Spinning Arrow?"): economic = 0.38 + sum / 8.0,
    // social = 2.41 + sum / 19.5, over per-answer values for Strongly disagree, Disagree,
    // Agree, Strongly agree. The first 21 propositions' values from that table:
    let econ: [[f64; 4]; 21] = [
        [0.5, 2.5, -2.5, -4.5],
        [7., 5., 0., -2.],
        [0.; 4],
        [0.; 4],
        [0.; 4],
        [0.; 4],
        [0.; 4],
        [0.; 4],
        [7., 5., 0., -2.],
        [-7., -5., 0., 2.],
        [6., 4., 0., -2.],
        [7., 5., 0., -2.],
        [-8., -6., 0., 2.],
        [8., 6., 0., -2.],
        [8., 6., 0., -1.],
        [7., 5., 0., -3.],
        [8., 6., 0., -1.],
        [-7., -5., 0., 2.],
        [-7., -5., 0., 1.],
        [-6., -4., 0., 2.],
        [6., 4., 0., -1.],
    ];
    let mut soc = [[0.0f64; 4]; 21];
    soc[1] = [-8., -6., 0., 2.];
    soc[2] = [7., 5., 0., -2.];
    soc[3] = [-7., -5., 0., 2.];
    soc[4] = [-7., -5., 0., 2.];
    soc[5] = [-6., -4., 0., 2.];
    soc[6] = [7., 5., 0., -2.];
    let items = (0..21)
        .map(|i| {
            item(
                &format!("pct-{i:02}"),
                &[("economic", econ[i].to_vec()), ("social", soc[i].to_vec())],
            )
        })
        .collect();
    let ins = instrument(
        &["Strongly disagree", "Disagree", "Agree", "Strongly agree"],
        &[
            ("economic", Scale::Affine([8.0, 0.38])),
            ("social", Scale::Affine([19.5, 2.41])),
        ],
        items,
    );
    // The sheet, by hand: item i answers i mod 4 (SD, D, A, SA, SD, ...).
    let sheet: Vec<Vec<f64>> = (0..21)
        .map(|i| (0..4).map(|a| if a == i % 4 { 1.0 } else { 0.0 }).collect())
        .collect();
    let s = ins.score(&sheet);
    // Economic picks: 0.5, 5, 0 x6, 7, -5, 0, -2, -8, 6, 0, -3, 8, -5, 0, 2, 6 = 11.5
    // -> 0.38 + 11.5 / 8 = 1.8175.
    assert!((s["economic"] - 1.8175).abs() < 1e-9, "{s:?}");
    // Social picks: items 1-6 -> -6, 0, 2, -7, -4, 0 = -15 -> 2.41 - 15 / 19.5 = 1.640769...
    assert!((s["social"] - (2.41 - 15.0 / 19.5)).abs() < 1e-9, "{s:?}");
    // All "Agree": every Agree value is 0 except item 0's -2.5 -> (0.0675, 2.41).
    let agree: Vec<Vec<f64>> = (0..21).map(|_| vec![0.0, 0.0, 1.0, 0.0]).collect();
    let s = ins.score(&agree);
    assert!((s["economic"] - 0.0675).abs() < 1e-9 && (s["social"] - 2.41).abs() < 1e-9);
}

fn random_engine(model: &Arc<Model>) -> Arc<Engine> {
    let ad = |stance: &str, seed| {
        Adapter::random(
            &model.config,
            stance,
            4,
            8.0,
            &[Target::Q, Target::V],
            seed,
            0.05,
        )
        .unwrap()
    };
    Engine::new(
        model.clone(),
        ExpertSet::new(vec![ad("progressive", 21), ad("conservative", 22)]).unwrap(),
    )
}

fn compass(n: usize) -> Instrument {
    let ins = Instrument::load(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("adapters/instruments/stance-compass.json"),
    )
    .unwrap();
    stancemix::eval::forced_choice::subset(&ins, Some(n))
}

fn quick_options() -> FcOptions {
    FcOptions {
        templates: vec![TEMPLATES[4].clone()],
        system: vec![false],
        orders: vec![Order::Forward, Order::Reversed],
        ..FcOptions::default()
    }
}

#[test]
fn batched_blends_equal_blends_scored_one_by_one() {
    // f32 weights: candle's Q8_0 kernels change with the number of rows in a matmul, which
    // moves logits by up to ~0.5 between batch shapes (why `eval` defaults to f32).
    let model = real_model(WeightFormat::F32);
    let engine = random_engine(&model);
    let ins = compass(2);
    let blends: Vec<Blend> = ["dial=-1", "dial=0.5", "mix=0.3@logits", "base"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let opts = quick_options();
    let batched = score_instrument(&engine, &ins, &blends, &opts, &mut |_, _| {}).unwrap();
    let mut worst = 0.0f64;
    for (b, blend) in blends.iter().enumerate() {
        let alone = score_instrument(
            &engine,
            &ins,
            std::slice::from_ref(blend),
            &opts,
            &mut |_, _| {},
        )
        .unwrap();
        let (x, y) = (&batched.blends[b], &alone.blends[0]);
        assert_eq!(x.blend, y.blend);
        for (ix, iy) in x.items.iter().zip(&y.items) {
            for (vx, vy) in ix.variants.iter().zip(&iy.variants) {
                for (p, q) in vx.probs.iter().zip(&vy.probs) {
                    worst = worst.max((p - q).abs());
                }
                worst = worst.max((vx.outside - vy.outside).abs());
            }
        }
    }
    assert!(worst < 1e-5, "batched vs one by one differ by {worst}");
    // Prompts shared among worker threads (each with its own cache) give the same numbers.
    let threaded = FcOptions {
        workers: 3,
        ..quick_options()
    };
    let split = score_instrument(&engine, &ins, &blends, &threaded, &mut |_, _| {}).unwrap();
    for (x, y) in batched.blends.iter().zip(&split.blends) {
        for (ix, iy) in x.items.iter().zip(&y.items) {
            assert_eq!(ix.variants.len(), iy.variants.len());
            for (vx, vy) in ix.variants.iter().zip(&iy.variants) {
                for (p, q) in vx.probs.iter().zip(&vy.probs) {
                    assert!((p - q).abs() < 1e-6, "workers 1 vs 3: {p} vs {q}");
                }
            }
        }
    }
    // The experts are random but non-zero: the blends must not all read the same.
    let e: Vec<f64> = batched.blends.iter().map(|b| b.items[0].probs[0]).collect();
    assert!(e.iter().any(|&v| (v - e[0]).abs() > 1e-4), "{e:?}");
}

#[test]
fn probabilities_are_normalised_and_control_is_scored() {
    let model = real_model(WeightFormat::F32);
    let engine = random_engine(&model);
    let ins = compass(2);
    let r = score_instrument(
        &engine,
        &ins,
        &[Blend::base()],
        &quick_options(),
        &mut |_, _| {},
    )
    .unwrap();
    let b = &r.blends[0];
    for it in &b.items {
        for v in &it.variants {
            assert!((v.probs.iter().sum::<f64>() - 1.0).abs() < 1e-9);
            assert!((0.0..=1.0).contains(&v.outside));
        }
    }
    assert_eq!(r.variants.len(), 2);
    assert_eq!(r.always_agree.answer, "Agree");
    // Expected scores lie inside the instrument's range.
    for s in b.axes.values() {
        assert!((-10.0..=10.0).contains(&s.expected) && (-10.0..=10.0).contains(&s.argmax));
    }
    // The always-agree sheet scored by hand: subset items econ-01 and soc-01; "Agree" is
    // effect -1 on each (agreeing is progressive), attainable [-2, 2] -> -5.
    let mut by_hand = BTreeMap::new();
    for it in &ins.items {
        for (axis, e) in &it.effects {
            let (lo, hi) = (-2.0, 2.0);
            by_hand.insert(axis.clone(), -10.0 + (e[2] - lo) / (hi - lo) * 20.0);
        }
    }
    for (axis, v) in &r.always_agree.axes {
        assert!(
            (v - by_hand[axis]).abs() < 1e-9,
            "{axis}: {v} vs {}",
            by_hand[axis]
        );
    }
}

#[test]
fn eval_cli_prints_json_with_expected_and_argmax_per_axis() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("eval.json");
    let o = std::process::Command::new(bin())
        .args([
            "eval",
            "--no-adapters",
            "--items",
            "2",
            "--templates",
            "respond",
            "--system",
            "without",
            "--one-order",
            "--json",
            "--model",
        ])
        .arg(real_model_path())
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for axis in ["economic", "social"] {
        assert!(v["axes"][axis]["expected"].is_f64(), "{v}");
        assert!(v["axes"][axis]["argmax"].is_f64(), "{v}");
    }
    assert_eq!(v["items"].as_array().unwrap().len(), 2);
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(file, v);
}

#[test]
fn eval_cli_names_file_item_and_field_of_a_bad_instrument() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.json");
    std::fs::write(
        &p,
        r#"{"name":"bad","answers":["No","Yes"],"axes":{"x":{"scale":{"affine":[1,0]}}},
           "items":[{"id":"q1","text":"T","effects":{"x":[1,2,3]}}]}"#,
    )
    .unwrap();
    let o = std::process::Command::new(bin())
        .args(["eval", "--no-adapters", "--instrument"])
        .arg(&p)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("bad.json: q1: effects.x"), "{err}");
}

#[test]
fn scoring_commands_refuse_zero_workers() {
    let dir = tempfile::tempdir().unwrap();
    for cmd in ["eval", "sweep", "report"] {
        let o = std::process::Command::new(bin())
            .args([cmd, "--no-adapters", "--workers", "0", "--out"])
            .arg(dir.path().join(cmd))
            .output()
            .unwrap();
        assert!(!o.status.success(), "{cmd}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("--workers: give at least 1"), "{cmd}: {err}");
        assert!(!dir.path().join(cmd).exists(), "{cmd} wrote output");
    }
}

/// Random progressive and conservative adapters saved as directories, for the CLI.
fn random_adapter_dirs(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let model = real_model(WeightFormat::F32);
    [("progressive", 31), ("conservative", 32)]
        .iter()
        .map(|(stance, seed)| {
            let a = Adapter::random(
                &model.config,
                stance,
                4,
                8.0,
                &[Target::Q, Target::V],
                *seed,
                0.05,
            )
            .unwrap();
            let d = dir.join(stance);
            a.save(&d, &model.config).unwrap();
            d
        })
        .collect()
}

#[test]
fn sweep_cli_writes_csv_json_and_a_valid_svg() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = random_adapter_dirs(dir.path());
    let out = dir.path().join("sweep");
    let o = std::process::Command::new(bin())
        .args(["sweep", "--path", "dial:-1:1:3", "--items", "2"])
        .args(["--templates", "respond", "--system", "without", "--json"])
        .arg("--model")
        .arg(real_model_path())
        .arg("--adapters")
        .args(&adapters)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 3);
    for axis in ["economic", "social"] {
        assert!(points[0]["axes"][axis]["expected"].is_f64());
        assert!(v["spearman"][axis].is_f64(), "{}", v["spearman"]);
        assert!(v["experts_gap"][axis].is_f64());
    }
    assert!(points[2]["blend"]
        .as_str()
        .unwrap()
        .starts_with("dial +1.00"));
    // CSV: a header and one row per point, every row as wide as the header.
    let csv = std::fs::read_to_string(out.join("sweep.csv")).unwrap();
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 4, "{csv}");
    assert!(lines[0].starts_with("x,blend,g_progressive,g_conservative,economic_expected"));
    let width = lines[0].split(',').count();
    assert!(lines[1..].iter().all(|l| l.split(',').count() == width));
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap();
    assert_eq!(json["forced_choice"]["blends"].as_array().unwrap().len(), 3);
    // SVG: well-formed XML with an <svg> root, the curves and the three compass markers.
    let svg = std::fs::read_to_string(out.join("sweep.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("sweep.svg is well-formed XML");
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    assert_eq!(
        root.tag_name().namespace(),
        Some("http://www.w3.org/2000/svg")
    );
    assert!(root.attribute("viewBox").is_some());
    let count = |tag: &str| doc.descendants().filter(|n| n.has_tag_name(tag)).count();
    assert!(
        count("polyline") >= 3,
        "two axis curves and the compass path"
    );
    assert!(count("polygon") >= 1 && count("circle") >= 6);
}

#[test]
fn mix_and_raw_paths_score_every_point() {
    let model = real_model(WeightFormat::F32);
    let engine = random_engine(&model);
    let ins = compass(2);
    let mut opts = quick_options();
    opts.orders = vec![Order::Forward];
    for spec in [
        "mix:0:1:3",
        "raw:progressive=0:progressive=-1,conservative=1:2",
    ] {
        let path = stancemix::eval::parse_path(spec).unwrap();
        let r = stancemix::eval::sweep(&engine, &ins, &path, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(r.points.len(), path.points.len(), "{spec}");
        assert!(r.progressive.is_some() && r.conservative.is_some());
        // mix 1 is the progressive expert alone: the same numbers as the reference.
        if spec.starts_with("mix") {
            assert_eq!(r.points[2].axes, r.progressive.as_ref().unwrap().axes);
        }
    }
}

/// The shipped judge, and the share of the stance data's dev answers it judges right, counted
/// here answer by answer (not taken from the judge's own report).
fn shipped_judge_dev_accuracy() -> &'static (stancemix::eval::judge::Judge, usize, f64) {
    use stancemix::eval::judge::{Judge, DEFAULT_JUDGE};
    static R: std::sync::OnceLock<(Judge, usize, f64)> = std::sync::OnceLock::new();
    R.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let judge = Judge::load(&root.join(DEFAULT_JUDGE)).unwrap();
        let pairs = stancemix::data::load_stance_dir(&root.join("adapters/data/stance")).unwrap();
        let model = real_model(WeightFormat::F32);
        let (mut n, mut right) = (0, 0);
        for p in pairs.iter().filter(|p| p.is_dev()) {
            for (answer, conservative) in [(&p.progressive, false), (&p.conservative, true)] {
                let pc = judge.p_conservative(&model, &p.prompt, answer).unwrap();
                assert!((0.0..=1.0).contains(&pc));
                n += 1;
                right += usize::from((pc > 0.5) == conservative);
            }
        }
        (judge, n, right as f64 / n as f64)
    })
}

#[test]
fn shipped_judge_beats_chance_on_dev_answers_and_matches_its_report() {
    let (judge, n, acc) = shipped_judge_dev_accuracy();
    assert!(*n >= 1000, "{n} dev answers");
    assert!(*acc >= 0.70, "dev accuracy {acc}");
    assert_eq!(judge.report.dev_answers, *n);
    // The same features as training: the report is reproduced.
    assert!(
        (judge.report.dev_accuracy - acc).abs() < 0.01,
        "{:?} vs {acc}",
        judge.report
    );
}

/// The hidden-state judge shipped until session 16 (SmolLM2's residual stream after blocks 4,
/// 8 and 12), kept for comparison and for the checks that need a judge that reads with a model.
const HIDDEN_JUDGE: &str = "adapters/judge/hidden-smollm2.json";

#[test]
fn judge_refuses_empty_answers_and_foreign_models() {
    use stancemix::eval::judge::{Judge, DEFAULT_JUDGE};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let model = real_model(WeightFormat::F32);
    for file in [DEFAULT_JUDGE, HIDDEN_JUDGE] {
        let judge = Judge::load(&root.join(file)).unwrap();
        assert!(judge.p_conservative(&model, "Q?", "   ").is_err(), "{file}");
    }
    // The tiny test model has fewer blocks than the hidden judge reads.
    let hidden = Judge::load(&root.join(HIDDEN_JUDGE)).unwrap();
    assert!(hidden
        .p_conservative(&tiny_model(1), "Q?", "An answer.")
        .is_err());
}

/// Answers from another base are read by the judge's own base: the hidden-state judge reads
/// with SmolLM2 whichever model wrote the answer, and gives the same number as reading with it
/// directly. The shipped n-gram judge reads no model: any base's answers, as they are.
#[test]
fn judge_reads_other_bases_answers_with_its_own_base() {
    use stancemix::eval::judge::{Judge, DEFAULT_JUDGE};
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let judge = Judge::load(&root.join(HIDDEN_JUDGE)).unwrap();
    let own = real_model(WeightFormat::F32);
    let other = tiny_model(1);
    assert!(judge.reads_with(&own) && !judge.reads_with(&other));
    let paths = stancemix::util::Paths::at(root);
    let reader = judge.reader_for(&other, &paths).unwrap();
    assert_eq!(reader.path.file_name(), own.path.file_name());
    let (q, a) = ("Should taxes rise?", "Yes: public services need the money.");
    let (p1, p2) = (
        judge.p_conservative(&reader, q, a).unwrap(),
        judge.p_conservative(&own, q, a).unwrap(),
    );
    assert!((p1 - p2).abs() < 1e-6, "{p1} vs {p2}");
    assert!(std::sync::Arc::ptr_eq(
        &judge.reader_for(&own, &paths).unwrap(),
        &own
    ));
    let shipped = Judge::load(&root.join(DEFAULT_JUDGE)).unwrap();
    assert!(shipped.reads_with(&other));
    assert!(std::sync::Arc::ptr_eq(
        &shipped.reader_for(&other, &paths).unwrap(),
        &other
    ));
    // Nothing model-specific: the tiny model's answer reads as the real model's.
    assert_eq!(
        shipped.p_conservative(&other, q, a).unwrap(),
        shipped.p_conservative(&own, q, a).unwrap()
    );
}

/// Acceptance 5 of the evaluation issue; not met: the best measured judges reach about 0.71-0.75
/// (docs/EVAL.md lists every feature set measured).
#[test]
#[ignore = "open: the best judge measured reaches about 0.71 on the 1,578 dev answers, the target is 0.85"]
fn judge_reaches_85_percent_on_dev_answers() {
    let (_, _, acc) = shipped_judge_dev_accuracy();
    assert!(*acc >= 0.85, "dev accuracy {acc}");
}

#[test]
fn perplexity_of_blends_batched_equals_each_alone() {
    let model = real_model(WeightFormat::F32);
    let engine = random_engine(&model);
    let texts = vec![
        "Bread is made from flour, water, salt and yeast. The dough rises as the yeast ferments."
            .to_string(),
    ];
    let blends: Vec<Blend> = ["base", "dial=1", "dial=-1"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    let ppl = stancemix::eval::side_effects::perplexity(&engine, &blends, &texts, &mut |_, _| {})
        .unwrap();
    for (b, p) in blends.iter().zip(&ppl) {
        let alone = stancemix::eval::side_effects::perplexity(
            &engine,
            std::slice::from_ref(b),
            &texts,
            &mut |_, _| {},
        )
        .unwrap();
        assert!((p - alone[0]).abs() < 1e-4 * p, "{b}: {p} vs {}", alone[0]);
        assert!(p.is_finite() && *p > 1.0 && *p < 200.0, "{b}: {p}");
    }
}

#[test]
fn report_cli_writes_the_page_with_plot_and_every_section() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = random_adapter_dirs(dir.path());
    let out = dir.path().join("report");
    let o = std::process::Command::new(bin())
        .args(["report", "--path", "dial:-1:1:3", "--items", "2"])
        .args([
            "--templates",
            "respond",
            "--system",
            "without",
            "--one-order",
        ])
        .args(["--neutral-limit", "1", "--adversarial-limit", "1"])
        .args([
            "--open-items",
            "1",
            "--dev-prompts",
            "1",
            "--max-tokens",
            "6",
        ])
        .arg("--model")
        .arg(real_model_path())
        .arg("--adapters")
        .args(&adapters)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let md = std::fs::read_to_string(out.join("README.md")).unwrap();
    for needle in [
        "## Base and experts",
        "![stance along the sweep and compass](sweep.svg)",
        "Spearman's rho",
        "## Side effects",
        "## Open-ended stance",
        "Acquiescence control",
    ] {
        assert!(md.contains(needle), "missing {needle:?} in\n{md}");
    }
    roxmltree::Document::parse(&std::fs::read_to_string(out.join("sweep.svg")).unwrap()).unwrap();
    let page: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert_eq!(
        page["side_effects"]["perplexity"].as_array().unwrap().len(),
        3
    );
    assert!(page["open_ended"]["judge"]["dev_accuracy"].is_f64());
}

#[test]
fn option_probabilities_match_a_direct_full_sequence_computation() {
    use candle_core::IndexOp;
    use stancemix::model::Logits;
    let model = real_model(WeightFormat::F32);
    let engine = random_engine(&model);
    let ins = compass(2);
    let blend: Blend = "dial=0.7".parse().unwrap();
    let opts = quick_options();
    let r = score_instrument(
        &engine,
        &ins,
        std::slice::from_ref(&blend),
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    let g = blend.gates(&engine.experts).unwrap();
    let tok = &model.tokenizer;
    for (v, variant) in r.variants.iter().enumerate() {
        let tpl = &opts.templates[0];
        assert_eq!(tpl.id, variant.template);
        for (i, it) in ins.items.iter().enumerate() {
            let text = tpl
                .render(&tok.chat, None, &it.text, &ins.answers, variant.order)
                .unwrap();
            let n = tok.encode(&text).unwrap().len();
            // log p(option) from one uncached pass over prompt + option.
            let lp: Vec<f64> = ins
                .answers
                .iter()
                .map(|a| {
                    let ids = tok
                        .encode(&format!("{text}{}", tpl.continuation(&tok.chat, a)))
                        .unwrap();
                    let z = engine
                        .forward_rows(&ids, None, std::slice::from_ref(&g), Logits::All)
                        .unwrap()
                        .i(0)
                        .unwrap();
                    (n..ids.len())
                        .map(|t| {
                            let row: Vec<f32> = z.i(t - 1).unwrap().to_vec1().unwrap();
                            let m = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
                            let lse =
                                m + row.iter().map(|x| (*x as f64 - m).exp()).sum::<f64>().ln();
                            row[ids[t] as usize] as f64 - lse
                        })
                        .sum()
                })
                .collect();
            let total: f64 = lp.iter().map(|x| x.exp()).sum();
            let got = &r.blends[0].items[i].variants[v];
            for (a, l) in lp.iter().enumerate() {
                let want = l.exp() / total;
                assert!(
                    (got.probs[a] - want).abs() < 1e-4,
                    "{}: {a}: {} vs {want}",
                    it.id,
                    got.probs[a]
                );
            }
            assert!(
                // Four options' masses, each from f32 logits summed in another order by the
                // cached pass than by this full one: up to 1e-4 each.
                (got.outside - (1.0 - total)).abs() < 4e-4,
                "{}: outside {} vs {}",
                it.id,
                got.outside,
                1.0 - total
            );
        }
    }
}

#[test]
fn eval_cli_scores_repeated_blend_flags_together() {
    let dir = tempfile::tempdir().unwrap();
    let adapters = random_adapter_dirs(dir.path());
    let o = std::process::Command::new(bin())
        .args([
            "eval",
            "--items",
            "1",
            "--templates",
            "respond",
            "--system",
            "without",
        ])
        .args([
            "--one-order",
            "--json",
            "--blend",
            "base",
            "--blend",
            "dial=-0.5",
        ])
        .args(["--blend", "mix=0.25@logits"])
        .arg("--model")
        .arg(real_model_path())
        .arg("--adapters")
        .args(&adapters)
        .arg("--out")
        .arg(dir.path().join("e.json"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names: Vec<&str> = v["blends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["blend"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "base | weights",
            "dial -0.50 | weights",
            "mix 0.25 | logits"
        ]
    );
    assert!(v["blends"][1]["weights"]["conservative"].is_f64());
}

#[test]
fn progressive_side_share_counts_items_whose_progressive_options_hold_most_mass() {
    let model = tiny_model(31);
    let engine = random_engine(&model);
    let ins = compass(8);
    let blends: Vec<Blend> = ["base", "expert=progressive", "expert=conservative"]
        .iter()
        .map(|b| b.parse().unwrap())
        .collect();
    let r = score_instrument(&engine, &ins, &blends, &quick_options(), &mut |_, _| {}).unwrap();
    for b in &r.blends {
        // Recount from the items' mean probabilities and the instrument's effects: the options
        // with a negative (progressive) effect on the item's axis.
        let on_side = ins
            .items
            .iter()
            .zip(&b.items)
            .filter(|(it, res)| {
                let effects = it.effects.values().next().unwrap();
                let mass: f64 = (0..effects.len())
                    .filter(|&a| effects[a] < 0.0)
                    .map(|a| res.probs[a])
                    .sum();
                mass > 0.5
            })
            .count();
        let want = on_side as f64 / ins.items.len() as f64;
        assert!(
            (b.progressive_side - want).abs() < 1e-12,
            "{}: {} vs {want}",
            b.blend,
            b.progressive_side
        );
    }
}
