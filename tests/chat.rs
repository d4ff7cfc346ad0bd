//! `stancemix chat` end to end on the real base model with random experts: a pseudo-terminal
//! session, piped runs, and save / load.

mod common;

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use expectrl::{ControlCode, Eof, Expect, Session};

/// The real model and two random experts in a temporary folder (also home of the history file).
struct Fixture {
    dir: tempfile::TempDir,
    model: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let model = common::real_model_path();
        for (stance, seed) in [("progressive", "1"), ("conservative", "2")] {
            let out = Command::new(common::bin())
                .args(["adapter", "init", "--random", "--stance", stance])
                .args(["--rank", "8", "--seed", seed, "--model"])
                .arg(&model)
                .arg("--out")
                .arg(dir.path().join(stance))
                .output()
                .unwrap();
            assert!(out.status.success(), "adapter init: {}", text(&out.stderr));
        }
        Fixture { dir, model }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `stancemix chat` on the model and both experts, 8 tokens an answer (unless `extra` says),
    /// history in the fixture folder; `extra` flags appended.
    fn chat(&self, extra: &[&str]) -> Command {
        let mut c = Command::new(common::bin());
        c.arg("chat")
            .arg("--model")
            .arg(&self.model)
            .arg("--adapters")
            .arg(self.path("progressive"))
            .arg(self.path("conservative"))
            .args(
                ["--max-tokens", "8"]
                    .iter()
                    .filter(|_| !extra.contains(&"--max-tokens")),
            )
            .args(extra)
            .env("STANCEMIX_HISTORY", self.path("history"))
            // A terminal rustyline edits on, whatever the test runner's TERM is.
            .env("TERM", "xterm");
        c
    }

