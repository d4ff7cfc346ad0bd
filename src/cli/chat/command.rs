//! What a line typed into `stancemix chat` means: a prompt, or a slash command.
//!
//! Parsing is pure (no model, no session) so every command and every bad value is unit-tested.

use std::path::PathBuf;

use stancemix::{Blend, Mode};

/// A line of input, understood.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// Nothing to do (a blank line).
    Empty,
    /// Text for the model. `//text` sends `/text`.
    Prompt(String),
    /// A slash command.
    Command(Command),
}

/// The slash commands.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// `/dial D`, D in [-1, 1].
    Dial(f32),
    /// `/mix A`, A in [0, 1].
    Mix(f32),
    /// `/expert NAME`: one expert at full weight.
    Expert(String),
    /// `/base`: experts off.
    Base,
    /// `/policy NAME`: route each prompt with the gate.
    Policy(String),
    /// `/mode weights|logits|contrast`.
    Mode(Mode),
    /// `/blend SPEC`: any blend `--blend` accepts.
    Blend(Blend),
    /// `/explain`: the last answer's routing decision and gate weights.
    Explain,
    /// `/compare`: the last prompt answered by the base and by each expert.
    Compare,
    /// `/temp T`, T >= 0 (0 = greedy).
    Temp(f64),
    /// `/seed N`.
    Seed(u64),
    /// `/reset`: forget the conversation.
    Reset,
    /// `/save FILE`: write the transcript (JSON Lines).
    Save(PathBuf),
    /// `/load FILE`: replace the conversation with a saved transcript (as `chat --load`).
    Load(PathBuf),
    /// `/help`.
    Help,
    /// `/quit` (or `/exit`).
    Quit,
}

/// The `/help` text, one command a line.
pub const HELP: &str = "\
/dial D        dial from -1 (conservative) through 0 (base) to +1 (progressive)
/mix A         mix A in [0, 1]: progressive A, conservative 1-A
/expert NAME   one expert at full weight
/base          experts off (the base model)
/policy NAME   route each prompt with the gate under a policy (e.g. libertarian)
/mode M        how gate weights apply: weights, logits or contrast
/blend SPEC    any --blend value, e.g. progressive=0.7,conservative=0.2@logits
/explain       the last answer's blend, routing decision and gate weights
/compare       the last prompt answered by the base and by each expert
/temp T        sampling temperature (0 = greedy)
/seed N        sampling seed
/reset         forget the conversation (keeps the blend)
/save FILE     write the transcript as JSON Lines (resume with /load FILE or `chat --load FILE`)
/load FILE     continue a saved conversation (replaces this one), on its last blend
/help          this list
/quit          leave (or Ctrl-D); Ctrl-C stops an answer
//text         send a prompt that starts with '/'";

/// Understand one line of input. Errors are one line, ready to print.
pub fn parse(line: &str) -> Result<Input, String> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Input::Empty);
    }
    if let Some(rest) = line.strip_prefix("//") {
        return Ok(Input::Prompt(format!("/{rest}")));
    }
    let Some(rest) = line.strip_prefix('/') else {
        return Ok(Input::Prompt(line.to_string()));
    };
    let (name, arg) = match rest.split_once(char::is_whitespace) {
        Some((n, a)) => (n, a.trim()),
        None => (rest, ""),
    };
    let cmd = match name {
        "dial" => {
            let d = number::<f32>(name, one_word(name, arg, "D")?)?;
            Command::Dial(Blend::dial(d).map(|_| d).map_err(|e| e.to_string())?)
        }
        "mix" => {
            let a = number::<f32>(name, one_word(name, arg, "A")?)?;
            Command::Mix(Blend::mix(a).map(|_| a).map_err(|e| e.to_string())?)
        }
        "expert" => Command::Expert(one_word(name, arg, "NAME")?.to_string()),
        "base" => no_arg(name, arg, Command::Base)?,
        "policy" => Command::Policy(one_word(name, arg, "NAME")?.to_string()),
        "mode" => Command::Mode(
            one_word(name, arg, "weights|logits|contrast")?
                .parse()
                .map_err(|e: stancemix::Error| e.to_string())?,
        ),
        "blend" => {
            if arg.is_empty() {
                return Err("usage: /blend SPEC (e.g. /blend dial=0.6@logits)".into());
            }
            Command::Blend(arg.parse().map_err(|e: stancemix::Error| e.to_string())?)
        }
        "explain" => no_arg(name, arg, Command::Explain)?,
        "compare" => no_arg(name, arg, Command::Compare)?,
        "temp" => {
            let t = number::<f64>(name, one_word(name, arg, "T")?)?;
            if !t.is_finite() || t < 0.0 {
                return Err(format!("temperature must be 0 or more, got {t}"));
            }
            Command::Temp(t)
        }
        "seed" => {
            let s = one_word(name, arg, "N")?;
            Command::Seed(
                s.parse()
                    .map_err(|_| format!("seed '{s}' is not a whole number 0 or more"))?,
            )
        }
        "reset" => no_arg(name, arg, Command::Reset)?,
        "save" => {
            if arg.is_empty() {
                return Err("usage: /save FILE".into());
            }
            Command::Save(PathBuf::from(arg))
        }
        "load" => {
            if arg.is_empty() {
                return Err("usage: /load FILE".into());
            }
            Command::Load(PathBuf::from(arg))
        }
        "help" | "?" => no_arg(name, arg, Command::Help)?,
        "quit" | "exit" => no_arg(name, arg, Command::Quit)?,
        _ => {
            return Err(format!(
                "unknown command /{name} (/help lists commands; //text sends a prompt starting with '/')"
            ))
        }
    };
    Ok(Input::Command(cmd))
}

