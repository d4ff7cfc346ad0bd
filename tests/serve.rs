//! `stancemix serve` over real HTTP: the server runs as a child process on an ephemeral port and
//! is driven by a small HTTP/1.1 client (and, when installed, the official `openai` package).

mod common;

use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use stancemix::lora::{export_blend, Adapter, ExpertSet};
use stancemix::model::Target;
use stancemix::Blend;

const PROMPT: &str = "Should the government raise the minimum wage?";
const MAX_TOKENS: usize = 24;

/// A `stancemix serve` child process; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let mut child = Command::new(bin())
            .args(["serve", "--port", "0", "--model"])
            .arg(real_model_path())
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting stancemix serve");
        let stderr = child.stderr.take().expect("stderr piped");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on http://").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or_default();
                    if let Some(port) = addr.rsplit(':').next().and_then(|p| p.parse().ok()) {
                        let _ = tx.send(port);
                    }
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let port: u16 = match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(p) => p,
            Err(_) => panic!("the server did not start:\n{}", log.lock().unwrap()),
        };
        Server { child, port, log }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn post(&self, path: &str, body: &Value) -> Resp {
        request(self.port, "POST", path, &[], body.to_string().as_bytes())
    }

    fn get(&self, path: &str) -> Resp {
        request(self.port, "GET", path, &[], b"")
    }

    /// The server still answers, and has not panicked.
    fn assert_alive(&self) {
        assert_eq!(self.get("/health").status, 200, "{}", self.log());
        assert!(!self.log().contains("panicked"), "{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response, its body de-chunked.
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `data:` payloads of a server-sent event stream.
    fn sse(&self) -> Vec<String> {
        self.text()
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .map(|e| {
                e.lines()
                    .filter_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .collect()
    }
}

fn write_request(
    s: &mut TcpStream,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) {
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
    {
        head.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .expect("writing the request head");
    // A server may answer before it has read all of a body it refuses.
    let _ = s.write_all(body);
}

/// One request on a fresh connection.
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
    write_request(&mut s, method, path, headers, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    parse(&raw)
}

fn parse(raw: &[u8]) -> Resp {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&b[..eol])
                .split(';')
                .next()
                .unwrap_or("0")
                .trim(),
            16,
        )
        .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}

/// `stancemix generate`'s answer (greedy) at `dial`.
fn generate(prompt: &str, dial: &str, max_tokens: usize) -> String {
    generate_blend(prompt, &format!("dial={dial}"), max_tokens)
}

fn generate_blend(prompt: &str, blend: &str, max_tokens: usize) -> String {
    let out = Command::new(bin())
        .args(["generate", "--prompt", prompt])
        .arg(format!("--blend={blend}"))
        .args(["--temperature", "0", "--seed", "7", "--max-tokens"])
        .arg(max_tokens.to_string())
        .arg("--model")
        .arg(real_model_path())
        .output()
        .expect("running stancemix generate");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).expect("UTF-8 answer");
    text.strip_suffix('\n').unwrap_or(&text).to_string()
}

fn chat_body(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "seed": 7,
        "stream": stream,
    })
}

/// The text of a streamed chat answer, its first chunk, and its finish reason; checks the stream
/// ends with `[DONE]` and every other event is a JSON chunk.
fn streamed(r: &Resp) -> (String, Value, String) {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let events = r.sse();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or_else(|_| panic!("not JSON: {e}")))
        .collect();
    let mut text = String::new();
    let mut finish = String::new();
    for c in &chunks {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            text.push_str(t);
        }
        if let Some(f) = c["choices"][0]["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    (text, chunks[0].clone(), finish)
}

