//! The recurrent state that replaces a KV cache: per layer, the last `W-1` conv inputs and
//! the SSM state, for every sequence of a batch. Its size does not grow with the sequence.

/// One layer's state for a whole batch: `conv: (batch, conv_dim, W-1)`,
/// `ssm: (batch, d_inner, N)` (Mamba-1) or `(batch, H, P, N)` (Mamba-2), all f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerState {
    pub conv: Vec<f32>,
    pub ssm: Vec<f32>,
}

/// Every layer's state, plus how many tokens it has absorbed.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub batch: usize,
    pub layers: Vec<LayerState>,
    pub tokens_seen: usize,
}

impl State {
    /// A zero state for `batch` sequences, from each layer's per-sequence `(conv, ssm)` sizes.
    pub fn zeros(batch: usize, per_sequence: &[(usize, usize)]) -> Self {
        State {
            batch,
            layers: per_sequence
                .iter()
                .map(|&(conv, ssm)| LayerState {
                    conv: vec![0.0; batch * conv],
                    ssm: vec![0.0; batch * ssm],
                })
                .collect(),
            tokens_seen: 0,
        }
    }

    /// Bytes of state held for each sequence.
    pub fn bytes_per_sequence(&self) -> usize {
        let floats: usize = self.layers.iter().map(|l| l.conv.len() + l.ssm.len()).sum();
        floats * std::mem::size_of::<f32>() / self.batch.max(1)
    }
}
