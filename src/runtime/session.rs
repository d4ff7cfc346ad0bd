//! `Session`: one conversation's state (KV cache, token history, blend) over a shared engine.

use candle_core::IndexOp;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use std::sync::Arc;

use super::{Blend, DecodeStep, Engine, PromptCache, RowPlan};
use crate::model::{KvCache, Logits, Message, TokenStream};
use crate::router::Route;
use crate::{Error, Result};

/// Sampling and stopping settings for one answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenParams {
    pub max_tokens: usize,
    /// 0 means greedy.
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    /// 1.0 means none.
    pub repeat_penalty: f32,
    /// How many recent tokens the penalty looks at.
    pub repeat_last_n: usize,
    pub seed: u64,
}

impl Default for GenParams {
    fn default() -> Self {
        GenParams {
            max_tokens: 200,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            repeat_penalty: 1.1,
            repeat_last_n: 64,
            seed: 42,
        }
    }
}

impl GenParams {
    /// candle's sampling rule for these settings (temperature 0: greedy).
    pub fn sampling(&self) -> Sampling {
        let t = self.temperature;
        match (t <= 0.0, self.top_k, self.top_p) {
            (true, _, _) => Sampling::ArgMax,
            (false, None, None) => Sampling::All { temperature: t },
            (false, Some(k), None) => Sampling::TopK { k, temperature: t },
            (false, None, Some(p)) => Sampling::TopP { p, temperature: t },
            (false, Some(k), Some(p)) => Sampling::TopKThenTopP {
                k,
                p,
                temperature: t,
            },
        }
    }
}

/// Why an answer ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndOfTurn,
    MaxTokens,
    Interrupted,
}

/// A finished answer, with the blend that produced it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Reply {
    pub text: String,
    pub tokens: Vec<u32>,
    /// The blend that produced it; shown (and serialised) in its `Display` form
    /// (`dial +0.60 | weights`).
    pub blend: Blend,
    /// Gate weights by expert name.
    pub weights: std::collections::BTreeMap<String, f32>,
    pub route: Option<Route>,
    pub stop: StopReason,
}

/// One conversation. Owns its KV cache; many sessions share one [`Engine`].
pub struct Session {
    engine: Arc<Engine>,
    cache: KvCache,
    /// Gate rows the cache was computed with.
    rows: Vec<Vec<f32>>,
    /// Tokens in the cache, in order.
    fed: Vec<u32>,
    /// Tokens to feed before the next forward (the end of the last turn).
    pending: Vec<u32>,
    /// The text the model has been given (`fed` and `pending`), as the chat template rendered
    /// it: each turn feeds only what the template adds after it.
    rendered: String,
    history: Vec<Message>,
    blend: Blend,
    system: Option<String>,
    last_route: Option<Route>,
}

