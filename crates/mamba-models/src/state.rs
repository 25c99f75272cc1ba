//! What a model carries from one call to the next, per layer and sequence. A Mamba layer
//! keeps its last `W-1` conv inputs and its SSM state, whose size does not grow with the
//! sequence; an attention layer keeps the keys and values of every token it has seen.

use crate::error::{Error, Result};
use candle_core::{DType, Device, Tensor};

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
///
/// A Mamba layer of a model on an accelerator keeps the same state as f32 tensors of those
/// shapes in `device` instead, so that decoding does not copy it to the host every token;
/// `conv` and `ssm` are then empty. [`LayerState::to_host`] brings it back.
/// ([`LayerState::zeros_on`] and [`LayerState::stack`] leave them as `(batch, values per
/// sequence)`, the same values in the same order; [`LayerState::recurrent_tensors`] gives
/// them the layer's shapes.)
#[derive(Debug, Clone, PartialEq)]
pub struct LayerState {
    pub conv: Vec<f32>,
    pub ssm: Vec<f32>,
    pub kv: Option<KvCache>,
    pub device: Option<DeviceState>,
}

/// A Mamba layer's recurrent state held on the model's device: f32 tensors
/// `conv: (batch, conv_dim, W-1)` and `ssm: (batch, d_inner, N)` or `(batch, H, P, N)`, or
/// the same values as `(batch, values per sequence)` (see [`LayerState`]).
///
/// The fused CUDA decoding step updates these tensors in place, so a clone copies them
/// (as cloning a host state copies its vectors) instead of sharing their storage.
#[derive(Debug)]
pub struct DeviceState {
    pub conv: Tensor,
    pub ssm: Tensor,
}

impl Clone for DeviceState {
    /// A copy in new device memory.
    ///
    /// # Panics
    /// When the device cannot allocate the copy.
    fn clone(&self) -> Self {
        let copy = |t: &Tensor| t.copy().expect("copying a device-held state");
        DeviceState {
            conv: copy(&self.conv),
            ssm: copy(&self.ssm),
        }
    }
}

impl PartialEq for DeviceState {
    /// Equal shapes and equal values (false where a value cannot be read).
    fn eq(&self, other: &Self) -> bool {
        same_values(&self.conv, &other.conv) && same_values(&self.ssm, &other.ssm)
    }
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
/// order the tokens came. On a CUDA device they stay there as `device` tensors (and the
/// vectors stay empty), so that decoding does not copy the whole cache every token.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SequenceKv {
    pub keys: Vec<f32>,
    pub values: Vec<f32>,
    pub device: Option<DeviceKv>,
}

/// A sequence's keys and values `(tokens, kv_heads, head_dim)` as f32 device tensors.
/// Appending makes new tensors (as Hugging Face's dynamic cache concatenates), never
/// writes in place, so a clone may share their storage.
#[derive(Debug, Clone)]
pub struct DeviceKv {
    pub keys: Tensor,
    pub values: Tensor,
}

impl PartialEq for DeviceKv {
    /// Equal shapes and equal values (false where a value cannot be read).
    fn eq(&self, other: &Self) -> bool {
        same_values(&self.keys, &other.keys) && same_values(&self.values, &other.values)
    }
}

/// A tensor's values as f32, in row-major order, on the host.
fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
}

/// Whether two tensors hold the same values in row-major order (false where a value cannot
/// be read).
fn same_values(a: &Tensor, b: &Tensor) -> bool {
    let a = host_values(a).ok();
    a.is_some() && a == host_values(b).ok()
}

impl SequenceKv {
    /// Tokens cached, for keys of `width` values per token.
    pub fn tokens(&self, width: usize) -> Result<usize> {
        Ok(match &self.device {
            Some(d) => d.keys.dim(0)?,
            None => self.keys.len() / width.max(1),
        })
    }

