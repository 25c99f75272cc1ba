//! The hot operations of Mamba models.
//!
//! Each op lives in its own module with the same three parts: a `*_reference` function
//! written like the equations (the definition the tests trust), a fast CPU function
//! (threaded with rayon, vectorised, chunked where the algorithm allows), and the shape
//! types both share. Ops work on contiguous `f32` slices in the layouts of the
//! `mamba_ssm` / `causal_conv1d` reference functions, so the golden fixtures apply as they are.
//! [`tensor`] wraps them as differentiable candle operations for the models; with the cargo
//! feature `cuda` their forward passes also run on CUDA tensors, through the kernels of the
//! `cuda` module.

pub mod causal_conv1d;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod error;
pub mod gemm;
pub mod gemv;
pub mod layout;
pub mod math;
pub mod pages;
pub mod parallel;
#[cfg(target_arch = "x86_64")]
mod prefetch;
pub mod quant;
pub mod rmsnorm_gated;
mod scratch;
pub mod selective_scan;
pub mod selective_state_update;
pub mod ssd;
pub mod ssd_graph;
pub mod tensor;

pub use error::{OpError, Result};
