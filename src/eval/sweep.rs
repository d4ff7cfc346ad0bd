//! Sweeps: a path through the gate weights (dial, mix or raw), every point scored on an
//! instrument in the same batched passes, with the base and both experts alongside; the curve's
//! monotonicity (Spearman) and the experts' gap.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::forced_choice::{score_instrument, AxisScore, BlendScore, FcOptions, Report};
use super::stats;
use crate::data::Instrument;
use crate::runtime::{Blend, Engine, Mode, CONSERVATIVE, PROGRESSIVE};
use crate::{Error, Result};

/// A parsed path: its points, each with its position `x` along the path.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPath {
    /// `dial`, `mix` or `raw`.
    pub kind: String,
    /// The spec it was parsed from.
    pub spec: String,
    pub points: Vec<(f64, Blend)>,
}

fn num(s: &str, what: &str, spec: &str) -> Result<f64> {
    s.trim().parse::<f64>().map_err(|_| {
        Error::setting(
            "sweep path",
            format!("{what} '{s}' is not a number in '{spec}'"),
        )
    })
}

/// `n` evenly spaced values from `a` to `b` (both included).
fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    (0..n)
        .map(|i| a + (b - a) * i as f64 / (n - 1) as f64)
        .collect()
}

/// Parse `dial:FROM:TO:N`, `mix:FROM:TO:N` or `raw:W0:W1:N` (weights `name=w,name=w`,
/// interpolated linearly, `x` from 0 to 1), optionally ending in `@weights|@logits|@contrast`.
pub fn parse_path(spec: &str) -> Result<SweepPath> {
    let (body, mode) = match spec.rsplit_once('@') {
        Some((b, m)) => (b, m.trim().parse::<Mode>()?),
        None => (spec, Mode::Weights),
    };
    let parts: Vec<&str> = body.split(':').collect();
    let bad = || {
        Error::setting(
            "sweep path",
            format!("cannot read '{spec}': expected dial:FROM:TO:N, mix:FROM:TO:N or raw:name=w,..:name=w,..:N (optionally @logits / @contrast)"),
        )
    };
    if parts.len() != 4 {
        return Err(bad());
    }
    let n: usize = parts[3].trim().parse().map_err(|_| {
        Error::setting(
            "sweep path",
            format!("N '{}' is not a count in '{spec}'", parts[3]),
        )
    })?;
    if !(1..=101).contains(&n) {
        return Err(Error::setting(
            "sweep path",
            format!("N must be 1 to 101, got {n} in '{spec}'"),
        ));
    }
    let kind = parts[0].trim().to_string();
    let points = match kind.as_str() {
        "dial" | "mix" => {
            let (a, b) = (num(parts[1], "FROM", spec)?, num(parts[2], "TO", spec)?);
            linspace(a, b, n)
                .into_iter()
                .map(|x| {
                    let blend = if kind == "dial" {
                        Blend::dial(x as f32)?
                    } else {
                        Blend::mix(x as f32)?
                    };
                    Ok((x, blend.with_mode(mode)))
                })
                .collect::<Result<Vec<_>>>()?
        }
        "raw" => {
            let w0 = raw_weights(parts[1], spec)?;
            let w1 = raw_weights(parts[2], spec)?;
            let names: Vec<String> = w0.keys().chain(w1.keys()).cloned().collect();
            linspace(0.0, 1.0, n)
                .into_iter()
                .map(|t| {
                    let w = names.iter().map(|k| {
                        let (a, b) = (
                            w0.get(k).copied().unwrap_or(0.0),
                            w1.get(k).copied().unwrap_or(0.0),
                        );
                        (k.clone(), (a + (b - a) * t) as f32)
                    });
                    (t, Blend::raw(w).with_mode(mode))
                })
                .collect()
        }
        _ => return Err(bad()),
    };
    Ok(SweepPath {
        kind,
        spec: spec.to_string(),
        points,
    })
}

fn raw_weights(s: &str, spec: &str) -> Result<BTreeMap<String, f64>> {
    s.split(',')
        .map(|p| {
            let (k, v) = p.split_once('=').ok_or_else(|| {
                Error::setting(
                    "sweep path",
                    format!("'{p}' is not name=weight in '{spec}'"),
                )
            })?;
            Ok((k.trim().to_string(), num(v, k.trim(), spec)?))
        })
        .collect()
}