    /// Appends new keys and values `k, v: (L, kv_heads, head_dim)` and returns every
    /// cached one `(S, kv_heads, head_dim)`, the new rows last (still carrying their
    /// gradient; the cache keeps them as constants).
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let past = self.tokens(k.dim(1)? * k.dim(2)?)?;
        let (keys, values) = match &self.device {
            Some(d) => (
                Tensor::cat(&[&d.keys, k], 0)?,
                Tensor::cat(&[&d.values, v], 0)?,
            ),
            None => (
                after_host_rows(&self.keys, k, past)?,
                after_host_rows(&self.values, v, past)?,
            ),
        };
        if k.device().is_cuda() {
            self.keys = Vec::new();
            self.values = Vec::new();
            self.device = Some(DeviceKv {
                keys: keys.detach(),
                values: values.detach(),
            });
        } else {
            self.extend_host(&host_values(k)?, &host_values(v)?);
        }
        Ok((keys, values))
    }

    /// Appends keys and values `(L, kv_heads, head_dim)` given as host values to a cache
    /// held on the host, in place.
    pub fn extend_host(&mut self, keys: &[f32], values: &[f32]) {
        self.keys.extend_from_slice(keys);
        self.values.extend_from_slice(values);
    }

    /// This cache with device-held keys and values copied into the vectors.
    fn to_host(&self) -> Result<SequenceKv> {
        Ok(match &self.device {
            Some(d) => SequenceKv {
                keys: host_values(&d.keys)?,
                values: host_values(&d.values)?,
                device: None,
            },
            None => self.clone(),
        })
    }
}

/// The `past` rows held on the host (`(past, G, d)` f32 values) followed by
/// `new: (L, G, d)`, on `new`'s device.
fn after_host_rows(cached: &[f32], new: &Tensor, past: usize) -> Result<Tensor> {
    if past == 0 {
        return Ok(new.clone());
    }
    let (_, g, d) = new.dims3()?;
    let cached = Tensor::from_slice(cached, (past, g, d), new.device())?;
    Ok(Tensor::cat(&[&cached, new], 0)?)
}

impl LayerState {
    /// The state of a layer that has seen nothing, for `batch` sequences.
    pub fn zeros(batch: usize, size: StateSize) -> Self {
        match size {
            StateSize::Recurrent { conv, ssm } => LayerState {
                conv: vec![0.0; batch * conv],
                ssm: vec![0.0; batch * ssm],
                kv: None,
                device: None,
            },
            StateSize::KeyValue { width } => LayerState {
                conv: Vec::new(),
                ssm: Vec::new(),
                kv: Some(KvCache {
                    width,
                    sequences: vec![SequenceKv::default(); batch],
                }),
                device: None,
            },
        }
    }

    /// [`LayerState::zeros`], with a Mamba layer's state made on `device` when that is a GPU:
    /// `(batch, values per sequence)` zeros set there, so that the first prefill neither fills
    /// host memory nor copies it over (for 64 sequences of mamba-2.8b, 1.3 GB).
    pub fn zeros_on(batch: usize, size: StateSize, device: &Device) -> Result<Self> {
        match size {
            StateSize::Recurrent { conv, ssm } if device.is_cuda() => Ok(LayerState {
                conv: Vec::new(),
                ssm: Vec::new(),
                kv: None,
                device: Some(DeviceState {
                    conv: Tensor::zeros((batch, conv), DType::F32, device)?,
                    ssm: Tensor::zeros((batch, ssm), DType::F32, device)?,
                }),
            }),
            _ => Ok(LayerState::zeros(batch, size)),
        }
    }