#[test]
fn answers_equal_generate_for_the_same_blend_and_seed_as_json_sse_and_via_the_openai_client() {
    let server = Server::start(&[]);
    for (dial, shown) in [("1", "dial +1.00"), ("-1", "dial -1.00")] {
        let want = generate(PROMPT, dial, MAX_TOKENS);
        assert!(!want.is_empty());
        // Blend by model name, one JSON body.
        let r = server.post(
            "/v1/chat/completions",
            &chat_body(&format!("stancemix:dial={dial}"), false),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        let v = r.json();
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(
            v["choices"][0]["message"]["content"],
            want.as_str(),
            "dial {dial}"
        );
        assert_eq!(v["choices"][0]["message"]["role"], "assistant");
        let ext = &v["stancemix"];
        assert!(ext["blend"].as_str().unwrap().starts_with(shown), "{ext}");
        assert!(ext["disclosure"]
            .as_str()
            .unwrap()
            .contains("deliberately biased"));
        assert!(r.header("x-stancemix-blend").unwrap().starts_with(shown));
        let u = &v["usage"];
        let completion = u["completion_tokens"].as_u64().unwrap();
        assert!(completion >= 1 && completion <= MAX_TOKENS as u64, "{u}");
        assert_eq!(
            u["total_tokens"].as_u64(),
            Some(u["prompt_tokens"].as_u64().unwrap() + completion)
        );
        let finish = v["choices"][0]["finish_reason"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(finish == "length", completion == MAX_TOKENS as u64, "{v}");
        // Blend by extension field (wins over the plain name), streamed.
        let mut body = chat_body("stancemix", true);
        body["stancemix"] = json!({"blend": format!("dial={dial}")});
        body["stream_options"] = json!({"include_usage": true});
        let r = server.post("/v1/chat/completions", &body);
        let (text, first, sfinish) = streamed(&r);
        assert_eq!(text, want, "streamed, dial {dial}");
        assert_eq!(sfinish, finish);
        assert!(first["stancemix"]["blend"]
            .as_str()
            .unwrap()
            .starts_with(shown));
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(r.header("x-stancemix-blend").unwrap().starts_with(shown));
        let usage_chunk: Value = serde_json::from_str(&r.sse()[r.sse().len() - 2]).unwrap();
        assert_eq!(
            usage_chunk["usage"]["completion_tokens"].as_u64(),
            Some(completion)
        );
        // The plain completion endpoint on the chat template's text gives the same tokens.
        let chatml = {
            let path = stancemix::model::fetch::ensure_default_model(&common::paths()).unwrap();
            let mut f = std::fs::File::open(&path).unwrap();
            let content = candle_core::quantized::gguf_file::Content::read(&mut f).unwrap();
            let tok = stancemix::model::Tokenizer::from_gguf(&content, &path).unwrap();
            tok.chat.user_prompt(PROMPT).unwrap()
        };
        let r = server.post(
            "/v1/completions",
            &json!({"model": format!("stancemix:dial={dial}"), "prompt": chatml,
                    "max_tokens": MAX_TOKENS, "temperature": 0}),
        );
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.json()["choices"][0]["text"], want.as_str());
        assert_eq!(r.json()["object"], "text_completion");
    }

    // Sampled (temperature, top_p, seed): the same draw as `generate` with the same seed.
    let out = Command::new(bin())
        .args([
            "generate",
            "--prompt",
            PROMPT,
            "--dial=0.5",
            "--temperature",
            "0.8",
        ])
        .args(["--top-p", "0.9", "--seed", "11", "--max-tokens"])
        .arg(MAX_TOKENS.to_string())
        .arg("--model")
        .arg(real_model_path())
        .output()
        .unwrap();
    let want = String::from_utf8(out.stdout).unwrap();
    let mut body = chat_body("stancemix:dial=0.5", false);
    body["temperature"] = json!(0.8);
    body["top_p"] = json!(0.9);
    body["seed"] = json!(11);
    let v = server.post("/v1/chat/completions", &body).json();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        want.strip_suffix('\n').unwrap_or(&want),
        "sampled at seed 11"
    );

    // A stop sequence cuts the answer before it.
    let full = generate(PROMPT, "1", MAX_TOKENS);
    if let Some(word) = full.split_whitespace().nth(3) {
        let mut body = chat_body("stancemix:dial=1", false);
        body["stop"] = json!([word]);
        let v = server.post("/v1/chat/completions", &body).json();
        let got = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert_eq!(got, &full[..full.find(word).unwrap()]);
        assert_eq!(v["choices"][0]["finish_reason"], "stop");
    }

    // The prompts asked again above (JSON, then streamed, then with a stop sequence) started
    // from the prompt cache, and their answers still equal `generate`'s.
    let metrics = server.get("/metrics").text();
    let hits: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("stancemix_prompt_cache_hits_total "))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(hits > 0, "no prompt cache hits:\n{metrics}");

    // Models: the base, each expert, reachable blends.
    let models = server.get("/v1/models").json();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "stancemix",
        "stancemix:expert=progressive",
        "stancemix:expert=conservative",
        "stancemix:dial=1",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }

    // Routing: what `stancemix route --json` prints.
    let r = server.post(
        "/v1/route",
        &json!({"input": "Should taxes on the rich go up?", "policy": "libertarian"}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert!(
        v["topic"].is_string() && v["probabilities"].is_object(),
        "{v}"
    );
    assert_eq!(v["policy"], "libertarian");
    // A routed chat answer names its topic and policy.
    let r = server.post("/v1/chat/completions", &{
        let mut b = chat_body("stancemix:auto=libertarian", false);
        b["max_tokens"] = json!(2);
        b
    });
    assert_eq!(r.status, 200, "{}", r.text());
    let ext = &r.json()["stancemix"];
    assert!(
        ext["topic"].is_string() && ext["policy"] == "libertarian",
        "{ext}"
    );
    assert!(r
        .header("x-stancemix-route")
        .unwrap()
        .contains("policy=libertarian"));

    // Metrics in the Prometheus text format.
    let m = server.get("/metrics");
    assert_eq!(m.status, 200);
    let m = m.text();
    assert!(
        m.contains("stancemix_requests_total{endpoint=\"/v1/chat/completions\",status=\"200\"}"),
        "{m}"
    );
    assert!(m.contains("# TYPE stancemix_generated_tokens_total counter"));
    assert!(m.contains("stancemix_queue_depth 0"));

    openai_client(&server);
    server.assert_alive();
}

/// The official `openai` package against the server; skipped (saying so) when it is missing.
fn openai_client(server: &Server) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/serve_openai.py");
    let probe = python_with_deps().args(["-c", "import openai"]).output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!(
            "SKIPPED the openai client check: python3 with the openai package is not available \
             (scripts/test installs it into target/pydeps)"
        );
        return;
    }
    let out = python_with_deps()
        .arg(&script)
        .arg(format!("http://127.0.0.1:{}/v1", server.port))
        .arg(PROMPT)
        .arg(MAX_TOKENS.to_string())
        .output()
        .expect("running the openai client");
    assert!(
        out.status.success(),
        "{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        server.log()
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("the script prints JSON");
    let ids: Vec<&str> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        ids.contains(&"stancemix:expert=progressive")
            && ids.contains(&"stancemix:expert=conservative")
    );
    for (dial, shown) in [("1", "dial +1.00"), ("-1", "dial -1.00")] {
        let want = generate(PROMPT, dial, MAX_TOKENS);
        assert_eq!(
            v[format!("chat{dial}")],
            want.as_str(),
            "openai chat, dial {dial}"
        );
        assert_eq!(
            v[format!("stream{dial}")],
            want.as_str(),
            "openai stream, dial {dial}"
        );
        for k in ["chat_ext", "stream_ext"] {
            let b = v[format!("{k}{dial}")]["blend"]
                .as_str()
                .unwrap_or_default();
            assert!(b.starts_with(shown), "{k}{dial}: {b}");
        }
    }
    assert_eq!(v["unknown_model"]["status"], 404, "{v}");
}

