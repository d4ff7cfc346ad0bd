//! One error type for the library. The binary adds context with `anyhow`.

use std::path::PathBuf;

/// Everything the library can fail with. Each variant names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file could not be used: the message says why.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// A data file (JSON Lines, TOML, JSON, a state cache) was malformed: `line` is where
    /// (from 1; 0 when the problem is not on one line, such as a record of a JSON document or a
    /// setting left at its default), `field` what.
    #[error("{path}{}: {field}: {msg}", at_line(*.line))]
    Data {
        path: PathBuf,
        line: usize,
        field: String,
        msg: String,
    },

    /// An adapter directory or one of its tensors was unusable.
    #[error("{path}: {tensor}: {msg}")]
    Adapter {
        path: PathBuf,
        tensor: String,
        msg: String,
    },

    /// A setting or argument of a library call is out of range or missing (a training or
    /// evaluation option, a sweep path, a layer the model does not have): `name` is the
    /// setting, `msg` what is wrong with it.
    #[error("{name}: {msg}")]
    Setting { name: String, msg: String },

    /// A setting names something that does not exist (a weight format, a base model, a
    /// template, a stance, a topic, a target module): `what` kind of thing, `name` the one
    /// asked for, `known` the ones that exist.
    #[error("unknown {what} '{name}' (known: {})", or_none(.known))]
    Unknown {
        what: String,
        name: String,
        known: Vec<String>,
    },

    /// Two things made separately do not fit together: a gate, judge, cache or gate weights
    /// and the model or experts they are used with, or a forward pass's inputs and its cache.
    /// `what` names the one that does not fit, `msg` how.
    #[error("{what}: {msg}")]
    Mismatch { what: String, msg: String },

    /// There is nothing to work on: no examples to train on, an empty prompt, an answer with
    /// no tokens. `what` names the operation, `msg` what it lacked.
    #[error("{what}: {msg}")]
    NoData { what: String, msg: String },

    /// A failure inside the library that its input did not cause (a worker thread that
    /// panicked or could not start, a report that could not be serialized, a solver that
    /// failed to run): the message says which.
    #[error("{0}")]
    Internal(String),

    /// A blend that cannot be read, or not used with the loaded experts (a dial outside
    /// [-1, 1], an unknown mode, a stance no expert has): the message says which.
    #[error("{0}")]
    BadBlend(String),

    /// A blend names an expert that is not loaded.
    #[error("no expert named '{name}' (loaded: {})", .loaded.join(", "))]
    UnknownExpert { name: String, loaded: Vec<String> },

    /// A blend or a route names a policy that is not loaded.
    #[error("no policy named '{name}' (loaded: {})", or_none(.loaded))]
    UnknownPolicy { name: String, loaded: Vec<String> },

    /// Feeding would take the cache past the model's context.
    #[error("context full: {needed} tokens exceed the model's context of {context}")]
    ContextFull { needed: usize, context: usize },

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// Tokenizer construction or encoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Fetching the default base model failed.
    #[error("fetch: {0}")]
    Fetch(String),

    /// The operation was interrupted (Ctrl-C); what was saved is kept.
    #[error("interrupted")]
    Interrupted,

    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Library result type.
pub type Result<T> = std::result::Result<T, Error>;

/// `:line`, or nothing for line 0 (no one line).
fn at_line(line: usize) -> String {
    if line == 0 {
        String::new()
    } else {
        format!(":{line}")
    }
}

/// `names` joined by commas, or `none`.
fn or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl Error {
    /// Whether the caller's input is at fault (a bad setting, blend or name, nothing to work
    /// on, or a full context) rather than the files, the machine or the library: the server
    /// answers these with 400, the rest with 500.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Error::Setting { .. }
                | Error::Unknown { .. }
                | Error::NoData { .. }
                | Error::BadBlend(_)
                | Error::UnknownExpert { .. }
                | Error::UnknownPolicy { .. }
                | Error::ContextFull { .. }
        )
    }

    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    /// A model-file error on `path`.
    pub fn model(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Model {
            path: path.into(),
            msg: msg.into(),
        }
    }

    /// A data-file error at `path:line` in `field`.
    pub fn data(
        path: impl Into<PathBuf>,
        line: usize,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Data {
            path: path.into(),
            line,
            field: field.into(),
            msg: msg.into(),
        }
    }

    /// A bad setting `name`: `msg` says what is wrong with it.
    pub fn setting(name: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Setting {
            name: name.into(),
            msg: msg.into(),
        }
    }

    /// `name` is not a `what` that exists; `known` lists those that do.
    pub fn unknown<S: ToString>(
        what: impl Into<String>,
        name: impl Into<String>,
        known: impl IntoIterator<Item = S>,
    ) -> Self {
        Error::Unknown {
            what: what.into(),
            name: name.into(),
            known: known.into_iter().map(|k| k.to_string()).collect(),
        }
    }

    /// `what` does not fit what it is used with: `msg` says how.
    pub fn mismatch(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Mismatch {
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// `what` has nothing to work on: `msg` says what it lacked.
    pub fn no_data(what: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::NoData {
            what: what.into(),
            msg: msg.into(),
        }
    }

    /// An adapter error on `path`, naming the tensor (or file) at fault.
    pub fn adapter(
        path: impl Into<PathBuf>,
        tensor: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Adapter {
            path: path.into(),
            tensor: tensor.into(),
            msg: msg.into(),
        }
    }
}

/// Write `bytes` to `path` atomically: a temporary file beside it, then a rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path.file_name().ok_or_else(|| {
        Error::setting("path", format!("'{}' is not a file path", path.display()))
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::io(path, e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_errors_name_the_line_only_when_there_is_one() {
        let at = Error::data("t.toml", 3, "rank", "must be at least 1");
        assert_eq!(at.to_string(), "t.toml:3: rank: must be at least 1");
        let whole = Error::data("bad.json", 0, "q1: text", "empty");
        assert_eq!(whole.to_string(), "bad.json: q1: text: empty");
    }

    #[test]
    fn settings_names_and_missing_input_are_client_errors_mismatches_and_internal_failures_not() {
        let client = [
            Error::setting("lr", "2 is not in (0, 1)"),
            Error::unknown("stance", "centrist", ["progressive", "conservative"]),
            Error::no_data("routing", "the prompt is empty"),
            Error::BadBlend("dial 2 is outside [-1, 1]".into()),
            Error::ContextFull {
                needed: 9,
                context: 8,
            },
        ];
        for e in &client {
            assert!(e.is_client_error(), "{e:?}");
        }
        let server = [
            Error::mismatch("gate", "it reads layer 30 but the model has 24 layers"),
            Error::Internal("a scoring worker panicked".into()),
            Error::model("m.gguf", "no tensor 'output.weight'"),
        ];
        for e in &server {
            assert!(!e.is_client_error(), "{e:?}");
        }
        assert_eq!(
            client[1].to_string(),
            "unknown stance 'centrist' (known: progressive, conservative)"
        );
    }
}
