//! GGUF files as llama.cpp reads and writes them for its `mamba` (Mamba-1 and FalconMamba)
//! and `mamba2` architectures: loading one into a [`Model`](crate::Model) ([`read`]) and
//! writing a checkpoint as one ([`write`]), with the vocabulary in `tokenizer.ggml.*`
//! metadata ([`vocab`]).
//!
//! llama.cpp's conventions (its `convert_hf_to_gguf.py` and `src/models/mamba*.cpp`), which
//! both directions follow; shapes here are row-major (PyTorch order), the reverse of ggml's
//! `ne` order that the file stores:
//!
//! ```text
//! Hugging Face                          GGUF                       shape in the file
//! backbone.embeddings.weight            token_embd.weight          (vocab, hidden)
//! backbone.layers.N.norm.weight         blk.N.attn_norm.weight     (hidden)
//! mixer.in_proj.weight                  blk.N.ssm_in.weight        (in_proj_out, hidden)
//! mixer.conv1d.weight (C, 1, K)         blk.N.ssm_conv1d.weight    (C, K)           squeezed
//! mixer.conv1d.bias                     blk.N.ssm_conv1d.bias      (C)
//! mixer.x_proj.weight        (Mamba-1)  blk.N.ssm_x.weight         (dt_rank + 2 N, d_inner)
//! mixer.dt_proj.weight       (Mamba-1)  blk.N.ssm_dt.weight        (d_inner, dt_rank)
//! mixer.dt_proj.bias         (Mamba-1)  blk.N.ssm_dt.bias          (d_inner)
//! mixer.dt_bias              (Mamba-2)  blk.N.ssm_dt.bias          (heads)
//! mixer.A_log                           blk.N.ssm_a                (d_inner, N) | (heads, 1)   A = -exp(A_log)
//! mixer.D                               blk.N.ssm_d                (d_inner)    | (heads, 1)
//! mixer.norm.weight          (Mamba-2)  blk.N.ssm_norm.weight      (groups, d_inner / groups)
//! mixer.out_proj.weight                 blk.N.ssm_out.weight       (hidden, d_inner)
//! backbone.norm_f.weight                output_norm.weight         (hidden)
//! lm_head.weight                        output.weight              (vocab, hidden)  absent when tied
//! ```
//!
//! The hyper-parameters are `{arch}.block_count`, `{arch}.embedding_length`,
//! `{arch}.ssm.{conv_kernel,inner_size,state_size,time_step_rank}`, for Mamba-2
//! `{arch}.ssm.group_count` (and `time_step_rank` is the number of heads), and
//! `{arch}.attention.layer_norm_rms_epsilon`; FalconMamba is `mamba` with
//! `mamba.ssm.dt_b_c_rms = true` (llama.cpp normalises Δ, B and C with the layer norm's
//! epsilon). The vocabulary size is the number of rows of `token_embd.weight`.

pub mod read;
pub mod vocab;
pub mod write;

pub use read::{load, GgufModel};
pub use vocab::GgufVocab;
pub use write::{write_checkpoint, WriteOptions, WriteSummary};

use crate::config::{Mamba2Config, MambaConfig, ModelConfig};
use crate::error::{Error, Result};
use std::path::Path;

/// `general.architecture` of Mamba-1 and FalconMamba files.
pub const ARCH_MAMBA: &str = "mamba";
/// `general.architecture` of Mamba-2 files.
pub const ARCH_MAMBA2: &str = "mamba2";

/// The metadata key `{arch}.{key}`.
fn arch_key(arch: &str, key: &str) -> String {
    format!("{arch}.{key}")
}

/// The GGUF name of a tensor of block `i`, e.g. `blk.3.ssm_in.weight`.
fn block_tensor(i: usize, name: &str) -> String {
    format!("blk.{i}.{name}")
}

/// Whether `path` names a GGUF file (by its extension; the header is checked on reading).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// An error about the GGUF file at `path`.
fn gguf_error(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::Checkpoint(format!("{}: {message}", path.display()))
}