#[test]
fn concurrent_requests_with_different_blends_decode_together_and_each_equals_generate() {
    let server = Server::start(&["--parallel", "4"]);
    let blends = ["dial=1", "dial=-1", "mix=0.5@logits", "base"];
    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = blends
            .iter()
            .map(|b| {
                let server = &server;
                s.spawn(move || {
                    let mut body = chat_body("stancemix", false);
                    body["stancemix"] = json!({ "blend": b });
                    let r = server.post("/v1/chat/completions", &body);
                    assert_eq!(r.status, 200, "{b}: {}", r.text());
                    r.json()["choices"][0]["message"]["content"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (b, got) in blends.iter().zip(&answers) {
        assert_eq!(got, &generate_blend(PROMPT, b, MAX_TOKENS), "blend {b}");
    }
    // The four decoded at the same time: some passes held more than one request's step.
    let m = server.get("/metrics").text();
    let (passes, steps) = (
        metric(&m, "stancemix_decode_batches_total"),
        metric(&m, "stancemix_batched_steps_total"),
    );
    assert!(
        steps > passes && passes > 0.0,
        "{passes} passes for {steps} steps"
    );
    server.assert_alive();
}

#[test]
fn a_multi_turn_chat_answers_as_a_session_restored_from_the_same_history() {
    let msg = |role: &str, content: &str| stancemix::model::Message {
        role: role.into(),
        content: content.into(),
    };
    let history = vec![
        msg("system", "You answer in one sentence."),
        msg("user", "Name a fruit."),
        msg("assistant", "An apple."),
    ];
    let last = "Should taxes on fuel go up?";
    let want = {
        let engine = stancemix::Engine::load(&stancemix::EngineOptions {
            model: Some(real_model_path()),
            ..stancemix::EngineOptions::shipped(common::paths())
        })
        .unwrap();
        let mut s = engine.session();
        s.restore(history.clone()).unwrap();
        s.set_blend("dial=-1".parse().unwrap()).unwrap();
        let params = stancemix::GenParams {
            max_tokens: MAX_TOKENS,
            temperature: 0.0,
            ..Default::default()
        };
        s.chat(last, &params, |_| true).unwrap().text
    };
    assert!(!want.is_empty());
    let server = Server::start(&[]);
    let mut messages: Vec<Value> = history
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    messages.push(json!({"role": "user", "content": last}));
    let r = server.post(
        "/v1/chat/completions",
        &json!({"model": "stancemix:dial=-1", "messages": messages,
                "max_tokens": MAX_TOKENS, "temperature": 0}),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["choices"][0]["message"]["content"], want.as_str());
}

/// A bad request: what it is, method, path, body, and the status, error code and param expected.
type Case<'a> = (
    &'a str,
    &'a str,
    &'a str,
    Vec<u8>,
    u16,
    Option<&'a str>,
    Option<&'a str>,
);

#[test]
fn bad_requests_get_openai_errors_with_the_right_status_and_the_server_keeps_serving() {
    let server = Server::start(&[]);
    let chat = |extra: Value| {
        let mut b = json!({"model": "stancemix", "max_tokens": 2, "temperature": 0,
                           "messages": [{"role": "user", "content": "Hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        b.to_string().into_bytes()
    };
    let long = "hello ".repeat(10_000);
    let cases: Vec<Case> = vec![
        (
            "malformed JSON",
            "POST",
            "/v1/chat/completions",
            b"{\"model\": \"stancemix\", \"messages\": [".to_vec(),
            400,
            Some("invalid_json"),
            None,
        ),
        (
            "missing messages",
            "POST",
            "/v1/chat/completions",
            br#"{"model": "stancemix"}"#.to_vec(),
            400,
            Some("missing_required_parameter"),
            Some("messages"),
        ),
        (
            "missing model",
            "POST",
            "/v1/chat/completions",
            br#"{"messages": [{"role": "user", "content": "Hi"}]}"#.to_vec(),
            400,
            Some("missing_required_parameter"),
            Some("model"),
        ),
        (
            "unknown model",
            "POST",
            "/v1/chat/completions",
            chat(json!({"model": "gpt-4o"})),
            404,
            Some("model_not_found"),
            Some("model"),
        ),
        (
            "dial off its range",
            "POST",
            "/v1/chat/completions",
            chat(json!({"model": "stancemix:dial=2"})),
            400,
            Some("invalid_blend"),
            Some("model"),
        ),
        (
            "unknown policy",
            "POST",
            "/v1/chat/completions",
            chat(json!({"stancemix": {"blend": "auto=nonsense"}})),
            400,
            Some("invalid_blend"),
            Some("stancemix.blend"),
        ),
        (
            "unknown expert",
            "POST",
            "/v1/chat/completions",
            chat(json!({"model": "stancemix:expert=centrist"})),
            400,
            Some("invalid_blend"),
            Some("model"),
        ),
        (
            "prompt longer than the context",
            "POST",
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": long}]})),
            400,
            Some("context_length_exceeded"),
            Some("messages"),
        ),
        (
            "max_tokens 0",
            "POST",
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})),
            400,
            Some("invalid_value"),
            Some("max_tokens"),
        ),
        (
            "max_tokens huge",
            "POST",
            "/v1/chat/completions",
            chat(json!({"max_tokens": 1_000_000_000u64})),
            400,
            Some("context_length_exceeded"),
            Some("max_tokens"),
        ),
        (
            "temperature of the wrong type",
            "POST",
            "/v1/chat/completions",
            chat(json!({"temperature": "warm"})),
            400,
            Some("invalid_type"),
            Some("temperature"),
        ),
        (
            "n = 2",
            "POST",
            "/v1/chat/completions",
            chat(json!({"n": 2})),
            400,
            Some("unsupported_value"),
            Some("n"),
        ),
        (
            "non-UTF-8 body",
            "POST",
            "/v1/chat/completions",
            b"{\"model\": \"stancemix\xff\xfe\"}".to_vec(),
            400,
            Some("invalid_encoding"),
            None,
        ),
        (
            "10 MB body",
            "POST",
            "/v1/chat/completions",
            vec![b' '; 10 << 20],
            413,
            Some("request_too_large"),
            None,
        ),
        (
            "completion without a prompt",
            "POST",
            "/v1/completions",
            br#"{"model": "stancemix"}"#.to_vec(),
            400,
            Some("missing_required_parameter"),
            Some("prompt"),
        ),
        (
            "unknown path",
            "GET",
            "/v1/nothing",
            Vec::new(),
            404,
            Some("unknown_url"),
            None,
        ),
        (
            "wrong method",
            "GET",
            "/v1/chat/completions",
            Vec::new(),
            405,
            Some("method_not_allowed"),
            None,
        ),
    ];
    for (what, method, path, body, status, code, param) in cases {
        let r = request(server.port, method, path, &[], &body);
        assert_eq!(r.status, status, "{what}: {}", r.text());
        let e = &r.json()["error"];
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {e}"
        );
        assert!(e["type"].is_string(), "{what}: {e}");
        assert!(
            e.get("param").is_some() && e.get("code").is_some(),
            "{what}: {e}"
        );
        assert_eq!(e["code"].as_str(), code, "{what}: {e}");
        assert_eq!(e["param"].as_str(), param, "{what}: {e}");
        server.assert_alive();
    }
    // Still serving.
    let r = request(
        server.port,
        "POST",
        "/v1/chat/completions",
        &[],
        &chat(json!({})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    server.assert_alive();
}

#[test]
fn full_queue_gets_429_a_disconnect_frees_the_slot_or_queue_place_and_the_api_key_is_required() {
    let server = Server::start(&["--parallel", "1", "--queue", "1", "--api-key", "s3cret"]);
    let key = [("Authorization", "Bearer s3cret")];
    // The key: required everywhere but /health, compared exactly.
    let r = request(server.port, "GET", "/v1/models", &[], b"");
    assert_eq!(r.status, 401);
    assert_eq!(r.json()["error"]["code"], "invalid_api_key");
    let r = request(
        server.port,
        "GET",
        "/v1/models",
        &[("Authorization", "Bearer s3cre")],
        b"",
    );
    assert_eq!(r.status, 401);
    let r = request(
        server.port,
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer wrong")],
        b"{}",
    );
    assert_eq!(r.status, 401);
    assert_eq!(
        request(server.port, "GET", "/metrics", &[], b"").status,
        401
    );
    assert_eq!(
        request(server.port, "GET", "/v1/models", &key, b"").status,
        200
    );
    assert_eq!(request(server.port, "GET", "/health", &[], b"").status, 200);

    // A long streamed answer takes the only slot.
    let long = json!({"model": "stancemix", "prompt": "1, 2, 3, 4, 5, 6, 7, 8,", "max_tokens": 4000,
                      "temperature": 0, "stream": true});
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    write_request(
        &mut s,
        "POST",
        "/v1/completions",
        &key,
        long.to_string().as_bytes(),
    );
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("data: ") {
        let n = s.read(&mut buf).expect("reading the stream");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"));

    // A second request waits in the only queue place.
    let short = json!({"model": "stancemix", "prompt": "Hello", "max_tokens": 2, "temperature": 0});
    let mut queued = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    write_request(
        &mut queued,
        "POST",
        "/v1/completions",
        &key,
        short.to_string().as_bytes(),
    );
    let depth = |want: f64| {
        let t0 = Instant::now();
        loop {
            let m = request(server.port, "GET", "/metrics", &key, b"").text();
            let d = metric(&m, "stancemix_queue_depth");
            if d == want || t0.elapsed() > Duration::from_secs(60) {
                return d;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    assert_eq!(depth(1.0), 1.0);

    // No slot, no queue place: 429 with Retry-After.
    let r = request(
        server.port,
        "POST",
        "/v1/completions",
        &key,
        short.to_string().as_bytes(),
    );
    assert_eq!(r.status, 429, "{}", r.text());
    assert!(r
        .header("retry-after")
        .is_some_and(|s| s.parse::<u64>().is_ok()));
    assert_eq!(r.json()["error"]["type"], "rate_limit_error");

    // The queued client goes away: its place is free again.
    drop(queued);
    assert_eq!(depth(0.0), 0.0);

    // The decoding client goes away: its generation stops and the slot is free again.
    drop(s);
    let t0 = Instant::now();
    let r = loop {
        let r = request(
            server.port,
            "POST",
            "/v1/completions",
            &key,
            short.to_string().as_bytes(),
        );
        if r.status != 429 || t0.elapsed() > Duration::from_secs(120) {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(r.status, 200, "{}", r.text());
    let m = request(server.port, "GET", "/metrics", &key, b"").text();
    assert!(m.contains("stancemix_cancelled_total 1"), "{m}");
    // The 429 above, and those of the wait for the slot.
    assert!(metric(&m, "stancemix_rejected_total") >= 1.0, "{m}");
    assert!(
        m.contains("stancemix_requests_total{endpoint=\"/v1/models\",status=\"401\"} 2"),
        "{m}"
    );
    server.assert_alive();
}

/// The value of a metric line `NAME VALUE` in Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no metric {name} in {text}"))
}

/// `sum_i g_i s_i B_i A_i` for one linear, from the experts themselves.
fn blended_delta(experts: &[Adapter], g: &[f32], layer: usize, t: Target) -> Option<Vec<f32>> {
    let mut sum: Option<candle_core::Tensor> = None;
    for (a, &w) in experts.iter().zip(g) {
        if let Some(d) = a.delta(layer, t).unwrap() {
            let d = (d * w as f64).unwrap();
            sum = Some(match sum {
                Some(s) => (s + d).unwrap(),
                None => d,
            });
        }
    }
    sum.map(|s| s.flatten_all().unwrap().to_vec1().unwrap())
}

#[test]
fn exported_blend_adapter_delta_equals_the_blended_delta() {
    let model = tiny_model(3);
    let c = &model.config;
    // Different ranks, scales and targets: the export stacks ranks and fills the gaps with zeros.
    let pro = Adapter::random(
        c,
        "progressive",
        4,
        8.0,
        &[Target::Q, Target::V, Target::Down],
        1,
        0.05,
    )
    .unwrap();
    let con = Adapter::random(
        c,
        "conservative",
        6,
        3.0,
        &[Target::Q, Target::K, Target::Up],
        2,
        0.05,
    )
    .unwrap();
    let experts = ExpertSet::new(vec![pro.clone(), con.clone()]).unwrap();
    for spec in ["dial=0.6", "mix=0.3", "progressive=1.5,conservative=-0.5"] {
        let g = spec.parse::<Blend>().unwrap().gates(&experts).unwrap();
        let out = export_blend(&experts, &g, c, spec).unwrap();
        let dir = tempfile::tempdir().unwrap();
        out.save(dir.path(), c).unwrap();
        let loaded = Adapter::load(dir.path(), c).unwrap();
        let active = g.iter().filter(|&&w| w != 0.0).count();
        let want_rank = [4, 6]
            .iter()
            .zip(&g)
            .filter(|(_, &w)| w != 0.0)
            .map(|(r, _)| r)
            .sum::<usize>();
        assert_eq!(
            loaded.config.r, want_rank,
            "{spec}: {active} experts in the blend"
        );
        for layer in 0..c.n_layer {
            for t in Target::ALL {
                let want = blended_delta(&[pro.clone(), con.clone()], &g, layer, t);
                let got = loaded
                    .delta(layer, t)
                    .unwrap()
                    .map(|d| d.flatten_all().unwrap().to_vec1::<f32>().unwrap());
                match (want, got) {
                    (Some(w), Some(gv)) => {
                        let scale = w.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-6);
                        let diff = max_abs_diff(&w, &gv);
                        assert!(
                            diff <= 1e-5 * scale,
                            "{spec} {layer} {t}: {diff} of {scale}"
                        );
                    }
                    (None, Some(gv)) => assert!(gv.iter().all(|x| *x == 0.0), "{spec} {layer} {t}"),
                    (Some(w), None) => {
                        assert!(w.iter().all(|x| *x == 0.0), "{spec} {layer} {t} missing")
                    }
                    (None, None) => {}
                }
            }
        }
    }
    assert!(export_blend(&experts, &[0.0, 0.0], c, "base").is_err());
}

#[test]
fn exported_blend_of_the_shipped_experts_equals_their_blend_read_independently_with_numpy() {
    let probe = python_with_deps()
        .args(["-c", "import numpy, safetensors"])
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIPPED: python3 with numpy and safetensors is not available (scripts/test installs them)");
        return;
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let (pro, con) = (
        root.join("adapters/progressive"),
        root.join("adapters/conservative"),
    );
    for (spec, g_pro, g_con) in [
        ("dial=0.6", 0.6, 0.0),
        ("mix=0.3", 0.3, 0.7),
        ("dial=-1", 0.0, 1.0),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin())
            .args(["adapter", "export-blend", "--blend", spec, "--model"])
            .arg(real_model_path())
            .arg("--out")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let check = python_with_deps()
            .arg(root.join("tests/check_exported_blend.py"))
            .arg(dir.path())
            .arg(format!("{}:{g_pro}", pro.display()))
            .arg(format!("{}:{g_con}", con.display()))
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{spec}: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // Routed and multi-pass blends are not one LoRA.
    for spec in ["auto=libertarian", "dial=0.5@logits", "base"] {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(bin())
            .args(["adapter", "export-blend", "--blend", spec, "--model"])
            .arg(real_model_path())
            .arg("--out")
            .arg(dir.path().join("x"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{spec} exported");
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
    }
}
