//! `Engine`: the shared, immutable half of the runtime (model + experts + gate).

use candle_core::Tensor;
use std::path::PathBuf;
use std::sync::Arc;

use super::{Blend, RowPlan, Session};
use crate::lora::{Adapter, ExpertPrecision, ExpertSet};
use crate::model::{Group, KvCache, LoadOptions, Logits, Model, Pass, WeightFormat, WIDE_ROWS};
use crate::router::{Gate, Policy, Route};
use crate::util::Paths;
use crate::{Error, Result};

/// Model, experts and (optionally) the gate with its policies; shared by every session.
///
/// ```no_run
/// use stancemix::{util::Paths, Blend, Engine, EngineOptions, GenParams};
/// let engine = Engine::load(&EngineOptions::shipped(Paths::at("path/to/stancemix")))?;
/// let mut session = engine.session();
/// session.set_blend(Blend::dial(0.5)?)?;
/// let reply = session.chat("Should cities build more housing?", &GenParams::default(), |_| true)?;
/// println!("[{}] {}", reply.blend, reply.text);
/// # Ok::<(), stancemix::Error>(())
/// ```
#[derive(Debug)]
pub struct Engine {
    pub model: Arc<Model>,
    pub experts: ExpertSet,
    pub gate: Option<Gate>,
    pub policies: Vec<Policy>,
}

/// One cache's share of a batched decode step ([`Engine::decode_together`]).
#[derive(Debug)]
pub struct DecodeStep<'a> {
    pub cache: &'a mut KvCache,
    pub token: u32,
    /// Gate weights per row of the cache (empty: one base row).
    pub rows: &'a [Vec<f32>],
}

/// What [`Engine::load`] loads. [`EngineOptions::shipped`] gives the shipped defaults.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Where the shipped adapters, gate and fetched models are.
    pub paths: Paths,
    /// The base GGUF; `None` fetches the default model if needed.
    pub model: Option<PathBuf>,
    /// Adapter directories; `None` means the shipped ones (those that exist).
    pub adapters: Option<Vec<PathBuf>>,
    /// Gate directory; `None` means the shipped one if it exists.
    pub gate: Option<PathBuf>,
    pub format: WeightFormat,
}

impl EngineOptions {
    /// The default base model, the shipped experts and gate under `paths`, format `mixed`.
    pub fn shipped(paths: Paths) -> Self {
        EngineOptions {
            paths,
            model: None,
            adapters: None,
            gate: None,
            format: WeightFormat::Mixed,
        }
    }
}

/// The shipped adapters that exist under `paths.root`: `adapters/progressive` and
/// `adapters/conservative` (the default base's), then `adapters/<base>/progressive` and
/// `adapters/<base>/conservative` for other bases, folders in name order. [`Engine::load`]
/// keeps those trained on the base it loads ([`adapter_fits`]).
pub fn shipped_adapters(paths: &Paths) -> Vec<PathBuf> {
    let root = paths.root.join("adapters");
    let mut folders = vec![root.clone()];
    if let Ok(entries) = std::fs::read_dir(&root) {
        let mut subs: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_dir())
            .collect();
        subs.sort();
        folders.extend(subs);
    }
    folders
        .iter()
        .flat_map(|f| ["progressive", "conservative"].map(|s| f.join(s)))
        .filter(|p| p.join(crate::lora::CONFIG_FILE).exists())
        .collect()
}

/// Whether the adapter in `dir` may load on `model`: false when its config names another base
/// (or cannot be read, which loading it would report).
pub fn adapter_fits(dir: &std::path::Path, model: &crate::model::Config) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(crate::lora::CONFIG_FILE)) else {
        return false;
    };
    match serde_json::from_str::<crate::lora::AdapterConfig>(&text) {
        Ok(c) => c
            .base
            .is_none_or(|b| b.name == model.name && b.architecture == model.arch),
        Err(_) => false,
    }
}

impl Engine {
    /// Load model, adapters and gate as `opts` says. Without adapters named, the shipped
    /// experts that were trained on this base ([`adapter_fits`]).
    pub fn load(opts: &EngineOptions) -> Result<Arc<Engine>> {
        let path =
            crate::model::fetch::model_path(&opts.paths, opts.model.as_deref(), &mut |_| {})?;
        let model = Model::load(
            &path,
            &LoadOptions {
                format: opts.format,
            },
        )?;
        // By default, the shipped experts that were trained on this base.
        let dirs = opts.adapters.clone().unwrap_or_else(|| {
            shipped_adapters(&opts.paths)
                .into_iter()
                .filter(|d| adapter_fits(d, &model.config))
                .collect()
        });
        let adapters = dirs
            .iter()
            .map(|d| Adapter::load(d, &model.config))
            .collect::<Result<Vec<_>>>()?;
        let experts = ExpertSet::new(adapters)?;
        let gate_dir = opts.gate.clone().or_else(|| {
            let d = crate::router::shipped_gate_dir(&opts.paths);
            d.join(crate::router::GATE_FILE).exists().then_some(d)
        });
        let (gate, policies) = match gate_dir {
            Some(d) => (
                Some(Gate::load(&d)?),
                crate::router::load_policies(&crate::router::policies_dir(&opts.paths))?,
            ),
            None => (None, Vec::new()),
        };
        Ok(Arc::new(Engine {
            model,
            experts,
            gate,
            policies,
        }))
    }

    /// An engine from parts (tests, benchmarks, embedding with custom adapters).
    pub fn new(model: Arc<Model>, experts: ExpertSet) -> Arc<Engine> {
        Arc::new(Engine {
            model,
            experts,
            gate: None,
            policies: Vec::new(),
        })
    }