/// The hyper-parameters a GGUF file records, shared by both directions.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Hyper {
    mamba2: bool,
    vocab: usize,
    hidden: usize,
    layers: usize,
    conv_kernel: usize,
    d_inner: usize,
    state: usize,
    /// Mamba-1: the rank of Δ; Mamba-2: the number of heads.
    time_step_rank: usize,
    /// Mamba-2's groups of B and C (1 for Mamba-1).
    groups: usize,
    eps: f64,
    /// FalconMamba's weightless RMS norms on Δ, B and C.
    dt_b_c_rms: bool,
}

impl Hyper {
    fn arch(&self) -> &'static str {
        if self.mamba2 {
            ARCH_MAMBA2
        } else {
            ARCH_MAMBA
        }
    }

    /// Channels through the convolution: `d_inner` (Mamba-1), `d_inner + 2 G N` (Mamba-2).
    fn conv_dim(&self) -> usize {
        if self.mamba2 {
            self.d_inner + 2 * self.groups * self.state
        } else {
            self.d_inner
        }
    }

    /// Rows of `in_proj`: `x, z` (Mamba-1), `z, x, B, C, dt` (Mamba-2).
    fn in_proj_rows(&self) -> usize {
        if self.mamba2 {
            2 * self.d_inner + 2 * self.groups * self.state + self.time_step_rank
        } else {
            2 * self.d_inner
        }
    }

    /// The model config these parameters describe, with the special tokens given.
    /// Mamba-2 gets transformers' default chunk size (256; any gives the same outputs up
    /// to rounding) and no Δ clamp, as llama.cpp runs it.
    fn to_config(self, tied: bool, bos: Option<u32>, eos: Option<u32>) -> Result<ModelConfig> {
        let expand = (self.d_inner / self.hidden.max(1)).max(1);
        let config = if self.mamba2 {
            let heads = self.time_step_rank.max(1);
            ModelConfig::Mamba2(Mamba2Config {
                vocab_size: self.vocab,
                hidden_size: self.hidden,
                state_size: self.state,
                num_hidden_layers: self.layers,
                layer_norm_epsilon: self.eps,
                expand,
                num_heads: heads,
                head_dim: self.d_inner / heads,
                n_groups: self.groups,
                chunk_size: 256,
                conv_kernel: self.conv_kernel,
                use_bias: false,
                use_conv_bias: true,
                time_step_limit: (0.0, f64::INFINITY),
                tie_word_embeddings: tied,
                norm_before_gate: false,
                eos_token_id: eos,
                bos_token_id: bos,
                pad_token_id: None,
            })
        } else {
            let c = MambaConfig {
                vocab_size: self.vocab,
                hidden_size: self.hidden,
                state_size: self.state,
                num_hidden_layers: self.layers,
                layer_norm_epsilon: self.eps,
                expand,
                intermediate_size: self.d_inner,
                conv_kernel: self.conv_kernel,
                use_bias: false,
                use_conv_bias: true,
                time_step_rank: self.time_step_rank,
                tie_word_embeddings: tied,
                mixer_rms_eps: self.dt_b_c_rms.then_some(self.eps),
                eos_token_id: eos,
                bos_token_id: bos,
                pad_token_id: None,
            };
            if self.dt_b_c_rms {
                ModelConfig::FalconMamba(c)
            } else {
                ModelConfig::Mamba(c)
            }
        };
        // A round trip through config.json runs the config's own checks.
        ModelConfig::from_json_str(&config.to_hf_json().to_string())
    }
}

/// What is done to a tensor's values between the two layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Values {
    Same,
    /// The file holds `A = -exp(A_log)`, the checkpoint `A_log`.
    NegExpOfLog,
}

/// One tensor in both namings, with its shape in each.
#[derive(Debug, Clone)]
struct TensorSpec {
    gguf: String,
    hf: String,
    gguf_shape: Vec<usize>,
    hf_shape: Vec<usize>,
    values: Values,
    /// A linear layer's weight (embedding and output head included), which quantised
    /// files store in blocks when its rows are a whole number of blocks.
    linear: bool,
}

