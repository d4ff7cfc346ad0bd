//! Tokenized training examples, the data order (seeded, length-bucketed, resumable), and the
//! per-sequence log-probability of answer tokens.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};

use crate::data::export::Record;
use crate::model::{Logits, Model, Pass, Tokenizer};
use crate::{Error, Result};

/// One tokenized record: the prompt, the adapter's own answer and, for DPO, the other side's.
#[derive(Debug, Clone)]
pub struct Example {
    pub id: String,
    pub prompt: Vec<u32>,
    pub chosen: Vec<u32>,
    pub rejected: Vec<u32>,
}

impl Example {
    /// Tokens a training pass over this example processes (both answers for DPO).
    pub fn tokens(&self) -> usize {
        2 * self.prompt.len() + self.chosen.len() + self.rejected.len()
    }
}

/// Tokenize records; answers are cut so prompt + answer fits in `max_len` tokens. Records whose
/// prompt leaves fewer than 8 answer tokens are dropped (their ids are returned).
pub fn tokenize(
    tok: &Tokenizer,
    records: &[Record],
    max_len: usize,
) -> Result<(Vec<Example>, Vec<String>)> {
    let mut out = Vec::new();
    let mut dropped = Vec::new();
    for r in records {
        let prompt = tok.encode(&r.prompt)?;
        if prompt.len() + 8 > max_len {
            dropped.push(r.id.clone());
            continue;
        }
        let room = max_len - prompt.len();
        let cut = |s: &str| -> Result<Vec<u32>> {
            let mut ids = tok.encode(s)?;
            ids.truncate(room);
            Ok(ids)
        };
        out.push(Example {
            id: r.id.clone(),
            chosen: cut(&r.chosen)?,
            rejected: match &r.rejected {
                Some(s) => cut(s)?,
                None => Vec::new(),
            },
            prompt,
        });
    }
    Ok((out, dropped))
}

/// The example indices of every micro-batch of one epoch. Deterministic in `(seed, epoch)`:
/// shuffle, sort chunks of 8 batches by length (less padding), shuffle the batches.
pub fn epoch_batches(
    examples: &[Example],
    batch: usize,
    seed: u64,
    epoch: usize,
) -> Vec<Vec<usize>> {
    let mut rng = StdRng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let mut order: Vec<usize> = (0..examples.len()).collect();
    order.shuffle(&mut rng);
    let mut batches: Vec<Vec<usize>> = Vec::new();
    for chunk in order.chunks(batch * 8) {
        let mut chunk = chunk.to_vec();
        chunk.sort_by_key(|&i| examples[i].tokens());
        batches.extend(chunk.chunks(batch).map(<[usize]>::to_vec));
    }
    batches.shuffle(&mut rng);
    batches
}

/// Sequences `prompt ++ answer`, right-padded into one `(rows, t)` batch, and where their
/// answer tokens are.
pub struct Packed {
    pub tokens: Tensor,
    /// Flat index `row * t + pos - 1` of the position that predicts each answer token.
    pub positions: Tensor,
    /// The answer tokens, in the same order.
    pub targets: Tensor,
    /// `(rows, n)` with a 1 where answer token `j` belongs to row `r`: sums log-probs per row.
    pub owner: Tensor,
    /// Real (non-padding) tokens in the batch.
    pub real_tokens: usize,
    pub answer_tokens: usize,
}

/// Pack `(prompt, answer)` sequences; padding uses `pad` and is never a target (the mask is
/// causal, so right padding cannot affect earlier positions).
pub fn pack(seqs: &[(&[u32], &[u32])], pad: u32) -> Result<Packed> {
    let t = seqs
        .iter()
        .map(|(p, a)| p.len() + a.len())
        .max()
        .unwrap_or(0);
    if t == 0 {
        return Err(Error::Invalid("empty training batch".into()));
    }
    let rows = seqs.len();
    let mut tokens = vec![pad; rows * t];
    let (mut positions, mut targets, mut owner_row) = (Vec::new(), Vec::new(), Vec::new());
    let mut real = 0;
    for (r, (p, a)) in seqs.iter().enumerate() {
        let row = &mut tokens[r * t..(r + 1) * t];
        row[..p.len()].copy_from_slice(p);
        row[p.len()..p.len() + a.len()].copy_from_slice(a);
        real += p.len() + a.len();
        for (j, &tok) in a.iter().enumerate() {
            positions.push((r * t + p.len() + j - 1) as u32);
            targets.push(tok);
            owner_row.push(r);
        }
    }
    let n = targets.len();
    let mut owner = vec![0f32; rows * n];
    for (j, &r) in owner_row.iter().enumerate() {
        owner[r * n + j] = 1.0;
    }
    let dev = Device::Cpu;
    Ok(Packed {
        tokens: Tensor::from_vec(tokens, (rows, t), &dev)?,
        positions: Tensor::from_vec(positions, n, &dev)?,
        targets: Tensor::from_vec(targets, (n, 1), &dev)?,
        owner: Tensor::from_vec(owner, (rows, n), &dev)?,
        real_tokens: real,
        answer_tokens: n,
    })
}

/// Log-probability of every answer token `(n,)` under the model with `pass.hook` attached.
/// The head runs only at answer positions.
pub fn token_logprobs(model: &Model, packed: &Packed, pass: &Pass) -> Result<Tensor> {
    let pass = Pass {
        hook: pass.hook,
        logits: Logits::Hidden,
        differentiable: pass.differentiable,
    };
    let hidden = model.forward(&packed.tokens, None, &pass)?; // (rows, t, hidden)
    let (rows, t, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((rows * t, h))?
        .index_select(&packed.positions, 0)?; // (n, hidden)
    let targets = packed.targets.flatten_all()?.to_vec1::<u32>()?;
    model.target_logprobs(&picked, &targets, &pass)
}

/// Sum of answer-token log-probabilities per row `(rows,)`.
pub fn row_sums(packed: &Packed, token_logp: &Tensor) -> Result<Tensor> {
    Ok(packed.owner.matmul(&token_logp.unsqueeze(1)?)?.squeeze(1)?)
}
