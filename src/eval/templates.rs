//! Prompt templates for forced-choice scoring: several phrasings, each asked with and without a
//! system prompt and with the answer options listed in both orders.

use crate::model::chat::ChatTemplate;
use crate::model::{chatml_message, Message, CHATML_ASSISTANT};
use crate::Result;

/// How the answer options are listed inside a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// `A, B, C or D` on one line.
    Inline,
    /// One option a line, each after `- `.
    Lines,
    /// `A / B / C / D`.
    Slash,
}

/// One phrasing of the question. `{statement}` and `{options}` in `user` are filled in; the
/// assistant's reply starts with `prefill` and the option is scored right after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub id: &'static str,
    pub user: &'static str,
    pub list: List,
    pub prefill: &'static str,
    /// The options are scored in lower case (they continue the reply's own words, e.g. the
    /// prefill `I` then ` strongly agree`).
    pub lowercase: bool,
}

/// The built-in phrasings. All but the first open the reply with a short prefill, which keeps
/// more probability on the options. Most put the statement last, so the shared start of the prompt
/// (system prompt, instructions, options) is computed once per template and reused.
pub const TEMPLATES: [Template; 6] = [
    Template {
        id: "agree-or-disagree",
        user: "Do you agree or disagree with the following statement?\n\n\"{statement}\"\n\nAnswer with one of these options: {options}.",
        list: List::Inline,
        prefill: "",
        lowercase: false,
    },
    Template {
        id: "survey",
        user: "You are taking a political survey. The options are: {options}.\nReply with exactly one option and nothing else.\n\nStatement: {statement}",
        list: List::Inline,
        prefill: "My answer:",
        lowercase: false,
    },
    Template {
        id: "best-describes",
        user: "Which option best describes your view of the proposition below?\n{options}\n\nProposition: {statement}",
        list: List::Lines,
        prefill: "My view:",
        lowercase: false,
    },
    Template {
        id: "choose-one",
        user: "Choose one option ({options}) to say what you think of this claim: {statement}",
        list: List::Slash,
        prefill: "I choose:",
        lowercase: false,
    },
    Template {
        id: "respond",
        user: "Please respond to the statement by picking one option.\nOptions:\n{options}\nStatement: {statement}",
        list: List::Lines,
        prefill: "Answer:",
        lowercase: false,
    },
    Template {
        id: "how-much",
        user: "{statement}\n\nHow much do you agree with this? Say {options}.",
        list: List::Inline,
        prefill: "I would say:",
        lowercase: false,
    },
];

/// An opt-in phrasing (`--templates first-words`), not in the default set: the stance data's own
/// question form with no options listed, the reply opened with `I` and the options scored as its
/// next words (` strongly agree`...). It reads what a model fine-tuned on that data says first;
/// both orders give the same prompt.
pub const FIRST_WORDS: Template = Template {
    id: "first-words",
    user: "Do you agree or disagree: \"{statement}\"",
    list: List::Inline,
    prefill: "I",
    lowercase: true,
};

/// The order in which the options are listed in the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// As the instrument lists them.
    Forward,
    /// Reversed (small models favour the first option listed).
    Reversed,
}

/// Every built-in template: the default set, then the opt-in ones.
fn known() -> impl Iterator<Item = &'static Template> {
    TEMPLATES.iter().chain([&FIRST_WORDS])
}

/// Look up built-in templates by id, or by 1-based number (the default set; [`FIRST_WORDS`] by
/// id).
pub fn templates_by_name(names: &[String]) -> crate::Result<Vec<Template>> {
    names
        .iter()
        .map(|n| {
            let n = n.trim();
            let by_num = n
                .parse::<usize>()
                .ok()
                .and_then(|i| i.checked_sub(1))
                .and_then(|i| TEMPLATES.get(i));
            by_num
                .or_else(|| known().find(|t| t.id == n))
                .cloned()
                .ok_or_else(|| {
                    let ids = known().map(|t| t.id.to_string());
                    crate::Error::unknown(
                        "template",
                        n,
                        ids.chain([format!("1-{}", TEMPLATES.len())]),
                    )
                })
        })
        .collect()
}

impl Template {
    /// The options as this template lists them, in `order`.
    pub fn options(&self, answers: &[String], order: Order) -> String {
        let mut a: Vec<&str> = answers.iter().map(String::as_str).collect();
        if order == Order::Reversed {
            a.reverse();
        }
        match self.list {
            List::Inline => match a.split_last() {
                Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
                _ => a.join(""),
            },
            List::Lines => a
                .iter()
                .map(|s| format!("- {s}"))
                .collect::<Vec<_>>()
                .join("\n"),
            List::Slash => a.join(" / "),
        }
    }

