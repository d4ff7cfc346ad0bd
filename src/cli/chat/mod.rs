//! `stancemix chat`: multi-turn chat with the blended model, steered live by slash commands.
//!
//! On a terminal: rustyline (line editing, a history file), answers streamed, a prompt that
//! shows the current blend. Otherwise (stdin piped): one prompt per input line, one answer per
//! output line, `[blend] text` with newlines written as `\n`; slash commands work too and report
//! on stderr.

mod command;
mod transcript;

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};
use rustyline::error::ReadlineError;

use stancemix::runtime::{shipped_adapters, StopReason, View};
use stancemix::{Blend, Engine, GenParams, Reply, Session};

use super::common::{EngineArgs, TurnArgs};
use command::{Command, Input, HELP};
use transcript::{Transcript, TurnRecord};

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Resume a transcript written by /save (JSON Lines). Its last blend is the starting blend
    /// unless --blend, --dial or --policy say otherwise.
    #[arg(long, value_name = "FILE")]
    pub load: Option<PathBuf>,
    #[command(flatten)]
    pub turn: TurnArgs,
}

/// Set by Ctrl-C while an answer is being generated: stop it.
static STOP: AtomicBool = AtomicBool::new(false);
/// True while an answer is being generated (Ctrl-C otherwise leaves, as usual).
static BUSY: AtomicBool = AtomicBool::new(false);

/// What the loop does after a line.
#[derive(Debug)]
enum Flow {
    Continue,
    Quit,
}

/// The chat's state: the session, the sampling settings and the transcript so far.
struct Chat {
    engine: Arc<Engine>,
    session: Session,
    params: GenParams,
    transcript: Transcript,
    /// Terminal mode (stream answers, info on stdout) or piped mode (one line per answer).
    interactive: bool,
    /// Explain every answer.
    explain: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let params = a.turn.gen.params()?;
    let flag_blend = a.turn.blend.blend()?;
    let interactive = std::io::stdin().is_terminal();
    let loaded = match &a.load {
        Some(p) => Some(Transcript::load(p)?),
        None => None,
    };
    note_missing_shipped_adapters(&a.turn.engine);
    if interactive {
        eprintln!("loading the model...");
    }
    let engine = a.turn.engine.load()?;
    if a.turn.engine.base.shipped_experts() && engine.expert_names().is_empty() {
        let other = shipped_adapters(&crate::cli::paths())
            .iter()
            .any(|d| !stancemix::runtime::adapter_fits(d, &engine.model.config));
        if other {
            eprintln!(
                "note: the shipped experts were trained on another base; chatting with {} only (train experts for it with `stancemix train`, or pass --adapters DIR...)",
                file_name(&engine.model.path)
            );
        }
    }
    let mut session = engine.session();
    let mut transcript = Transcript {
        system: a.turn.system.clone(),
        model: file_name(&engine.model.path),
        experts: engine.expert_names().to_vec(),
        turns: Vec::new(),
    };
    if let Some(t) = loaded {
        if a.turn.system.is_some() && a.turn.system != t.system {
            eprintln!("note: the transcript's system prompt is kept; --system is ignored");
        }
        session.restore(t.messages())?;
        transcript.system = t.system;
        transcript.turns = t.turns;
    }
    session.set_system(transcript.system.clone());

    // Starting blend: the flags, else the loaded transcript's last blend.
    let given = a.turn.blend.blend.is_some()
        || a.turn.blend.dial.is_some()
        || a.turn.blend.policy.is_some();
    let start = match transcript.turns.last() {
        Some(t) if !given => {
            let b: Blend = t.blend_spec.parse()?;
            match a.turn.blend.mode {
                Some(m) => b.with_mode(m),
                None => b,
            }
        }
        _ => flag_blend,
    };

    let mut chat = Chat {
        engine,
        session,
        params,
        transcript,
        interactive,
        explain: a.turn.explain,
    };
    if let Err(e) = chat.set_blend(start.clone()) {
        eprintln!(
            "note: cannot start on blend {start}: {}; starting on the base model",
            one_line(&e)
        );
    }
    if interactive {
        chat.banner(&history_path());
        if let Some(p) = &a.load {
            chat.resumed(p);
        }
        chat.repl()
    } else {
        eprintln!(
            "stancemix chat: one prompt per stdin line, one answer per stdout line as `[blend] text` \
             (newlines as \\n); starting blend {}. The experts are deliberately biased adapters, \
             for research.",
            chat.session.blend()
        );
        chat.piped()
    }
}

