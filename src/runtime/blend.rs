//! `Blend`: how a request mixes the experts. All blending math lives here.
//!
//! Views of the gate weights `g` (one per expert): the dial `d` in [-1, 1]
//! (`g_pro = max(d, 0)`, `g_con = max(-d, 0)`), the mix `a` in [0, 1] (`g = (a, 1 - a)`),
//! raw per-expert weights, or automatic routing by a policy. Modes say how `g` is applied.

use std::collections::BTreeMap;
use std::fmt;

use crate::lora::ExpertSet;
use crate::util::softmax;
use crate::{Error, Result};

/// Expert stance names the dial and mix need.
pub const PROGRESSIVE: &str = "progressive";
pub const CONSERVATIVE: &str = "conservative";

/// Which gate weights a request uses.
#[derive(Debug, Clone, PartialEq)]
pub enum View {
    /// Experts off.
    Base,
    /// `d` in [-1, 1]: -1 conservative, 0 base, +1 progressive.
    Dial(f32),
    /// `a` in [0, 1]: `g = (a, 1 - a)` for (progressive, conservative).
    Mix(f32),
    /// Per-expert weights by name (extrapolation and negation allowed, warned).
    Raw(BTreeMap<String, f32>),
    /// Route each prompt with the gate and this policy.
    Auto(String),
}

/// How the gate weights are applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `y = W x + sum_i g_i s_i B_i A_i x` in every adapted linear: one pass.
    #[default]
    Weights,
    /// Next-token distributions mixed: `p = w_base p_base + sum_i g_i p_i`, with
    /// `w_base = max(0, 1 - sum g)` and the weights normalised.
    Logits,
    /// DExperts: `z = z_base + l (z_pro - z_con)` with `l = g_pro - g_con`.
    Contrast,
}

impl std::str::FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "weights" => Ok(Mode::Weights),
            "logits" => Ok(Mode::Logits),
            "contrast" => Ok(Mode::Contrast),
            _ => Err(Error::BadBlend(format!(
                "unknown blend mode '{s}' (expected weights, logits or contrast)"
            ))),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Weights => "weights",
            Mode::Logits => "logits",
            Mode::Contrast => "contrast",
        })
    }
}

/// A blend: gate-weight view plus mode.
///
/// Two text forms, both read by `parse`: the one people type (`--blend`, the [`Blend::spec`]
/// form: `dial=0.6@logits`) and the one shown with every answer (`Display`:
/// `dial +0.60 | logits`, more digits only where two would not read back as the same value).
///
/// ```
/// use stancemix::Blend;
/// let b: Blend = "dial=0.6".parse().unwrap();
/// assert_eq!(b, Blend::dial(0.6).unwrap());
/// assert_eq!(b.to_string(), "dial +0.60 | weights");
/// assert_eq!(b.to_string().parse::<Blend>().unwrap(), b);
/// assert_eq!(b.spec(), "dial=0.6@weights");
/// let m: Blend = "mix=0.25@logits".parse().unwrap();
/// assert_eq!(m.mode, stancemix::Mode::Logits);
/// assert!("dial=1.5".parse::<Blend>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Blend {
    pub view: View,
    pub mode: Mode,
}

impl Default for Blend {
    fn default() -> Self {
        Blend::base()
    }
}

impl Blend {
    /// Experts off.
    pub fn base() -> Self {
        Blend {
            view: View::Base,
            mode: Mode::Weights,
        }
    }

    /// The dial `d` in [-1, 1].
    pub fn dial(d: f32) -> Result<Self> {
        if !(-1.0..=1.0).contains(&d) || d.is_nan() {
            return Err(Error::BadBlend(format!("dial {d} is outside [-1, 1]")));
        }
        Ok(Blend {
            view: View::Dial(d),
            mode: Mode::Weights,
        })
    }

    /// The mix `a` in [0, 1].
    pub fn mix(a: f32) -> Result<Self> {
        if !(0.0..=1.0).contains(&a) || a.is_nan() {
            return Err(Error::BadBlend(format!("mix {a} is outside [0, 1]")));
        }
        Ok(Blend {
            view: View::Mix(a),
            mode: Mode::Weights,
        })
    }

    /// One expert at full weight.
    pub fn expert(name: &str) -> Self {
        Blend {
            view: View::Raw([(name.to_string(), 1.0)].into()),
            mode: Mode::Weights,
        }
    }

    /// Raw weights by expert name.
    pub fn raw(weights: impl IntoIterator<Item = (String, f32)>) -> Self {
        Blend {
            view: View::Raw(weights.into_iter().collect()),
            mode: Mode::Weights,
        }
    }

