//! The modules' layers point one way: `scripts/check-layers` finds no upward `crate::` edge.

use std::process::Command;

#[test]
fn no_module_uses_a_layer_above_its_own() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/check-layers");
    let out = Command::new("python3")
        .arg(script)
        .output()
        .expect("scripts/check-layers runs (python3 on PATH)");
    assert!(
        out.status.success(),
        "upward edges:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