/// The single word `arg` must be, or a usage error naming `what`.
fn one_word<'a>(name: &str, arg: &'a str, what: &str) -> Result<&'a str, String> {
    if arg.is_empty() || arg.contains(char::is_whitespace) {
        return Err(format!("usage: /{name} {what}"));
    }
    Ok(arg)
}

fn no_arg(name: &str, arg: &str, cmd: Command) -> Result<Command, String> {
    if arg.is_empty() {
        Ok(cmd)
    } else {
        Err(format!("/{name} takes no value (got '{arg}')"))
    }
}

fn number<T: std::str::FromStr>(name: &str, s: &str) -> Result<T, String> {
    s.parse()
        .map_err(|_| format!("/{name}: '{s}' is not a number"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(line: &str) -> Command {
        match parse(line) {
            Ok(Input::Command(c)) => c,
            other => panic!("{line:?} parsed as {other:?}"),
        }
    }

    fn err(line: &str) -> String {
        match parse(line) {
            Err(e) => e,
            Ok(x) => panic!("{line:?} should fail, parsed as {x:?}"),
        }
    }

    #[test]
    fn plain_text_is_a_prompt_and_blank_is_empty() {
        assert_eq!(
            parse("  Should taxes rise? "),
            Ok(Input::Prompt("Should taxes rise?".into()))
        );
        assert_eq!(parse("   "), Ok(Input::Empty));
        assert_eq!(parse(""), Ok(Input::Empty));
    }

    #[test]
    fn double_slash_sends_a_prompt_starting_with_slash() {
        assert_eq!(
            parse("//usr is a folder?"),
            Ok(Input::Prompt("/usr is a folder?".into()))
        );
    }

    #[test]
    fn every_command_parses() {
        assert_eq!(cmd("/dial 0.6"), Command::Dial(0.6));
        assert_eq!(cmd("/dial -1"), Command::Dial(-1.0));
        assert_eq!(cmd("/mix 0.25"), Command::Mix(0.25));
        assert_eq!(
            cmd("/expert progressive"),
            Command::Expert("progressive".into())
        );
        assert_eq!(cmd("/base"), Command::Base);
        assert_eq!(
            cmd("/policy libertarian"),
            Command::Policy("libertarian".into())
        );
        assert_eq!(cmd("/mode logits"), Command::Mode(Mode::Logits));
        assert_eq!(cmd("/mode contrast"), Command::Mode(Mode::Contrast));
        assert_eq!(
            cmd("/blend mix=0.3@logits"),
            Command::Blend(Blend::mix(0.3).unwrap().with_mode(Mode::Logits))
        );
        assert_eq!(cmd("/explain"), Command::Explain);
        assert_eq!(cmd("/compare"), Command::Compare);
        assert_eq!(cmd("/temp 0.7"), Command::Temp(0.7));
        assert_eq!(cmd("/temp 0"), Command::Temp(0.0));
        assert_eq!(cmd("/seed 7"), Command::Seed(7));
        assert_eq!(cmd("/reset"), Command::Reset);
        assert_eq!(
            cmd("/save my chats/today.jsonl"),
            Command::Save(PathBuf::from("my chats/today.jsonl"))
        );
        assert_eq!(
            cmd("/load my chats/today.jsonl"),
            Command::Load(PathBuf::from("my chats/today.jsonl"))
        );
        assert_eq!(cmd("/help"), Command::Help);
        assert_eq!(cmd("/quit"), Command::Quit);
        assert_eq!(cmd("/exit"), Command::Quit);
    }

    #[test]
    fn extra_spaces_around_values_are_fine() {
        assert_eq!(cmd("  /dial    +0.5  "), Command::Dial(0.5));
    }

    #[test]
    fn out_of_range_values_are_one_line_errors() {
        for (line, want) in [
            ("/dial 1.5", "outside [-1, 1]"),
            ("/dial NaN", "outside [-1, 1]"),
            ("/mix -0.1", "outside [0, 1]"),
            ("/temp -1", "0 or more"),
            ("/temp inf", "0 or more"),
            ("/seed -3", "whole number"),
            ("/mode fast", "unknown blend mode"),
            ("/blend dial=3", "outside [-1, 1]"),
        ] {
            let e = err(line);
            assert!(e.contains(want), "{line}: {e}");
            assert!(!e.contains('\n'), "{line}: error spans lines: {e}");
        }
    }

    #[test]
    fn missing_or_extra_values_print_usage() {
        assert_eq!(err("/dial"), "usage: /dial D");
        assert_eq!(err("/dial 0.1 0.2"), "usage: /dial D");
        assert_eq!(err("/dial abc"), "/dial: 'abc' is not a number");
        assert_eq!(err("/policy"), "usage: /policy NAME");
        assert_eq!(err("/expert"), "usage: /expert NAME");
        assert_eq!(err("/save"), "usage: /save FILE");
        assert_eq!(err("/load"), "usage: /load FILE");
        assert!(err("/blend").starts_with("usage: /blend SPEC"));
        assert_eq!(err("/quit now"), "/quit takes no value (got 'now')");
    }

    #[test]
    fn unknown_command_names_itself() {
        let e = err("/frobnicate 3");
        assert!(e.starts_with("unknown command /frobnicate"), "{e}");
    }

    #[test]
    fn help_lists_every_command() {
        for c in [
            "/dial", "/mix", "/expert", "/base", "/policy", "/mode", "/blend", "/explain",
            "/compare", "/temp", "/seed", "/reset", "/save", "/load", "/help", "/quit",
        ] {
            assert!(HELP.contains(c), "{c} missing from /help");
        }
    }
}
