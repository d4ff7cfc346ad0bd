//! Forced-choice scoring: the probability of each answer option read from the model after a
//! prompt template, normalised over the options, turned into axis scores by the instrument.
//!
//! An option's probability is that of its whole token sequence right after the prompt (the
//! product of its tokens' conditional probabilities), so options that share a first token
//! ("Strongly agree", "Strongly disagree") are still told apart. Every item is asked under
//! every variant (template x with/without system prompt x option order); the two orders of a
//! template are averaged (small models favour the first option listed), and the spread of the
//! scores across templates gives the 95% interval. Several blends are scored at once, as rows
//! of one batched forward pass; a prompt's shared start is computed once and reused.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::stats;
use super::templates::{Order, Template, TEMPLATES};
use crate::data::Instrument;
use crate::model::{KvCache, Logits};
use crate::runtime::{Blend, Engine, RowPlan, View};
use crate::util::{log_softmax, softmax_and_log_sum_exp};
use crate::{Error, Result};

/// How an instrument is asked.
#[derive(Debug, Clone)]
pub struct FcOptions {
    pub templates: Vec<Template>,
    /// Ask each template without a system prompt (`false`) and/or with one (`true`).
    pub system: Vec<bool>,
    /// The system prompt used when one is asked for (`None`: the one the model's own chat
    /// template inserts by default, e.g. SmolLM2's or Qwen's; a generic one if it has none).
    pub system_prompt: Option<String>,
    pub orders: Vec<Order>,
    /// Score only this many items, balanced over axes and keying (`None`: all; see [`subset`]).
    pub items: Option<usize>,
    /// At most this many batch rows per forward pass; more blends run in several groups.
    pub max_rows: usize,
    /// Score prompts on this many threads at once, each with its own cache. More than one pays
    /// only when candle itself runs single-threaded (see [`crate::runtime::threads`]).
    pub workers: usize,
}

/// The system prompt of the "with system" variants for a model whose template has no default.
pub const GENERIC_SYSTEM: &str = "You are a helpful assistant.";

impl Default for FcOptions {
    fn default() -> Self {
        FcOptions {
            templates: TEMPLATES.to_vec(),
            system: vec![false, true],
            system_prompt: None,
            orders: vec![Order::Forward, Order::Reversed],
            items: None,
            max_rows: 16,
            workers: 1,
        }
    }
}

/// One way of asking: template, system prompt or not, option order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Variant {
    pub template: String,
    pub system: bool,
    pub order: Order,
}

/// Option probabilities of one item under one variant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VariantProbs {
    /// Index into [`Report::variants`].
    pub variant: usize,
    /// Normalised over the options, in the instrument's answer order.
    pub probs: Vec<f64>,
    /// Probability mass that fell on none of the options.
    pub outside: f64,
}

/// One item's results for one blend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    /// Mean over variants of the normalised probabilities.
    pub probs: Vec<f64>,
    pub variants: Vec<VariantProbs>,
}

/// Expected and argmax score of one axis, as a mean over templates with its spread.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AxisScore {
    /// Score of the option probabilities (mean over templates).
    pub expected: f64,
    /// Score of each item's most probable option (mean over templates).
    pub argmax: f64,
    /// Half-width of the 95% interval of the mean over templates (Student's t).
    pub expected_ci95: f64,
    pub argmax_ci95: f64,
    /// Standard deviation over templates.
    pub expected_sd: f64,
    pub argmax_sd: f64,
}

/// Scores of one axis under one template.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub expected: f64,
    pub argmax: f64,
}

/// One template (both orders averaged) for one blend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TemplateScore {
    pub template: String,
    pub system: bool,
    pub axes: BTreeMap<String, Point>,
    pub outside_mass: f64,
}

/// Everything measured for one blend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlendScore {
    /// As shown to users (`dial +0.60 | weights`).
    pub blend: String,
    /// Gate weights by expert name.
    pub weights: BTreeMap<String, f32>,
    pub axes: BTreeMap<String, AxisScore>,
    /// Mean share of probability that fell outside the options.
    pub outside_mass: f64,
    /// Mean probability of the agreeing options (acquiescence).
    pub agree_share: f64,
    /// Mean probability of whichever option was listed first (1 / answers if unbiased).
    pub first_option_share: f64,
    /// Share of items on which the forced choice falls on the progressive side: the item's
    /// options that move its score toward progressive (negative effect) hold more than half
    /// the probability (mean over variants). The conservative side's share is the rest; an
    /// expert's "side accuracy" is its own side's share.
    #[serde(default)]
    pub progressive_side: f64,
    /// How often the blend agrees with the items its progressive side agrees with and with
    /// those it rejects: a side reader agrees more with the first; a respondent that disagrees
    /// (or agrees) with everything has half its side's share from the keying alone.
    #[serde(default)]
    pub keying: KeyingAgreement,
    pub templates: Vec<TemplateScore>,
    pub items: Vec<ItemResult>,
}

