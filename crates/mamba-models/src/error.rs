//! The error type of the models crate.

use std::path::PathBuf;

/// Everything that can go wrong while loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: malformed JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("config: {0}")]
    Config(String),
    #[error("unknown architecture {0:?}: supported are MambaForCausalLM, FalconMambaForCausalLM and Mamba2ForCausalLM")]
    UnknownArchitecture(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Op(#[from] mamba_ops::OpError),
}

pub type Result<T> = std::result::Result<T, Error>;
