//! Diagnostic (issue #21, docs/EVAL.md "What the data and the bases can read"): the base's
//! residual stream for one-line statements, for a linear probe in `scripts/statement-probe`.
//!
//! Run: cargo run --release --example statement_readings -- MODEL.gguf TEXTS.txt OUT.f32 8,12,16
//! For each line of TEXTS (a statement), after each listed number of blocks: the RMS-normalised
//! residual stream mean-pooled over the statement's tokens (`eval::judge::hidden_features`).
//! OUT holds the rows as little-endian f32, one row per line (layers concatenated), written to
//! OUT.tmp and renamed at the end.
use stancemix::eval::judge::{hidden_features, Context};
use stancemix::model::{LoadOptions, Model, WeightFormat};
use stancemix::{Error, Result};
use std::io::Write;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [model, texts, out, layers] = args.as_slice() else {
        return Err(Error::setting(
            "arguments",
            "usage: statement_readings MODEL.gguf TEXTS.txt OUT.f32 LAYERS (e.g. 8,12,16)",
        ));
    };
    let layers = layers
        .split(',')
        .map(|l| l.trim().parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::setting("LAYERS", format!("{layers:?}: {e}")))?;
    let opts = LoadOptions {
        format: WeightFormat::Stored,
    };
    let model = Model::load(model, &opts)?;
    let texts = std::fs::read_to_string(texts).map_err(|e| Error::io(texts, e))?;
    let lines: Vec<&str> = texts.lines().filter(|l| !l.trim().is_empty()).collect();
    let tmp = format!("{out}.tmp");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?);
    for (i, line) in lines.iter().enumerate() {
        let v = hidden_features(&model, &layers, Context::Answer, "", line)?;
        for x in v {
            f.write_all(&x.to_le_bytes())
                .map_err(|e| Error::io(&tmp, e))?;
        }
        if (i + 1) % 100 == 0 || i + 1 == lines.len() {
            eprintln!("{}/{} statements", i + 1, lines.len());
        }
    }
    f.flush().map_err(|e| Error::io(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(())
}