/// Items on which the agreeing options hold more than half the probability (mean over
/// variants), by keying: whether agreeing moves the item's score toward progressive
/// (`pro_agree`) or toward conservative (`pro_disagree`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyingAgreement {
    pub pro_agree_items: usize,
    pub agrees_with_pro_agree: usize,
    pub pro_disagree_items: usize,
    pub agrees_with_pro_disagree: usize,
    /// The blend's reading of sides apart from how much it agrees overall: the chance that a
    /// pro-agree item gets more of its agreeing probability than a pro-disagree item (ties
    /// count half; the ROC AUC of that probability against the keying). 0.5 reads nothing;
    /// above, it agrees more where the progressive side does; below, where the conservative
    /// side does. `None` when either keying has no items (or in files written before it).
    #[serde(default)]
    pub agree_auc: Option<f64>,
}

impl KeyingAgreement {
    /// Count over `items` (results in the instrument's item order).
    pub fn of(ins: &Instrument, items: &[ItemResult]) -> KeyingAgreement {
        let agree = agreeing(&ins.answers);
        let mut k = KeyingAgreement::default();
        // Agreeing probability of each item, by keying, for the AUC.
        let (mut pro, mut con) = (Vec::new(), Vec::new());
        for (it, r) in ins.items.iter().zip(items) {
            // Effect of agreeing: the agreeing options' summed effects over the item's axes.
            let effect: f64 = it
                .effects
                .values()
                .flat_map(|e| agree.iter().filter_map(|&a| e.get(a)))
                .sum();
            let p_agree = agree.iter().map(|&a| r.probs[a]).sum::<f64>();
            let agrees = p_agree > 0.5;
            if effect < 0.0 {
                k.pro_agree_items += 1;
                k.agrees_with_pro_agree += agrees as usize;
                pro.push(p_agree);
            } else if effect > 0.0 {
                k.pro_disagree_items += 1;
                k.agrees_with_pro_disagree += agrees as usize;
                con.push(p_agree);
            }
        }
        if !pro.is_empty() && !con.is_empty() {
            let wins: f64 = pro
                .iter()
                .flat_map(|a| con.iter().map(move |b| a.total_cmp(b)))
                .map(|o| match o {
                    std::cmp::Ordering::Greater => 1.0,
                    std::cmp::Ordering::Equal => 0.5,
                    std::cmp::Ordering::Less => 0.0,
                })
                .sum();
            k.agree_auc = Some(wins / (pro.len() * con.len()) as f64);
        }
        k
    }

    /// Share of items agreed with, of each keying: `(pro_agree, pro_disagree)`.
    pub fn shares(&self) -> (f64, f64) {
        let share = |a: usize, n: usize| if n == 0 { 0.0 } else { a as f64 / n as f64 };
        (
            share(self.agrees_with_pro_agree, self.pro_agree_items),
            share(self.agrees_with_pro_disagree, self.pro_disagree_items),
        )
    }
}

/// The acquiescence control: the scores of a respondent who always agrees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Control {
    pub answer: String,
    pub axes: BTreeMap<String, f64>,
}

/// The result of [`score_instrument`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub instrument: String,
    /// What the sign of a score means, as the instrument says.
    pub sign: String,
    pub answers: Vec<String>,
    pub items: usize,
    pub model: String,
    pub experts: Vec<String>,
    pub method: String,
    pub variants: Vec<Variant>,
    pub always_agree: Control,
    pub blends: Vec<BlendScore>,
    pub elapsed_s: f64,
}

/// How option probabilities are read (recorded in every report).
pub const METHOD: &str = "probability of each option's full token sequence after the prompt, normalised over the options; two option orders averaged per template; mean and 95% interval (Student's t) over templates";

