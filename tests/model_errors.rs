//! Bad model files give a one-line error naming the file and the problem; never a panic.

mod common;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use common::*;
use std::path::Path;

fn info_fails_with(path: &Path, needle: &str) {
    let out = std::process::Command::new(bin())
        .args(["info", "--model"])
        .arg(path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "should fail: {err}");
    assert!(!err.contains("panicked"), "panicked: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(
        err.contains(&path.display().to_string()),
        "names the file: {err}"
    );
    assert!(err.contains(needle), "says '{needle}': {err}");
}

#[test]
fn truncated_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("truncated.gguf");
    let bytes = std::fs::read(real_model_path()).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 3]).unwrap();
    info_fails_with(&p, "truncated");
    // Cut inside the header too.
    std::fs::write(&p, &bytes[..1000]).unwrap();
    info_fails_with(&p, "GGUF");
}

#[test]
fn unsupported_architecture_is_a_clear_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("gpt2.gguf");
    let t = QTensor::quantize(
        &Tensor::zeros((4, 4), candle_core::DType::F32, &Device::Cpu).unwrap(),
        GgmlDType::F32,
    )
    .unwrap();
    stancemix::model::write_gguf(
        &p,
        &[("general.architecture", Value::String("gpt2".into()))],
        &[("token_embd.weight".into(), t)],
    )
    .unwrap();
    info_fails_with(
        &p,
        "unsupported architecture: general.architecture is 'gpt2'",
    );
}

#[test]
fn text_file_as_model_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("notes.txt");
    std::fs::write(&p, "this is not a model\n").unwrap();
    info_fails_with(&p, "not a readable GGUF file");
    info_fails_with(&dir.path().join("missing.gguf"), "No such file");
}
