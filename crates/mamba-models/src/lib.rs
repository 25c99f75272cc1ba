//! Mamba model families (Mamba-1, FalconMamba, Mamba-2) and the Jamba hybrid (Mamba and
//! attention layers with mixture-of-experts MLPs): configs, checkpoint loading, the
//! per-layer state (recurrent state or key/value cache), sampling and generation.

pub mod attention;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod generate;
pub mod init;
pub mod jamba;
pub mod layers;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod moe;
pub mod sampling;
pub mod state;
pub mod tokenizer;

pub use error::{Error, Result};
pub use model::Model;
pub use state::State;
