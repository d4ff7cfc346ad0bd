//! The optional sections of an evaluation, over several blends: side effects (perplexity on
//! neutral text, the adversarial check) and open-ended stance. `stancemix eval` and `report`
//! share them and only print what they return.

use std::path::PathBuf;
use std::sync::Arc;

use super::judge::Judge;
use super::open_ended::{instrument_prompts, open_ended, stance_dev_prompts};
use super::report::{OpenEndedSection, SideEffects};
use super::side_effects::{load_adversarial, load_neutral, perplexity, safety};
use crate::data::{load_stance_dir, Instrument};
use crate::model::Model;
use crate::runtime::{Blend, Engine, GenParams};
use crate::Result;

/// Settings of the side-effect and open-ended sections.
#[derive(Debug, Clone)]
pub struct SectionConfig {
    /// Stance pairs whose dev prompts are answered openly.
    pub stance_data: PathBuf,
    /// Open-ended: instrument items to answer, spread evenly (0 = all).
    pub open_items: usize,
    /// Open-ended: stance-data dev prompts to answer, spread evenly (0 = all).
    pub dev_prompts: usize,
    /// Neutral texts for perplexity (JSON Lines).
    pub neutral: PathBuf,
    /// Neutral texts to read, spread evenly (0 = all).
    pub neutral_limit: usize,
    /// Adversarial prompts (JSON Lines).
    pub adversarial: PathBuf,
    /// Adversarial prompts to answer, spread evenly (0 = all).
    pub adversarial_limit: usize,
    /// Longest generated answer, in tokens (greedy decoding).
    pub max_tokens: usize,
}

/// `n` elements spread evenly over `v` (all when `n` is 0 or too large).
pub fn spread<T: Clone>(v: &[T], n: usize) -> Vec<T> {
    if n == 0 || n >= v.len() {
        return v.to_vec();
    }
    (0..n).map(|k| v[k * v.len() / n].clone()).collect()
}

impl SectionConfig {
    fn params(&self) -> GenParams {
        GenParams {
            max_tokens: self.max_tokens,
            ..GenParams::default()
        }
    }

    /// Perplexity (batched on `scoring`) and the adversarial check (generated on `gen`) of each
    /// blend. `progress(stage, done, total)`: stages `perplexity`, `adversarial BLEND`.
    pub fn side_effects(
        &self,
        scoring: &Arc<Engine>,
        gen: &Arc<Engine>,
        blends: &[Blend],
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<SideEffects> {
        let texts: Vec<String> = spread(&load_neutral(&self.neutral)?, self.neutral_limit)
            .into_iter()
            .map(|t| t.text)
            .collect();
        let ppl = perplexity(scoring, blends, &texts, &mut |d, t| {
            progress("perplexity", d, t)
        })?;
        let prompts = spread(
            &load_adversarial(&self.adversarial)?,
            self.adversarial_limit,
        );
        let safety = blends
            .iter()
            .map(|b| {
                let stage = format!("adversarial {b}");
                safety(gen, b, &prompts, &self.params(), &mut |d, t| {
                    progress(&stage, d, t)
                })
            })
            .collect::<Result<_>>()?;
        Ok(SideEffects {
            neutral_texts: texts.len(),
            perplexity: blends.iter().map(|b| b.to_string()).zip(ppl).collect(),
            safety,
        })
    }

    /// Answer the instrument's items and the stance data's dev prompts under each blend (on
    /// `gen`) and judge the answers, read by `reader` (the judge's base, which need not be the
    /// one that answers). `progress(stage, done, total)`: stages `open-ended BLEND`.
    pub fn open_ended(
        &self,
        judge: &Judge,
        reader: &Model,
        gen: &Arc<Engine>,
        instrument: &Instrument,
        blends: &[Blend],
        progress: &mut dyn FnMut(&str, usize, usize),
    ) -> Result<OpenEndedSection> {
        let pairs = load_stance_dir(&self.stance_data)?;
        let mut prompts = spread(&instrument_prompts(instrument), self.open_items);
        prompts.extend(spread(&stance_dev_prompts(&pairs), self.dev_prompts));
        let blends = blends
            .iter()
            .map(|b| {
                let stage = format!("open-ended {b}");
                open_ended(
                    gen,
                    judge,
                    reader,
                    b,
                    &prompts,
                    &self.params(),
                    &mut |d, t| progress(&stage, d, t),
                )
            })
            .collect::<Result<_>>()?;
        Ok(OpenEndedSection {
            judge: judge.report.clone(),
            prompts: prompts.len(),
            blends,
        })
    }
}