impl Chat {
    /// The terminal loop: rustyline, history file, streamed answers.
    fn repl(&mut self) -> anyhow::Result<()> {
        let config = rustyline::Config::builder()
            .auto_add_history(false)
            .history_ignore_dups(true)?
            .max_history_size(1000)?
            .build();
        let mut rl = rustyline::DefaultEditor::with_config(config)?;
        // After the editor: rustyline installs a SIGINT handler of its own when created (it
        // reads Ctrl-C as a key in raw mode, so it does not need one), which would hide ours.
        install_ctrl_c()?;
        let history = history_path();
        if let Some(p) = &history {
            if p.exists() {
                if let Err(e) = rl.load_history(p) {
                    eprintln!("note: cannot read history {}: {e}", p.display());
                }
            }
        }
        loop {
            let prompt = format!("[{}] > ", self.session.blend());
            match rl.readline(&prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = rl.add_history_entry(line.as_str());
                    }
                    match self.line(&line) {
                        Ok(Flow::Quit) => break,
                        Ok(Flow::Continue) => {}
                        Err(e) => eprintln!("error: {}", one_line(&e)),
                    }
                }
                Err(ReadlineError::Interrupted) => {
                    println!("(nothing to stop: Ctrl-D or /quit leaves)");
                }
                Err(ReadlineError::Eof) => {
                    println!();
                    break;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if let Some(p) = &history {
            let saved = match p.parent() {
                Some(d) if !d.as_os_str().is_empty() => std::fs::create_dir_all(d)
                    .map_err(ReadlineError::from)
                    .and_then(|_| rl.save_history(p)),
                _ => rl.save_history(p),
            };
            if let Err(e) = saved {
                eprintln!("note: cannot write history {}: {e}", p.display());
            }
        }
        Ok(())
    }

    /// The scripted loop: one prompt (or command) per stdin line. Fails at the end if any
    /// line failed, after going on with the rest.
    fn piped(&mut self) -> anyhow::Result<()> {
        install_ctrl_c()?;
        let stdin = std::io::stdin();
        let mut input = stdin.lock();
        let (mut n, mut failed) = (0usize, 0usize);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            if input.read_until(b'\n', &mut buf)? == 0 {
                break;
            }
            n += 1;
            let line = String::from_utf8_lossy(&buf);
            match self.line(line.trim_end_matches(['\n', '\r'])) {
                Ok(Flow::Quit) => break,
                Ok(Flow::Continue) => {}
                Err(e) => {
                    failed += 1;
                    eprintln!("error: line {n}: {}", one_line(&e));
                }
            }
        }
        if failed > 0 {
            bail!("{failed} of {n} input lines failed (see above)");
        }
        Ok(())
    }

    /// Handle one line of input. An error leaves the chat usable: the caller prints it and
    /// goes on.
    fn line(&mut self, line: &str) -> anyhow::Result<Flow> {
        match command::parse(line).map_err(|msg| anyhow!(msg))? {
            Input::Empty => Ok(Flow::Continue),
            Input::Prompt(p) => self.ask(&p).map(|_| Flow::Continue),
            Input::Command(c) => self.command(c),
        }
    }

    /// Answer a prompt in the conversation and record the turn.
    fn ask(&mut self, user: &str) -> anyhow::Result<()> {
        let reply = match generate(&mut self.session, user, &self.params, self.interactive) {
            Ok(r) => r,
            Err(e) => {
                // Put the session back to the last complete turn.
                let _ = self.session.restore(self.transcript.messages());
                return Err(e);
            }
        };
        let blend = self.session.blend().clone();
        self.show(&reply);
        self.transcript
            .turns
            .push(TurnRecord::new(user, &reply, &blend, &self.params));
        if self.explain {
            self.explain_last()?;
        }
        Ok(())
    }

    /// Print a finished answer: on a terminal, a line under the streamed text saying which blend
    /// produced it; piped, the whole answer on one line after its blend.
    fn show(&self, reply: &Reply) {
        if self.interactive {
            let n = reply.tokens.len();
            let why = match reply.stop {
                StopReason::EndOfTurn => "",
                StopReason::MaxTokens => ", --max-tokens reached",
                StopReason::Interrupted => ", stopped by Ctrl-C",
            };
            println!();
            println!("  -- [{}] {n} tokens{why}", label(reply));
        } else {
            println!("[{}] {}", label(reply), escape(&reply.text));
        }
    }

