//! One request's generation, on a blocking thread: prefill, then token by token, each step sent
//! to the HTTP side over a channel. A closed channel (the client went away) stops it.
//!
//! The arithmetic is the session's: [`Session::feed_prompt`] runs the prompt under the blend's
//! row plan (or takes it from the server's [`PromptCache`] when the same prompt ran before under
//! the same rows, with the same result) and combines the rows; each decode step goes through the
//! [`Batcher`], which runs the steps of all decoding requests as one forward pass, row for row
//! what each gets alone. Sampling repeats
//! `Turn::next_token` (repeat penalty over the last 64 generated tokens, `GenParams::sampling` in
//! candle's `LogitsProcessor`, the tokenizer's stop ids), so an answer here is token for token
//! `stancemix generate`'s for the same seed.

use candle_transformers::generation::LogitsProcessor;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

use super::batch::Batcher;
use crate::model::TokenStream;
use crate::router::Route;
use crate::runtime::PromptCache;
use crate::{Blend, Engine, GenParams};

/// What to generate.
#[derive(Debug, Clone)]
pub struct Job {
    /// The prompt's tokens (chat template applied for chat requests).
    pub prompt: Vec<u32>,
    /// The text the gate reads for an automatic blend (the last user message, or the prompt).
    pub route_text: String,
    pub blend: Blend,
    pub params: GenParams,
    /// Stop sequences: the answer ends before the first of them.
    pub stop: Vec<String>,
}

/// Why an answer ended, in OpenAI's words.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of turn or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// One step of a generation, as sent to the HTTP side.
#[derive(Debug, Clone)]
pub enum Event {
    /// The prompt is in; the blend is resolved (routed, for automatic blends).
    Started {
        weights: BTreeMap<String, f32>,
        route: Option<Route>,
        prompt_tokens: usize,
    },
    /// New answer text (complete UTF-8, never part of a stop sequence).
    Text(String),
    /// The answer is over.
    Done(Done),
    /// It failed; `invalid` when the request was at fault.
    Failed { message: String, invalid: bool },
}

/// How an answer ended, and what it cost.
#[derive(Debug, Clone, Copy)]
pub struct Done {
    pub finish: Finish,
    pub completion_tokens: usize,
    /// Decode steps run (one token fed each) and the seconds they took.
    pub decode_steps: usize,
    pub decode_secs: f64,
}

/// Text held back from the client: the longest tail of `text` that could begin a stop sequence.
fn held_back(text: &str, stop: &[String]) -> usize {
    let mut hold = 0;
    for s in stop {
        for (i, _) in s.char_indices().skip(1) {
            if text.ends_with(&s[..i]) {
                hold = hold.max(i);
            }
        }
    }
    hold
}

/// How a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Finished,
    /// The receiver went away (the client disconnected).
    Cancelled,
    Failed,
}

/// Run `job`, sending events on `tx` until done, failed or the receiver is gone; decode steps
/// are batched with the other requests' by `batcher`.
pub fn run(
    engine: &Arc<Engine>,
    batcher: &Batcher,
    prompts: &PromptCache,
    job: Job,
    tx: &mpsc::Sender<Event>,
) -> Outcome {
    match generate(engine, batcher, prompts, job, tx) {
        Ok(o) => o,
        Err(e) => {
            let invalid = e.is_client_error();
            let _ = tx.blocking_send(Event::Failed {
                message: e.to_string(),
                invalid,
            });
            Outcome::Failed
        }
    }
}

fn generate(
    engine: &Arc<Engine>,
    batcher: &Batcher,
    prompts: &PromptCache,
    job: Job,
    tx: &mpsc::Sender<Event>,
) -> crate::Result<Outcome> {
    let (g, plan, route) = engine.plan(&job.blend, &job.route_text)?;
    let mut session = engine.session();
    let mut logits = session.feed_prompt(&job.prompt, &plan, prompts)?;
    let weights = engine
        .expert_names()
        .iter()
        .cloned()
        .zip(g.iter().copied())
        .filter(|(_, x)| *x != 0.0)
        .collect();
    let started = Event::Started {
        weights,
        route,
        prompt_tokens: job.prompt.len(),
    };
    if tx.blocking_send(started).is_err() {
        return Ok(Outcome::Cancelled);
    }
    let tok = &engine.model.tokenizer;
    let stop_ids = tok.stop_ids();
    let dev = engine.model.device().clone();
    let params = &job.params;
    let mut sample = LogitsProcessor::from_sampling(params.seed, params.sampling());
    let mut generated: Vec<u32> = Vec::new();
    let mut stream = TokenStream::default();
    let mut text = String::new();
    let mut sent = 0;
    let mut decode_secs = 0.0;
    let mut decode_steps = 0;
    let mut by_sequence = false;
    // From here on the batcher waits for this generation's steps.
    let _decoding = batcher.enter();
    let finish = loop {
        if generated.len() >= params.max_tokens {
            break Finish::Length;
        }
        if tx.is_closed() {
            return Ok(Outcome::Cancelled);
        }
        let mut z = candle_core::Tensor::new(logits.as_slice(), &dev)?;
        if params.repeat_penalty != 1.0 {
            let start = generated.len().saturating_sub(params.repeat_last_n);
            z = candle_transformers::utils::apply_repeat_penalty(
                &z,
                params.repeat_penalty,
                &generated[start..],
            )?;
        }
        let id = sample.sample(&z)?;
        if stop_ids.contains(&id) {
            break Finish::Stop;
        }
        generated.push(id);
        if let Some(piece) = stream.push(tok, id)? {
            text.push_str(&piece);
            if let Some(at) = job.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                text.truncate(at);
                by_sequence = true;
            }
            let upto = if by_sequence {
                text.len()
            } else {
                text.len() - held_back(&text, &job.stop)
            };
            if upto > sent {
                if tx
                    .blocking_send(Event::Text(text[sent..upto].into()))
                    .is_err()
                {
                    return Ok(Outcome::Cancelled);
                }
                sent = upto;
            }
            if by_sequence {
                break Finish::Stop;
            }
        }
        if generated.len() < params.max_tokens {
            let t0 = Instant::now();
            (session, logits) = batcher.feed(session, id, &plan)?;
            decode_secs += t0.elapsed().as_secs_f64();
            decode_steps += 1;
        }
    };
    if !by_sequence {
        // What the stop-sequence check held back, and the bytes of an unfinished character.
        let full = stream.text(tok)?;
        let rest = if full.starts_with(&text) { full } else { text };
        if rest.len() > sent && rest.is_char_boundary(sent) {
            let _ = tx.blocking_send(Event::Text(rest[sent..].into()));
        }
    }
    let done = Event::Done(Done {
        finish,
        completion_tokens: generated.len(),
        decode_steps,
        decode_secs,
    });
    Ok(if tx.blocking_send(done).is_ok() {
        Outcome::Finished
    } else {
        Outcome::Cancelled
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_only_what_could_start_a_stop_sequence() {
        let stop = vec!["\nUser:".to_string(), "END".to_string()];
        assert_eq!(held_back("hello\nUs", &stop), 3);
        assert_eq!(held_back("hello E", &stop), 1);
        assert_eq!(held_back("hello", &stop), 0);
        assert_eq!(held_back("anything", &[]), 0);
    }
}
