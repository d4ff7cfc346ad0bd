//! `stancemix serve`: OpenAI's HTTP API over one shared [`Engine`], the blend a request parameter.
//!
//! Endpoints: `POST /v1/chat/completions` and `POST /v1/completions` (both also as server-sent
//! events with `"stream": true`), `GET /v1/models`, `POST /v1/route` (the gate's decision, as
//! `stancemix route --json` prints it), `GET /health`, `GET /metrics` (Prometheus text).
//!
//! The blend rides in the model name (`stancemix:dial=0.6`, the CLI's `--blend` grammar) or in
//! the extension field `"stancemix": {"blend": "mix=0.3"}`, which wins. Every answer says which
//! blend made it, with the disclosure that the experts are deliberately biased: in the field
//! `stancemix` of the response (of the first chunk when streamed) and in `X-Stancemix-*` headers.
//!
//! **Stack: axum on tokio (hyper underneath).** axum is the most used Rust HTTP framework built
//! by the tokio project itself: plain async functions as handlers, tower middleware (auth and
//! request counting here), server-sent events built in, and no macros or code generation; hyper
//! under it is the HTTP/1.1 implementation most of the Rust ecosystem runs on. The model work is
//! CPU-bound and blocking, so it runs on tokio's blocking threads and talks to the async side
//! over a channel: the HTTP side stays responsive (health, metrics, 429s) while slots decode.
//!
//! **Concurrency: `--parallel N` requests decode at once, their steps batched.** Each admitted
//! request gets its own session (KV cache) over the shared `Arc<Engine>` and runs its prompt and
//! its sampling on its own thread; every decode step goes through one batching thread
//! (`batch.rs`) that runs the steps of all decoding requests as one forward pass: the linears
//! (where a step's time goes) over all their rows at once, each row with its own blend, then
//! attention per request over its own cache at its own position. An answer is token for token
//! what the request gets alone. Past the slots, up to `--queue N` requests wait; past that,
//! `429` with `Retry-After`. A client that goes away stops its generation at the next token and
//! frees its slot.

pub mod batch;
pub mod decode;
pub mod error;
pub mod metrics;
pub mod request;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use subtle::ConstantTimeEq;
use tokio::sync::{mpsc, Semaphore};

use crate::model::Message;
use crate::router::Route;
use crate::runtime::PromptCache;
use crate::{Blend, Engine, GenParams};
use decode::{Event, Finish, Job};
use error::ApiError;
use metrics::{Gauges, Metrics};

/// Said with every answer: the experts lean on purpose.
pub const DISCLOSURE: &str = "stancemix's experts are deliberately biased (one progressive, one \
conservative), built for research and comparison; an answer leans as its blend says and is not \
neutral.";

/// The endpoints, as counted in `/metrics` (anything else is counted as `other`).
pub const ENDPOINTS: [&str; 7] = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/models",
    "/v1/route",
    "/health",
    "/metrics",
    "/",
];

/// How the server admits and limits requests.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Requests decoded at once.
    pub parallel: usize,
    /// Requests that may wait for a slot; more get 429.
    pub queue: usize,
    /// When set, every endpoint but `/health` needs `Authorization: Bearer KEY`.
    pub api_key: Option<String>,
    /// Largest request body read, in bytes (413 past it).
    pub max_body: usize,
    /// Bytes of whole prompts kept with their KV caches ([`PromptCache`]; 0: none).
    pub prompt_cache: usize,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            parallel: 2,
            queue: 16,
            api_key: None,
            max_body: 4 << 20,
            prompt_cache: 256 << 20,
        }
    }
}

/// The server's shared state.
pub struct AppState {
    engine: Arc<Engine>,
    opts: ServeOptions,
    /// SHA-256 of the API key (compared in constant time with the offered key's).
    key_hash: Option<[u8; 32]>,
    slots: Arc<Semaphore>,
    /// Requests admitted: waiting or decoding.
    admitted: AtomicUsize,
    /// Requests decoding.
    active: AtomicUsize,
    metrics: Metrics,
    next_id: AtomicU64,
    /// Runs the decode steps of all decoding requests as one forward pass.
    batcher: batch::Batcher,
    /// Prompts seen before, with their KV caches.
    prompts: PromptCache,
}