/// Feed one token to each of several sessions on one engine, as [`Session::feed`] would one by
/// one: sessions in steady decoding share one batched forward step
/// ([`Engine::decode_together`]); the others (a first token, pending tokens, a changed blend, a
/// full context, another engine) are fed alone, so one's error is its own. Returns each
/// session's next-token logits, in order.
pub fn feed_together(items: &mut [(&mut Session, u32, &RowPlan)]) -> Vec<Result<Vec<f32>>> {
    let Some(engine) = items.first().map(|(s, _, _)| s.engine.clone()) else {
        return Vec::new();
    };
    let batchable = |s: &Session, plan: &RowPlan| {
        s.steady(plan)
            && Arc::ptr_eq(&s.engine, &engine)
            && s.fed.len() < engine.model.config.context_len
    };
    let mut out: Vec<Option<Result<Vec<f32>>>> = (0..items.len()).map(|_| None).collect();
    for (i, (s, token, plan)) in items.iter_mut().enumerate() {
        if !batchable(s, plan) {
            out[i] = Some(s.feed(&[*token], plan));
        }
    }
    let together: Vec<usize> = (0..items.len()).filter(|&i| out[i].is_none()).collect();
    let mut steps: Vec<DecodeStep> = items
        .iter_mut()
        .zip(&out)
        .filter(|(_, done)| done.is_none())
        .map(|((s, token, plan), _)| DecodeStep {
            cache: &mut s.cache,
            token: *token,
            rows: &plan.rows,
        })
        .collect();
    let logits = engine.decode_together(&mut steps);
    drop(steps);
    match logits {
        Ok(logits) => {
            for (&i, z) in together.iter().zip(logits) {
                let (s, token, plan) = &mut items[i];
                s.fed.push(*token);
                let rows = (0..plan.rows.len().max(1))
                    .map(|r| z.i(r)?.to_vec1::<f32>())
                    .collect::<candle_core::Result<Vec<_>>>();
                out[i] = Some(rows.map(|r| plan.combine(&r)).map_err(Error::from));
            }
        }
        Err(e) => {
            // The batched step failed as a whole (the caches may be part-extended): each session
            // starts over from its tokens at its next feed.
            for &i in &together {
                let (s, _, _) = &mut items[i];
                s.cache.clear();
                s.rows.clear();
                out[i] = Some(Err(Error::Candle(candle_core::Error::Msg(format!(
                    "batched decode step: {e}"
                )))));
            }
        }
    }
    out.into_iter().flatten().collect()
}

impl Session {
    /// A fresh session with the base blend and no system prompt of its own (the model's chat
    /// template may insert its default one).
    pub fn new(engine: Arc<Engine>) -> Session {
        let n = engine.model.config.n_layer;
        Session {
            engine,
            cache: KvCache::new(n),
            rows: Vec::new(),
            fed: Vec::new(),
            pending: Vec::new(),
            rendered: String::new(),
            history: Vec::new(),
            blend: Blend::base(),
            system: None,
            last_route: None,
        }
    }

    /// The engine this session runs on.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Change the blend; takes effect at the next token. No reload, no re-merge.
    pub fn set_blend(&mut self, blend: Blend) -> Result<()> {
        if !matches!(blend.view, super::View::Auto(_)) {
            let g = blend.gates(&self.engine.experts)?;
            RowPlan::new(&g, blend.mode, &self.engine.experts)?;
        } else if let super::View::Auto(p) = &blend.view {
            if self.engine.gate.is_none() {
                return Err(Error::BadBlend(
                    "no gate loaded: automatic routing needs router-data/gate.json".into(),
                ));
            }
            self.engine.policy(p)?;
        }
        self.blend = blend;
        Ok(())
    }

    /// The current blend.
    pub fn blend(&self) -> &Blend {
        &self.blend
    }

    /// Set the system prompt (`None` for none); applies when the conversation starts.
    pub fn set_system(&mut self, system: Option<String>) {
        self.system = system;
    }

    /// The conversation so far.
    pub fn history(&self) -> &[Message] {
        &self.history
    }

    /// The last routing decision (automatic blends only).
    pub fn last_route(&self) -> Option<&Route> {
        self.last_route.as_ref()
    }

