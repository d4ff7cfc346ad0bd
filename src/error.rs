//! One error type for the library. The binary adds context with `anyhow`.

use std::path::PathBuf;

/// Everything the library can fail with. Each variant names what was wrong and where.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A model file could not be used: the message says why.
    #[error("{path}: {msg}")]
    Model { path: PathBuf, msg: String },

    /// A line of a data file (JSON Lines, TOML, JSON) was malformed.
    #[error("{path}:{line}: {field}: {msg}")]
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

    /// A library call got an argument it cannot use.
    #[error("{0}")]
    Invalid(String),

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

/// `names` joined by commas, or `none`.
fn or_none(names: &[String]) -> String {
    if names.is_empty() {
        "none".into()
    } else {
        names.join(", ")
    }
}

impl Error {
    /// Whether the caller's input is at fault (a bad argument, blend, name, or a full context)
    /// rather than the files or the machine: the server answers these with 400.
    pub fn is_client_error(&self) -> bool {
        matches!(
            self,
            Error::Invalid(_)
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
    let name = path
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{}: not a file path", path.display())))?;
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
