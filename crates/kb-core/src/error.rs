//! The error type shared by every kb-core module.
//!
//! Every variant carries enough context (a file, a field, a tensor name, a line) for a user to
//! find and fix the problem without reading the code.

use std::path::PathBuf;

/// Errors raised by kb-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A `config.json` (or `generation_config.json`) is malformed or asks for something unsupported.
    #[error("{}: field `{field}`: {message}", path.display())]
    Config {
        /// The configuration file.
        path: PathBuf,
        /// The offending field (or `-` when the whole file is unreadable).
        field: String,
        /// What is wrong with it.
        message: String,
    },
    /// Model weights are missing, malformed or of the wrong shape.
    #[error("weights: {0}")]
    Weights(String),
    /// The model could not be located (no such folder, nothing in the hub cache, hub unreachable).
    #[error("model source: {0}")]
    ModelSource(String),
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// Invalid arguments to a kb-core function (e.g. generation settings that contradict each other).
    #[error("{0}")]
    Invalid(String),
    /// A data-parallel training worker stopped because another worker failed; the other
    /// worker's error is the root cause (it says what went wrong).
    #[error("another training worker failed: {0}")]
    PeerFailed(String),
    /// An error from the tensor library.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result alias with kb-core's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// Whether this error only reports another training worker's failure
    /// ([`Error::PeerFailed`]): the root cause is that worker's own error.
    pub fn is_peer_failure(&self) -> bool {
        matches!(self, Error::PeerFailed(_))
    }

    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