    /// Run `cmd` with `input` piped to stdin.
    fn piped(&self, mut cmd: Command, input: &str) -> Output {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        child.wait_with_output().unwrap()
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn lines(out: &Output) -> Vec<String> {
    text(&out.stdout).lines().map(str::to_string).collect()
}

/// Start `cmd` on a pseudo-terminal with a generous timeout (a shared 2-core machine).
fn pty(cmd: Command) -> expectrl::session::OsSession {
    let mut s = Session::spawn(cmd).unwrap();
    s.set_expect_timeout(Some(Duration::from_secs(240)));
    s
}

/// Wait for `needle` on the screen, failing with what was there.
fn see(s: &mut expectrl::session::OsSession, needle: &str) {
    if let Err(e) = s.expect(needle) {
        panic!("waiting for {needle:?}: {e}");
    }
}

#[test]
fn pty_session_asks_steers_explains_compares_and_quits() {
    let fx = Fixture::new();
    let mut s = pty(fx.chat(&[]));

    see(&mut s, "deliberately biased");
    see(&mut s, "history: ");
    see(&mut s, "[base | weights] > ");

    // Ctrl-C at the prompt stops nothing and keeps the REPL.
    s.send(ControlCode::EndOfText).unwrap();
    see(&mut s, "nothing to stop");
    see(&mut s, "[base | weights] > ");

    s.send_line("What is a tax?").unwrap();
    see(&mut s, "  -- [base | weights] ");
    see(&mut s, "[base | weights] > ");

    s.send_line("/dial 0.6").unwrap();
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("What is a tax?").unwrap();
    see(&mut s, "  -- [dial +0.60 | weights] ");
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("/explain").unwrap();
    see(
        &mut s,
        "last answer: [dial +0.60 | weights] gate progressive=0.60",
    );
    see(&mut s, "route: none");
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("/compare").unwrap();
    see(&mut s, "compare: What is a tax?");
    see(&mut s, "--- base:");
    see(&mut s, "  -- [base | weights] ");
    see(&mut s, "--- progressive:");
    see(&mut s, "  -- [raw progressive=1.00 | weights] ");
    see(&mut s, "--- conservative:");
    see(&mut s, "  -- [raw conservative=1.00 | weights] ");
    // The comparison leaves the blend as it was.
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("/frobnicate").unwrap();
    see(&mut s, "error: unknown command /frobnicate");
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("/dial 3").unwrap();
    see(&mut s, "error: dial 3 is outside [-1, 1]");
    see(&mut s, "[dial +0.60 | weights] > ");

    s.send_line("/quit").unwrap();
    s.expect(Eof).unwrap();
    let status = s.get_process().wait().unwrap();
    assert_eq!(
        status,
        expectrl::process::unix::WaitStatus::Exited(s.get_process().pid(), 0),
        "exit status"
    );

    let history = std::fs::read_to_string(fx.path("history")).unwrap();
    assert!(history.contains("/dial 0.6"), "history file: {history}");
}

#[test]
fn pty_ctrl_c_stops_the_answer_and_keeps_the_repl() {
    let fx = Fixture::new();
    let mut s = pty(fx.chat(&["--max-tokens", "4000"]));
    see(&mut s, "[base | weights] > ");
    s.send_line("Tell me a very long story about a dragon and a village.")
        .unwrap();
    // Wait until the answer is streaming, then interrupt it.
    if let Err(e) = s.expect(expectrl::Regex("village\\.[^\n]*\n[^\r\n]*[A-Za-z]{3}")) {
        panic!("waiting for the answer to start: {e}");
    }
    s.send(ControlCode::EndOfText).unwrap();
    see(&mut s, "stopped by Ctrl-C");
    see(&mut s, "[base | weights] > ");
    s.send_line("/quit").unwrap();
    s.expect(Eof).unwrap();
}

#[test]
fn piped_run_prints_one_answer_per_input_line() {
    let fx = Fixture::new();
    let out = fx.piped(
        fx.chat(&["--dial", "0.5"]),
        "What is a tax?\nShould cities build more public housing?\n",
    );
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    let got = lines(&out);
    assert_eq!(got.len(), 2, "stdout: {got:?}");
    for l in &got {
        assert!(l.starts_with("[dial +0.50 | weights] "), "{l}");
        assert!(
            l.len() > "[dial +0.50 | weights] ".len(),
            "empty answer: {l}"
        );
    }
}

#[test]
fn piped_bad_command_is_reported_with_its_line_and_the_run_goes_on() {
    let fx = Fixture::new();
    let out = fx.piped(
        fx.chat(&[]),
        "What is a tax?\n/dial 9\n/frobnicate\n/mix 0.25\nWhat is a tax?\n",
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("error: line 2: dial 9 is outside [-1, 1]"),
        "{err}"
    );
    assert!(
        err.contains("error: line 3: unknown command /frobnicate"),
        "{err}"
    );
    assert!(err.contains("blend mix 0.25 | weights"), "{err}");
    let got = lines(&out);
    assert_eq!(got.len(), 2, "stdout: {got:?}");
    assert!(got[0].starts_with("[base | weights] "), "{}", got[0]);
    assert!(got[1].starts_with("[mix 0.25 | weights] "), "{}", got[1]);
    // A script learns that something failed.
    assert!(!out.status.success());
}

#[test]
fn no_adapters_chats_on_the_base_and_dial_says_why_not() {
    let fx = Fixture::new();
    let mut cmd = Command::new(common::bin());
    cmd.arg("chat")
        .arg("--model")
        .arg(&fx.model)
        .args(["--no-adapters", "--max-tokens", "4"])
        .env("STANCEMIX_HISTORY", "");
    let out = fx.piped(cmd, "/dial 0.5\n/compare\nHello\n");
    let err = text(&out.stderr);
    assert!(err.contains("error: line 1: no experts loaded"), "{err}");
    assert!(
        err.contains("error: line 2: nothing to compare yet"),
        "{err}"
    );
    let got = lines(&out);
    assert_eq!(got.len(), 1, "stdout: {got:?}");
    assert!(got[0].starts_with("[base | weights] "), "{}", got[0]);
}

#[test]
fn save_then_load_resumes_the_conversation_and_its_blend() {
    let fx = Fixture::new();
    let saved = fx.path("chat.jsonl");
    let first = "My name is Zorblax.";
    let second = "What is my name?";
    // The uninterrupted run feeds the second turn onto its cache, the resumed one feeds the whole
    // history at once. f32 weights give the same logits either way; the default `mixed` format
    // switches to them only for passes of 32 tokens or more, so the two could differ.
    let f32w = ["--format", "f32"];

    // One uninterrupted conversation, for reference.
    let whole = fx.piped(
        fx.chat(&["--dial", "0.5", f32w[0], f32w[1]]),
        &format!("{first}\n{second}\n"),
    );
    assert!(whole.status.success(), "{}", text(&whole.stderr));
    let whole = lines(&whole);

    // The same, saved after the first turn and resumed in a new process without blend flags.
    let a = fx.piped(
        fx.chat(&["--dial", "0.5", f32w[0], f32w[1]]),
        &format!("{first}\n/save {}\n", saved.display()),
    );
    assert!(a.status.success(), "{}", text(&a.stderr));
    let lines_saved = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(
        lines_saved.lines().count(),
        2,
        "header + 1 turn: {lines_saved}"
    );

    let again = fx.path("again.jsonl");
    let mut resume = fx.chat(&f32w);
    resume.arg("--load").arg(&saved);
    let b = fx.piped(resume, &format!("{second}\n/save {}\n", again.display()));
    assert!(b.status.success(), "{}", text(&b.stderr));
    let resumed = lines(&b);
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert!(
        resumed[0].starts_with("[dial +0.50 | weights] "),
        "blend resumed: {}",
        resumed[0]
    );
    assert_eq!(
        resumed[0], whole[1],
        "the resumed answer matches the uninterrupted one"
    );

    // `/load` inside a running chat does the same: what was said so far, on another blend, is
    // replaced by the saved conversation and its blend.
    let c = fx.piped(
        fx.chat(&["--dial", "-0.3", f32w[0], f32w[1]]),
        &format!(
            "Tell me about rivers.\n/load {}\n{second}\n",
            saved.display()
        ),
    );
    assert!(c.status.success(), "{}", text(&c.stderr));
    assert!(
        text(&c.stderr).contains("resumed 1 turns from"),
        "{}",
        text(&c.stderr)
    );
    let c = lines(&c);
    assert_eq!(c.len(), 2, "{c:?}");
    assert!(c[0].starts_with("[dial -0.30 | weights] "), "{}", c[0]);
    assert_eq!(c[1], whole[1], "/load, then the uninterrupted run's answer");
    // A file that is not there: an error naming it, and the run goes on.
    let missing = fx.path("missing.jsonl");
    let d = fx.piped(
        fx.chat(&[]),
        &format!("/load {}\n/help\n", missing.display()),
    );
    let err = text(&d.stderr);
    assert!(
        err.contains(&format!("error: line 1: {}", missing.display())),
        "{err}"
    );

    // Without the first turn the model cannot know the name: the context really came back.
    let fresh = fx.piped(fx.chat(&["--dial", "0.5"]), &format!("{second}\n"));
    let fresh = lines(&fresh);
    assert!(resumed[0].contains("Zorblax"), "{}", resumed[0]);
    assert!(!fresh[0].contains("Zorblax"), "{}", fresh[0]);

    // The new transcript carries the old turn unchanged, then the new one with its blend.
    let t: Vec<serde_json::Value> = std::fs::read_to_string(&again)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(t.len(), 3);
    assert_eq!(t[0]["type"], "header");
    let old: serde_json::Value = serde_json::from_str(lines_saved.lines().nth(1).unwrap()).unwrap();
    assert_eq!(t[1], old);
    assert_eq!(t[2]["user"], second);
    assert_eq!(t[2]["blend"], "dial +0.50 | weights");
    assert_eq!(t[2]["blend_spec"], "dial=0.5@weights");
    assert_eq!(t[2]["weights"]["progressive"], 0.5);
    assert!(t[2]["route"].is_null());
}

#[test]
fn load_of_a_bad_transcript_names_the_file_and_line() {
    let fx = Fixture::new();
    let bad = fx.path("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"type\":\"header\",\"format\":\"stancemix-chat\",\"version\":1,\"system\":null}\n{\"type\":\"turn\",\"user\":\"hi\"}\n",
    )
    .unwrap();
    let mut cmd = fx.chat(&[]);
    cmd.arg("--load").arg(&bad);
    let out = fx.piped(cmd, "");
    assert!(!out.status.success());
    let err = text(&out.stderr);
    let want = format!("{}:2: ", bad.display());
    assert!(
        err.contains(&want) && err.contains("missing field"),
        "{err}"
    );
}
