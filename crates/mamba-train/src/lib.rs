//! Training Mamba models on CPU: byte or tokenizer data, AdamW with a warmup + cosine
//! schedule, gradient clipping and accumulation, atomic checkpoints that resume exactly,
//! and a loss-curve plot (with the line charts other commands draw).

pub mod checkpoint;
pub mod data;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod train;

/// What can go wrong while training.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("data: {0}")]
    Data(String),
    #[error("training: {0}")]
    Train(String),
    #[error("plotting failed: {0}")]
    Plot(String),
    #[error(transparent)]
    Model(#[from] mamba_models::Error),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches the path to an I/O error.
pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}