    /// Carry out a slash command.
    fn command(&mut self, c: Command) -> anyhow::Result<Flow> {
        let mode = self.session.blend().mode;
        let changes_blend = matches!(
            c,
            Command::Dial(_)
                | Command::Mix(_)
                | Command::Expert(_)
                | Command::Base
                | Command::Policy(_)
                | Command::Mode(_)
                | Command::Blend(_)
        );
        match c {
            Command::Dial(d) => self.set_blend(Blend::dial(d)?.with_mode(mode))?,
            Command::Mix(x) => self.set_blend(Blend::mix(x)?.with_mode(mode))?,
            Command::Expert(name) => self.set_blend(Blend::expert(&name).with_mode(mode))?,
            Command::Base => self.set_blend(Blend::base().with_mode(mode))?,
            Command::Policy(p) => self.set_blend(Blend::auto(&p).with_mode(mode))?,
            Command::Mode(m) => self.set_blend(self.session.blend().clone().with_mode(m))?,
            Command::Blend(b) => self.set_blend(b)?,
            Command::Explain => self.explain_last()?,
            Command::Compare => self.compare()?,
            Command::Temp(t) => {
                self.params.temperature = t;
                self.info(&format!(
                    "temperature {t}{}",
                    if t == 0.0 { " (greedy)" } else { "" }
                ));
            }
            Command::Seed(s) => {
                self.params.seed = s;
                self.info(&format!("seed {s}"));
            }
            Command::Reset => {
                self.session.reset();
                self.transcript.turns.clear();
                self.info("conversation cleared (blend and settings kept)");
            }
            Command::Save(path) => {
                self.transcript.save(&path)?;
                self.info(&format!(
                    "saved {} turns to {} (resume with `stancemix chat --load {}`)",
                    self.transcript.turns.len(),
                    path.display(),
                    path.display()
                ));
            }
            Command::Load(path) => self.load(&path)?,
            Command::Help => self.info(HELP),
            Command::Quit => return Ok(Flow::Quit),
        }
        if changes_blend && !self.interactive {
            // A terminal's prompt line shows the blend; a script gets told.
            self.info(&format!("blend {}", self.session.blend()));
        }
        Ok(Flow::Continue)
    }

    /// Switch blends, with a clear error when the experts it needs are not loaded.
    fn set_blend(&mut self, b: Blend) -> anyhow::Result<()> {
        if self.engine.experts.is_empty() && b.view != View::Base {
            bail!(
                "no experts loaded (base model only): blend {b} needs them; load some with \
                 --adapters DIR..."
            );
        }
        if let View::Auto(p) = &b.view {
            // Every expert the policy names must be loaded (else routing fails later).
            if let Ok(policy) = self.engine.policy(p) {
                let experts = &self.engine.experts;
                for w in policy.table.values() {
                    for e in w.keys() {
                        if experts.index(e).is_none() && experts.by_stance(e).is_none() {
                            bail!(
                                "policy '{p}' needs an expert '{e}', which is not loaded (loaded: {})",
                                experts.names().join(", ")
                            );
                        }
                    }
                }
            }
        }
        self.session.set_blend(b.clone())?;
        if b.extrapolates() {
            eprintln!(
                "warning: blend {b} extrapolates beyond the experts (weights outside [0, 1])"
            );
        }
        Ok(())
    }

    /// `/explain`: the last answer's blend, routing decision and gate weights.
    fn explain_last(&self) -> anyhow::Result<()> {
        let t = self
            .transcript
            .turns
            .last()
            .ok_or_else(|| anyhow!("nothing to explain yet: ask something first"))?;
        let mut s = format!("last answer: [{}] gate {}", t.blend, weights(&t.weights));
        match &t.route {
            Some(r) => s.push_str(&format!("\nroute: {}", r.explain())),
            None => {
                s.push_str("\nroute: none (a fixed blend does not ask the gate)");
                if let Some(gate) = &self.engine.gate {
                    let probs = gate.probabilities(Some(&self.engine.model), &t.user)?;
                    let mut p: Vec<(&String, f32)> = gate.topics.iter().zip(probs).collect();
                    p.sort_by(|a, b| b.1.total_cmp(&a.1));
                    let top: Vec<String> = p
                        .iter()
                        .take(3)
                        .map(|(t, x)| format!("{t} {x:.2}"))
                        .collect();
                    s.push_str(&format!(
                        "\ngate's reading of the prompt (unused): {}",
                        top.join(", ")
                    ));
                }
            }
        }
        self.info(&s);
        Ok(())
    }