    /// An engine from parts with a gate and policies.
    pub fn with_gate(
        model: Arc<Model>,
        experts: ExpertSet,
        gate: Gate,
        policies: Vec<Policy>,
    ) -> Arc<Engine> {
        Arc::new(Engine {
            model,
            experts,
            gate: Some(gate),
            policies,
        })
    }

    /// A new conversation on this engine.
    pub fn session(self: &Arc<Self>) -> Session {
        Session::new(self.clone())
    }

    /// Forward `tokens` (`(t,)` shared by every row) for a batch whose row `r` uses gate weights
    /// `rows[r]`; extends `cache`. Returns logits `(rows, vocab)` (or `(rows, t, vocab)`).
    pub fn forward_rows(
        &self,
        tokens: &[u32],
        cache: Option<&mut KvCache>,
        rows: &[Vec<f32>],
        logits: Logits,
    ) -> Result<Tensor> {
        if tokens.is_empty() {
            return Err(Error::no_data("forward_rows", "no tokens to feed"));
        }
        let b = rows.len().max(1);
        let t = Tensor::new(tokens, self.model.device())?
            .unsqueeze(0)?
            .repeat((b, 1))?;
        let zero = [vec![0f32; self.experts.len()]];
        let rows = if rows.is_empty() { &zero[..] } else { rows };
        let hook = self.experts.hook_with(rows, self.expert_precision())?;
        self.model.forward(
            &t,
            cache,
            &Pass {
                hook: &hook,
                logits,
                differentiable: false,
            },
        )
    }

    /// One decode step for several caches together: `steps[i]` feeds `token` to `cache`, whose
    /// rows use gate weights `rows` (one row for a weights blend, several for logits and
    /// contrast blends). Returns each step's logits `(rows_i, vocab)`, row for row what
    /// [`Engine::forward_rows`] gives that cache alone: the batch runs in parts of fewer than
    /// [`WIDE_ROWS`] rows, so every row takes the narrow (row-by-row) kernels.
    pub fn decode_together(&self, steps: &mut [DecodeStep]) -> Result<Vec<Tensor>> {
        let mut out = Vec::with_capacity(steps.len());
        let mut start = 0;
        while start < steps.len() {
            // The longest run of steps from `start` under WIDE_ROWS rows (at least one step).
            let mut end = start + 1;
            let mut n = steps[start].rows.len().max(1);
            while end < steps.len() && n + steps[end].rows.len().max(1) < WIDE_ROWS {
                n += steps[end].rows.len().max(1);
                end += 1;
            }
            out.extend(self.decode_part(&mut steps[start..end])?);
            start = end;
        }
        Ok(out)
    }

    fn decode_part(&self, steps: &mut [DecodeStep]) -> Result<Vec<Tensor>> {
        let zero = vec![vec![0f32; self.experts.len()]];
        let mut tokens = Vec::new();
        let mut rows: Vec<Vec<f32>> = Vec::new();
        for s in steps.iter() {
            let r: &[Vec<f32>] = if s.rows.is_empty() { &zero } else { s.rows };
            tokens.extend(std::iter::repeat_n(s.token, r.len()));
            rows.extend(r.iter().cloned());
        }
        let hook = self.experts.hook_with(&rows, self.expert_precision())?;
        let mut groups: Vec<Group> = steps
            .iter_mut()
            .map(|s| Group {
                rows: s.rows.len().max(1),
                cache: Some(&mut *s.cache),
            })
            .collect();
        let t = Tensor::new(tokens.as_slice(), self.model.device())?.unsqueeze(1)?; // (b, 1)
        let z = self.model.decode_groups(
            &t,
            &mut groups,
            &Pass {
                hook: &hook,
                logits: Logits::Last,
                differentiable: false,
            },
        )?; // (b, vocab)
        let mut at = 0;
        let mut out = Vec::with_capacity(groups.len());
        for g in &groups {
            out.push(z.narrow(0, at, g.rows)?);
            at += g.rows;
        }
        Ok(out)
    }

    /// The experts' decode arithmetic that matches the base: int8 with a quantized base (Q8_0 is
    /// what decode steps read in every format but `f32`), f32 with an f32 base.
    pub fn expert_precision(&self) -> ExpertPrecision {
        match self.model.format {
            WeightFormat::F32 => ExpertPrecision::F32,
            _ => ExpertPrecision::Int8,
        }
    }

    /// The gate weights and row plan for `blend` applied to the prompt `text`.
    pub fn plan(&self, blend: &Blend, text: &str) -> Result<(Vec<f32>, RowPlan, Option<Route>)> {
        let (g, route) = match &blend.view {
            super::View::Auto(policy) => {
                let r = self.route(text, policy)?;
                (r.gates.clone(), Some(r))
            }
            _ => (blend.gates(&self.experts)?, None),
        };
        let plan = RowPlan::new(&g, blend.mode, &self.experts)?;
        Ok((g, plan, route))
    }

    /// Ask the gate about `text` under the policy named `policy`.
    pub fn route(&self, text: &str, policy: &str) -> Result<Route> {
        let gate = self.gate.as_ref().ok_or_else(|| {
            Error::setting(
                "gate",
                "none loaded: train one with `stancemix router train`",
            )
        })?;
        let p = self.policy(policy)?;
        gate.route(&self.model, &self.experts, text, p)
    }

    /// The loaded policy named `name`.
    pub fn policy(&self, name: &str) -> Result<&Policy> {
        self.policies
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| Error::UnknownPolicy {
                name: name.to_string(),
                loaded: self.policies.iter().map(|p| p.name.clone()).collect(),
            })
    }

    /// Names of the experts, in gate order.
    pub fn expert_names(&self) -> &[String] {
        self.experts.names()
    }
}
