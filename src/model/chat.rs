//! The chat template: a conversation rendered to the text the model was tuned on.
//!
//! The template is the file's own `tokenizer.chat_template` (a Jinja template), rendered by
//! minijinja as transformers renders it (`trim_blocks`, `lstrip_blocks`, Python string methods,
//! `raise_exception`, `bos_token` / `eos_token`). A file without one gets ChatML when its
//! vocabulary has `<|im_start|>` and `<|im_end|>`, else [`PLAIN_TEMPLATE`] (pretrained bases).

use minijinja::{context, Environment, ErrorKind};

use super::Message;
use crate::{Error, Result};

/// ChatML, for files without a template whose vocabulary has the ChatML tokens.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// For pretrained files with neither a template nor ChatML tokens: `Role: text` paragraphs.
pub const PLAIN_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{{ message.role | capitalize }}: {{ message.content }}\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}";

/// Where a model's template came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TemplateSource {
    /// `tokenizer.chat_template` in the GGUF file.
    File,
    /// [`CHATML_TEMPLATE`].
    ChatMl,
    /// [`PLAIN_TEMPLATE`].
    Plain,
}

/// How the template frames an assistant's answer after the prompt that opens its turn:
/// `lead` + answer + `close` (ChatML: `""` and `"<|im_end|>\n"`; the plain template: `" "` and
/// `"\n\n"`). Training targets and forced-choice continuations are built from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerFrame {
    pub lead: String,
    pub close: String,
}

/// A compiled chat template.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    pub source: TemplateSource,
    /// Whether the model's vocabulary has ChatML's `<|im_start|>` and `<|im_end|>`.
    pub chatml_vocab: bool,
    bos: String,
    eos: String,
    /// Probed once from the template (see [`ChatTemplate::frame`]).
    frame: AnswerFrame,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .finish()
    }
}

impl ChatTemplate {
    /// Compile `template` (`None`: the file has none; `chatml`: its vocabulary has the ChatML
    /// tokens). `bos` / `eos`: the special tokens' text, for templates that print them.
    pub fn new(template: Option<&str>, chatml: bool, bos: &str, eos: &str) -> Result<Self> {
        let (text, source) = match template {
            Some(t) => (t.to_string(), TemplateSource::File),
            None if chatml => (CHATML_TEMPLATE.to_string(), TemplateSource::ChatMl),
            None => (PLAIN_TEMPLATE.to_string(), TemplateSource::Plain),
        };
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned("chat", text)
            .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))?;
        let mut t = ChatTemplate {
            env,
            source,
            chatml_vocab: chatml,
            bos: bos.to_string(),
            eos: eos.to_string(),
            frame: AnswerFrame {
                lead: String::new(),
                close: eos.to_string(),
            },
        };
        t.frame = t.probe_frame();
        Ok(t)
    }

    /// Render a conversation with one answer and cut it around the answer. A template that
    /// renders the finished turn differently from the open one (or fails) keeps the fallback:
    /// no lead, the EOS text as close.
    fn probe_frame(&self) -> AnswerFrame {
        const QUESTION: &str = "\u{1}question\u{1}";
        const ANSWER: &str = "\u{1}answer\u{1}";
        let user = Message {
            role: "user".into(),
            content: QUESTION.into(),
        };
        let answer = Message {
            role: "assistant".into(),
            content: ANSWER.into(),
        };
        let open = self.render(std::slice::from_ref(&user), true);
        let done = self.render(&[user, answer], false);
        if let (Ok(open), Ok(done)) = (open, done) {
            if let Some(rest) = done.strip_prefix(open.as_str()) {
                if let Some((lead, close)) = rest.split_once(ANSWER) {
                    return AnswerFrame {
                        lead: lead.into(),
                        close: close.into(),
                    };
                }
            }
        }
        AnswerFrame {
            lead: String::new(),
            close: self.eos.clone(),
        }
    }

    /// How this template frames an answer.
    pub fn frame(&self) -> &AnswerFrame {
        &self.frame
    }

    /// An answer as a training target after [`ChatTemplate::user_prompt`]: the lead, the
    /// answer, and the close up to its last non-blank character (ChatML's `<|im_end|>`, as the
    /// shipped experts were trained) or, where the close is only blank (the plain template's
    /// `\n\n`), the close itself, so the model learns where an answer ends.
    pub fn completion(&self, answer: &str) -> String {
        format!("{}{answer}{}", self.frame.lead, self.target_close())
    }

    /// The close a training target ends with: the template's close up to its last non-blank
    /// character, or the whole close where it is only blank.
    fn target_close(&self) -> &str {
        match self.frame.close.trim_end() {
            "" => &self.frame.close,
            close => close,
        }
    }

    /// The answer inside a [`ChatTemplate::completion`] (the text itself when it is not one).
    pub fn strip_completion<'a>(&self, completion: &'a str) -> &'a str {
        let inner = completion
            .strip_prefix(self.frame.lead.as_str())
            .unwrap_or(completion);
        inner.strip_suffix(self.target_close()).unwrap_or(inner)
    }

    /// ChatML without a system message (exports made without a model).
    pub fn chatml() -> Self {
        // The built-in template compiles.
        Self::new(None, true, "", "").expect("the ChatML template compiles")
    }

    /// `messages` as text; with `add_generation_prompt`, ending with the assistant's open turn.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self
            .env
            .get_template("chat")
            .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))?;
        tmpl.render(context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos,
            eos_token => self.eos,
        })
        .map_err(|e| Error::Tokenizer(format!("chat template: {e:#}")))
    }

    /// The system prompt the template inserts when a conversation has none (SmolLM2's "You
    /// are a helpful AI assistant named SmolLM...", Qwen's "You are Qwen..."), if it does.
    pub fn default_system(&self) -> Option<String> {
        const PROBE: &str = "\u{1}probe\u{1}";
        let text = self.user_prompt(PROBE).ok()?;
        let before = &text[..text.find(PROBE)?];
        let start = before.find("<|im_start|>system\n")? + "<|im_start|>system\n".len();
        let end = start + before[start..].find("<|im_end|>")?;
        Some(before[start..end].to_string())
    }

    /// The prompt for one user message, no system message: what the model answers.
    pub fn user_prompt(&self, user: &str) -> Result<String> {
        self.render(
            &[Message {
                role: "user".into(),
                content: user.into(),
            }],
            true,
        )
    }
}
