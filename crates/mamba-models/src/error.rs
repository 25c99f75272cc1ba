//! The error type of the models crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The message carries the cause; it is not also reported as a `source`, so that
    /// a printed error chain does not repeat it.
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: malformed JSON: {cause}")]
    Json {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("unknown architecture {0:?}: supported are MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM, JambaForCausalLM and MoEMambaForCausalLM, and mamba_ssm's native config.json (hybrids included)")]
    UnknownArchitecture(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(candle_core::Error),
    #[error(transparent)]
    Op(#[from] mamba_ops::OpError),
    /// An error of the caller's, raised from a callback (e.g. writing streamed text).
    #[error(transparent)]
    Caller(Box<dyn std::error::Error + Send + Sync>),
}

impl From<candle_core::Error> for Error {
    /// Keeps candle's message and drops the backtrace it attaches when
    /// `RUST_BACKTRACE` is set, so that errors stay one line.
    fn from(e: candle_core::Error) -> Self {
        let mut e = e;
        while let candle_core::Error::WithBacktrace { inner, .. } = e {
            e = *inner;
        }
        Error::Candle(e)
    }
}

pub type Result<T> = std::result::Result<T, Error>;
