//! `data check`: validate data files, find duplicates and instrument overlap, screen text with
//! an offensive-language filter, and tabulate balance.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use super::{topics, word_count, Instrument, StancePair};
use crate::util::words;

/// Word-level Jaccard similarity at or above which a training prompt is too close to an
/// instrument item.
pub const INSTRUMENT_JACCARD: f64 = 0.6;
/// Word-level Jaccard similarity at or above which two prompts are near duplicates.
pub const NEAR_DUP_JACCARD: f64 = 0.8;

/// What `check` found.
#[derive(Debug, Default)]
pub struct CheckReport {
    /// `file:line: field: problem`.
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// (topic, kind) -> pairs.
    pub balance: BTreeMap<(String, String), usize>,
    /// topic -> the distinct sub-issues its pairs name.
    pub subissues: BTreeMap<String, std::collections::BTreeSet<String>>,
    pub files: usize,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Neutral {
    #[allow(dead_code)]
    id: String,
    text: String,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Adversarial {
    #[allow(dead_code)]
    id: String,
    topic: String,
    prompt: String,
}

/// A text to screen and compare: where it came from and what it is.
struct Text {
    at: String,
    field: &'static str,
    text: String,
}

fn collect_files(paths: &[PathBuf], out: &mut Vec<PathBuf>, errors: &mut Vec<String>) {
    for p in paths {
        if p.is_dir() {
            match std::fs::read_dir(p) {
                Ok(rd) => {
                    let mut kids: Vec<PathBuf> =
                        rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
                    kids.sort();
                    collect_files(&kids, out, errors);
                }
                Err(e) => errors.push(format!("{}: {e}", p.display())),
            }
        } else if p.extension().is_some_and(|x| x == "jsonl" || x == "json") {
            out.push(p.clone());
        } else if !p.exists() {
            errors.push(format!("{}: no such file or directory", p.display()));
        }
    }
}

fn word_set(s: &str) -> HashSet<String> {
    words(s).into_iter().collect()
}

fn jaccard(a: &HashSet<String>, b: &HashSet<String>) -> f64 {
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let inter = a.intersection(b).count();
    inter as f64 / (a.len() + b.len() - inter) as f64
}

/// The part of a proposition prompt inside quotes, if any (the statement itself).
fn quoted(s: &str) -> Option<&str> {
    let start = s.find(['"', '\u{201c}'])?;
    let rest = &s[start + s[start..].chars().next()?.len_utf8()..];
    let end = rest.find(['"', '\u{201d}'])?;
    Some(&rest[..end])
}

/// Words of `text` that the offensive-language filter (rustrict) flags: profanity of moderate
/// severity or more, or severe offensiveness (slurs).
///
/// Each word is screened on its own: over whole sentences rustrict also matches across word
/// boundaries ("...ing. A ..."), which flags ordinary prose. Its `SEXUAL` and `MEAN` categories
/// are left out: they flag the vocabulary these topics must use ("abortion", "same-sex", "gay",
/// "racist") and health text.
pub fn flagged_words(text: &str) -> Vec<String> {
    use rustrict::{Censor, Type};
    text.split_whitespace()
        .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
        .filter(|w| !w.is_empty())
        .filter(|w| {
            let t = Censor::from_str(w).analyze();
            t.is(Type::PROFANE & Type::MODERATE_OR_HIGHER) || t.is(Type::OFFENSIVE & Type::SEVERE)
        })
        .map(str::to_string)
        .collect()
}

/// True when [`flagged_words`] finds anything.
pub fn is_offensive(text: &str) -> bool {
    !flagged_words(text).is_empty()
}

/// Check every data file under `paths`.
pub fn check(paths: &[PathBuf]) -> CheckReport {
    let mut r = CheckReport::default();
    let mut files = Vec::new();
    collect_files(paths, &mut files, &mut r.errors);
    r.files = files.len();
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut texts: Vec<Text> = Vec::new();
    let mut train_prompts: Vec<(String, String)> = Vec::new(); // (at, prompt)
    let mut other_prompts: Vec<(String, String)> = Vec::new(); // router prompts: compared for duplicates
    let mut items: Vec<(String, String)> = Vec::new(); // (instrument:item, text)
    let mut answer_words: Vec<(String, &'static str, usize, String)> = Vec::new();
    for f in &files {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let text = match std::fs::read_to_string(f) {
            Ok(t) => t,
            Err(e) => {
                r.errors.push(format!("{}: {e}", f.display()));
                continue;
            }
        };
        if name.ends_with(".json") {
            if !text.contains("\"items\"") {
                continue; // not an instrument (e.g. router-data/gate.json)
            }
            match Instrument::load(f) {
                Ok(ins) => {
                    for it in &ins.items {
                        items.push((format!("{}: {}", f.display(), it.id), it.text.clone()));
                        texts.push(Text {
                            at: format!("{}: {}", f.display(), it.id),
                            field: "text",
                            text: it.text.clone(),
                        });
                    }
                }
                Err(e) => r.errors.push(e.to_string()),
            }
            continue;
        }
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let at = format!("{}:{}", f.display(), i + 1);
            let v: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    r.errors.push(format!("{at}: json: {e}"));
                    continue;
                }
            };
            let kind = if name.starts_with("neutral") {
                "neutral"
            } else if name.starts_with("adversarial") {
                "adversarial"
            } else if v.get("progressive").is_some() || v.get("conservative").is_some() {
                "stance"
            } else {
                "router"
            };
            let id = v
                .get("id")
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string();
            if !id.is_empty() {
                if let Some(first) = ids.insert(format!("{kind}/{id}"), at.clone()) {
                    r.errors
                        .push(format!("{at}: id: duplicate id '{id}' (first at {first})"));
                }
            }
            let field_err = |e: serde_json::Error| {
                let msg = e.to_string();
                let field = ["missing field `", "unknown field `"]
                    .iter()
                    .find_map(|p| msg.split(p).nth(1).and_then(|s| s.split('`').next()))
                    .unwrap_or("record")
                    .to_string();
                format!("{at}: {field}: {msg}")
            };
            match kind {
                "neutral" => match serde_json::from_value::<Neutral>(v) {
                    Ok(n) => texts.push(Text {
                        at,
                        field: "text",
                        text: n.text,
                    }),
                    Err(e) => r.errors.push(field_err(e)),
                },
                "adversarial" => match serde_json::from_value::<Adversarial>(v) {
                    Ok(a) => {
                        if !topics::is_political(&a.topic) {
                            r.errors
                                .push(format!("{at}: topic: unknown topic '{}'", a.topic));
                        }
                        texts.push(Text {
                            at,
                            field: "prompt",
                            text: a.prompt,
                        });
                    }
                    Err(e) => r.errors.push(field_err(e)),
                },
                "router" => match serde_json::from_value::<super::RouterPrompt>(v) {
                    Ok(p) => {
                        if !topics::all_topics().contains(&p.topic.as_str()) {
                            r.errors
                                .push(format!("{at}: topic: unknown topic '{}'", p.topic));
                        }
                        other_prompts.push((at.clone(), p.text.clone()));
                        texts.push(Text {
                            at,
                            field: "text",
                            text: p.text,
                        });
                    }
                    Err(e) => r.errors.push(field_err(e)),
                },
                _ => match serde_json::from_value::<StancePair>(v) {
                    Ok(p) => {
                        for (field, msg) in p.problems() {
                            r.errors.push(format!("{at}: {field}: {msg}"));
                        }
                        *r.balance
                            .entry((p.topic.clone(), p.kind.clone()))
                            .or_default() += 1;
                        if let Some(sub) = &p.subissue {
                            r.subissues
                                .entry(p.topic.clone())
                                .or_default()
                                .insert(sub.clone());
                        }
                        train_prompts.push((at.clone(), p.prompt.clone()));
                        for (field, ans) in [
                            ("progressive", &p.progressive),
                            ("conservative", &p.conservative),
                        ] {
                            answer_words.push((at.clone(), field, word_count(ans), p.kind.clone()));
                            texts.push(Text {
                                at: at.clone(),
                                field,
                                text: ans.clone(),
                            });
                        }
                        texts.push(Text {
                            at,
                            field: "prompt",
                            text: p.prompt,
                        });
                    }
                    Err(e) => r.errors.push(field_err(e)),
                },
            }
        }
    }
    // Offensive-language screen over every text.
    for t in &texts {
        if is_offensive(&t.text) {
            r.errors.push(format!(
                "{}: {}: flagged by the offensive-language filter (rustrict): {}",
                t.at,
                t.field,
                flagged_words(&t.text).join(", ")
            ));
        }
    }
    // Exact and near duplicates among prompts (training prompts and router prompts).
    let all: Vec<(&String, &String, HashSet<String>)> = train_prompts
        .iter()
        .chain(&other_prompts)
        .map(|(at, p)| (at, p, word_set(p)))
        .collect();
    let mut exact: HashMap<String, &String> = HashMap::new();
    for (at, p, _) in &all {
        let norm = words(p).join(" ");
        if let Some(first) = exact.insert(norm, at) {
            r.errors
                .push(format!("{at}: prompt: exact duplicate of {first}"));
        }
    }
    for i in 0..all.len() {
        for j in 0..i {
            let s = jaccard(&all[i].2, &all[j].2);
            if (NEAR_DUP_JACCARD..1.0).contains(&s) && all[i].2.len() >= 5 {
                r.errors.push(format!(
                    "{}: prompt: near duplicate of {} (word Jaccard {s:.2})",
                    all[i].0, all[j].0
                ));
            }
        }
    }
    // Training prompts vs instrument items (the statement in quotes too).
    let item_sets: Vec<(&String, HashSet<String>)> =
        items.iter().map(|(at, t)| (at, word_set(t))).collect();
    for (at, p) in &train_prompts {
        let mut cands = vec![word_set(p)];
        if let Some(q) = quoted(p) {
            cands.push(word_set(q));
        }
        for (item, set) in &item_sets {
            let s = cands.iter().map(|c| jaccard(c, set)).fold(0.0, f64::max);
            if s >= INSTRUMENT_JACCARD {
                r.errors.push(format!(
                    "{at}: prompt: overlaps held-out instrument item {item} (word Jaccard {s:.2})"
                ));
            }
        }
    }
    // Answer length outliers (more than 3 standard deviations from the mean of their kind).
    for kind in ["opinion", "proposition"] {
        let w: Vec<f64> = answer_words
            .iter()
            .filter(|a| a.3 == kind)
            .map(|a| a.2 as f64)
            .collect();
        if w.len() < 10 {
            continue;
        }
        let mean = w.iter().sum::<f64>() / w.len() as f64;
        let sd = (w.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        for (at, field, n, _) in answer_words.iter().filter(|a| a.3 == kind) {
            if ((*n as f64) - mean).abs() > 3.0 * sd {
                r.warnings.push(format!(
                    "{at}: {field}: length outlier ({n} words; {kind} mean {mean:.0}, sd {sd:.0})"
                ));
            }
        }
    }
    r
}

impl CheckReport {
    /// Total stance pairs.
    pub fn pairs(&self) -> usize {
        self.balance.values().sum()
    }

