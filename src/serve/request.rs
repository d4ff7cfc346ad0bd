//! Reading OpenAI request bodies: each field checked by hand, so that an error names the field
//! at fault (`param`) and says what was expected.

use serde_json::{Map, Value};

use super::error::ApiError;
use crate::model::Message;
use crate::{Blend, Engine};

/// The JSON object of a request body.
pub type Body = Map<String, Value>;

/// What the model name `stancemix` (no blend) means: the base model, experts off.
pub const MODEL: &str = "stancemix";

/// The default for `max_tokens`, as `stancemix generate`'s (capped by the context left).
pub const DEFAULT_MAX_TOKENS: usize = 200;

/// Parse a body: UTF-8, JSON, an object.
pub fn parse_body(bytes: &[u8]) -> Result<Body, ApiError> {
    let text = std::str::from_utf8(bytes).map_err(|e| {
        ApiError::invalid(
            None,
            format!("The request body is not valid UTF-8 ({e}); send JSON text"),
        )
        .code("invalid_encoding")
    })?;
    if text.trim().is_empty() {
        return Err(
            ApiError::invalid(None, "The request body is empty; send a JSON object")
                .code("invalid_json"),
        );
    }
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(
            ApiError::invalid(None, "The request body must be a JSON object").code("invalid_json"),
        ),
        Err(e) => Err(ApiError::invalid(
            None,
            format!("We could not parse the JSON body of your request ({e})"),
        )
        .code("invalid_json")),
    }
}

fn wrong(param: &str, expected: &str, got: &Value) -> ApiError {
    let got = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::invalid(
        Some(param),
        format!("'{param}' must be {expected}, got {got}"),
    )
    .code("invalid_type")
}

/// A field that is absent or `null` is `None`.
fn field<'a>(body: &'a Body, name: &str) -> Option<&'a Value> {
    body.get(name).filter(|v| !v.is_null())
}

fn opt_f64(body: &Body, name: &str) -> Result<Option<f64>, ApiError> {
    field(body, name)
        .map(|v| v.as_f64().ok_or_else(|| wrong(name, "a number", v)))
        .transpose()
}

fn opt_int(body: &Body, name: &str) -> Result<Option<i64>, ApiError> {
    field(body, name)
        .map(|v| {
            v.as_i64()
                .or_else(|| v.as_u64().map(|u| u as i64))
                .ok_or_else(|| wrong(name, "an integer", v))
        })
        .transpose()
}

fn opt_bool(body: &Body, name: &str) -> Result<Option<bool>, ApiError> {
    field(body, name)
        .map(|v| v.as_bool().ok_or_else(|| wrong(name, "a boolean", v)))
        .transpose()
}

/// The `model` field (required).
pub fn model(body: &Body) -> Result<String, ApiError> {
    match field(body, "model") {
        None => Err(ApiError::invalid(
            Some("model"),
            "you must provide a model parameter ('stancemix' or 'stancemix:BLEND')",
        )
        .code("missing_required_parameter")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(wrong("model", "a string", v)),
    }
}

/// Sampling, stopping and streaming settings shared by both completion endpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    /// `None`: the default, [`DEFAULT_MAX_TOKENS`] capped by the context left.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    /// `None`: a fresh random seed.
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub repeat_penalty: f32,
    /// The extension field `stancemix.blend`, which wins over the model name.
    pub blend: Option<String>,
}

