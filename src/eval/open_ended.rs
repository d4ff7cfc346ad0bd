//! Open-ended stance: generate answers to the instrument's items (and to the stance data's dev
//! prompts) under a blend, and judge each answer's stance with the [`Judge`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::judge::Judge;
use crate::data::{Instrument, StancePair};
use crate::model::Model;
use crate::runtime::{Blend, Engine, GenParams};
use crate::Result;

/// A prompt to answer freely, with the axis it bears on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenPrompt {
    pub id: String,
    pub axis: String,
    pub text: String,
}

/// The instrument's items as open questions.
pub fn instrument_prompts(ins: &Instrument) -> Vec<OpenPrompt> {
    ins.items
        .iter()
        .map(|it| OpenPrompt {
            id: it.id.clone(),
            axis: it.effects.keys().next().cloned().unwrap_or_default(),
            text: format!(
                "What do you think of this statement? Give your view in a few sentences.\n\n\"{}\"",
                it.text.trim()
            ),
        })
        .collect()
}

/// The prompts of the stance data's dev pairs (held out from the experts' training).
pub fn stance_dev_prompts(pairs: &[StancePair]) -> Vec<OpenPrompt> {
    pairs
        .iter()
        .filter(|p| p.is_dev())
        .map(|p| OpenPrompt {
            id: p.id.clone(),
            axis: p.axis.clone(),
            text: p.prompt.clone(),
        })
        .collect()
}

/// One judged answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgedAnswer {
    pub id: String,
    pub axis: String,
    pub answer: String,
    pub p_conservative: f64,
}

/// Judged stance over a set of answers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Judged {
    pub answers: usize,
    /// Mean p(conservative).
    pub mean_p_conservative: f64,
    /// Share judged conservative (p > 0.5).
    pub share_conservative: f64,
    /// `2 * mean p - 1`, in [-1, 1]: negative = progressive, positive = conservative.
    pub stance: f64,
}

impl Judged {
    fn of(ps: &[f64]) -> Judged {
        let n = ps.len().max(1) as f64;
        let mean = ps.iter().sum::<f64>() / n;
        Judged {
            answers: ps.len(),
            mean_p_conservative: mean,
            share_conservative: ps.iter().filter(|&&p| p > 0.5).count() as f64 / n,
            stance: 2.0 * mean - 1.0,
        }
    }
}

/// Open-ended results of one blend.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenEnded {
    pub blend: String,
    pub overall: Judged,
    pub by_axis: BTreeMap<String, Judged>,
    pub answers: Vec<JudgedAnswer>,
}

/// Answer every prompt under `blend` (no system prompt) and judge the answers, the judge's
/// features read by `reader` (the judge's own base, [`Judge::reads_with`]).
pub fn open_ended(
    engine: &std::sync::Arc<Engine>,
    judge: &Judge,
    reader: &Model,
    blend: &Blend,
    prompts: &[OpenPrompt],
    params: &GenParams,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<OpenEnded> {
    let mut answers = Vec::new();
    for (k, p) in prompts.iter().enumerate() {
        let mut s = engine.session();
        s.set_blend(blend.clone())?;
        let reply = s.chat(&p.text, params, |_| true)?;
        // An empty answer takes no side.
        let p_conservative = if reply.text.trim().is_empty() {
            0.5
        } else {
            judge.p_conservative(reader, &p.text, &reply.text)?
        };
        answers.push(JudgedAnswer {
            id: p.id.clone(),
            axis: p.axis.clone(),
            p_conservative,
            answer: reply.text,
        });
        progress(k + 1, prompts.len());
    }
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for a in &answers {
        by.entry(a.axis.clone()).or_default().push(a.p_conservative);
    }
    let all: Vec<f64> = answers.iter().map(|a| a.p_conservative).collect();
    Ok(OpenEnded {
        blend: blend.to_string(),
        overall: Judged::of(&all),
        by_axis: by.iter().map(|(k, v)| (k.clone(), Judged::of(v))).collect(),
        answers,
    })
}
