//! Mamba model families (Mamba-1, FalconMamba, Mamba-2): configs, checkpoint loading,
//! the recurrent state cache, sampling and generation.

pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod init;
pub mod layers;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod sampling;
pub mod state;
pub mod tokenizer;

pub use error::{Error, Result};
pub use model::Model;
pub use state::State;