/// The instrument restricted to `n` items, balanced over strata of (first axis, keying) so a
/// small subset keeps both axes and both directions of wording (an agreeing answer that moves
/// the score up or down); within a stratum, items are spread evenly. Original order is kept.
pub fn subset(ins: &Instrument, n: Option<usize>) -> Instrument {
    let mut out = ins.clone();
    let Some(n) = n.filter(|&n| n > 0 && n < ins.items.len()) else {
        return out;
    };
    // Strata in order of first appearance: (axis, whether the last answer scores higher).
    let mut strata: Vec<((String, bool), Vec<usize>)> = Vec::new();
    for (i, it) in ins.items.iter().enumerate() {
        let key = it
            .effects
            .iter()
            .next()
            .map(|(a, e)| (a.clone(), e.last() > e.first()))
            .unwrap_or_default();
        match strata.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(i),
            None => strata.push((key, vec![i])),
        }
    }
    // Interleave strata of different axes, so ties in the share go to distinct axes first.
    strata.sort_by_key(|(k, _)| {
        let rank = strata_rank(&ins.items, k);
        (rank, ins.axes.keys().position(|a| *a == k.0))
    });
    // Largest-remainder shares of n, in that order.
    let len = ins.items.len() as f64;
    let exact: Vec<f64> = strata
        .iter()
        .map(|(_, v)| n as f64 * v.len() as f64 / len)
        .collect();
    let mut take: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..strata.len()).collect();
    order.sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    for &s in order.iter().cycle().take(n - take.iter().sum::<usize>()) {
        take[s] += 1;
    }
    let mut chosen: Vec<usize> = strata
        .iter()
        .zip(&take)
        .flat_map(|((_, v), &t)| (0..t.min(v.len())).map(move |k| v[k * v.len() / t]))
        .collect();
    chosen.sort_unstable();
    out.items = chosen.into_iter().map(|i| ins.items[i].clone()).collect();
    out
}

/// How many strata of the same axis appear before this one (0 for an axis's first stratum).
fn strata_rank(items: &[crate::data::Item], key: &(String, bool)) -> usize {
    let mut seen: Vec<(String, bool)> = Vec::new();
    for it in items {
        if let Some((a, e)) = it.effects.iter().next() {
            let k = (a.clone(), e.last() > e.first());
            if !seen.contains(&k) {
                seen.push(k);
            }
        }
    }
    seen.iter()
        .take_while(|k| *k != key)
        .filter(|k| k.0 == key.0)
        .count()
}

/// Score `blends` on `instrument`, all blends batched as rows of the same forward passes.
/// `progress(done, total)` is called after each prompt.
pub fn score_instrument(
    engine: &Engine,
    instrument: &Instrument,
    blends: &[Blend],
    opts: &FcOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    let start = Instant::now();
    if blends.is_empty() {
        return Err(Error::no_data("forced choice", "no blend to score"));
    }
    for (name, empty) in [
        ("templates", opts.templates.is_empty()),
        ("system", opts.system.is_empty()),
        ("orders", opts.orders.is_empty()),
    ] {
        if empty {
            return Err(Error::setting(name, "forced choice needs at least one"));
        }
    }
    let ins = subset(instrument, opts.items);
    let variants: Vec<(Template, bool, Order)> = opts
        .templates
        .iter()
        .flat_map(|t| {
            opts.system
                .iter()
                .flat_map(move |&s| opts.orders.iter().map(move |&o| (t.clone(), s, o)))
        })
        .collect();
    let plans: Vec<RowPlan> = blends
        .iter()
        .map(|b| plan_of(engine, b))
        .collect::<Result<_>>()?;
    let lp = option_logprobs(engine, &ins, &variants, &plans, opts, progress)?;
    let blends_out = blends
        .iter()
        .zip(lp)
        .map(|(b, lp)| summarise(engine, &ins, &variants, b, &lp))
        .collect::<Result<_>>()?;
    Ok(Report {
        instrument: ins.name.clone(),
        sign: ins.sign.clone(),
        answers: ins.answers.clone(),
        items: ins.items.len(),
        model: model_name(engine),
        experts: engine.expert_names().to_vec(),
        method: METHOD.to_string(),
        variants: variants
            .iter()
            .map(|(t, s, o)| Variant {
                template: t.id.to_string(),
                system: *s,
                order: *o,
            })
            .collect(),
        always_agree: always_agree(&ins),
        blends: blends_out,
        elapsed_s: start.elapsed().as_secs_f64(),
    })
}