    /// Forget the conversation (keeps blend and system prompt).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.rows.clear();
        self.fed.clear();
        self.pending.clear();
        self.rendered.clear();
        self.history.clear();
        self.last_route = None;
    }

    /// Restore a conversation (e.g. a loaded transcript); the cache is rebuilt lazily.
    pub fn restore(&mut self, history: Vec<Message>) -> Result<()> {
        self.reset();
        let text = self.engine.model.tokenizer.chat.render(&history, false)?;
        self.pending = self.engine.model.tokenizer.encode(&text)?;
        self.rendered = text;
        self.history = history;
        Ok(())
    }

    /// Feed `tokens` under `plan` and return the combined next-token logits.
    /// Rebuilds the cache from history when the plan's rows differ from the cache's.
    pub fn feed(&mut self, tokens: &[u32], plan: &RowPlan) -> Result<Vec<f32>> {
        Ok(plan.combine(&self.feed_rows(tokens, plan)?))
    }

    /// Feed a whole prompt to this session, fresh (nothing fed yet), through `store`: a prompt
    /// kept there under the same rows is not computed again, and one computed here is kept.
    /// Exactly [`Session::feed`]'s logits and cache either way; a session that has already been
    /// fed just feeds.
    pub fn feed_prompt(
        &mut self,
        tokens: &[u32],
        plan: &RowPlan,
        store: &PromptCache,
    ) -> Result<Vec<f32>> {
        if !self.fed.is_empty() || !self.pending.is_empty() || tokens.is_empty() {
            return self.feed(tokens, plan);
        }
        if let Some((cache, rows)) = store.get(&plan.rows, tokens)? {
            self.cache = cache;
            self.rows = plan.rows.clone();
            self.fed = tokens.to_vec();
            return Ok(plan.combine(&rows));
        }
        let rows = self.feed_rows(tokens, plan)?;
        store.put(&plan.rows, tokens, &self.cache, &rows)?;
        Ok(plan.combine(&rows))
    }

    /// [`Session::feed`] before the rows are combined: each row's next-token logits.
    fn feed_rows(&mut self, tokens: &[u32], plan: &RowPlan) -> Result<Vec<Vec<f32>>> {
        let mut all: Vec<u32> = std::mem::take(&mut self.pending);
        all.extend_from_slice(tokens);
        if plan.rows != self.rows {
            all = [std::mem::take(&mut self.fed), all].concat();
            self.cache.clear();
            self.rows = plan.rows.clone();
        }
        if all.is_empty() {
            return Err(Error::no_data("session", "nothing to feed"));
        }
        let logits =
            self.engine
                .forward_rows(&all, Some(&mut self.cache), &plan.rows, Logits::Last)?;
        self.fed.extend_from_slice(&all);
        let rows: Vec<Vec<f32>> = (0..plan.rows.len())
            .map(|r| logits.i(r)?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        Ok(rows)
    }

    /// Whether feeding one token under `plan` is a plain decode step (nothing pending, the
    /// cache's own rows): what [`feed_together`] batches.
    fn steady(&self, plan: &RowPlan) -> bool {
        self.pending.is_empty() && !self.fed.is_empty() && plan.rows == self.rows
    }

    /// Start an answer to `user`: routes (for automatic blends), feeds the turn, and returns a
    /// [`Turn`] that yields tokens one at a time.
    pub fn begin(&mut self, user: &str, params: &GenParams) -> Result<Turn<'_>> {
        let (g, plan, route) = self.engine.plan(&self.blend, user)?;
        self.last_route = route.clone();
        if self.history.is_empty() && self.fed.is_empty() && self.pending.is_empty() {
            if let Some(s) = self.system.as_ref().filter(|s| !s.is_empty()) {
                self.history.push(Message {
                    role: "system".into(),
                    content: s.clone(),
                });
            }
        }
        self.history.push(Message {
            role: "user".into(),
            content: user.to_string(),
        });
        let full = self
            .engine
            .model
            .tokenizer
            .chat
            .render(&self.history, true)?;
        let text = match full.strip_prefix(self.rendered.as_str()) {
            Some(added) => added.to_string(),
            None => {
                // The template rewrote earlier turns (some templates do): start over.
                self.cache.clear();
                self.rows.clear();
                self.fed.clear();
                self.pending.clear();
                full.clone()
            }
        };
        self.rendered = full;
        let tokens = self.engine.model.tokenizer.encode(&text)?;
        let logits = self.feed(&tokens, &plan)?;
        let weights = self
            .engine
            .experts
            .names()
            .iter()
            .cloned()
            .zip(g.iter().copied())
            .filter(|(_, x)| *x != 0.0)
            .collect();
        Ok(Turn {
            sampler: LogitsProcessor::from_sampling(params.seed, params.sampling()),
            params: params.clone(),
            plan,
            logits,
            generated: Vec::new(),
            stream: TokenStream::default(),
            done: None,
            blend: self.blend.clone(),
            weights,
            route,
            session: self,
        })
    }

    /// Answer `user`, calling `on_text` with each new piece of text; return `false` from it to
    /// stop early. The reply records the blend that produced it.
    pub fn chat(
        &mut self,
        user: &str,
        params: &GenParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Reply> {
        let mut turn = self.begin(user, params)?;
        while let Some(piece) = turn.next_token()? {
            if !piece.text.is_empty() && !on_text(&piece.text) {
                turn.interrupt();
            }
        }
        turn.finish()
    }
}