/// The axum application for `engine` (an error only where its batching thread cannot start).
pub fn app(engine: Arc<Engine>, opts: ServeOptions) -> crate::Result<Router> {
    let opts = ServeOptions {
        parallel: opts.parallel.max(1),
        ..opts
    };
    let state = Arc::new(AppState {
        key_hash: opts.api_key.as_ref().map(|k| hash(k.as_bytes())),
        slots: Arc::new(Semaphore::new(opts.parallel)),
        prompts: PromptCache::new(opts.prompt_cache),
        engine,
        opts,
        admitted: AtomicUsize::new(0),
        active: AtomicUsize::new(0),
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
        batcher: batch::Batcher::start()?,
    });
    Ok(Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/v1/route", post(route))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(index))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn_with_state(state.clone(), count))
        .with_state(state))
}

/// Serve `app` on `listener` until Ctrl-C (or SIGTERM), finishing the requests in flight.
pub async fn serve(listener: tokio::net::TcpListener, app: Router) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn hash(b: &[u8]) -> [u8; 32] {
    Sha256::digest(b).into()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `--api-key`: every endpoint but `/health` needs the key; digests compared in constant time.
async fn auth(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(want) = &st.key_hash else {
        return next.run(req).await;
    };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    let offered = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|k| hash(k.trim().as_bytes()));
    match offered {
        Some(h) if bool::from(h.ct_eq(want)) => next.run(req).await,
        _ => ApiError::unauthorized().into_response(),
    }
}

/// Count every answer by endpoint and status.
async fn count(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    let endpoint = ENDPOINTS
        .iter()
        .find(|e| **e == path)
        .copied()
        .unwrap_or("other");
    let r = next.run(req).await;
    st.metrics.request(endpoint, r.status().as_u16());
    r
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid(None, format!("Unknown request URL: {method} {uri}"))
        .code("unknown_url")
        .status(StatusCode::NOT_FOUND)
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::invalid(None, format!("{method} is not allowed on {}", uri.path()))
        .code("method_not_allowed")
        .status(StatusCode::METHOD_NOT_ALLOWED)
}

/// Read a body of at most `limit` bytes. A larger one is read on (up to a hard cap, and
/// discarded) so that the client, still sending, reads the 413 instead of a reset connection.
async fn read_body(body: Body, limit: usize) -> Result<Vec<u8>, ApiError> {
    const DRAIN_CAP: usize = 64 << 20;
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::invalid(None, format!("could not read the request body: {e}"))
                .code("invalid_body")
        })?;
        total += chunk.len();
        if total <= limit {
            buf.extend_from_slice(&chunk);
        } else if total > DRAIN_CAP {
            break;
        }
    }
    if total > limit {
        return Err(ApiError::invalid(
            None,
            format!("The request body is larger than this server's limit of {limit} bytes"),
        )
        .code("request_too_large")
        .status(StatusCode::PAYLOAD_TOO_LARGE));
    }
    Ok(buf)
}