/// The model's name (from its metadata) or its file name.
pub fn model_name(engine: &Engine) -> String {
    engine.model.config.name.clone().unwrap_or_else(|| {
        engine
            .model
            .path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    })
}

/// The row plan of a fixed blend (automatic routing has no single plan for an instrument).
pub fn plan_of(engine: &Engine, blend: &Blend) -> Result<RowPlan> {
    if let View::Auto(p) = &blend.view {
        return Err(Error::BadBlend(format!(
            "blend auto={p} routes each prompt: forced-choice scoring needs a fixed blend (dial, mix, expert or raw weights)"
        )));
    }
    let g = blend.gates(&engine.experts)?;
    RowPlan::new(&g, blend.mode, &engine.experts)
}

/// A prompt and the tokens of each option after it.
struct Prepared {
    prompt: Vec<u32>,
    options: Vec<Vec<u32>>,
}

fn prepare(
    engine: &Engine,
    (tpl, system, order): &(Template, bool, Order),
    system_prompt: &str,
    statement: &str,
    answers: &[String],
) -> Result<Prepared> {
    let tok = &engine.model.tokenizer;
    let chat = &tok.chat;
    let text = tpl.render(
        chat,
        system.then_some(system_prompt),
        statement,
        answers,
        *order,
    )?;
    let prompt = tok.encode(&text)?;
    if prompt.is_empty() {
        return Err(Error::no_data("forced choice", "empty prompt"));
    }
    let options = answers
        .iter()
        .map(|a| {
            let cont = tpl.continuation(chat, a);
            let full = tok.encode(&format!("{text}{cont}"))?;
            // Tokenised with the prompt when the boundary is stable, alone otherwise.
            let ids = if full.len() > prompt.len() && full.starts_with(&prompt) {
                full[prompt.len()..].to_vec()
            } else {
                tok.encode(&cont)?
            };
            if ids.is_empty() {
                return Err(Error::no_data(
                    "forced choice",
                    format!("answer '{a}' has no tokens"),
                ));
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    Ok(Prepared { prompt, options })
}

/// Several blends' row plans as one batch: the distinct gate rows, and how each blend
/// combines its rows' logits into log-probabilities.
pub struct Batch {
    pub plans: Vec<RowPlan>,
    /// Distinct gate rows of all plans: the batch rows of a forward pass.
    pub rows: Vec<Vec<f32>>,
    /// For each plan, the index of each of its rows in `rows`.
    index: Vec<Vec<usize>>,
}

impl Batch {
    /// The batch of `plans`.
    pub fn new(plans: Vec<RowPlan>) -> Batch {
        let mut rows: Vec<Vec<f32>> = Vec::new();
        let index = plans
            .iter()
            .map(|plan| {
                plan.rows
                    .iter()
                    .map(|r| match rows.iter().position(|x| x == r) {
                        Some(i) => i,
                        None => {
                            rows.push(r.clone());
                            rows.len() - 1
                        }
                    })
                    .collect()
            })
            .collect();
        Batch { plans, rows, index }
    }

    /// The batch of fixed `blends` on `engine`.
    pub fn of_blends(engine: &Engine, blends: &[Blend]) -> Result<Batch> {
        Ok(Batch::new(
            blends
                .iter()
                .map(|b| plan_of(engine, b))
                .collect::<Result<_>>()?,
        ))
    }

    /// Per blend: the combined next-token log-probabilities, from one position's logits of
    /// every batch row.
    pub fn logprobs(&self, rows: &[Vec<f32>]) -> Vec<Vec<f32>> {
        self.plans
            .iter()
            .zip(&self.index)
            .map(|(plan, idx)| {
                let z: Vec<Vec<f32>> = idx.iter().map(|&i| rows[i].clone()).collect();
                log_softmax(&plan.combine(&z))
            })
            .collect()
    }
}

/// `[blend][variant][item][option]` log-probabilities, blends grouped to fit `max_rows`.
fn option_logprobs(
    engine: &Engine,
    ins: &Instrument,
    variants: &[(Template, bool, Order)],
    plans: &[RowPlan],
    opts: &FcOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Vec<Vec<Vec<f64>>>>> {
    // Group consecutive blends so each group's distinct rows fit in one batch.
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut group_rows: Vec<Vec<f32>> = Vec::new();
    for (b, plan) in plans.iter().enumerate() {
        let new: Vec<&Vec<f32>> = plan
            .rows
            .iter()
            .filter(|r| !group_rows.contains(r))
            .collect();
        if groups.is_empty() || group_rows.len() + new.len() > opts.max_rows.max(1) {
            groups.push(Vec::new());
            group_rows.clear();
        }
        for r in &plan.rows {
            if !group_rows.contains(r) {
                group_rows.push(r.clone());
            }
        }
        groups.last_mut().expect("pushed above").push(b);
    }
    // The "with system" prompt: the caller's, else the model's default, else a generic one.
    let default_system = engine.model.tokenizer.chat.default_system();
    let system_prompt = opts
        .system_prompt
        .as_deref()
        .or(default_system.as_deref())
        .unwrap_or(GENERIC_SYSTEM);
    let prepared: Vec<Vec<Prepared>> = variants
        .iter()
        .map(|v| {
            ins.items
                .iter()
                .map(|it| prepare(engine, v, system_prompt, &it.text, &ins.answers))
                .collect::<Result<_>>()
        })
        .collect::<Result<_>>()?;
    let total = groups.len() * variants.len() * ins.items.len();
    let done = AtomicUsize::new(0);
    // Prompts in order (variant-major, so a template's shared start stays cached), cut into one
    // contiguous run per worker.
    let work: Vec<(usize, &Prepared)> = prepared
        .iter()
        .enumerate()
        .flat_map(|(v, items)| items.iter().map(move |p| (v, p)))
        .collect();
    let mut out = vec![Vec::new(); plans.len()];
    if work.is_empty() {
        return Ok(out);
    }
    let workers = opts.workers.clamp(1, work.len());
    let chunk = work.len().div_ceil(workers);
    for group in &groups {
        let comb = Batch::new(group.iter().map(|&b| plans[b].clone()).collect());
        // One run of prompts on one worker: `[prompt][group blend][option]`.
        let run =
            |part: &[(usize, &Prepared)], tick: &mut dyn FnMut()| -> Result<Vec<Vec<Vec<f64>>>> {
                let mut cache = KvCache::new(engine.model.config.n_layer);
                let mut fed: Vec<u32> = Vec::new();
                part.iter()
                    .map(|(_, p)| {
                        let lp = score_prompt(engine, &mut cache, &mut fed, p, &comb)?;
                        tick();
                        Ok(lp)
                    })
                    .collect()
            };
        let parts: Vec<&[(usize, &Prepared)]> = work.chunks(chunk).collect();
        // The calling thread scores the first run and reports progress; the others count.
        let results: Vec<Result<Vec<Vec<Vec<f64>>>>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts[1..]
                .iter()
                .map(|part| {
                    let (run, done) = (&run, &done);
                    s.spawn(move || {
                        run(part, &mut || {
                            done.fetch_add(1, Ordering::Relaxed);
                        })
                    })
                })
                .collect();
            let first = run(parts[0], &mut || {
                let d = done.fetch_add(1, Ordering::Relaxed) + 1;
                progress(d, total);
            });
            let mut all = vec![first];
            all.extend(handles.into_iter().map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(Error::Internal("a scoring worker panicked".into())))
            }));
            all
        });
        // res[group blend][variant][item][option]
        let mut res = vec![vec![Vec::with_capacity(ins.items.len()); variants.len()]; group.len()];
        let scored = results.into_iter().collect::<Result<Vec<_>>>()?;
        for ((v, _), lp) in work.iter().zip(scored.into_iter().flatten()) {
            for (k, x) in lp.into_iter().enumerate() {
                res[k][*v].push(x);
            }
        }
        progress(done.load(Ordering::Relaxed), total);
        for (k, &b) in group.iter().enumerate() {
            out[b] = std::mem::take(&mut res[k]);
        }
    }
    Ok(out)
}