impl TensorSpec {
    fn new(gguf: String, hf: String, shape: &[usize]) -> Self {
        TensorSpec {
            gguf,
            hf,
            gguf_shape: shape.to_vec(),
            hf_shape: shape.to_vec(),
            values: Values::Same,
            linear: false,
        }
    }

    fn linear(mut self) -> Self {
        self.linear = true;
        self
    }

    /// Stored as `gguf_shape` in the file, `hf_shape` in the checkpoint.
    fn shapes(mut self, gguf_shape: &[usize], hf_shape: &[usize]) -> Self {
        self.gguf_shape = gguf_shape.to_vec();
        self.hf_shape = hf_shape.to_vec();
        self
    }

    fn values(mut self, values: Values) -> Self {
        self.values = values;
        self
    }
}

/// Every tensor of a model with these parameters; `output.weight` only when untied.
fn tensor_specs(p: &Hyper, tied: bool) -> Vec<TensorSpec> {
    let (h, v) = (p.hidden, p.vocab);
    let mut specs = vec![TensorSpec::new(
        "token_embd.weight".into(),
        "backbone.embeddings.weight".into(),
        &[v, h],
    )
    .linear()];
    for i in 0..p.layers {
        specs.extend(block_specs(p, i));
    }
    specs.push(TensorSpec::new(
        "output_norm.weight".into(),
        "backbone.norm_f.weight".into(),
        &[h],
    ));
    if !tied {
        specs.push(
            TensorSpec::new("output.weight".into(), "lm_head.weight".into(), &[v, h]).linear(),
        );
    }
    specs
}

/// The tensors of block `i`.
fn block_specs(p: &Hyper, i: usize) -> Vec<TensorSpec> {
    let (h, di, n, r, k, c) = (
        p.hidden,
        p.d_inner,
        p.state,
        p.time_step_rank,
        p.conv_kernel,
        p.conv_dim(),
    );
    let spec = |gguf: &str, hf: &str, shape: &[usize]| {
        TensorSpec::new(
            block_tensor(i, gguf),
            format!("backbone.layers.{i}.{hf}"),
            shape,
        )
    };
    let mut specs = vec![
        spec("attn_norm.weight", "norm.weight", &[h]),
        spec(
            "ssm_in.weight",
            "mixer.in_proj.weight",
            &[p.in_proj_rows(), h],
        )
        .linear(),
        spec("ssm_conv1d.weight", "mixer.conv1d.weight", &[c]).shapes(&[c, k], &[c, 1, k]),
        spec("ssm_conv1d.bias", "mixer.conv1d.bias", &[c]),
        spec("ssm_out.weight", "mixer.out_proj.weight", &[h, di]).linear(),
    ];
    if p.mamba2 {
        specs.extend([
            spec("ssm_dt.bias", "mixer.dt_bias", &[r]),
            spec("ssm_a", "mixer.A_log", &[r])
                .shapes(&[r, 1], &[r])
                .values(Values::NegExpOfLog),
            spec("ssm_d", "mixer.D", &[r]).shapes(&[r, 1], &[r]),
            spec("ssm_norm.weight", "mixer.norm.weight", &[di])
                .shapes(&[p.groups, di / p.groups.max(1)], &[di]),
        ]);
    } else {
        specs.extend([
            spec("ssm_x.weight", "mixer.x_proj.weight", &[r + 2 * n, di]).linear(),
            spec("ssm_dt.weight", "mixer.dt_proj.weight", &[di, r]).linear(),
            spec("ssm_dt.bias", "mixer.dt_proj.bias", &[di]),
            spec("ssm_a", "mixer.A_log", &[di, n]).values(Values::NegExpOfLog),
            spec("ssm_d", "mixer.D", &[di]),
        ]);
    }
    specs
}

/// A candle error's message without the backtrace candle may attach to it.
fn candle_message(e: candle_core::Error) -> String {
    Error::from(e).to_string()
}