    /// Route each prompt with the gate under `policy`.
    pub fn auto(policy: &str) -> Self {
        Blend {
            view: View::Auto(policy.to_string()),
            mode: Mode::Weights,
        }
    }

    /// The same view under another mode.
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Gate weights, one per expert of `experts` (for `Auto`, use the router first).
    pub fn gates(&self, experts: &ExpertSet) -> Result<Vec<f32>> {
        let mut g = vec![0f32; experts.len()];
        let stance = |s: &str| {
            experts.by_stance(s).ok_or_else(|| {
                Error::BadBlend(format!(
                    "this blend needs an expert whose adapter_config.json says \"stance\": \"{s}\" (loaded: {})",
                    if experts.is_empty() { "none".to_string() } else { experts.names().join(", ") }
                ))
            })
        };
        match &self.view {
            View::Base => {}
            View::Dial(d) => {
                let (p, c) = (stance(PROGRESSIVE)?, stance(CONSERVATIVE)?);
                g[p] = d.max(0.0);
                g[c] = (-d).max(0.0);
            }
            View::Mix(a) => {
                let (p, c) = (stance(PROGRESSIVE)?, stance(CONSERVATIVE)?);
                g[p] = *a;
                g[c] = 1.0 - a;
            }
            View::Raw(w) => {
                for (name, &x) in w {
                    let i = experts
                        .index(name)
                        .or_else(|| experts.by_stance(name))
                        .ok_or_else(|| Error::UnknownExpert {
                            name: name.clone(),
                            loaded: experts.names().to_vec(),
                        })?;
                    if !x.is_finite() {
                        return Err(Error::BadBlend(format!(
                            "weight of '{name}' is not a finite number"
                        )));
                    }
                    g[i] = x;
                }
            }
            View::Auto(p) => {
                return Err(Error::BadBlend(format!(
                    "blend auto:{p} needs a routed prompt: use Session, which asks the gate"
                )))
            }
        }
        if self.mode == Mode::Contrast {
            stance(PROGRESSIVE)?;
            stance(CONSERVATIVE)?;
        }
        Ok(g)
    }

    /// The blend as `--blend` reads it, every digit kept: `dial=0.6@weights`,
    /// `progressive=0.7,conservative=0.2@logits`, `auto=libertarian@weights`.
    pub fn spec(&self) -> String {
        let body = match &self.view {
            View::Base => "base".to_string(),
            View::Dial(d) => format!("dial={d}"),
            View::Mix(a) => format!("mix={a}"),
            View::Raw(w) if w.is_empty() => "base".to_string(),
            View::Raw(w) => w
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(","),
            View::Auto(p) => format!("auto={p}"),
        };
        format!("{body}@{}", self.mode)
    }

    /// True when raw weights extrapolate (any weight outside [0, 1] or a sum above 1).
    pub fn extrapolates(&self) -> bool {
        match &self.view {
            View::Raw(w) => {
                w.values().any(|&x| !(0.0..=1.0).contains(&x))
                    || w.values().sum::<f32>() > 1.0 + 1e-6
            }
            _ => false,
        }
    }
}

/// `x` to two decimals (signed with `plus`) when that reads back as the same `f32`, else with
/// every digit it needs: the shown blend is the blend, and parses back to it.
fn two_places(x: f32, plus: bool) -> String {
    let short = if plus {
        format!("{x:+.2}")
    } else {
        format!("{x:.2}")
    };
    match short.parse::<f32>() {
        Ok(y) if y == x => short,
        _ if plus => format!("{x:+}"),
        _ => format!("{x}"),
    }
}

impl fmt::Display for Blend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.view {
            View::Base => write!(f, "base")?,
            View::Dial(d) => write!(f, "dial {}", two_places(*d, true))?,
            View::Mix(a) => write!(f, "mix {}", two_places(*a, false))?,
            View::Raw(w) => {
                let parts: Vec<String> = w
                    .iter()
                    .map(|(k, v)| format!("{k}={}", two_places(*v, false)))
                    .collect();
                write!(f, "raw {}", parts.join(","))?
            }
            View::Auto(p) => write!(f, "auto: {p}")?,
        }
        write!(f, " | {}", self.mode)
    }
}