/// One point of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepPoint {
    /// Position along the path (the dial, the mix, or 0..1 for raw paths).
    pub x: f64,
    pub blend: String,
    pub weights: BTreeMap<String, f32>,
    pub axes: BTreeMap<String, AxisScore>,
    pub outside_mass: f64,
    pub agree_share: f64,
}

impl SweepPoint {
    fn new(x: f64, b: &BlendScore) -> SweepPoint {
        SweepPoint {
            x,
            blend: b.blend.clone(),
            weights: b.weights.clone(),
            axes: b.axes.clone(),
            outside_mass: b.outside_mass,
            agree_share: b.agree_share,
        }
    }
}

/// The result of [`sweep`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepReport {
    pub path: String,
    pub kind: String,
    pub instrument: String,
    pub sign: String,
    pub points: Vec<SweepPoint>,
    /// Spearman's rho of each axis's expected score against `x` (`None` if a side is constant).
    pub spearman: BTreeMap<String, Option<f64>>,
    /// The base and each stance expert at full weight (when loaded), for reference.
    pub base: SweepPoint,
    pub progressive: Option<SweepPoint>,
    pub conservative: Option<SweepPoint>,
    /// Per axis, conservative expert minus progressive expert (expected scores).
    pub experts_gap: Option<BTreeMap<String, f64>>,
    /// Axis ranges of the instrument's `range` scales, for plotting.
    pub ranges: BTreeMap<String, [f64; 2]>,
    /// Every blend's full forced-choice results (path points first, then the references).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forced_choice: Option<Report>,
}