/// A place among the admitted requests; released when dropped.
struct Ticket(Arc<AppState>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.admitted.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A decoding slot in use; released when dropped.
struct Active(Arc<AppState>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppState {
    /// Admit a request if a slot or queue place is free; 429 otherwise.
    fn admit(self: &Arc<Self>) -> Result<Ticket, ApiError> {
        let cap = self.opts.parallel + self.opts.queue;
        let mut cur = self.admitted.load(Ordering::SeqCst);
        loop {
            if cur >= cap {
                self.metrics.rejected();
                return Err(ApiError::busy(1));
            }
            match self
                .admitted
                .compare_exchange(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Ok(Ticket(self.clone())),
                Err(c) => cur = c,
            }
        }
    }

    fn gauges(&self) -> Gauges {
        let admitted = self.admitted.load(Ordering::SeqCst);
        let active = self.active.load(Ordering::SeqCst);
        let (decode_batches, batched_steps) = self.batcher.stats();
        Gauges {
            queued: admitted.saturating_sub(active),
            active,
            parallel: self.opts.parallel,
            queue_capacity: self.opts.queue,
            prompt_cache: self.prompts.stats(),
            decode_batches,
            batched_steps,
        }
    }

    /// Run `work` on a blocking thread once admitted and given a slot; the ticket and slot are
    /// held until `work` returns.
    async fn run_blocking<T: Send + 'static>(
        self: &Arc<Self>,
        work: impl FnOnce(&Arc<Engine>) -> T + Send + 'static,
    ) -> Result<tokio::task::JoinHandle<T>, ApiError> {
        let ticket = self.admit()?;
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| ApiError::internal(format!("slots closed: {e}")))?;
        self.active.fetch_add(1, Ordering::SeqCst);
        let active = Active(self.clone());
        let engine = self.engine.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let _held = (ticket, permit, active);
            work(&engine)
        }))
    }
}

/// A generation under way, its first event (`Started`) received.
struct Running {
    rx: mpsc::Receiver<Event>,
    weights: BTreeMap<String, f32>,
    route: Option<Route>,
    prompt_tokens: usize,
}

/// Which endpoint's response shapes to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Text,
}

/// A checked completion request.
struct Prepared {
    kind: Kind,
    model: String,
    blend: Blend,
    settings: request::Settings,
    job: Job,
}

async fn chat(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let arrived = Instant::now();
    match prepare(&st, body, Kind::Chat).await {
        Ok(p) => answer(st, p, arrived).await,
        Err(e) => e.into_response(),
    }
}

async fn completions(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let arrived = Instant::now();
    match prepare(&st, body, Kind::Text).await {
        Ok(p) => answer(st, p, arrived).await,
        Err(e) => e.into_response(),
    }
}

/// Read and check a completion request, tokenize its prompt, and fit it to the context.
async fn prepare(st: &Arc<AppState>, body: Body, kind: Kind) -> Result<Prepared, ApiError> {
    let bytes = read_body(body, st.opts.max_body).await?;
    let b = request::parse_body(&bytes)?;
    let model = request::model(&b)?;
    let settings = request::settings(&b)?;
    let (text, route_text, param) = match kind {
        Kind::Chat => {
            let msgs: Vec<Message> = request::messages(&b)?;
            let last = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
            // The model's own chat template, as chat and generate render it.
            let text = st
                .engine
                .model
                .tokenizer
                .chat
                .render(&msgs, true)
                .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
            (text, last, "messages")
        }
        Kind::Text => {
            let p = request::prompt(&b)?;
            (p.clone(), p, "prompt")
        }
    };
    let blend = request::blend(&st.engine, &model, settings.blend.as_deref())?;
    let engine = st.engine.clone();
    let prompt = tokio::task::spawn_blocking(move || engine.model.tokenizer.encode(&text))
        .await
        .map_err(|e| ApiError::internal(format!("tokenizer task failed: {e}")))?
        .map_err(|e| ApiError::invalid(Some(param), e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid(Some(param), "the prompt is empty").code("invalid_value"));
    }
    let ctx = st.engine.model.config.context_len;
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            Some(param),
            format!(
                "This model's maximum context length is {ctx} tokens; your prompt has {} tokens",
                prompt.len()
            ),
        )
        .code("context_length_exceeded"));
    }
    let room = ctx - prompt.len();
    let max_tokens = match settings.max_tokens {
        Some(n) if n > room => {
            return Err(ApiError::invalid(
                Some("max_tokens"),
                format!(
                    "This model's maximum context length is {ctx} tokens: {} prompt tokens plus \
                     max_tokens {n} exceed it (at most {room} here)",
                    prompt.len()
                ),
            )
            .code("context_length_exceeded"))
        }
        Some(n) => n,
        None => request::DEFAULT_MAX_TOKENS.min(room),
    };
    let params = GenParams {
        max_tokens,
        temperature: settings.temperature,
        top_k: settings.top_k,
        top_p: settings.top_p,
        repeat_penalty: settings.repeat_penalty,
        repeat_last_n: GenParams::default().repeat_last_n,
        seed: settings.seed.unwrap_or_else(rand::random),
    };
    Ok(Prepared {
        kind,
        model,
        job: Job {
            prompt,
            route_text,
            blend: blend.clone(),
            params,
            stop: settings.stop.clone(),
        },
        blend,
        settings,
    })
}