/// One generated token and the text it completed.
#[derive(Debug, Clone)]
pub struct Piece {
    pub id: u32,
    pub text: String,
}

/// An answer being generated. Dropping it without [`Turn::finish`] leaves the session
/// consistent but unrecorded in history.
pub struct Turn<'a> {
    session: &'a mut Session,
    sampler: LogitsProcessor,
    params: GenParams,
    plan: RowPlan,
    logits: Vec<f32>,
    generated: Vec<u32>,
    stream: TokenStream,
    done: Option<StopReason>,
    blend: Blend,
    weights: std::collections::BTreeMap<String, f32>,
    route: Option<Route>,
}

impl Turn<'_> {
    /// Next-token logits (or log-probabilities in `logits` mode) before sampling.
    pub fn logits(&self) -> &[f32] {
        &self.logits
    }

    /// Stop after the current token.
    pub fn interrupt(&mut self) {
        self.done.get_or_insert(StopReason::Interrupted);
    }

    /// Change the blend mid-answer (same rows only: e.g. another dial value in weights mode
    /// changes the rows' gates, so the next token is computed under the new weights).
    pub fn set_plan(&mut self, plan: RowPlan) {
        self.plan = plan;
    }

    /// Sample the next token; `None` when the answer is over.
    pub fn next_token(&mut self) -> Result<Option<Piece>> {
        if self.done.is_some() {
            return Ok(None);
        }
        if self.generated.len() >= self.params.max_tokens {
            self.done = Some(StopReason::MaxTokens);
            return Ok(None);
        }
        let tok = &self.session.engine.model.tokenizer;
        let dev = self.session.engine.model.device().clone();
        let mut z = candle_core::Tensor::new(self.logits.as_slice(), &dev)?;
        if self.params.repeat_penalty != 1.0 {
            let start = self
                .generated
                .len()
                .saturating_sub(self.params.repeat_last_n);
            z = candle_transformers::utils::apply_repeat_penalty(
                &z,
                self.params.repeat_penalty,
                &self.generated[start..],
            )?;
        }
        let id = self.sampler.sample(&z)?;
        if tok.stop_ids().contains(&id) {
            self.done = Some(StopReason::EndOfTurn);
            return Ok(None);
        }
        self.generated.push(id);
        let text = self.stream.push(tok, id)?.unwrap_or_default();
        let plan = self.plan.clone();
        self.logits = self.session.feed(&[id], &plan)?;
        Ok(Some(Piece { id, text }))
    }

    /// Close the turn: record the answer in history and return it.
    pub fn finish(mut self) -> Result<Reply> {
        let stop = self.done.unwrap_or(StopReason::MaxTokens);
        let text = self.stream.text(&self.session.engine.model.tokenizer)?;
        let s = &mut *self.session;
        s.history.push(Message {
            role: "assistant".into(),
            content: text.clone(),
        });
        // What the template closes the answer with (`<|im_end|>\n` in ChatML) is fed before
        // the next turn.
        let answered = format!("{}{text}", s.rendered);
        let closed = s.engine.model.tokenizer.chat.render(&s.history, false)?;
        match closed.strip_prefix(answered.as_str()) {
            Some(close) => {
                s.pending = s.engine.model.tokenizer.encode(close)?;
                s.rendered = closed;
            }
            // The template renders the answer otherwise: the next turn starts over.
            None => s.rendered = answered,
        }
        Ok(Reply {
            text,
            tokens: std::mem::take(&mut self.generated),
            blend: self.blend.clone(),
            weights: self.weights.clone(),
            route: self.route.clone(),
            stop,
        })
    }
}
