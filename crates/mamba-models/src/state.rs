//! What a model carries from one call to the next, per layer and sequence. A Mamba layer
//! keeps its last `W-1` conv inputs and its SSM state, whose size does not grow with the
//! sequence; an attention layer keeps the keys and values of every token it has seen.

/// What one layer keeps for each sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateSize {
    /// A Mamba mixer: `conv` and `ssm` f32 values, whatever the sequence length.
    Recurrent { conv: usize, ssm: usize },
    /// An attention mixer: `width` f32 values of keys and as many of values per token.
    KeyValue { width: usize },
}

/// One layer's state for a whole batch. Mamba layers fill `conv: (batch, conv_dim, W-1)`
/// and `ssm: (batch, d_inner, N)` (Mamba-1) or `(batch, H, P, N)` (Mamba-2), all f32, and
/// have no `kv`; attention layers leave `conv` and `ssm` empty and carry `kv`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerState {
    pub conv: Vec<f32>,
    pub ssm: Vec<f32>,
    pub kv: Option<KvCache>,
}

/// The keys and values of one attention layer, kept apart for each sequence of the batch
/// so that sequences may hold different numbers of tokens (prompts of unequal length).
#[derive(Debug, Clone, PartialEq)]
pub struct KvCache {
    /// f32 values per token in the keys (and in the values): `kv_heads * head_dim`.
    pub width: usize,
    pub sequences: Vec<SequenceKv>,
}

/// One sequence's cache: `keys, values: (tokens, kv_heads, head_dim)`, row-major, in the
/// order the tokens came.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SequenceKv {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
}

impl LayerState {
    /// The state of a layer that has seen nothing, for `batch` sequences.
    pub fn zeros(batch: usize, size: StateSize) -> Self {
        match size {
            StateSize::Recurrent { conv, ssm } => LayerState {
                conv: vec![0.0; batch * conv],
                ssm: vec![0.0; batch * ssm],
                kv: None,
            },
            StateSize::KeyValue { width } => LayerState {
                conv: Vec::new(),
                ssm: Vec::new(),
                kv: Some(KvCache {
                    width,
                    sequences: vec![SequenceKv::default(); batch],
                }),
            },
        }
    }

    /// The states of several batches of the same layer as one batch, in order
    /// (the recurrent layouts are batch-major, the caches per sequence).
    pub fn stack(parts: &[&LayerState]) -> Self {
        let kv = parts
            .first()
            .and_then(|p| p.kv.as_ref())
            .map(|first| KvCache {
                width: first.width,
                sequences: parts
                    .iter()
                    .filter_map(|p| p.kv.as_ref())
                    .flat_map(|kv| kv.sequences.iter().cloned())
                    .collect(),
            });
        LayerState {
            conv: parts.iter().flat_map(|p| p.conv.iter().copied()).collect(),
            ssm: parts.iter().flat_map(|p| p.ssm.iter().copied()).collect(),
            kv,
        }
    }
}

/// Every layer's state, plus how many tokens it has absorbed.
#[derive(Debug, Clone, PartialEq)]
pub struct State {
    pub batch: usize,
    pub layers: Vec<LayerState>,
    pub tokens_seen: usize,
}

impl State {
    /// The state of a model that has seen nothing, for `batch` sequences, from what each
    /// layer keeps per sequence.
    pub fn zeros(batch: usize, per_sequence: &[StateSize]) -> Self {
        State {
            batch,
            layers: per_sequence
                .iter()
                .map(|&size| LayerState::zeros(batch, size))
                .collect(),
            tokens_seen: 0,
        }
    }

    /// `times` copies of this batch's sequences, one batch after another, as one batch
    /// (for decoding many sequences that share a prompt).
    pub fn repeated(&self, times: usize) -> State {
        State {
            batch: self.batch * times,
            layers: self
                .layers
                .iter()
                .map(|layer| LayerState::stack(&vec![layer; times]))
                .collect(),
            tokens_seen: self.tokens_seen,
        }
    }

    /// Bytes of recurrent (conv and SSM) state held for each sequence; constant in the
    /// sequence length. Key/value caches are counted by [`State::kv_bytes_per_token`].
    pub fn bytes_per_sequence(&self) -> usize {
        let floats: usize = self.layers.iter().map(|l| l.conv.len() + l.ssm.len()).sum();
        floats * std::mem::size_of::<f32>() / self.batch.max(1)
    }

    /// Bytes that the key/value caches of the attention layers grow by for each token of
    /// each sequence (zero for models without attention).
    pub fn kv_bytes_per_token(&self) -> usize {
        let floats: usize = self
            .layers
            .iter()
            .filter_map(|l| l.kv.as_ref())
            .map(|kv| 2 * kv.width)
            .sum();
        floats * std::mem::size_of::<f32>()
    }
}