    /// The states of several batches of the same layer as one batch, in order
    /// (the recurrent layouts are batch-major, the caches per sequence). Parts whose state
    /// is on a device stack there (a part still on the host is moved to that device).
    pub fn stack(parts: &[&LayerState]) -> Result<Self> {
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
        let Some(on) = parts.iter().find_map(|p| p.device.as_ref()) else {
            return Ok(LayerState {
                conv: parts.iter().flat_map(|p| p.conv.iter().copied()).collect(),
                ssm: parts.iter().flat_map(|p| p.ssm.iter().copied()).collect(),
                kv,
                device: None,
            });
        };
        let dev = on.conv.device();
        let mut convs = Vec::with_capacity(parts.len());
        let mut ssms = Vec::with_capacity(parts.len());
        for part in parts {
            let (conv, ssm) = match &part.device {
                Some(d) => (d.conv.clone(), d.ssm.clone()),
                None => {
                    let rows = |v: &[f32], like: &Tensor| -> Result<Tensor> {
                        let per_row: usize = like.dims()[1..].iter().product();
                        let mut shape = like.dims().to_vec();
                        shape[0] = v.len() / per_row.max(1);
                        Ok(Tensor::from_slice(v, shape, dev)?)
                    };
                    (rows(&part.conv, &on.conv)?, rows(&part.ssm, &on.ssm)?)
                }
            };
            convs.push(conv.flatten_from(1)?); // (rows, values per sequence)
            ssms.push(ssm.flatten_from(1)?);
        }
        Ok(LayerState {
            conv: Vec::new(),
            ssm: Vec::new(),
            kv,
            device: Some(DeviceState {
                conv: Tensor::cat(&convs, 0)?,
                ssm: Tensor::cat(&ssms, 0)?,
            }),
        })
    }

    /// This state with any device-held recurrent state copied back into `conv` and `ssm`
    /// (and device-held keys and values into their vectors).
    pub fn to_host(&self) -> Result<LayerState> {
        let kv = match &self.kv {
            Some(kv) => Some(KvCache {
                width: kv.width,
                sequences: kv
                    .sequences
                    .iter()
                    .map(SequenceKv::to_host)
                    .collect::<Result<_>>()?,
            }),
            None => None,
        };
        let (conv, ssm) = match &self.device {
            Some(d) => (host_values(&d.conv)?, host_values(&d.ssm)?),
            None => (self.conv.clone(), self.ssm.clone()),
        };
        Ok(LayerState {
            conv,
            ssm,
            kv,
            device: None,
        })
    }

    /// The recurrent state as f32 tensors `(conv, ssm)` of the given shapes on `device`:
    /// the device-held tensors where there are some, else built from `conv` and `ssm`.
    pub fn recurrent_tensors(
        &self,
        conv_shape: &[usize],
        ssm_shape: &[usize],
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let fits = |held: usize, shape: &[usize]| held == shape.iter().product::<usize>();
        let (conv_len, ssm_len) = match &self.device {
            Some(d) => (d.conv.elem_count(), d.ssm.elem_count()),
            None => (self.conv.len(), self.ssm.len()),
        };
        if !fits(conv_len, conv_shape) || !fits(ssm_len, ssm_shape) {
            return Err(Error::Input(format!(
                "the state holds {conv_len} conv and {ssm_len} SSM values where the layer needs {conv_shape:?} and {ssm_shape:?}"
            )));
        }
        match &self.device {
            Some(d) => Ok((d.conv.reshape(conv_shape)?, d.ssm.reshape(ssm_shape)?)),
            None => Ok((
                Tensor::from_slice(&self.conv, conv_shape, device)?,
                Tensor::from_slice(&self.ssm, ssm_shape, device)?,
            )),
        }
    }

    /// Replaces the recurrent state by `conv` and `ssm` (no gradient kept): held as tensors
    /// when they are on a CUDA device, else copied into the `conv` and `ssm` vectors.
    pub fn set_recurrent(&mut self, conv: &Tensor, ssm: &Tensor) -> Result<()> {
        if !conv.device().is_cuda() {
            self.conv = host_values(conv)?;
            self.ssm = host_values(ssm)?;
            self.device = None;
        } else {
            self.conv = Vec::new();
            self.ssm = Vec::new();
            self.device = Some(DeviceState {
                conv: conv.detach(),
                ssm: ssm.detach(),
            });
        }
        Ok(())
    }

