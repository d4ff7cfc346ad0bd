//! Tokenized training examples, the data order (seeded, length-bucketed, resumable), and the
//! per-sequence log-probability of answer tokens.

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use std::cell::RefCell;
use std::collections::HashMap;

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
        return Err(Error::no_data("training batch", "every sequence is empty"));
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
    let hidden = model.forward(&packed.tokens, None, &hidden_pass(pass))?; // (rows, t, hidden)
    answer_logprobs(model, packed, &hidden, pass)
}

/// [`token_logprobs`] from the residual stream `(rows, t, hidden)` entering block `after` (see
/// [`Residuals`]): the same figures, running only the blocks from `after` on.
pub fn token_logprobs_from(
    model: &Model,
    packed: &Packed,
    residual: &Tensor,
    after: usize,
    pass: &Pass,
) -> Result<Tensor> {
    let hidden = model.forward_from(residual, after, &hidden_pass(pass))?;
    answer_logprobs(model, packed, &hidden, pass)
}

fn hidden_pass<'a>(pass: &Pass<'a>) -> Pass<'a> {
    Pass {
        hook: pass.hook,
        logits: Logits::Hidden,
        differentiable: pass.differentiable,
    }
}

/// The answer tokens' log-probabilities from the final-norm hidden states `(rows, t, hidden)`.
fn answer_logprobs(model: &Model, packed: &Packed, hidden: &Tensor, pass: &Pass) -> Result<Tensor> {
    let (rows, t, h) = hidden.dims3()?;
    let picked = hidden
        .reshape((rows * t, h))?
        .index_select(&packed.positions, 0)?; // (n, hidden)
    let targets = packed.targets.flatten_all()?.to_vec1::<u32>()?;
    model.target_logprobs(&picked, &targets, pass)
}

/// The base model's residual stream entering block `after`, per token sequence, computed once
/// and kept: when an adapter covers only the blocks from `after` on, everything below is the
/// frozen base's, so a training run needs it once, not once an epoch.
///
/// Sequences asked for with `keep` stay for the whole run; the others (a run shorter than an
/// epoch never sees a training example twice) stay only until the next batch needs new ones,
/// long enough for DPO's reference pass over the batch the policy pass just read. A 1.5B run
/// of 300 DPO steps would otherwise hold ~4 GB it never reads again.
pub struct Residuals {
    after: usize,
    store: RefCell<HashMap<Vec<u32>, Tensor>>,
    scratch: RefCell<HashMap<Vec<u32>, Tensor>>,
}

impl Residuals {
    pub fn new(after: usize) -> Self {
        Residuals {
            after,
            store: RefCell::new(HashMap::new()),
            scratch: RefCell::new(HashMap::new()),
        }
    }

    /// The block the stored residuals enter.
    pub fn after(&self) -> usize {
        self.after
    }

    /// Sequences kept for the run, and the memory their residuals take.
    pub fn stored(&self) -> (usize, usize) {
        let store = self.store.borrow();
        let bytes = store.values().map(|t| t.elem_count() * 4).sum();
        (store.len(), bytes)
    }

    /// The residuals of `seqs` (`prompt ++ answer` each), right-padded with zeros into
    /// `(rows, t, hidden)` like [`pack`] pads the tokens; missing ones are computed in one pass
    /// of the base's first `after` blocks and kept for the run (`keep`) or until the next
    /// batch. Padding never reaches a real position (causal mask).
    pub fn batch(
        &self,
        model: &Model,
        seqs: &[(&[u32], &[u32])],
        pad: u32,
        keep: bool,
    ) -> Result<Tensor> {
        let full: Vec<Vec<u32>> = seqs.iter().map(|(p, a)| [*p, *a].concat()).collect();
        if keep {
            let mut scratch = self.scratch.borrow_mut();
            let mut store = self.store.borrow_mut();
            for s in &full {
                if let Some(x) = scratch.remove(s) {
                    store.insert(s.clone(), x);
                }
            }
        }
        let todo: Vec<&Vec<u32>> = {
            let (store, scratch) = (self.store.borrow(), self.scratch.borrow());
            let mut todo: Vec<&Vec<u32>> = full
                .iter()
                .filter(|s| !store.contains_key(*s) && !scratch.contains_key(*s))
                .collect();
            todo.sort();
            todo.dedup();
            todo
        };
        if !todo.is_empty() {
            let t = todo.iter().map(|s| s.len()).max().unwrap_or(0);
            let mut tokens = vec![pad; todo.len() * t];
            for (r, s) in todo.iter().enumerate() {
                tokens[r * t..r * t + s.len()].copy_from_slice(s);
            }
            let tokens = Tensor::from_vec(tokens, (todo.len(), t), &Device::Cpu)?;
            let pass = Pass {
                hook: &crate::model::NoHook,
                logits: Logits::Layer(self.after),
                differentiable: false,
            };
            let x = model.forward(&tokens, None, &pass)?; // (todo, t, hidden)
            let mut store = match keep {
                true => self.store.borrow_mut(),
                false => {
                    // What this batch reads from the last one's scratch moves up first.
                    let mut scratch = self.scratch.borrow_mut();
                    let old = std::mem::take(&mut *scratch);
                    scratch.extend(old.into_iter().filter(|(s, _)| full.contains(s)));
                    scratch
                }
            };
            for (r, s) in todo.iter().enumerate() {
                let row = x.get(r)?.narrow(0, 0, s.len())?.contiguous()?;
                store.insert((*s).clone(), row);
            }
        }
        let t = full.iter().map(Vec::len).max().unwrap_or(0);
        let (store, scratch) = (self.store.borrow(), self.scratch.borrow());
        let rows = full
            .iter()
            .map(|s| {
                let x = store.get(s).or_else(|| scratch.get(s)).ok_or_else(|| {
                    candle_core::Error::Msg("residual missing after its pass".into())
                })?;
                match t - s.len() {
                    0 => Ok(x.clone()),
                    n => Tensor::cat(
                        &[x, &Tensor::zeros((n, x.dim(1)?), x.dtype(), x.device())?],
                        0,
                    ),
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&rows, 0)?)
    }
}

/// Sum of answer-token log-probabilities per row `(rows,)`.
pub fn row_sums(packed: &Packed, token_logp: &Tensor) -> Result<Tensor> {
    Ok(packed.owner.matmul(&token_logp.unsqueeze(1)?)?.squeeze(1)?)
}