/// Queue the job, wait for its prefill, and answer: one JSON body or a stream of events.
async fn answer(st: Arc<AppState>, p: Prepared, arrived: Instant) -> Response {
    let run = match start(&st, p.job.clone()).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    st.metrics.first_token(arrived.elapsed().as_secs_f64());
    let id = format!(
        "{}-{:x}{:04x}",
        match p.kind {
            Kind::Chat => "chatcmpl",
            Kind::Text => "cmpl",
        },
        now(),
        st.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let ext = extension(&p.blend, &run.weights, run.route.as_ref());
    let headers = blend_headers(&p.blend, run.route.as_ref());
    let shape = Shape {
        kind: p.kind,
        id,
        created: now(),
        model: p.model.clone(),
    };
    if p.settings.stream {
        let stream = sse_stream(st, shape, run, ext, p.settings.include_usage);
        return (headers, Sse::new(stream)).into_response();
    }
    let Running {
        mut rx,
        prompt_tokens,
        ..
    } = run;
    let mut text = String::new();
    loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done(done)) => {
                st.metrics.generation(prompt_tokens, &done);
                let usage = usage(prompt_tokens, done.completion_tokens);
                let mut body = shape.full(&text, done.finish, usage);
                body["stancemix"] = ext;
                return (headers, Json(body)).into_response();
            }
            Some(Event::Failed { message, .. }) => {
                return ApiError::internal(format!("generation failed: {message}")).into_response()
            }
            Some(Event::Started { .. }) | None => {
                return ApiError::internal("generation ended without finishing").into_response()
            }
        }
    }
}

/// Admit the job, run it on a slot, and wait for its first event.
async fn start(st: &Arc<AppState>, job: Job) -> Result<Running, ApiError> {
    let (tx, mut rx) = mpsc::channel(64);
    let state = st.clone();
    st.run_blocking(move |engine| {
        if decode::run(engine, &state.batcher, &state.prompts, job, &tx)
            == decode::Outcome::Cancelled
        {
            state.metrics.cancelled();
        }
    })
    .await?;
    match rx.recv().await {
        Some(Event::Started {
            weights,
            route,
            prompt_tokens,
        }) => Ok(Running {
            rx,
            weights,
            route,
            prompt_tokens,
        }),
        Some(Event::Failed { message, invalid }) => Err(if invalid {
            ApiError::invalid(None, message)
        } else {
            ApiError::internal(format!("generation failed: {message}"))
        }),
        _ => Err(ApiError::internal("generation ended before it started")),
    }
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

/// The extension field: resolved blend, gate weights, routing decision, disclosure.
fn extension(blend: &Blend, weights: &BTreeMap<String, f32>, route: Option<&Route>) -> Value {
    json!({
        "blend": blend.to_string(),
        "weights": weights,
        "topic": route.map(|r| r.topic.clone()),
        "policy": route.map(|r| r.policy.clone()),
        "route": route.map(Route::to_json),
        "disclosure": DISCLOSURE,
    })
}

/// `X-Stancemix-Blend`, `X-Stancemix-Route` (when routed) and `X-Stancemix-Disclosure`.
fn blend_headers(blend: &Blend, route: Option<&Route>) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put("x-stancemix-blend", blend.to_string());
    if let Some(r) = route {
        put(
            "x-stancemix-route",
            format!("topic={}; policy={}", r.topic, r.policy),
        );
    }
    put("x-stancemix-disclosure", DISCLOSURE.to_string());
    h
}

