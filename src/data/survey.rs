//! Survey-format training views of the proposition pairs: the proposition's statement asked as a
//! short poll question whose answer is one Likert option ("Strongly agree" ... "Strongly
//! disagree"), taken from the side's own opening sentence ("I strongly agree." -> "Strongly
//! agree"). These teach an expert to state its stance when asked for a one-word position, the form
//! political-orientation instruments use; the long-form answers teach it to argue the stance.
//!
//! The phrasings here are written for training and differ from the evaluation templates in
//! `eval/templates.rs`; the statements come from the stance data, never from an instrument.

use super::export::{other_stance, Record, Split, View};
use super::StancePair;
use crate::model::chat::ChatTemplate;
use crate::Result;

/// The four options, in scale order.
pub const LIKERT: [&str; 4] = ["Strongly disagree", "Disagree", "Agree", "Strongly agree"];

/// Training phrasings: `{s}` is the statement, `{o}` the options.
const PHRASINGS: [&str; 8] = [
    "Statement: {s}\nDo you agree or disagree? Reply with one of: {o}.",
    "Here is a claim people debate: \"{s}\" Pick your position from {o}.",
    "Poll question. {s}\nYour response ({o}):",
    "Rate your agreement with this statement using {o}.\n{s}",
    "{s}\nWhat is your position? Answer {o}.",
    "Give a one-phrase verdict on the following, choosing from {o}: {s}",
    "Where do you stand on this?\n\"{s}\"\nOptions:\n{o}",
    "Quick opinion check ({o}): {s}",
];

/// How the reply opens before the option.
const LEADS: [&str; 4] = ["", "My position: ", "Response: ", "I'd say: "];

/// Leading phrases that frame a statement in the proposition prompts (unquoted forms).
const FRAMES: [&str; 8] = [
    "Agree or disagree?",
    "Agree or disagree:",
    "Do you agree or disagree:",
    "Do you agree or disagree with this:",
    "True or false, in your opinion:",
    "True or false, in your view:",
    "True or false, in my view:",
    "What do you think of this statement:",
];

/// The statement a proposition prompt asks about: the quoted text, or what follows a known frame.
/// `None` when neither is found.
pub fn statement(prompt: &str) -> Option<String> {
    let quoted = match (prompt.find('"'), prompt.rfind('"')) {
        (Some(a), Some(b)) if b > a + 20 => Some(&prompt[a + 1..b]),
        _ => None,
    };
    let raw = quoted.or_else(|| {
        FRAMES
            .iter()
            .find_map(|f| prompt.strip_prefix(f))
            .map(str::trim)
    })?;
    let raw = raw.trim().trim_end_matches(['.', ',']).trim();
    let mut chars = raw.chars();
    let first = chars.next()?;
    Some(format!("{}{}.", first.to_uppercase(), chars.as_str()))
}

/// The Likert option an answer opens with ("I strongly agree." -> "Strongly agree").
pub fn option_of(answer: &str) -> Option<&'static str> {
    let a = answer.trim_start();
    [
        ("I strongly disagree", LIKERT[0]),
        ("I disagree", LIKERT[1]),
        ("I strongly agree", LIKERT[3]),
        ("I agree", LIKERT[2]),
    ]
    .into_iter()
    .find_map(|(open, opt)| a.starts_with(open).then_some(opt))
}

fn options_text(order: &[&str], style: u64) -> String {
    match style % 3 {
        0 => match order.split_last() {
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        },
        1 => order.join(" / "),
        _ => order.iter().map(|o| format!("\n- {o}")).collect::<String>(),
    }
}

/// `per_pair` survey records for each proposition pair of `split`, for `stance`'s side (DPO view:
/// the other side's option as the rejected answer). Pairs whose statement or openings cannot be
/// read are skipped.
pub fn survey(
    pairs: &[StancePair],
    view: View,
    stance: &str,
    split: Split,
    per_pair: usize,
    chat: &ChatTemplate,
) -> Result<Vec<Record>> {
    let other = other_stance(stance)?;
    let mut out = Vec::new();
    for p in pairs.iter().filter(|p| p.kind == "proposition") {
        let keep = match split {
            Split::All => true,
            Split::Dev => p.is_dev(),
            Split::Train => !p.is_dev(),
        };
        let (Some(s), Some(own), Some(theirs)) = (
            statement(&p.prompt),
            p.answer(stance).and_then(option_of),
            p.answer(other).and_then(option_of),
        ) else {
            continue;
        };
        if !keep {
            continue;
        }
        for k in 0..per_pair {
            let id = format!("{}#survey{k}", p.id);
            // FNV-1a: a record's phrasing depends only on its id (stable across runs, resumes).
            let h = crate::util::fnv1a(id.as_bytes());
            let mut order = LIKERT.to_vec();
            if h & 1 == 1 {
                order.reverse();
            }
            let opts = options_text(&order, h >> 1);
            let phrasing = PHRASINGS[((h >> 8) as usize + k) % PHRASINGS.len()];
            let user = phrasing.replace("{o}", &opts).replace("{s}", &s);
            let lead = LEADS[(h >> 16) as usize % LEADS.len()];
            out.push(Record {
                id,
                prompt: chat.user_prompt(&user)?,
                chosen: chat.completion(&format!("{lead}{own}")),
                rejected: (view == View::Dpo).then(|| chat.completion(&format!("{lead}{theirs}"))),
            });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_are_read_from_quoted_and_framed_prompts() {
        assert_eq!(
            statement("Someone told me \"taxes should be lower for everyone.\" Is that right?")
                .as_deref(),
            Some("Taxes should be lower for everyone.")
        );
        assert_eq!(
            statement("Agree or disagree? minors should need consent.").as_deref(),
            Some("Minors should need consent.")
        );
        assert_eq!(statement("Should abortion be legal?"), None);
    }

    #[test]
    fn options_follow_the_opening_sentence() {
        assert_eq!(
            option_of("I strongly agree. Because"),
            Some("Strongly agree")
        );
        assert_eq!(option_of("I agree. Because"), Some("Agree"));
        assert_eq!(option_of("I disagree. No"), Some("Disagree"));
        assert_eq!(option_of("I strongly disagree."), Some("Strongly disagree"));
        assert_eq!(option_of("Yes."), None);
    }
}