    /// f32 values of recurrent state held, on the host or on the device.
    fn recurrent_len(&self) -> usize {
        match &self.device {
            Some(d) => d.conv.elem_count() + d.ssm.elem_count(),
            None => self.conv.len() + self.ssm.len(),
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

    /// [`State::zeros`] with the Mamba layers' states made on `device` ([`LayerState::zeros_on`]).
    pub fn zeros_on(batch: usize, per_sequence: &[StateSize], device: &Device) -> Result<Self> {
        Ok(State {
            batch,
            layers: per_sequence
                .iter()
                .map(|&size| LayerState::zeros_on(batch, size, device))
                .collect::<Result<_>>()?,
            tokens_seen: 0,
        })
    }

    /// `times` copies of this batch's sequences, one batch after another, as one batch
    /// (for decoding many sequences that share a prompt).
    pub fn repeated(&self, times: usize) -> Result<State> {
        Ok(State {
            batch: self.batch * times,
            layers: self
                .layers
                .iter()
                .map(|layer| LayerState::stack(&vec![layer; times]))
                .collect::<Result<_>>()?,
            tokens_seen: self.tokens_seen,
        })
    }

    /// This state with every device-held recurrent state and cache copied back to the host.
    pub fn to_host(&self) -> Result<State> {
        Ok(State {
            batch: self.batch,
            layers: self
                .layers
                .iter()
                .map(LayerState::to_host)
                .collect::<Result<_>>()?,
            tokens_seen: self.tokens_seen,
        })
    }

    /// Bytes of recurrent (conv and SSM) state held for each sequence; constant in the
    /// sequence length. Key/value caches are counted by [`State::kv_bytes_per_token`].
    pub fn bytes_per_sequence(&self) -> usize {
        let floats: usize = self.layers.iter().map(LayerState::recurrent_len).sum();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the recurrent state stays in the vectors, and stacking and copying to the
    /// host leave it as it was.
    #[test]
    fn cpu_state_stays_on_the_host() {
        let size = StateSize::Recurrent { conv: 2, ssm: 3 };
        let mut layer = LayerState::zeros(1, size);
        let conv = Tensor::new(&[[1f32, 2.0]], &Device::Cpu).unwrap();
        let ssm = Tensor::new(&[[3f32, 4.0, 5.0]], &Device::Cpu).unwrap();
        layer.set_recurrent(&conv, &ssm).unwrap();
        assert_eq!(
            (layer.conv.clone(), layer.ssm.clone()),
            (vec![1.0, 2.0], vec![3.0, 4.0, 5.0])
        );
        assert!(layer.device.is_none());
        assert_eq!(layer.to_host().unwrap(), layer);
        let two = LayerState::stack(&[&layer, &layer]).unwrap();
        assert!(two.device.is_none());
        assert_eq!(two.conv, vec![1.0, 2.0, 1.0, 2.0]);
        let (c, s) = two
            .recurrent_tensors(&[2, 1, 2], &[2, 1, 3], &Device::Cpu)
            .unwrap();
        assert_eq!((c.dims(), s.dims()), (&[2, 1, 2][..], &[2, 1, 3][..]));
        let state = State {
            batch: 2,
            layers: vec![two],
            tokens_seen: 0,
        };
        assert_eq!(state.bytes_per_sequence(), 5 * 4);
    }

    /// A state asked for in shapes that do not hold its values is refused, not reshaped.
    #[test]
    fn a_state_of_another_size_is_refused() {
        let layer = LayerState::zeros(2, StateSize::Recurrent { conv: 2, ssm: 3 });
        let asked = layer.recurrent_tensors(&[2, 1, 2], &[2, 1, 4], &Device::Cpu);
        assert!(matches!(asked, Err(Error::Input(m)) if m.contains("[2, 1, 4]")));
    }
}
