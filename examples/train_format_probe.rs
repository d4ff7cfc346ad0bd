//! How close LoRA training over the int8 base (`--base-format int8`, `model::gemm8`) comes to
//! the f32 one: answer-token loss of a micro-batch, and the cosine similarity and relative
//! error of every LoRA gradient, on the real base and the stance data.
//! `cargo run --release --example train_format_probe [BATCHES]`.
use candle_core::{Device, Tensor};
use stancemix::data::export::{export, Split, View};
use stancemix::data::load_stance_dir;
use stancemix::model::{fetch, LoadOptions, Model, Target, WeightFormat};
use stancemix::train::{Method, TrainConfig, Trainer};

fn main() -> anyhow::Result<()> {
    let batches: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    let path =
        fetch::ensure_default_model(&stancemix::util::Paths::at(env!("CARGO_MANIFEST_DIR")))?;
    let pairs = load_stance_dir(std::path::Path::new("adapters/data/stance"))?;
    let records = export(
        &pairs,
        View::Sft,
        "progressive",
        Split::Train,
        &stancemix::model::chat::ChatTemplate::chatml(),
    )?;
    let dir = tempfile::tempdir()?;
    let mut grads: Vec<Vec<(String, Vec<f32>)>> = Vec::new();
    let mut losses = Vec::new();
    for format in [WeightFormat::F32, WeightFormat::Int8] {
        let model = Model::load(&path, &LoadOptions { format })?;
        let c = TrainConfig {
            method: Method::Sft,
            rank: 8,
            alpha: 16.0,
            targets: Target::ALL.map(|t| t.peft_name().to_string()).to_vec(),
            max_seq_len: 128,
            ..TrainConfig::default()
        };
        let t = Trainer::new(&model, c, &records, &[], dir.path())?;
        // The same non-zero B everywhere, so A's gradients are non-zero too.
        for (i, p) in t.lora().pairs.values().enumerate() {
            let n = p.b.elem_count();
            let v: Vec<f32> = (0..n)
                .map(|j| ((j * 7 + i * 13) as f32 * 0.37).sin() * 0.02)
                .collect();
            p.b.set(&Tensor::from_vec(v, p.b.shape().clone(), &Device::Cpu)?)?;
        }
        let mut loss_sum = 0.0;
        let mut acc: Vec<(String, Vec<f32>)> = Vec::new();
        for b in 0..batches {
            let ex: Vec<_> = t.train_examples()[b * 4..b * 4 + 4].iter().collect();
            let (loss, _) = t.batch_loss(&ex, true)?;
            loss_sum += loss.to_scalar::<f32>()? as f64;
            let g = loss.backward()?;
            for (k, (name, var)) in t.lora().named_vars().into_iter().enumerate() {
                let v = g
                    .get(var.as_tensor())
                    .map(|t| t.flatten_all()?.to_vec1::<f32>())
                    .transpose()?;
                let v = v.unwrap_or_else(|| vec![0.0; var.elem_count()]);
                if b == 0 {
                    acc.push((name, v));
                } else {
                    acc[k].1.iter_mut().zip(&v).for_each(|(a, x)| *a += x);
                }
            }
        }
        losses.push(loss_sum / batches as f64);
        grads.push(acc);
    }
    println!(
        "mean answer-token loss: f32 {:.5}, int8 {:.5}",
        losses[0], losses[1]
    );
    let (mut worst, mut all_num, mut all_den, mut all_dot, mut n2) = (1.0f64, 0.0, 0.0, 0.0, 0.0);
    for ((name, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
        let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum();
        let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum();
        let diff: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum();
        let cos = dot / (na.sqrt() * nb.sqrt()).max(1e-30);
        if cos < worst {
            worst = cos;
            println!(
                "  lowest so far: {name} cos {cos:.4} rel err {:.4}",
                (diff / na).sqrt()
            );
        }
        all_num += diff;
        all_den += na;
        all_dot += dot;
        n2 += nb;
    }
    println!(
        "all LoRA gradients: cosine {:.5}, relative error {:.4}, norm ratio int8/f32 {:.4}",
        all_dot / (all_den.sqrt() * n2.sqrt()),
        (all_num / all_den).sqrt(),
        (n2 / all_den).sqrt()
    );
    Ok(())
}
