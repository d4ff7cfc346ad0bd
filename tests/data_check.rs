//! `data check` on deliberately broken files: each fails with the right `file:line` message.

mod common;

use stancemix::data::check;
use std::path::{Path, PathBuf};

fn pair(id: &str, topic: &str, prompt: &str) -> serde_json::Value {
    let words = |side: &str| format!("I think {side} answers deserve care and reasons. ").repeat(4);
    serde_json::json!({"id": id, "topic": topic, "axis": stancemix::data::topics::axis_of(topic).unwrap_or("economic"),
        "kind": "opinion", "prompt": prompt, "progressive": words("progressive"), "conservative": words("conservative")})
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn errors_of(paths: &[PathBuf]) -> Vec<String> {
    check(paths).errors
}

fn assert_has(errors: &[String], want: &str) {
    assert!(
        errors.iter().any(|e| e.contains(want)),
        "expected an error containing '{want}', got {errors:#?}"
    );
}

#[test]
fn good_file_passes() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("ok.jsonl");
    write_lines(
        &f,
        &[
            pair(
                "a-1",
                "taxes",
                "Should estates be taxed more heavily at death?",
            )
            .to_string(),
            pair(
                "a-2",
                "guns",
                "What do you think about background checks at gun shows?",
            )
            .to_string(),
        ],
    );
    assert!(errors_of(&[f]).is_empty());
}

#[test]
fn broken_files_fail_with_file_line_messages() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("bad.jsonl");
    let f_s = f.display().to_string();
    let mut missing = pair(
        "b-2",
        "taxes",
        "How should payroll taxes change for gig workers?",
    );
    missing.as_object_mut().unwrap().remove("conservative");
    write_lines(
        &f,
        &[
            pair(
                "b-1",
                "taxes",
                "Is a flat tax fairer than brackets for working families?",
            )
            .to_string(),
            "{not json".to_string(),
            missing.to_string(),
            pair(
                "b-4",
                "astrology",
                "Do stars decide elections of club presidents?",
            )
            .to_string(),
            pair(
                "b-1",
                "housing",
                "Should zoning allow more duplexes near transit lines?",
            )
            .to_string(),
            pair(
                "b-6",
                "labor",
                "Those damn fucking unions are a shitshow, right?",
            )
            .to_string(),
        ],
    );
    let errs = errors_of(&[f]);
    assert_has(&errs, &format!("{f_s}:2: json:"));
    assert_has(&errs, &format!("{f_s}:3: conservative: missing field"));
    assert_has(&errs, &format!("{f_s}:4: topic: unknown topic 'astrology'"));
    assert_has(
        &errs,
        &format!("{f_s}:5: id: duplicate id 'b-1' (first at {f_s}:1)"),
    );
    assert_has(
        &errs,
        &format!("{f_s}:6: prompt: flagged by the offensive-language filter"),
    );
}

#[test]
fn instrument_item_copied_into_training_data_is_caught() {
    let d = tempfile::tempdir().unwrap();
    let ins = d.path().join("ins.json");
    std::fs::write(
        &ins,
        serde_json::json!({"name": "t", "answers": ["Disagree", "Agree"], "axes": {"economic": {"scale": {"range": [-10, 10]}}},
            "items": [{"id": "e1", "text": "Governments should guarantee every citizen a basic income paid for by higher taxes on the wealthy.", "effects": {"economic": [1, -1]}}]})
        .to_string(),
    )
    .unwrap();
    let f = d.path().join("train.jsonl");
    // The item with small edits, inside a proposition frame.
    write_lines(&f, &[pair("c-1", "welfare", "Agree or disagree: \"Government should guarantee every citizen a basic income, paid for by higher taxes on wealthy people.\"").to_string()]);
    let errs = errors_of(&[f.clone(), ins.clone()]);
    assert_has(
        &errs,
        &format!(
            "{}:1: prompt: overlaps held-out instrument item {}: e1",
            f.display(),
            ins.display()
        ),
    );
    // An unrelated prompt does not fire.
    write_lines(
        &f,
        &[pair(
            "c-1",
            "welfare",
            "How should food assistance handle people who move between states?",
        )
        .to_string()],
    );
    assert!(errors_of(&[f, ins]).is_empty());
}

#[test]
fn near_duplicates_and_unequal_sides_are_caught() {
    let d = tempfile::tempdir().unwrap();
    let (f1, f2) = (d.path().join("one.jsonl"), d.path().join("two.jsonl"));
    write_lines(
        &f1,
        &[pair(
            "d-1",
            "trade",
            "Should the country raise tariffs on imported steel to protect jobs?",
        )
        .to_string()],
    );
    let mut p = pair(
        "d-2",
        "trade",
        "Should the country raise tariffs on imported steel to protect local jobs?",
    );
    p["conservative"] = serde_json::json!(
        "I disagree because tariffs raise prices for everyone who buys things made of steel."
            .repeat(5)
    );
    write_lines(&f2, &[p.to_string()]);
    let errs = errors_of(&[f1.clone(), f2.clone()]);
    assert_has(
        &errs,
        &format!(
            "{}:1: prompt: near duplicate of {}:1",
            f2.display(),
            f1.display()
        ),
    );
    assert_has(
        &errs,
        &format!(
            "{}:1: conservative: the two sides differ in length by more than 2x",
            f2.display()
        ),
    );
}

#[test]
fn shipped_data_passes_check() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let r = check(&[
        root.join("adapters/data"),
        root.join("adapters/instruments"),
        root.join("router-data"),
    ]);
    assert!(
        r.errors.is_empty(),
        "{:#?}",
        &r.errors[..r.errors.len().min(20)]
    );
}
