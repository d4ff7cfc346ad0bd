//! Start-up cost of each weight format: `cargo run --release --example load_probe [FORMAT...]`.
use stancemix::model::{fetch, LoadOptions, Model, WeightFormat};

fn main() -> anyhow::Result<()> {
    let path =
        fetch::ensure_default_model(&stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR")))?;
    let formats: Vec<String> = std::env::args().skip(1).collect();
    let formats = if formats.is_empty() {
        vec!["int8".to_string(), "f32".into(), "mixed".into()]
    } else {
        formats
    };
    for f in formats {
        let format: WeightFormat = f.parse()?;
        let t = std::time::Instant::now();
        let m = Model::load(&path, &LoadOptions { format })?;
        println!("{:>6}: {:.2} s", m.format.name(), t.elapsed().as_secs_f64());
    }
    Ok(())
}