/// The fixed parts of one answer's responses.
struct Shape {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
}

impl Shape {
    /// A whole (non-streamed) response.
    fn full(&self, text: &str, finish: Finish, usage: Value) -> Value {
        match self.kind {
            Kind::Chat => json!({
                "id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": null,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": null, "finish_reason": finish.as_str()}],
                "usage": usage,
            }),
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": null,
                "choices": [{"index": 0, "text": text, "logprobs": null,
                             "finish_reason": finish.as_str()}],
                "usage": usage,
            }),
        }
    }

    /// One streamed chunk: `delta` text (with the role on the first chat chunk), or the end.
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<Finish>) -> Value {
        let finish = finish.map(Finish::as_str);
        match self.kind {
            Kind::Chat => {
                let delta = match (text, first) {
                    (Some(t), true) => json!({"role": "assistant", "content": t}),
                    (Some(t), false) => json!({"content": t}),
                    (None, _) => json!({}),
                };
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                    "model": self.model, "system_fingerprint": null,
                    "choices": [{"index": 0, "delta": delta, "logprobs": null,
                                 "finish_reason": finish}],
                })
            }
            Kind::Text => json!({
                "id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": null,
                "choices": [{"index": 0, "text": text.unwrap_or(""), "logprobs": null,
                             "finish_reason": finish}],
            }),
        }
    }

    /// The closing chunk with usage and no choices (`stream_options.include_usage`).
    fn usage_chunk(&self, usage: Value) -> Value {
        let mut c = self.chunk(None, false, None);
        c["choices"] = json!([]);
        c["usage"] = usage;
        c
    }
}

/// Where a stream is.
enum Phase {
    First,
    Body,
    Usage(Value),
    Done,
    Over,
}