/// Score every point of `path` on `instrument`, with the base and both experts, batched.
pub fn sweep(
    engine: &Engine,
    instrument: &Instrument,
    path: &SweepPath,
    opts: &FcOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<SweepReport> {
    let mut blends: Vec<Blend> = path.points.iter().map(|(_, b)| b.clone()).collect();
    // References: reuse a path point with the same gate weights and mode, else score it too.
    let key = |b: &Blend| -> Result<(Vec<f32>, Mode)> { Ok((b.gates(&engine.experts)?, b.mode)) };
    let mut keys: Vec<(Vec<f32>, Mode)> = blends.iter().map(key).collect::<Result<_>>()?;
    let mut reference = |b: Blend, blends: &mut Vec<Blend>| -> Result<usize> {
        let k = key(&b)?;
        Ok(match keys.iter().position(|x| *x == k) {
            Some(i) => i,
            None => {
                keys.push(k);
                blends.push(b);
                blends.len() - 1
            }
        })
    };
    let base = reference(Blend::base(), &mut blends)?;
    let mut expert = |stance: &str, blends: &mut Vec<Blend>| -> Result<Option<usize>> {
        match engine.experts.by_stance(stance) {
            Some(_) => Ok(Some(reference(Blend::expert(stance), blends)?)),
            None => Ok(None),
        }
    };
    let pro = expert(PROGRESSIVE, &mut blends)?;
    let con = expert(CONSERVATIVE, &mut blends)?;
    let report = score_instrument(engine, instrument, &blends, opts, progress)?;
    let points: Vec<SweepPoint> = path
        .points
        .iter()
        .zip(&report.blends)
        .map(|((x, _), b)| SweepPoint::new(*x, b))
        .collect();
    let at = |i: usize| {
        let x = path.points.get(i).map_or(f64::NAN, |p| p.0);
        SweepPoint::new(x, &report.blends[i])
    };
    let (pro, con) = (pro.map(at), con.map(at));
    let experts_gap = match (&pro, &con) {
        (Some(p), Some(c)) => Some(
            p.axes
                .iter()
                .map(|(k, s)| (k.clone(), c.axes[k].expected - s.expected))
                .collect(),
        ),
        _ => None,
    };
    let xs: Vec<f64> = points.iter().map(|p| p.x).collect();
    let spearman = instrument
        .axes
        .keys()
        .map(|k| {
            let ys: Vec<f64> = points.iter().map(|p| p.axes[k].expected).collect();
            (k.clone(), stats::spearman(&xs, &ys))
        })
        .collect();
    let ranges = instrument
        .axes
        .iter()
        .filter_map(|(k, a)| match a.scale {
            crate::data::Scale::Range(r) => Some((k.clone(), r)),
            _ => None,
        })
        .collect();
    Ok(SweepReport {
        path: path.spec.clone(),
        kind: path.kind.clone(),
        instrument: report.instrument.clone(),
        sign: report.sign.clone(),
        points,
        spearman,
        base: at(base),
        progressive: pro,
        conservative: con,
        experts_gap,
        ranges,
        forced_choice: Some(report),
    })
}

impl SweepReport {
    /// The summary without the per-item results.
    pub fn summary(&self) -> SweepReport {
        SweepReport {
            forced_choice: None,
            ..self.clone()
        }
    }

    /// Write `sweep.csv`, `sweep.json` (with every blend's full results) and `sweep.svg` into
    /// `dir`, each atomically. Returns their paths.
    pub fn write_files(&self, dir: &std::path::Path) -> Result<Vec<std::path::PathBuf>> {
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Internal(format!("sweep report: {e}")))?;
        let files = [
            ("sweep.csv", self.to_csv()),
            ("sweep.json", json),
            ("sweep.svg", super::plot::sweep_svg(self)),
        ];
        let mut out = Vec::new();
        for (name, text) in files {
            let p = dir.join(name);
            crate::error::write_atomic(&p, text.as_bytes())?;
            out.push(p);
        }
        Ok(out)
    }

    /// One CSV row per point: position, blend, weights, then per axis expected, its 95%
    /// half-width and argmax; then outside mass and agree share.
    pub fn to_csv(&self) -> String {
        let experts: Vec<String> = self
            .forced_choice
            .as_ref()
            .map(|r| r.experts.clone())
            .unwrap_or_default();
        let axes: Vec<&String> = self.spearman.keys().collect();
        let mut s = String::from("x,blend");
        for e in &experts {
            s.push_str(&format!(",g_{e}"));
        }
        for a in &axes {
            s.push_str(&format!(",{a}_expected,{a}_ci95,{a}_argmax"));
        }
        s.push_str(",outside_mass,agree_share\n");
        for p in &self.points {
            s.push_str(&format!("{},\"{}\"", p.x, p.blend.replace('"', "'")));
            for e in &experts {
                s.push_str(&format!(",{}", p.weights.get(e).copied().unwrap_or(0.0)));
            }
            for a in &axes {
                let v = &p.axes[*a];
                s.push_str(&format!(
                    ",{:.6},{:.6},{:.6}",
                    v.expected, v.expected_ci95, v.argmax
                ));
            }
            s.push_str(&format!(",{:.6},{:.6}\n", p.outside_mass, p.agree_share));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::View;

    #[test]
    fn dial_path_has_evenly_spaced_points() {
        let p = parse_path("dial:-1:1:11").unwrap();
        assert_eq!(p.points.len(), 11);
        assert!((p.points[0].0 + 1.0).abs() < 1e-12 && (p.points[5].0).abs() < 1e-12);
        assert_eq!(p.points[10].1, Blend::dial(1.0).unwrap());
        let m = parse_path("mix:0:1:3@logits").unwrap();
        assert_eq!(
            m.points[1].1,
            Blend::mix(0.5).unwrap().with_mode(Mode::Logits)
        );
    }

    #[test]
    fn raw_path_interpolates_weights() {
        let p = parse_path("raw:progressive=0,conservative=1:progressive=2:3").unwrap();
        match &p.points[1].1.view {
            View::Raw(w) => {
                assert!((w["progressive"] - 1.0).abs() < 1e-6);
                assert!((w["conservative"] - 0.5).abs() < 1e-6);
            }
            v => panic!("{v:?}"),
        }
    }

    #[test]
    fn bad_paths_say_what_was_expected() {
        for s in ["dial:-1:1", "dial:a:1:3", "slider:0:1:3", "dial:-1:1:0"] {
            let e = parse_path(s).unwrap_err();
            assert!(
                matches!(&e, Error::Setting { name, msg } if name == "sweep path" && msg.contains(s)),
                "{s}: {e:?}"
            );
        }
        // A dial off its range is a bad blend.
        assert!(matches!(
            parse_path("dial:-2:1:3").unwrap_err(),
            Error::BadBlend(_)
        ));
    }
}