    /// `/compare`: the last prompt, in the same context, answered by the base and by each
    /// expert at full weight. The conversation itself is unchanged.
    fn compare(&mut self) -> anyhow::Result<()> {
        let last = self
            .transcript
            .turns
            .last()
            .ok_or_else(|| anyhow!("nothing to compare yet: ask something first"))?;
        if self.engine.experts.is_empty() {
            bail!("no experts loaded (base model only): /compare needs them; load some with --adapters DIR...");
        }
        let user = last.user.clone();
        let context = self.transcript.messages_before_last();
        let names = self.engine.expert_names();
        let blends = std::iter::once(("base", Blend::base()))
            .chain(names.iter().map(|n| (n.as_str(), Blend::expert(n))));
        if self.interactive {
            println!("compare: {user}");
        }
        for (name, b) in blends {
            let mut s = self.engine.session();
            s.restore(context.clone())?;
            s.set_blend(b)?;
            if self.interactive {
                println!("--- {name}:");
            }
            let reply = generate(&mut s, &user, &self.params, self.interactive)?;
            self.show(&reply);
            if reply.stop == StopReason::Interrupted {
                self.info("(compare stopped)");
                break;
            }
        }
        Ok(())
    }

    /// Status text: stdout on a terminal, stderr when piped (stdout carries only answers).
    fn info(&self, s: &str) {
        if self.interactive {
            println!("{s}");
        } else {
            eprintln!("{s}");
        }
    }

    fn banner(&self, history: &Option<PathBuf>) {
        let e = &self.engine;
        let experts = if e.experts.is_empty() {
            "none (base model only)".to_string()
        } else {
            e.expert_names().join(", ")
        };
        let gate = match &e.gate {
            Some(_) => {
                let names: Vec<&str> = e.policies.iter().map(|p| p.name.as_str()).collect();
                format!("policies {}", names.join(", "))
            }
            None => "none".into(),
        };
        println!(
            "stancemix chat | base {} ({:?}) | experts: {experts} | gate: {gate}",
            file_name(&e.model.path),
            e.model.format
        );
        println!(
            "The experts are deliberately biased LoRA adapters, one progressive and one conservative,\n\
             made for research and comparison: not a source of political information or advice."
        );
        println!(
            "/help lists commands | Ctrl-C stops an answer | Ctrl-D or /quit leaves | history: {}",
            match history {
                Some(p) => p.display().to_string(),
                None => "off".into(),
            }
        );
    }

    /// `/load FILE`: the saved conversation replaces this one (system prompt included), and its
    /// last blend becomes the blend when the loaded experts can make it. Nothing changes if the
    /// file cannot be read.
    fn load(&mut self, path: &Path) -> anyhow::Result<()> {
        let t = Transcript::load(path)?;
        let blend: Option<Blend> = match t.turns.last() {
            Some(turn) => Some(turn.blend_spec.parse()?),
            None => None,
        };
        self.session.restore(t.messages())?;
        self.session.set_system(t.system.clone());
        self.transcript.system = t.system;
        self.transcript.turns = t.turns;
        if let Some(b) = blend {
            if let Err(e) = self.set_blend(b.clone()) {
                self.info(&format!(
                    "note: cannot switch to the transcript's blend {b}: {}; keeping {}",
                    one_line(&e),
                    self.session.blend()
                ));
            }
        }
        if self.interactive {
            self.resumed(path);
        } else {
            // Piped, stdout carries answers only.
            self.info(&format!(
                "resumed {} turns from {}",
                self.transcript.turns.len(),
                path.display()
            ));
        }
        Ok(())
    }

    /// After `--load` or `/load`: say what was resumed and show the last exchange.
    fn resumed(&self, path: &Path) {
        let n = self.transcript.turns.len();
        println!("resumed {n} turns from {}", path.display());
        if let Some(t) = self.transcript.turns.last() {
            println!("[{}] > {}", t.blend, t.user);
            println!("{}", t.assistant);
            println!("  -- [{}]", t.blend);
        }
    }
}

/// Ctrl-C stops the answer being generated; at any other time it leaves, as usual.
fn install_ctrl_c() -> anyhow::Result<()> {
    ctrlc::set_handler(|| {
        if BUSY.load(Ordering::SeqCst) {
            STOP.store(true, Ordering::SeqCst);
        } else {
            std::process::exit(130);
        }
    })
    .context("installing the Ctrl-C handler")
}

