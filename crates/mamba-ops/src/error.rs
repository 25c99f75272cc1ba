//! The error type of the op layer.

/// A wrong shape or an unsupported argument passed to an op.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{op}: {msg}")]
    Shape { op: &'static str, msg: String },
    #[error("{op}: no backward pass (a decoding step is not differentiable)")]
    NoBackward { op: &'static str },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OpError>;