/// Read and check the settings of a completion request.
pub fn settings(body: &Body) -> Result<Settings, ApiError> {
    let ext = match field(body, "stancemix") {
        None => None,
        Some(Value::Object(m)) => Some(m),
        Some(v) => {
            return Err(wrong(
                "stancemix",
                "an object like {\"blend\": \"dial=0.5\"}",
                v,
            ))
        }
    };
    let max_tokens = match (
        opt_int(body, "max_completion_tokens")?,
        opt_int(body, "max_tokens")?,
    ) {
        (Some(n), _) => Some(("max_completion_tokens", n)),
        (None, Some(n)) => Some(("max_tokens", n)),
        (None, None) => None,
    };
    let max_tokens = match max_tokens {
        Some((name, n)) if n < 1 => {
            return Err(ApiError::invalid(
                Some(name),
                format!("'{name}' must be at least 1, got {n}"),
            )
            .code("invalid_value"))
        }
        Some((_, n)) => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        None => None,
    };
    let temperature = opt_f64(body, "temperature")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::invalid(
            Some("temperature"),
            format!("'temperature' must be between 0 and 2, got {temperature}"),
        )
        .code("invalid_value"));
    }
    let top_p = match opt_f64(body, "top_p")? {
        Some(p) if !(p > 0.0 && p <= 1.0) => {
            return Err(ApiError::invalid(
                Some("top_p"),
                format!("'top_p' must be in (0, 1], got {p}"),
            )
            .code("invalid_value"))
        }
        Some(p) if p >= 1.0 => None,
        p => p,
    };
    let top_k = match opt_int(body, "top_k")? {
        Some(k) if k < 1 => {
            return Err(ApiError::invalid(
                Some("top_k"),
                format!("'top_k' must be at least 1, got {k}"),
            )
            .code("invalid_value"))
        }
        k => k.map(|k| k as usize),
    };
    let seed = opt_int(body, "seed")?.map(|s| s as u64);
    if let Some(n) = opt_int(body, "n")? {
        if n != 1 {
            return Err(ApiError::invalid(
                Some("n"),
                format!("this server generates one choice per request: 'n' must be 1, got {n}"),
            )
            .code("unsupported_value"));
        }
    }
    for name in ["presence_penalty", "frequency_penalty"] {
        if let Some(x) = opt_f64(body, name)? {
            if x != 0.0 {
                return Err(ApiError::invalid(
                    Some(name),
                    format!("'{name}' is not supported (only 0); use 'repetition_penalty' (default 1.1)"),
                )
                .code("unsupported_parameter"));
            }
        }
    }
    if opt_bool(body, "logprobs")? == Some(true) {
        return Err(
            ApiError::invalid(Some("logprobs"), "'logprobs' is not supported")
                .code("unsupported_parameter"),
        );
    }
    if let Some(v) = field(body, "tools") {
        if v.as_array().is_none_or(|a| !a.is_empty()) {
            return Err(ApiError::invalid(
                Some("tools"),
                "tool calling is not supported by this server",
            )
            .code("unsupported_parameter"));
        }
    }
    let stop = match field(body, "stop") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| wrong("stop", "a string or an array of strings", v))
            })
            .collect::<Result<_, _>>()?,
        Some(v) => return Err(wrong("stop", "a string or an array of strings", v)),
    };
    if stop.len() > 4 || stop.iter().any(String::is_empty) {
        return Err(
            ApiError::invalid(Some("stop"), "'stop' takes up to 4 non-empty sequences")
                .code("invalid_value"),
        );
    }
    let stream = opt_bool(body, "stream")?.unwrap_or(false);
    let include_usage = match field(body, "stream_options") {
        None => false,
        Some(Value::Object(o)) => o
            .get("include_usage")
            .map(|v| {
                v.as_bool()
                    .ok_or_else(|| wrong("stream_options.include_usage", "a boolean", v))
            })
            .transpose()?
            .unwrap_or(false),
        Some(v) => return Err(wrong("stream_options", "an object", v)),
    };
    let ext_penalty = match ext {
        Some(m) => opt_f64(m, "repeat_penalty")?,
        None => None,
    };
    let repeat_penalty = match ext_penalty.or(opt_f64(body, "repetition_penalty")?) {
        Some(p) if !(p > 0.0 && p.is_finite()) => {
            return Err(ApiError::invalid(
                Some("repetition_penalty"),
                format!("'repetition_penalty' must be a positive number, got {p}"),
            )
            .code("invalid_value"))
        }
        Some(p) => p as f32,
        None => crate::GenParams::default().repeat_penalty,
    };
    let blend = match ext.and_then(|m| field(m, "blend")) {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => return Err(wrong("stancemix.blend", "a string such as \"dial=0.5\"", v)),
    };
    Ok(Settings {
        max_tokens,
        temperature,
        top_p,
        top_k,
        seed,
        stop,
        stream,
        include_usage,
        repeat_penalty,
        blend,
    })
}

/// The text of a message's `content`: a string, or an array of `{"type": "text", "text"}` parts.
fn content_text(v: &Value, param: &str) -> Result<String, ApiError> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut s = String::new();
            for p in parts {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => s.push_str(t),
                    _ => {
                        return Err(ApiError::invalid(
                            Some(param),
                            format!("'{param}': only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"),
                        )
                        .code("unsupported_value"))
                    }
                }
            }
            Ok(s)
        }
        v => Err(wrong(param, "a string or an array of text parts", v)),
    }
}

/// The `messages` of a chat request: roles system, user, assistant (`developer` read as
/// system), the last one from the user.
pub fn messages(body: &Body) -> Result<Vec<Message>, ApiError> {
    let list = match field(body, "messages") {
        None => {
            return Err(
                ApiError::invalid(Some("messages"), "you must provide a 'messages' array")
                    .code("missing_required_parameter"),
            )
        }
        Some(Value::Array(a)) => a,
        Some(v) => return Err(wrong("messages", "an array of messages", v)),
    };
    if list.is_empty() {
        return Err(
            ApiError::invalid(Some("messages"), "'messages' must not be empty")
                .code("invalid_value"),
        );
    }
    let mut out = Vec::with_capacity(list.len());
    for (i, m) in list.iter().enumerate() {
        let p = format!("messages[{i}]");
        let role = match m.get("role") {
            Some(Value::String(r)) => r.as_str(),
            Some(v) => return Err(wrong(&format!("{p}.role"), "a string", v)),
            None => {
                return Err(ApiError::invalid(
                    Some(&format!("{p}.role")),
                    format!("{p} has no 'role'"),
                )
                .code("missing_required_parameter"))
            }
        };
        let role = match role {
            "system" | "developer" => "system",
            "user" => "user",
            "assistant" => "assistant",
            r => {
                return Err(ApiError::invalid(
                    Some(&format!("{p}.role")),
                    format!("{p}: role '{r}' is not supported (system, user or assistant)"),
                )
                .code("invalid_value"))
            }
        };
        let content = match m.get("content") {
            Some(v) if !v.is_null() => content_text(v, &format!("{p}.content"))?,
            _ => {
                return Err(ApiError::invalid(
                    Some(&format!("{p}.content")),
                    format!("{p} has no 'content'"),
                )
                .code("missing_required_parameter"))
            }
        };
        out.push(Message {
            role: role.into(),
            content,
        });
    }
    if out.last().is_some_and(|m| m.role != "user") {
        return Err(ApiError::invalid(
            Some("messages"),
            "the last message must be the user's: the model answers it",
        )
        .code("invalid_value"));
    }
    Ok(out)
}