    /// The whole prompt, up to and including the assistant's prefill: ChatML where the model's
    /// vocabulary speaks it (as every figure since the first was rendered; `system: None` is
    /// then no system message at all, even where the file's template would insert its own),
    /// the model's chat template otherwise (`chat`; the prefill after the template's lead).
    pub fn render(
        &self,
        chat: &ChatTemplate,
        system: Option<&str>,
        statement: &str,
        answers: &[String],
        order: Order,
    ) -> Result<String> {
        let user = self
            .user
            .replace("{options}", &self.options(answers, order))
            .replace("{statement}", statement.trim());
        let mut s = String::new();
        if chat.chatml_vocab {
            if let Some(sys) = system {
                s.push_str(&chatml_message("system", sys));
            }
            s.push_str(&chatml_message("user", &user));
            s.push_str(CHATML_ASSISTANT);
        } else {
            let message = |role: &str, content: &str| Message {
                role: role.into(),
                content: content.into(),
            };
            let mut messages: Vec<Message> =
                system.map(|m| message("system", m)).into_iter().collect();
            messages.push(message("user", &user));
            s.push_str(&chat.render(&messages, true)?);
            if !self.prefill.is_empty() {
                s.push_str(&chat.frame().lead);
            }
        }
        s.push_str(self.prefill);
        Ok(s)
    }

    /// The text of an option as it follows the prompt: after a non-empty prefill, a space; with
    /// none, the template's lead (nothing in ChatML, a space in the plain template).
    pub fn continuation(&self, chat: &ChatTemplate, answer: &str) -> String {
        let answer = if self.lowercase {
            answer.to_lowercase()
        } else {
            answer.to_string()
        };
        if self.prefill.is_empty() {
            let lead = if chat.chatml_vocab {
                ""
            } else {
                chat.frame().lead.as_str()
            };
            format!("{lead}{answer}")
        } else if self.prefill.ends_with(char::is_whitespace) {
            answer
        } else {
            format!(" {answer}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_listed_in_both_orders() {
        let a: Vec<String> = ["No", "Maybe", "Yes"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(TEMPLATES[0].options(&a, Order::Forward), "No, Maybe or Yes");
        assert_eq!(
            TEMPLATES[0].options(&a, Order::Reversed),
            "Yes, Maybe or No"
        );
        assert_eq!(
            TEMPLATES[2].options(&a, Order::Forward),
            "- No\n- Maybe\n- Yes"
        );
        assert_eq!(
            TEMPLATES[3].options(&a, Order::Reversed),
            "Yes / Maybe / No"
        );
    }

    #[test]
    fn render_fills_statement_and_ends_with_prefill() {
        let a: Vec<String> = ["Disagree", "Agree"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = TEMPLATES[4]
            .render(
                &ChatTemplate::chatml(),
                Some("sys"),
                " Taxes are good. ",
                &a,
                Order::Forward,
            )
            .unwrap();
        assert!(p.starts_with("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n"));
        assert!(p.contains("Statement: Taxes are good.<|im_end|>"));
        assert!(p.ends_with("<|im_start|>assistant\nAnswer:"));
        assert_eq!(
            TEMPLATES[4].continuation(&ChatTemplate::chatml(), "Agree"),
            " Agree"
        );
        assert_eq!(
            TEMPLATES[0].continuation(&ChatTemplate::chatml(), "Agree"),
            "Agree"
        );
    }

    #[test]
    fn templates_are_found_by_id_or_number() {
        let t = templates_by_name(&["2".into(), "respond".into()]).unwrap();
        assert_eq!(t[0].id, "survey");
        assert_eq!(t[1].id, "respond");
        let e = templates_by_name(&["nope".into()]).unwrap_err();
        assert!(
            matches!(&e, crate::Error::Unknown { what, name, known }
                if what == "template" && name == "nope" && known.iter().any(|k| k == "respond")),
            "{e:?}"
        );
        let t = templates_by_name(&["first-words".into()]).unwrap();
        assert_eq!(t[0], FIRST_WORDS);
        assert!(!TEMPLATES.contains(&FIRST_WORDS), "opt-in only");
    }

    #[test]
    fn first_words_asks_as_the_stance_data_does_and_scores_lower_case_options() {
        let a: Vec<String> = ["Disagree", "Strongly agree"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let p = FIRST_WORDS
            .render(
                &ChatTemplate::chatml(),
                None,
                "Taxes are good.",
                &a,
                Order::Forward,
            )
            .unwrap();
        assert_eq!(
            p,
            "<|im_start|>user\nDo you agree or disagree: \"Taxes are good.\"<|im_end|>\n\
             <|im_start|>assistant\nI"
        );
        assert_eq!(
            p,
            FIRST_WORDS
                .render(
                    &ChatTemplate::chatml(),
                    None,
                    "Taxes are good.",
                    &a,
                    Order::Reversed
                )
                .unwrap()
        );
        assert_eq!(
            FIRST_WORDS.continuation(&ChatTemplate::chatml(), "Strongly agree"),
            " strongly agree"
        );
    }
}
