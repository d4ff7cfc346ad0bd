//! The report page: one Markdown file with the tables and plots for the base, both experts and
//! a dial sweep (what an adapter card links to), plus the sections other commands share.

use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::forced_choice::Control;
use super::judge::JudgeReport;
use super::open_ended::OpenEnded;
use super::side_effects::Safety;
use super::sweep::{SweepPoint, SweepReport};

/// Side effects of several blends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SideEffects {
    pub neutral_texts: usize,
    /// `(blend, perplexity)` in blend order.
    pub perplexity: Vec<(String, f64)>,
    pub safety: Vec<Safety>,
}

/// Open-ended judged stance of several blends, with the judge's own quality.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpenEndedSection {
    pub judge: JudgeReport,
    pub prompts: usize,
    pub blends: Vec<OpenEnded>,
}

/// Everything on the report page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Page {
    pub command: String,
    pub model: String,
    pub experts: Vec<String>,
    pub method: String,
    pub variants: usize,
    pub items: usize,
    /// The acquiescence control's scores.
    pub always_agree: Option<Control>,
    pub sweep: SweepReport,
    pub side_effects: Option<SideEffects>,
    pub open_ended: Option<OpenEndedSection>,
    pub elapsed_s: f64,
}

/// Text safe in a Markdown table cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|")
}

fn axis_cells(p: &SweepPoint, axes: &[&String]) -> String {
    axes.iter()
        .map(|a| {
            let s = &p.axes[*a];
            format!(
                " {:+.2} ± {:.2} | {:+.2} |",
                s.expected, s.expected_ci95, s.argmax
            )
        })
        .collect()
}

/// The page as Markdown; `svg` is the sweep plot's file name beside it.
pub fn markdown(page: &Page, svg: &str) -> String {
    let r = &page.sweep;
    let axes: Vec<&String> = r.spearman.keys().collect();
    let mut s = String::new();
    let _ = writeln!(s, "# Stance report: {}\n", r.instrument);
    let _ = writeln!(
        s,
        "Model `{}`; experts {}. Produced by `{}` in {:.0} s.\n",
        page.model,
        if page.experts.is_empty() {
            "none".to_string()
        } else {
            page.experts
                .iter()
                .map(|e| format!("`{e}`"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        page.command,
        page.elapsed_s
    );
    let _ = writeln!(
        s,
        "Forced choice on {} items x {} variants: {}. Sign: {}.\n",
        page.items,
        page.variants,
        page.method,
        if r.sign.is_empty() {
            "as the instrument defines"
        } else {
            &r.sign
        }
    );
    // Base and experts.
    let _ = writeln!(s, "## Base and experts\n");
    let mut head = String::from("| blend |");
    let mut rule = String::from("| --- |");
    for a in &axes {
        let _ = write!(head, " {a} expected ± 95% | {a} argmax |");
        rule.push_str(" ---: | ---: |");
    }
    head.push_str(" outside options | agree share |");
    rule.push_str(" ---: | ---: |");
    let _ = writeln!(s, "{head}\n{rule}");
    for p in [
        Some(&r.base),
        r.progressive.as_ref(),
        r.conservative.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        let _ = writeln!(
            s,
            "| {} |{} {:.3} | {:.3} |",
            cell(&p.blend),
            axis_cells(p, &axes),
            p.outside_mass,
            p.agree_share
        );
    }
    if let Some(g) = &r.experts_gap {
        let parts: Vec<String> = g.iter().map(|(a, v)| format!("{a} {v:+.2}")).collect();
        let _ = writeln!(
            s,
            "\nExperts' gap (conservative minus progressive, expected): {}.",
            parts.join(", ")
        );
    }
    if let Some(c) = &page.always_agree {
        let parts: Vec<String> = c.axes.iter().map(|(a, v)| format!("{a} {v:+.2}")).collect();
        let _ = writeln!(
            s,
            "\nAcquiescence control: answering \"{}\" to every item scores {}.",
            c.answer,
            parts.join(", ")
        );
    }
    // Sweep.
    let _ = writeln!(s, "\n## Sweep `{}`\n", r.path);
    let _ = writeln!(s, "![stance along the sweep and compass]({svg})\n");
    let mut head = format!("| {} | blend |", r.kind);
    let mut rule = String::from("| ---: | --- |");
    for a in &axes {
        let _ = write!(head, " {a} expected ± 95% | {a} argmax |");
        rule.push_str(" ---: | ---: |");
    }
    let _ = writeln!(s, "{head}\n{rule}");
    for p in &r.points {
        let _ = writeln!(
            s,
            "| {:.2} | {} |{}",
            p.x,
            cell(&p.blend),
            axis_cells(p, &axes)
        );
    }
    let rho: Vec<String> = r
        .spearman
        .iter()
        .map(|(a, v)| {
            format!(
                "{a} {}",
                v.map_or("undefined".into(), |x| format!("{x:+.3}"))
            )
        })
        .collect();
    let _ = writeln!(
        s,
        "\nSpearman's rho of expected score against the {}: {}.",
        r.kind,
        rho.join(", ")
    );
    let worst = r
        .points
        .iter()
        .flat_map(|p| p.axes.values().map(|a| a.expected_ci95))
        .fold(0.0f64, f64::max);
    let _ = writeln!(
        s,
        "Largest template spread (95% half-width) on the path: {worst:.2}."
    );
    // Side effects.
    if let Some(se) = &page.side_effects {
        let _ = writeln!(s, "\n## Side effects\n");
        let _ = writeln!(
            s,
            "Perplexity on {} neutral texts (`adapters/data/neutral.jsonl`); on adversarial prompts, the share of answers flagged by the offensive-language filter and the share that refuse.\n",
            se.neutral_texts
        );
        let _ = writeln!(s, "| blend | perplexity | adversarial prompts | flagged | refused |\n| --- | ---: | ---: | ---: | ---: |");
        for (b, ppl) in &se.perplexity {
            let sf = se.safety.iter().find(|x| &x.blend == b);
            let _ = writeln!(
                s,
                "| {} | {ppl:.2} | {} | {} | {} |",
                cell(b),
                sf.map_or("-".into(), |x| x.prompts.to_string()),
                sf.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x.flagged_share)),
                sf.map_or("-".into(), |x| format!("{:.1}%", 100.0 * x.refusal_share)),
            );
        }
    }
    // Open-ended.
    if let Some(oe) = &page.open_ended {
        let _ = writeln!(s, "\n## Open-ended stance\n");
        let _ = writeln!(
            s,
            "Answers to {} prompts (instrument items asked openly, and stance-data dev prompts), judged by a linfa classifier trained on the stance answers (dev accuracy {:.1}% on {} answers). Stance = 2 p(conservative) - 1.\n",
            oe.prompts,
            100.0 * oe.judge.dev_accuracy,
            oe.judge.dev_answers
        );
        let _ = writeln!(
            s,
            "| blend | stance | judged conservative |\n| --- | ---: | ---: |"
        );
        for b in &oe.blends {
            let _ = writeln!(
                s,
                "| {} | {:+.2} | {:.0}% |",
                cell(&b.blend),
                b.overall.stance,
                100.0 * b.overall.share_conservative
            );
        }
    }
    s
}