    /// Balance table by topic x kind, with axis and totals, and the dataset targets.
    pub fn balance_table(&self) -> String {
        let mut s = format!(
            "{:<18}{:<10}{:>9}{:>13}{:>7}\n",
            "topic", "axis", "opinion", "proposition", "total"
        );
        let mut topics_: Vec<&str> = topics::ECONOMIC
            .iter()
            .chain(topics::SOCIAL)
            .copied()
            .collect();
        topics_.retain(|t| self.balance.keys().any(|(x, _)| x == t));
        let get = |t: &str, k: &str| {
            self.balance
                .get(&(t.to_string(), k.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let mut axis_tot: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &topics_ {
            let (o, p) = (get(t, "opinion"), get(t, "proposition"));
            let axis = topics::axis_of(t).unwrap_or("-");
            *axis_tot.entry(axis).or_default() += o + p;
            s.push_str(&format!(
                "{:<18}{:<10}{:>9}{:>13}{:>7}\n",
                t,
                axis,
                o,
                p,
                o + p
            ));
        }
        let n = self.pairs();
        let o: usize = self
            .balance
            .iter()
            .filter(|((_, k), _)| k == "opinion")
            .map(|(_, v)| v)
            .sum();
        s.push_str(&format!(
            "{:<18}{:<10}{:>9}{:>13}{:>7}\n",
            "all",
            "",
            o,
            n - o,
            n
        ));
        if n > 0 {
            let min_topic = topics_
                .iter()
                .map(|t| get(t, "opinion") + get(t, "proposition"))
                .min()
                .unwrap_or(0);
            let min_sub = topics_
                .iter()
                .map(|t| self.subissues.get(*t).map_or(0, |x| x.len()))
                .min()
                .unwrap_or(0);
            s.push_str(&format!(
                "pairs {n} (target >= 5000) | propositions {} (target >= 3000) | topics {} of 20, fewest pairs {min_topic} | fewest sub-issues in a topic {min_sub} (target >= 40) | axes {}\n",
                n - o,
                topics_.len(),
                axis_tot.iter().map(|(a, c)| format!("{a} {c}")).collect::<Vec<_>>().join(", ")
            ));
        }
        s
    }
}

/// Split of a stance pair into train or dev by hashed id (dev about 10%).
pub fn split_of(id: &str) -> &'static str {
    if super::is_dev(id) {
        "dev"
    } else {
        "train"
    }
}
