//! Chat transcripts: JSON Lines, a header line then one line per turn, each turn with the blend
//! that produced it and its routing decision. `/save` writes one; `chat --load` resumes one.
//!
//! ```text
//! {"type":"header","format":"stancemix-chat","version":1,"system":null,"model":"...gguf","experts":["progressive","conservative"]}
//! {"type":"turn","user":"...","assistant":"...","blend":"dial +0.60 | weights","blend_spec":"dial=0.6@weights","weights":{"progressive":0.6},"route":null,"stop":"max_tokens","params":{...}}
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use stancemix::model::Message;
use stancemix::router::Route;
use stancemix::runtime::StopReason;
use stancemix::{Blend, Error, GenParams, Reply};

/// The `format` field of a transcript header.
pub const FORMAT: &str = "stancemix-chat";
/// The transcript version this code writes and reads.
pub const VERSION: u32 = 1;

/// One answered prompt and how it was produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TurnRecord {
    pub user: String,
    pub assistant: String,
    /// The blend as shown to users (`dial +0.60 | weights`).
    pub blend: String,
    /// The blend as `--blend` reads it (`dial=0.6@weights`, [`Blend::spec`]).
    pub blend_spec: String,
    /// Gate weights by expert name (the routed ones for automatic blends).
    pub weights: BTreeMap<String, f32>,
    /// The gate's decision (automatic blends only).
    pub route: Option<Route>,
    pub stop: StopReason,
    pub params: GenParams,
}

impl TurnRecord {
    /// The record of `reply` to `user` under `blend` and `params`.
    pub fn new(user: &str, reply: &Reply, blend: &Blend, params: &GenParams) -> TurnRecord {
        TurnRecord {
            user: user.to_string(),
            assistant: reply.text.clone(),
            blend: reply.blend.to_string(),
            blend_spec: blend.spec(),
            weights: reply.weights.clone(),
            route: reply.route.clone(),
            stop: reply.stop,
            params: params.clone(),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Header {
    format: String,
    version: u32,
    system: Option<String>,
    /// File name of the base model (informative).
    #[serde(default)]
    model: String,
    /// Expert names at save time (informative).
    #[serde(default)]
    experts: Vec<String>,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Header(Header),
    Turn(Box<TurnRecord>),
}

/// A conversation: system prompt, turns, and what it ran on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Transcript {
    pub system: Option<String>,
    pub model: String,
    pub experts: Vec<String>,
    pub turns: Vec<TurnRecord>,
}

impl Transcript {
    /// The conversation as chat messages (system, then user / assistant pairs).
    pub fn messages(&self) -> Vec<Message> {
        self.messages_of(&self.turns)
    }

    /// The conversation before the last turn (the context `/compare` answers in).
    pub fn messages_before_last(&self) -> Vec<Message> {
        let n = self.turns.len().saturating_sub(1);
        self.messages_of(&self.turns[..n])
    }

    fn messages_of(&self, turns: &[TurnRecord]) -> Vec<Message> {
        let msg = |role: &str, content: &str| Message {
            role: role.into(),
            content: content.into(),
        };
        let mut m = Vec::new();
        if let Some(s) = self.system.as_deref().filter(|s| !s.is_empty()) {
            m.push(msg("system", s));
        }
        for t in turns {
            m.push(msg("user", &t.user));
            m.push(msg("assistant", &t.assistant));
        }
        m
    }

    /// Write as JSON Lines: a temporary file beside `path`, then renamed over it.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        let mut text = String::new();
        let header = Line::Header(Header {
            format: FORMAT.into(),
            version: VERSION,
            system: self.system.clone(),
            model: self.model.clone(),
            experts: self.experts.clone(),
        });
        let lines = std::iter::once(header)
            .chain(self.turns.iter().map(|t| Line::Turn(Box::new(t.clone()))));
        for line in lines {
            let json = serde_json::to_string(&line)
                .map_err(|e| Error::Internal(format!("cannot write the transcript: {e}")))?;
            text.push_str(&json);
            text.push('\n');
        }
        stancemix::error::write_atomic(path, text.as_bytes())
    }

    /// Read a transcript; errors name the file, the line and the field.
    pub fn load(path: &Path) -> Result<Transcript, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Transcript::parse(&text, path)
    }