/// Log-probabilities `[position][blend][token]` after a run of fed tokens.
type PositionLogprobs = Vec<Vec<Vec<f32>>>;

/// Per blend, each option's log-probability after `p.prompt`. Reuses the cached prefix.
fn score_prompt(
    engine: &Engine,
    cache: &mut KvCache,
    fed: &mut Vec<u32>,
    p: &Prepared,
    comb: &Batch,
) -> Result<Vec<Vec<f64>>> {
    let rows = &comb.rows;
    let keep = fed
        .iter()
        .zip(&p.prompt)
        .take_while(|(a, b)| a == b)
        .count()
        .min(p.prompt.len() - 1);
    cache.truncate(keep);
    fed.truncate(keep);
    let z = engine.forward_rows(&p.prompt[keep..], Some(cache), rows, Logits::Last)?;
    fed.extend_from_slice(&p.prompt[keep..]);
    let first = comb.logprobs(&z.to_vec2::<f32>()?);
    let mut lp: Vec<Vec<f64>> = vec![vec![0.0; p.options.len()]; comb.plans.len()];
    // Per-position log-probabilities `[position][blend]` after each option prefix fed so far,
    // so options sharing their leading tokens ("Strongly ...") share the forward pass.
    let mut memo: Vec<(&[u32], PositionLogprobs)> = Vec::new();
    for (o, ids) in p.options.iter().enumerate() {
        for (b, l) in first.iter().enumerate() {
            lp[b][o] = l[ids[0] as usize] as f64;
        }
        if ids.len() > 1 {
            // The option's later tokens, conditioned on its earlier ones; then roll back.
            let prefix = &ids[..ids.len() - 1];
            if !memo.iter().any(|(k, _)| *k == prefix) {
                let z = engine.forward_rows(prefix, Some(cache), rows, Logits::All)?;
                let z = z.to_vec3::<f32>()?; // (rows, t, vocab)
                let per_pos = (0..prefix.len())
                    .map(|j| {
                        let at: Vec<Vec<f32>> = z.iter().map(|r| r[j].clone()).collect();
                        comb.logprobs(&at)
                    })
                    .collect();
                memo.push((prefix, per_pos));
                cache.truncate(p.prompt.len());
            }
            let per_pos = &memo
                .iter()
                .find(|(k, _)| *k == prefix)
                .expect("memoised above")
                .1;
            for (j, at) in per_pos.iter().enumerate() {
                for (b, l) in at.iter().enumerate() {
                    lp[b][o] += l[ids[j + 1] as usize] as f64;
                }
            }
        }
    }
    Ok(lp)
}