/// Serialised as its `Display` form (`"dial +0.60 | weights"`), the text every answer shows,
/// so a serialised [`crate::Reply`] reads as before `Reply.blend` was typed.
impl serde::Serialize for Blend {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Read from either text form (`parse`).
impl<'de> serde::Deserialize<'de> for Blend {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for Blend {
    type Err = Error;
    /// `base`, `dial=D`, `mix=A`, `expert=NAME`, `auto=POLICY`, or raw `name=w,name=w`;
    /// optionally `@weights|@logits|@contrast`. Also the `Display` form: `base | weights`,
    /// `dial +0.60 | logits`, `mix 0.30 | weights`, `raw name=w,name=w | weights`,
    /// `auto: POLICY | contrast`.
    fn from_str(s: &str) -> Result<Self> {
        let (body, mode) = match s.rsplit_once('@').or_else(|| s.rsplit_once(" | ")) {
            Some((b, m)) => (b.trim(), m.trim().parse::<Mode>()?),
            None => (s.trim(), Mode::Weights),
        };
        // The keyword's argument after any of its separators (`dial=0.6`, `dial +0.60`).
        let arg = |key: &str, seps: &[char]| {
            body.strip_prefix(key)
                .and_then(|r| r.strip_prefix(seps))
                .map(str::trim)
        };
        let num = |v: &str, what: &str| -> Result<f32> {
            v.trim()
                .parse::<f32>()
                .map_err(|_| Error::BadBlend(format!("{what} value '{v}' is not a number")))
        };
        let view = if body == "base" {
            Blend::base()
        } else if let Some(v) = arg("dial", &['=', ' ']) {
            Blend::dial(num(v, "dial")?)?
        } else if let Some(v) = arg("mix", &['=', ' ']) {
            Blend::mix(num(v, "mix")?)?
        } else if let Some(v) = arg("expert", &['=']) {
            Blend::expert(v)
        } else if let Some(v) = arg("auto", &['=', ':']) {
            Blend::auto(v)
        } else if body == "raw" {
            Blend::raw([])
        } else if body.contains('=') {
            let list = arg("raw", &[' ']).unwrap_or(body);
            let mut w = BTreeMap::new();
            for part in list.split(',') {
                let (k, v) = part.split_once('=').ok_or_else(|| {
                    Error::BadBlend(format!("blend part '{part}' is not name=weight"))
                })?;
                w.insert(k.trim().to_string(), num(v, k.trim())?);
            }
            Blend {
                view: View::Raw(w),
                mode: Mode::Weights,
            }
        } else {
            return Err(Error::BadBlend(format!(
                "cannot read blend '{s}': expected base, dial=D, mix=A, expert=NAME, auto=POLICY or name=w,... (optionally @logits / @contrast)"
            )));
        };
        Ok(view.with_mode(mode))
    }
}

/// How a blend runs: the gate weights of each batch row, and how rows combine.
#[derive(Debug, Clone, PartialEq)]
pub struct RowPlan {
    /// Gate weights per batch row.
    pub rows: Vec<Vec<f32>>,
    pub combine: Combine,
}

/// How the rows' next-token logits become one distribution.
#[derive(Debug, Clone, PartialEq)]
pub enum Combine {
    /// One row; its logits as they are.
    Single,
    /// `log sum_r w_r softmax(z_r)`.
    Mixture(Vec<f32>),
    /// Rows (base, pro, con): `z_base + l (z_pro - z_con)`.
    Contrast(f32),
}

impl RowPlan {
    /// The plan for gate weights `g` under `mode` with `experts`.
    pub fn new(g: &[f32], mode: Mode, experts: &ExpertSet) -> Result<RowPlan> {
        let n = experts.len();
        let one_hot = |i: usize| {
            let mut r = vec![0f32; n];
            r[i] = 1.0;
            r
        };
        Ok(match mode {
            Mode::Weights => RowPlan {
                rows: vec![g.to_vec()],
                combine: Combine::Single,
            },
            Mode::Logits => {
                if g.iter().any(|&x| x < 0.0) {
                    return Err(Error::BadBlend(
                        "logits mode mixes probabilities: negative weights are not allowed".into(),
                    ));
                }
                let total: f32 = g.iter().sum();
                let mut rows = Vec::new();
                let mut w = Vec::new();
                let base_w = (1.0 - total).max(0.0);
                if base_w > 0.0 {
                    rows.push(vec![0f32; n]);
                    w.push(base_w);
                }
                for (i, &x) in g.iter().enumerate() {
                    if x > 0.0 {
                        rows.push(one_hot(i));
                        w.push(x);
                    }
                }
                let z: f32 = w.iter().sum();
                if rows.len() == 1 {
                    RowPlan {
                        rows,
                        combine: Combine::Single,
                    }
                } else {
                    RowPlan {
                        rows,
                        combine: Combine::Mixture(w.iter().map(|x| x / z).collect()),
                    }
                }
            }
            Mode::Contrast => {
                let p = experts.by_stance(PROGRESSIVE).ok_or_else(|| {
                    Error::BadBlend("contrast mode needs a progressive expert".into())
                })?;
                let c = experts.by_stance(CONSERVATIVE).ok_or_else(|| {
                    Error::BadBlend("contrast mode needs a conservative expert".into())
                })?;
                RowPlan {
                    rows: vec![vec![0f32; n], one_hot(p), one_hot(c)],
                    combine: Combine::Contrast(g[p] - g[c]),
                }
            }
        })
    }