    /// Parse a transcript's text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Transcript, Error> {
        let mut t = Transcript::default();
        let mut seen_any = false;
        for (i, raw) in text.lines().enumerate() {
            let n = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let line: Line = serde_json::from_str(raw).map_err(|e| {
                let msg = e.to_string();
                Error::data(path, n, field_of(&msg), msg)
            })?;
            match line {
                Line::Header(h) => {
                    if seen_any {
                        return Err(Error::data(
                            path,
                            n,
                            "type",
                            "a header may only be the first line",
                        ));
                    }
                    if h.format != FORMAT {
                        return Err(Error::data(
                            path,
                            n,
                            "format",
                            format!("expected \"{FORMAT}\", got \"{}\"", h.format),
                        ));
                    }
                    if h.version != VERSION {
                        return Err(Error::data(
                            path,
                            n,
                            "version",
                            format!("this stancemix reads version {VERSION}, got {}", h.version),
                        ));
                    }
                    t.system = h.system;
                    t.model = h.model;
                    t.experts = h.experts;
                }
                Line::Turn(turn) => {
                    if let Err(e) = turn.blend_spec.parse::<Blend>() {
                        return Err(Error::data(path, n, "blend_spec", e.to_string()));
                    }
                    t.turns.push(*turn);
                }
            }
            seen_any = true;
        }
        if !seen_any {
            return Err(Error::data(
                path,
                1,
                "type",
                "empty file: expected a stancemix chat transcript (JSON Lines)",
            ));
        }
        Ok(t)
    }
}

/// The field a serde_json message names (`missing field `user``), else `line`.
fn field_of(msg: &str) -> String {
    msg.split('`').nth(1).unwrap_or("line").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(user: &str, spec: &str) -> TurnRecord {
        let blend: Blend = spec.parse().unwrap();
        TurnRecord {
            user: user.into(),
            assistant: format!("answer to {user}\nwith a second line"),
            blend: blend.to_string(),
            blend_spec: blend.spec(),
            weights: [("progressive".to_string(), 0.5)].into(),
            route: None,
            stop: StopReason::MaxTokens,
            params: GenParams::default(),
        }
    }

    #[test]
    fn save_then_load_gives_the_same_transcript() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.jsonl");
        let t = Transcript {
            system: Some("Be brief.".into()),
            model: "m.gguf".into(),
            experts: vec!["progressive".into(), "conservative".into()],
            turns: vec![
                turn("one", "dial=0.6"),
                turn("two", "auto=libertarian@logits"),
            ],
        };
        t.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "header + one line per turn");
        assert_eq!(Transcript::load(&path).unwrap(), t);
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn messages_are_system_then_user_assistant_pairs() {
        let t = Transcript {
            system: Some("S".into()),
            turns: vec![turn("a", "base"), turn("b", "base")],
            ..Default::default()
        };
        let roles: Vec<String> = t.messages().into_iter().map(|m| m.role).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user", "assistant"]);
        let before: Vec<String> = t
            .messages_before_last()
            .into_iter()
            .map(|m| m.content)
            .collect();
        assert_eq!(before, ["S", "a", "answer to a\nwith a second line"]);
    }

    #[test]
    fn bad_lines_name_file_line_and_field() {
        let p = Path::new("chat.jsonl");
        let header = r#"{"type":"header","format":"stancemix-chat","version":1,"system":null}"#;
        let e = Transcript::parse(&format!("{header}\n{{\"type\":\"turn\"}}\n"), p)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("chat.jsonl:2: "), "{e}");
        assert!(e.contains("missing field"), "{e}");

        let e = Transcript::parse("not json\n", p).unwrap_err().to_string();
        assert!(e.starts_with("chat.jsonl:1: "), "{e}");

        let e = Transcript::parse(&header.replace("\"version\":1", "\"version\":9"), p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("chat.jsonl:1: version:"), "{e}");

        let mut bad = serde_json::to_value(Line::Turn(Box::new(turn("x", "base")))).unwrap();
        bad["blend_spec"] = "dial=7".into();
        let e = Transcript::parse(&format!("{header}\n{bad}\n"), p)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("chat.jsonl:2: blend_spec: dial 7 is outside"),
            "{e}"
        );

        let e = Transcript::parse("\n", p).unwrap_err().to_string();
        assert!(e.contains("empty file"), "{e}");
    }
}