/// Normalised probabilities and the mass outside the options, from option log-probabilities.
pub fn normalise(lp: &[f64]) -> (Vec<f64>, f64) {
    let (p, lse) = softmax_and_log_sum_exp(lp);
    (p, (1.0 - lse.exp()).max(0.0))
}

/// One-hot sheet of each row's most probable answer (first on ties).
pub fn argmax_sheet(sheet: &[Vec<f64>]) -> Vec<Vec<f64>> {
    sheet
        .iter()
        .map(|p| {
            let k = p
                .iter()
                .enumerate()
                .fold(0, |best, (i, &x)| if x > p[best] { i } else { best });
            (0..p.len())
                .map(|i| if i == k { 1.0 } else { 0.0 })
                .collect()
        })
        .collect()
}

/// Answers that agree ("Agree", "Strongly agree"; not "Disagree").
pub fn agreeing(answers: &[String]) -> Vec<usize> {
    answers
        .iter()
        .enumerate()
        .filter(|(_, a)| {
            let a = a.to_lowercase();
            a.contains("agree") && !a.contains("disagree")
        })
        .map(|(i, _)| i)
        .collect()
}

/// The always-agree control: the plainest agreeing answer ("Agree") for every item (the last
/// answer when none agrees).
pub fn always_agree(ins: &Instrument) -> Control {
    let k = agreeing(&ins.answers)
        .into_iter()
        .min_by_key(|&i| ins.answers[i].len())
        .unwrap_or(ins.answers.len() - 1);
    let sheet: Vec<Vec<f64>> = ins
        .items
        .iter()
        .map(|_| {
            (0..ins.answers.len())
                .map(|i| if i == k { 1.0 } else { 0.0 })
                .collect()
        })
        .collect();
    Control {
        answer: ins.answers[k].clone(),
        axes: ins.score(&sheet),
    }
}

