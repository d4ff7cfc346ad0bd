//! Gate evaluation: accuracy, per-topic recall, confusion matrix.

use super::Gate;
use crate::data::topics::NON_POLITICAL;
use crate::model::Model;
use crate::Result;

/// How a gate did on labelled prompts.
#[derive(Debug, Clone)]
pub struct Report {
    pub topics: Vec<String>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub accuracy: f64,
}

impl Report {
    /// Recall of one topic (NaN if it has no examples).
    pub fn recall(&self, topic: &str) -> f64 {
        let Some(i) = self.topics.iter().position(|t| t == topic) else {
            return f64::NAN;
        };
        let n: usize = self.confusion[i].iter().sum();
        self.confusion[i][i] as f64 / n as f64
    }

    /// How many prompts were scored.
    pub fn total(&self) -> usize {
        self.confusion.iter().flatten().sum()
    }

    /// Share of the political prompts (every topic but `non_political`) given `non_political`:
    /// the prompts a policy would answer with the base alone (NaN if there are none).
    pub fn political_to_base(&self) -> f64 {
        let Some(np) = self.topics.iter().position(|t| t == NON_POLITICAL) else {
            return f64::NAN;
        };
        let (mut to_base, mut n) = (0usize, 0usize);
        for (_, row) in self.confusion.iter().enumerate().filter(|(i, _)| *i != np) {
            to_base += row[np];
            n += row.iter().sum::<usize>();
        }
        to_base as f64 / n as f64
    }

    /// The report as one JSON object: `accuracy`, `prompts`, `non_political_recall`,
    /// `political_to_base`, `recall` per topic, `topics` and `confusion` (rows true, columns
    /// predicted, in `topics` order). NaN (a topic without prompts) is written as null.
    pub fn to_json(&self) -> serde_json::Value {
        let num = |x: f64| serde_json::json!(x.is_finite().then_some(x));
        let recall: serde_json::Map<String, serde_json::Value> = self
            .topics
            .iter()
            .map(|t| (t.clone(), num(self.recall(t))))
            .collect();
        serde_json::json!({
            "accuracy": num(self.accuracy),
            "prompts": self.total(),
            "non_political_recall": num(self.recall(NON_POLITICAL)),
            "political_to_base": num(self.political_to_base()),
            "recall": recall,
            "topics": self.topics,
            "confusion": self.confusion,
        })
    }

    /// A printable table: `{what} accuracy` (plain `accuracy` for an empty `what`), recall per topic, confusion matrix (rows true,
    /// columns predicted), non-political recall and the political prompts given to the base.
    pub fn render(&self, what: &str) -> String {
        let what = if what.is_empty() {
            "accuracy".to_string()
        } else {
            format!("{what} accuracy")
        };
        let mut s = format!(
            "{what} {:.3} ({} prompts)\n\nrecall per topic:\n",
            self.accuracy,
            self.total()
        );
        for t in &self.topics {
            let i = self.topics.iter().position(|x| x == t).unwrap_or(0);
            s.push_str(&format!(
                "  {:<17} {:.3}  (n={})\n",
                t,
                self.recall(t),
                self.confusion[i].iter().sum::<usize>()
            ));
        }
        s.push_str("\nconfusion (rows: true, columns: predicted, in topic order):\n");
        for (i, row) in self.confusion.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .map(|c| {
                    if *c == 0 {
                        " .".into()
                    } else {
                        format!("{c:>2}")
                    }
                })
                .collect();
            s.push_str(&format!("  {:<17}{}\n", self.topics[i], cells.join(" ")));
        }
        s.push_str(&format!(
            "non_political recall {:.3}\npolitical prompts given to the base {:.3}\n",
            self.recall(NON_POLITICAL),
            self.political_to_base()
        ));
        s
    }
}

/// Evaluate `gate` on `(text, topic)` pairs; `model` is the base model (needed when the gate
/// reads hidden states). Pairs with a topic the gate does not know are skipped.
pub fn evaluate<'a>(
    gate: &Gate,
    model: Option<&Model>,
    examples: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Report> {
    evaluate_with_progress(gate, model, examples, &mut |_, _| {})
}

/// [`evaluate`], calling `progress(done, total)` after each pair.
pub fn evaluate_with_progress<'a>(
    gate: &Gate,
    model: Option<&Model>,
    examples: impl IntoIterator<Item = (&'a str, &'a str)>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Report> {
    let examples: Vec<_> = examples.into_iter().collect();
    let mut pairs = Vec::new();
    for (i, (text, topic)) in examples.iter().enumerate() {
        if let Some(t) = gate.topics.iter().position(|x| x == topic) {
            pairs.push((t, argmax(&gate.probabilities(model, text)?)));
        }
        progress(i + 1, examples.len());
    }
    Ok(Report::from_predictions(&gate.topics, pairs))
}

/// Index of the largest value (0 for an empty slice).
pub fn argmax(p: &[f32]) -> usize {
    p.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map_or(0, |(i, _)| i)
}

impl Report {
    /// A report from `(true topic index, predicted topic index)` pairs.
    pub fn from_predictions(
        topics: &[String],
        pairs: impl IntoIterator<Item = (usize, usize)>,
    ) -> Report {
        let k = topics.len();
        let mut confusion = vec![vec![0usize; k]; k];
        let (mut right, mut total) = (0usize, 0usize);
        for (t, pred) in pairs {
            if t >= k || pred >= k {
                continue;
            }
            confusion[t][pred] += 1;
            total += 1;
            right += (pred == t) as usize;
        }
        Report {
            topics: topics.to_vec(),
            confusion,
            accuracy: right as f64 / total.max(1) as f64,
        }
    }
}
