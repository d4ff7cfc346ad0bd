//! Fast checks on the tiny random model.

mod common;

use candle_core::{Device, IndexOp, Tensor};
use common::*;
use stancemix::model::{KvCache, Logits, NoHook, Pass};

#[test]
fn incremental_decode_matches_one_full_forward() {
    let m = tiny_model(1);
    let ids = m
        .tokenizer
        .encode("<|im_start|>user\nhello there, tiny model<|im_end|>\n")
        .unwrap();
    let pass_all = Pass {
        hook: &NoHook,
        logits: Logits::All,
        differentiable: false,
    };
    let pass_last = Pass {
        hook: &NoHook,
        logits: Logits::Last,
        differentiable: false,
    };
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = m.forward(&x, None, &pass_all).unwrap().i(0).unwrap(); // (t, vocab)
    let mut cache = KvCache::new(m.config.n_layer);
    // Feed a prefix in one go, then the rest token by token (the cache grows past its first size).
    let split = 5;
    m.forward(
        &x.narrow(1, 0, split).unwrap(),
        Some(&mut cache),
        &pass_last,
    )
    .unwrap();
    for (i, &id) in ids.iter().enumerate().skip(split) {
        let step = m
            .forward(
                &Tensor::new(&[[id]], &Device::Cpu).unwrap(),
                Some(&mut cache),
                &pass_last,
            )
            .unwrap();
        let want: Vec<f32> = full.i(i).unwrap().to_vec1().unwrap();
        let d = max_abs_diff(&step.i(0).unwrap().to_vec1().unwrap(), &want);
        assert!(d < 1e-4, "position {i}: {d}");
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn differentiable_ops_match_fused_ops() {
    let m = tiny_model(2);
    let ids = m.tokenizer.encode("some text to compare").unwrap();
    let x = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = m
        .forward(
            &x,
            None,
            &Pass {
                hook: &NoHook,
                logits: Logits::All,
                differentiable: false,
            },
        )
        .unwrap();
    let b = m
        .forward(
            &x,
            None,
            &Pass {
                hook: &NoHook,
                logits: Logits::All,
                differentiable: true,
            },
        )
        .unwrap();
    let d = max_abs_diff(
        &a.flatten_all().unwrap().to_vec1().unwrap(),
        &b.flatten_all().unwrap().to_vec1().unwrap(),
    );
    assert!(d < 1e-4, "{d}");
}

#[test]
fn tiny_tokenizer_round_trips_bytes_and_specials() {
    let m = tiny_model(3);
    let s = "<|im_start|>user\nnaïve 123 ✓<|im_end|>\n";
    let ids = m.tokenizer.encode(s).unwrap();
    assert_eq!(ids[0], m.tokenizer.im_start_id.unwrap());
    assert_eq!(m.tokenizer.decode(&ids, true).unwrap(), s);
}

#[test]
fn batch_rows_equal_single_rows() {
    let m = tiny_model(4);
    let ids = m.tokenizer.encode("rows").unwrap();
    let pass = Pass {
        hook: &NoHook,
        logits: Logits::Last,
        differentiable: false,
    };
    let one = m
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
            None,
            &pass,
        )
        .unwrap();
    let three = m
        .forward(
            &Tensor::new(ids.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap()
                .repeat((3, 1))
                .unwrap(),
            None,
            &pass,
        )
        .unwrap();
    for r in 0..3 {
        let d = max_abs_diff(
            &one.i(0).unwrap().to_vec1().unwrap(),
            &three.i(r).unwrap().to_vec1().unwrap(),
        );
        assert!(d < 1e-5, "row {r}: {d}");
    }
}