/// The `prompt` of a completion request: a string, or an array holding one string.
pub fn prompt(body: &Body) -> Result<String, ApiError> {
    match field(body, "prompt") {
        None => Err(
            ApiError::invalid(Some("prompt"), "you must provide a 'prompt'")
                .code("missing_required_parameter"),
        ),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            Ok(a[0].as_str().unwrap_or_default().to_string())
        }
        Some(v) => Err(wrong("prompt", "a string (or an array of one string)", v)),
    }
}

/// The blend a request asks for: the extension field `stancemix.blend` if given, else the model
/// name's part after `stancemix:`; checked against the engine (experts, gate, policy) with the
/// same rules as a session's `set_blend`.
pub fn blend(
    engine: &std::sync::Arc<Engine>,
    model: &str,
    field: Option<&str>,
) -> Result<Blend, ApiError> {
    let from_name = if model == MODEL {
        None
    } else if let Some(spec) = model.strip_prefix("stancemix:") {
        Some(spec)
    } else {
        return Err(ApiError::model_not_found(model));
    };
    let (spec, param) = match (field, from_name) {
        (Some(f), _) => (f, "stancemix.blend"),
        (None, Some(n)) => (n, "model"),
        (None, None) => return Ok(Blend::base()),
    };
    let bad = |e: crate::Error| {
        ApiError::invalid(Some(param), format!("blend '{spec}': {e}")).code("invalid_blend")
    };
    let b: Blend = spec.parse().map_err(bad)?;
    engine.session().set_blend(b.clone()).map_err(bad)?;
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(s: &str) -> Body {
        parse_body(s.as_bytes()).unwrap()
    }

    #[test]
    fn settings_defaults_follow_openai_and_the_cli() {
        let s = settings(&body("{}")).unwrap();
        assert_eq!(s.temperature, 1.0);
        assert_eq!(s.max_tokens, None);
        assert_eq!(s.repeat_penalty, crate::GenParams::default().repeat_penalty);
        assert!(!s.stream && s.stop.is_empty() && s.blend.is_none());
    }

    #[test]
    fn settings_name_the_field_at_fault() {
        for (b, param) in [
            (r#"{"max_tokens": 0}"#, "max_tokens"),
            (r#"{"temperature": "hot"}"#, "temperature"),
            (r#"{"temperature": 3}"#, "temperature"),
            (r#"{"top_p": 0}"#, "top_p"),
            (r#"{"n": 2}"#, "n"),
            (r#"{"stop": [1]}"#, "stop"),
            (r#"{"stop": ["a","b","c","d","e"]}"#, "stop"),
            (r#"{"stancemix": {"blend": 3}}"#, "stancemix.blend"),
            (r#"{"presence_penalty": 0.5}"#, "presence_penalty"),
        ] {
            let e = settings(&body(b)).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{b}: {}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_rejected() {
        assert_eq!(
            parse_body(b"\xff\xfe{}").unwrap_err().code,
            Some("invalid_encoding")
        );
        assert_eq!(
            parse_body(b"{\"a\":").unwrap_err().code,
            Some("invalid_json")
        );
        assert_eq!(parse_body(b"[1]").unwrap_err().code, Some("invalid_json"));
        assert_eq!(parse_body(b"  ").unwrap_err().code, Some("invalid_json"));
    }

    #[test]
    fn messages_must_end_with_the_user() {
        let m = messages(&body(
            r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":[{"type":"text","text":"Hi"}]}]}"#,
        ))
        .unwrap();
        assert_eq!(m[1].content, "Hi");
        let e = messages(&body(
            r#"{"messages":[{"role":"assistant","content":"x"}]}"#,
        ))
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = messages(&body(r#"{"messages":[{"role":"tool","content":"x"}]}"#)).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
        let e = messages(&body(r#"{"model":"stancemix"}"#)).unwrap_err();
        assert_eq!(e.code, Some("missing_required_parameter"));
    }
}