/// Generate an answer, streaming its text to stdout when `stream`; Ctrl-C stops it.
fn generate(
    session: &mut Session,
    user: &str,
    params: &GenParams,
    stream: bool,
) -> anyhow::Result<Reply> {
    STOP.store(false, Ordering::SeqCst);
    BUSY.store(true, Ordering::SeqCst);
    let mut out = std::io::stdout();
    let reply = session.chat(user, params, |piece| {
        if stream {
            let _ = out.write_all(piece.as_bytes());
            let _ = out.flush();
        }
        !STOP.load(Ordering::SeqCst)
    });
    BUSY.store(false, Ordering::SeqCst);
    Ok(reply?)
}

/// Which blend produced `reply`: `dial +0.60 | weights`, or for automatic blends
/// `auto: libertarian | weights | topic housing, gate conservative=0.93`.
fn label(reply: &Reply) -> String {
    match &reply.route {
        Some(r) => format!(
            "{} | topic {}, gate {}",
            reply.blend,
            r.topic,
            weights(&reply.weights)
        ),
        None => reply.blend.to_string(),
    }
}

fn weights(w: &std::collections::BTreeMap<String, f32>) -> String {
    if w.is_empty() {
        return "base".into();
    }
    w.iter()
        .map(|(k, v)| format!("{k}={v:.2}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One answer on one line: `\` as `\\`, newline as `\n`, carriage return as `\r`.
fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// An error chain on one line.
fn one_line(e: &anyhow::Error) -> String {
    format!("{e:#}").replace('\n', " ")
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into())
}

/// The history file: `$STANCEMIX_HISTORY` (empty turns history off), else
/// `$XDG_DATA_HOME/stancemix/chat_history`, else `~/.local/share/stancemix/chat_history`.
fn history_path() -> Option<PathBuf> {
    history_path_from(|k| std::env::var_os(k))
}

/// [`history_path`] with the environment given as a lookup (testable).
fn history_path_from(env: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    if let Some(p) = env("STANCEMIX_HISTORY") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let var = |k: &str| env(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    let data = var("XDG_DATA_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| var("HOME").map(|h| h.join(".local/share")))
        .or_else(|| var("APPDATA"))?;
    Some(data.join("stancemix").join("chat_history"))
}

/// When the shipped adapters are the default but missing, say so: chat runs on what exists.
fn note_missing_shipped_adapters(engine: &EngineArgs) {
    if !engine.base.shipped_experts() {
        return;
    }
    let found = shipped_adapters(&crate::cli::paths());
    let missing: Vec<String> = ["progressive", "conservative"]
        .iter()
        .filter(|s| !found.iter().any(|p| p.ends_with(s)))
        .map(|s| format!("adapters/{s}"))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "note: the shipped adapter{} {} {} not there yet; chatting with {} (pass --adapters DIR... to load experts)",
            if missing.len() > 1 { "s" } else { "" },
            missing.join(" and "),
            if missing.len() > 1 { "are" } else { "is" },
            if found.is_empty() {
                "the base model only".to_string()
            } else {
                let names: Vec<String> = found.iter().map(|d| file_name(d)).collect();
                format!("{} only", names.join(", "))
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_keeps_each_answer_on_one_line() {
        assert_eq!(escape("a\nb\\n\r"), "a\\nb\\\\n\\r");
        assert!(!escape("x\ny\n").contains('\n'));
    }

    /// An environment of `vars` only.
    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.into())
    }

    #[test]
    fn history_path_prefers_stancemix_history_then_xdg_then_home() {
        let all = [
            ("STANCEMIX_HISTORY", "/tmp/h"),
            ("XDG_DATA_HOME", "/xdg"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(history_path_from(env(&all)), Some("/tmp/h".into()));
        assert_eq!(
            history_path_from(env(&[("STANCEMIX_HISTORY", ""), ("HOME", "/h")])),
            None
        );
        assert_eq!(
            history_path_from(env(&all[1..])),
            Some("/xdg/stancemix/chat_history".into())
        );
        assert_eq!(
            history_path_from(env(&[("XDG_DATA_HOME", "relative"), ("HOME", "/home/u")])),
            Some("/home/u/.local/share/stancemix/chat_history".into())
        );
        assert_eq!(history_path_from(env(&[])), None);
    }
}