fn summarise(
    engine: &Engine,
    ins: &Instrument,
    variants: &[(Template, bool, Order)],
    blend: &Blend,
    lp: &[Vec<Vec<f64>>],
) -> Result<BlendScore> {
    let n_ans = ins.answers.len();
    // norm[v][i] = (probs, outside)
    let norm: Vec<Vec<(Vec<f64>, f64)>> = lp
        .iter()
        .map(|items| items.iter().map(|x| normalise(x)).collect())
        .collect();
    // Template units: (template, system), orders averaged.
    let mut units: Vec<(String, bool, Vec<usize>)> = Vec::new();
    for (v, (t, s, _)) in variants.iter().enumerate() {
        match units.iter_mut().find(|u| u.0 == t.id && u.1 == *s) {
            Some(u) => u.2.push(v),
            None => units.push((t.id.to_string(), *s, vec![v])),
        }
    }
    let mut templates = Vec::new();
    for (id, system, vs) in &units {
        let sheet: Vec<Vec<f64>> = (0..ins.items.len())
            .map(|i| {
                (0..n_ans)
                    .map(|a| vs.iter().map(|&v| norm[v][i].0[a]).sum::<f64>() / vs.len() as f64)
                    .collect()
            })
            .collect();
        let e = ins.score(&sheet);
        let m = ins.score(&argmax_sheet(&sheet));
        let outside = stats::mean(
            &vs.iter()
                .flat_map(|&v| norm[v].iter().map(|x| x.1))
                .collect::<Vec<_>>(),
        );
        templates.push(TemplateScore {
            template: id.clone(),
            system: *system,
            axes: e
                .iter()
                .map(|(k, &x)| {
                    (
                        k.clone(),
                        Point {
                            expected: x,
                            argmax: m[k],
                        },
                    )
                })
                .collect(),
            outside_mass: outside,
        });
    }
    let axes = ins
        .axes
        .keys()
        .map(|k| {
            let e: Vec<f64> = templates.iter().map(|t| t.axes[k].expected).collect();
            let m: Vec<f64> = templates.iter().map(|t| t.axes[k].argmax).collect();
            (
                k.clone(),
                AxisScore {
                    expected: stats::mean(&e),
                    argmax: stats::mean(&m),
                    expected_ci95: stats::ci95(&e),
                    argmax_ci95: stats::ci95(&m),
                    expected_sd: stats::sd(&e),
                    argmax_sd: stats::sd(&m),
                },
            )
        })
        .collect();
    let agree = agreeing(&ins.answers);
    let (mut outside, mut agree_share, mut first, mut n) = (0.0, 0.0, 0.0, 0.0);
    for (v, (_, _, order)) in variants.iter().enumerate() {
        let first_idx = match order {
            Order::Forward => 0,
            Order::Reversed => n_ans - 1,
        };
        for (p, out) in &norm[v] {
            outside += out;
            agree_share += agree.iter().map(|&a| p[a]).sum::<f64>();
            first += p[first_idx];
            n += 1.0;
        }
    }
    let items: Vec<ItemResult> = ins
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| ItemResult {
            id: it.id.clone(),
            probs: (0..n_ans)
                .map(|a| norm.iter().map(|nv| nv[i].0[a]).sum::<f64>() / norm.len() as f64)
                .collect(),
            variants: norm
                .iter()
                .enumerate()
                .map(|(v, nv)| VariantProbs {
                    variant: v,
                    probs: nv[i].0.clone(),
                    outside: nv[i].1,
                })
                .collect(),
        })
        .collect();
    let progressive_side = if items.is_empty() {
        0.0
    } else {
        let on_side = |it: &crate::data::Item, r: &ItemResult| -> bool {
            let mass: f64 = it
                .effects
                .values()
                .flat_map(|e| e.iter().enumerate())
                .filter(|(_, &x)| x < 0.0)
                .map(|(a, _)| r.probs[a])
                .sum();
            mass > 0.5
        };
        ins.items
            .iter()
            .zip(&items)
            .filter(|(it, r)| on_side(it, r))
            .count() as f64
            / items.len() as f64
    };
    let g = blend.gates(&engine.experts)?;
    Ok(BlendScore {
        progressive_side,
        keying: KeyingAgreement::of(ins, &items),
        blend: blend.to_string(),
        weights: engine
            .expert_names()
            .iter()
            .cloned()
            .zip(g)
            .filter(|(_, x)| *x != 0.0)
            .collect(),
        axes,
        outside_mass: outside / n,
        agree_share: agree_share / n,
        first_option_share: first / n,
        templates,
        items,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subset_balances_axes_and_keying() {
        use crate::data::{Axis, Item, Scale};
        // Items alternate keying within each axis, all economic first: an even stride would
        // pick one keying only.
        let items: Vec<Item> = (0..16)
            .map(|i| Item {
                id: format!("q{i}"),
                text: "t".into(),
                effects: [(
                    if i < 8 { "econ" } else { "soc" }.to_string(),
                    if i % 2 == 0 {
                        vec![1.0, -1.0]
                    } else {
                        vec![-1.0, 1.0]
                    },
                )]
                .into(),
            })
            .collect();
        let ins = Instrument {
            name: "t".into(),
            description: String::new(),
            sign: String::new(),
            answers: vec!["No".into(), "Yes".into()],
            axes: ["econ", "soc"]
                .iter()
                .map(|a| {
                    (
                        a.to_string(),
                        Axis {
                            scale: Scale::Range([-1.0, 1.0]),
                        },
                    )
                })
                .collect(),
            items,
        };
        let ids = |n| -> Vec<String> {
            subset(&ins, Some(n))
                .items
                .iter()
                .map(|i| i.id.clone())
                .collect()
        };
        assert_eq!(ids(2), ["q0", "q8"]);
        assert_eq!(ids(4), ["q0", "q1", "q8", "q9"]);
        assert_eq!(ids(8).len(), 8);
        assert_eq!(subset(&ins, None).items.len(), 16);
    }

    /// Counted by hand: four items, two keyed each way (agreeing moves the score down, i.e.
    /// toward progressive, or up), read by a respondent that agrees with three of them.
    #[test]
    fn keying_agreement_counts_agreement_per_keying() {
        use crate::data::Item;
        // Pro-agree (s = 1): the disagreeing options move the score up, the agreeing ones down.
        let effects = |s: f64| [("econ".to_string(), vec![s, s / 2.0, -s / 2.0, -s])].into();
        let items: Vec<Item> = [1.0, 1.0, -1.0, -1.0]
            .iter()
            .enumerate()
            .map(|(i, &a)| Item {
                id: format!("q{i}"),
                text: "t".into(),
                effects: effects(a),
            })
            .collect();
        let ins = Instrument {
            name: "t".into(),
            description: String::new(),
            sign: String::new(),
            answers: ["Strongly disagree", "Disagree", "Agree", "Strongly agree"]
                .map(String::from)
                .to_vec(),
            axes: Default::default(),
            items,
        };
        let result = |p: [f64; 4]| ItemResult {
            id: String::new(),
            probs: p.to_vec(),
            variants: vec![],
        };
        let results = [
            result([0.1, 0.1, 0.4, 0.4]), // agrees (0.8), pro-agree
            result([0.3, 0.3, 0.2, 0.2]), // disagrees, pro-agree
            result([0.0, 0.4, 0.6, 0.0]), // agrees (0.6), pro-disagree
            result([0.0, 0.2, 0.0, 0.8]), // agrees (0.8), pro-disagree
        ];
        let k = KeyingAgreement::of(&ins, &results);
        assert_eq!(
            k,
            KeyingAgreement {
                pro_agree_items: 2,
                agrees_with_pro_agree: 1,
                pro_disagree_items: 2,
                agrees_with_pro_disagree: 2,
                // Pro-agree 0.8, 0.4 against pro-disagree 0.6, 0.8: of the four pairs, 0.8 > 0.6
                // wins, 0.8 = 0.8 ties, 0.4 loses twice: 1.5 / 4.
                agree_auc: Some(0.375),
            }
        );
        assert_eq!(k.shares(), (0.5, 1.0));
    }

    #[test]
    fn normalise_reports_mass_outside_options() {
        // Options with probabilities 0.2 and 0.3: normalised 0.4 / 0.6, 0.5 outside.
        let (p, out) = normalise(&[0.2f64.ln(), 0.3f64.ln()]);
        assert!((p[0] - 0.4).abs() < 1e-12 && (p[1] - 0.6).abs() < 1e-12);
        assert!((out - 0.5).abs() < 1e-12);
    }

    #[test]
    fn argmax_sheet_is_one_hot() {
        let s = argmax_sheet(&[vec![0.1, 0.6, 0.3], vec![0.5, 0.5, 0.0]]);
        assert_eq!(s, vec![vec![0.0, 1.0, 0.0], vec![1.0, 0.0, 0.0]]);
    }

    #[test]
    fn agreeing_answers_exclude_disagree() {
        let a: Vec<String> = [
            "Strongly disagree",
            "Disagree",
            "Neutral",
            "Agree",
            "Strongly agree",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(agreeing(&a), vec![3, 4]);
    }
}