/// The server-sent events of a streamed answer: a first chunk carrying the role and the
/// `stancemix` field, one chunk per piece of text, the finish, optionally usage, `[DONE]`.
/// Dropping the stream (the client went away) drops the receiver, which stops the generation.
fn sse_stream(
    st: Arc<AppState>,
    shape: Shape,
    run: Running,
    ext: Value,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Result<SseEvent, Infallible>> {
    let data = |v: Value| Ok(SseEvent::default().data(v.to_string()));
    let state = (st, shape, run, ext, Phase::First);
    futures_util::stream::unfold(state, move |(st, shape, mut run, ext, phase)| async move {
        match phase {
            Phase::First => {
                let mut c = shape.chunk(Some(""), true, None);
                c["stancemix"] = ext.clone();
                Some((data(c), (st, shape, run, ext, Phase::Body)))
            }
            Phase::Body => match run.rx.recv().await {
                Some(Event::Text(t)) => {
                    let c = shape.chunk(Some(&t), false, None);
                    Some((data(c), (st, shape, run, ext, Phase::Body)))
                }
                Some(Event::Done(done)) => {
                    st.metrics.generation(run.prompt_tokens, &done);
                    let c = shape.chunk(None, false, Some(done.finish));
                    let next = if include_usage {
                        Phase::Usage(usage(run.prompt_tokens, done.completion_tokens))
                    } else {
                        Phase::Done
                    };
                    Some((data(c), (st, shape, run, ext, next)))
                }
                Some(Event::Failed { message, .. }) => {
                    let e = ApiError::internal(format!("generation failed: {message}")).body();
                    Some((data(e), (st, shape, run, ext, Phase::Over)))
                }
                Some(Event::Started { .. }) | None => {
                    let e = ApiError::internal("generation ended without finishing").body();
                    Some((data(e), (st, shape, run, ext, Phase::Over)))
                }
            },
            Phase::Usage(u) => {
                let c = shape.usage_chunk(u);
                Some((data(c), (st, shape, run, ext, Phase::Done)))
            }
            Phase::Done => Some((
                Ok(SseEvent::default().data("[DONE]")),
                (st, shape, run, ext, Phase::Over),
            )),
            Phase::Over => None,
        }
    })
}

async fn models(State(st): State<Arc<AppState>>) -> Json<Value> {
    let e = &st.engine;
    let created = now();
    let entry = |id: String, kind: &str, blend: String, description: String| {
        json!({"id": id, "object": "model", "created": created, "owned_by": "stancemix",
               "stancemix": {"kind": kind, "blend": blend, "description": description}})
    };
    let mut data = vec![entry(
        request::MODEL.into(),
        "base",
        Blend::base().to_string(),
        format!(
            "the base model ({}), experts off; 'stancemix:BLEND' takes any blend of the CLI's \
             --blend grammar",
            e.model
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        ),
    )];
    for a in e.experts.adapters() {
        let name = a.name();
        data.push(entry(
            format!("stancemix:expert={name}"),
            "expert",
            Blend::expert(&name).to_string(),
            a.config.description.clone().unwrap_or_default(),
        ));
    }
    let probe = |spec: &str| -> Option<Blend> {
        let b: Blend = spec.parse().ok()?;
        e.session().set_blend(b.clone()).ok()?;
        Some(b)
    };
    for spec in ["dial=-1", "dial=-0.5", "dial=0.5", "dial=1", "mix=0.5"] {
        if let Some(b) = probe(spec) {
            data.push(entry(
                format!("stancemix:{spec}"),
                "blend",
                b.to_string(),
                "a fixed blend of the experts".into(),
            ));
        }
    }
    for p in &e.policies {
        if let Some(b) = probe(&format!("auto={}", p.name)) {
            data.push(entry(
                format!("stancemix:auto={}", p.name),
                "routed",
                b.to_string(),
                p.description.clone(),
            ));
        }
    }
    Json(json!({"object": "list", "data": data}))
}

/// `POST /v1/route` `{"input": TEXT, "policy": NAME}` (policy default `libertarian`): the gate's
/// decision, as `stancemix route --json` prints it.
async fn route(State(st): State<Arc<AppState>>, body: Body) -> Response {
    let r = async {
        let bytes = read_body(body, st.opts.max_body).await?;
        let b = request::parse_body(&bytes)?;
        let text = ["input", "text", "prompt"]
            .iter()
            .find_map(|k| b.get(*k).and_then(Value::as_str))
            .ok_or_else(|| {
                ApiError::invalid(Some("input"), "you must provide 'input', the text to route")
                    .code("missing_required_parameter")
            })?
            .to_string();
        let policy = match b.get("policy") {
            None | Some(Value::Null) => "libertarian".to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => {
                return Err(
                    ApiError::invalid(Some("policy"), "'policy' must be a string")
                        .code("invalid_type"),
                )
            }
        };
        if st.engine.gate.is_none() {
            return Err(ApiError::invalid(
                None,
                "no gate is loaded: start the server with a trained gate (--gate DIR)",
            )
            .code("no_gate"));
        }
        st.engine
            .policy(&policy)
            .map_err(|e| ApiError::invalid(Some("policy"), e.to_string()).code("invalid_value"))?;
        let job = st
            .run_blocking(move |engine| engine.route(&text, &policy))
            .await?;
        let routed = job
            .await
            .map_err(|e| ApiError::internal(format!("routing task failed: {e}")))?
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok::<Value, ApiError>(routed.to_json())
    }
    .await;
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn health(State(st): State<Arc<AppState>>) -> Json<Value> {
    let g = st.gauges();
    Json(json!({
        "status": "ok",
        "experts": st.engine.expert_names(),
        "gate": st.engine.gate.is_some(),
        "active": g.active,
        "queued": g.queued,
    }))
}

async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st.metrics.render(st.gauges());
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

async fn index() -> Json<Value> {
    Json(json!({
        "name": "stancemix",
        "endpoints": ENDPOINTS,
        "disclosure": DISCLOSURE,
    }))
}