    /// Combine next-token logits `(rows, vocab)` into one vector (logits or log-probabilities).
    pub fn combine(&self, logits: &[Vec<f32>]) -> Vec<f32> {
        match &self.combine {
            Combine::Single => logits[0].clone(),
            Combine::Mixture(w) => {
                let probs: Vec<Vec<f32>> = logits.iter().map(|z| softmax(z)).collect();
                (0..logits[0].len())
                    .map(|j| {
                        let p: f32 = w.iter().zip(&probs).map(|(wi, pi)| wi * pi[j]).sum();
                        p.max(f32::MIN_POSITIVE).ln()
                    })
                    .collect()
            }
            Combine::Contrast(l) => logits[0]
                .iter()
                .zip(&logits[1])
                .zip(&logits[2])
                .map(|((b, p), c)| b + l * (p - c))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind of view, at values two decimals show exactly and at ones they do not.
    const SPECS: &[&str] = &[
        "base",
        "dial=0.6",
        "dial=-1",
        "dial=0.605",
        "dial=-0.0",
        "mix=0.3",
        "mix=0.33333334",
        "expert=conservative",
        "auto=libertarian",
        "progressive=0.7,conservative=0.2",
        "progressive=1.5,conservative=-0.125",
        "progressive=0.1234567",
    ];

    #[test]
    fn display_and_spec_parse_back_to_the_same_blend() {
        for spec in SPECS {
            for mode in ["", "@weights", "@logits", "@contrast"] {
                let b: Blend = format!("{spec}{mode}").parse().unwrap();
                let shown = b.to_string();
                assert_eq!(shown.parse::<Blend>().unwrap(), b, "{spec}{mode}: {shown}");
                assert_eq!(b.spec().parse::<Blend>().unwrap(), b, "{spec}{mode}");
            }
        }
        let empty = Blend::raw([]);
        assert_eq!(empty.to_string().parse::<Blend>().unwrap(), empty);
    }

    #[test]
    fn display_shows_two_decimals_unless_more_are_needed() {
        let shown = |s: &str| s.parse::<Blend>().unwrap().to_string();
        assert_eq!(shown("dial=0.6"), "dial +0.60 | weights");
        assert_eq!(shown("dial=0.605@logits"), "dial +0.605 | logits");
        assert_eq!(shown("mix=0.25"), "mix 0.25 | weights");
        assert_eq!(
            shown("expert=conservative"),
            "raw conservative=1.00 | weights"
        );
        assert_eq!(
            shown("auto=libertarian@contrast"),
            "auto: libertarian | contrast"
        );
        assert_eq!(shown("a=0.7,b=-0.125"), "raw a=0.70,b=-0.125 | weights");
    }

    #[test]
    fn serialises_as_the_display_form_and_reads_back() {
        for spec in SPECS {
            let b: Blend = format!("{spec}@logits").parse().unwrap();
            let json = serde_json::to_string(&b).unwrap();
            assert_eq!(json, serde_json::to_string(&b.to_string()).unwrap());
            assert_eq!(serde_json::from_str::<Blend>(&json).unwrap(), b, "{spec}");
        }
        assert!(serde_json::from_str::<Blend>("\"dial 7\"").is_err());
    }

    #[test]
    fn bad_blends_and_unknown_experts_have_their_own_errors() {
        assert!(matches!(Blend::dial(1.5), Err(Error::BadBlend(_))));
        assert!(matches!(
            "mix=0.3@sideways".parse::<Blend>(),
            Err(Error::BadBlend(_))
        ));
        let e = Blend::expert("libertarian")
            .gates(&ExpertSet::new(Vec::new()).unwrap())
            .unwrap_err();
        assert!(matches!(&e, Error::UnknownExpert { name, .. } if name == "libertarian"));
        assert_eq!(e.to_string(), "no expert named 'libertarian' (loaded: )");
        assert!(e.is_client_error());
    }

    #[test]
    fn display_form_with_bad_values_is_refused() {
        for bad in [
            "dial +1.50 | weights",
            "mix 0.30 | sideways",
            "dial x | weights",
        ] {
            assert!(bad.parse::<Blend>().is_err(), "{bad}");
        }
    }
}
