//! Mamba model families (Mamba-1, FalconMamba, Mamba-2), the Jamba hybrid (Mamba and
//! attention layers with mixture-of-experts MLPs), `mamba_ssm`-style hybrids (attention
//! layers and gated MLPs; Transformers among them) and MoE-Mamba: configs, checkpoint
//! loading, the per-layer state (recurrent state or key/value cache), sampling and
//! generation.

pub mod attention;
pub mod checkpoint;
pub mod config;
#[cfg(feature = "cuda")]
mod cuda_decode;
pub mod error;
pub mod generate;
pub mod gguf;
pub mod hybrid;
pub mod init;
mod int8_product;
pub mod jamba;
pub mod layers;
pub mod mamba1;
pub mod mamba2;
pub mod model;
pub mod moe;
pub mod moe_mamba;
pub mod sampling;
pub mod state;
pub mod tokenizer;

pub use error::{Error, Result};
pub use layers::WeightFormat;
pub use model::Model;
pub use state::State;
