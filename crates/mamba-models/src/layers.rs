//! Building blocks shared by the model families: linear layers (f32 or bf16 weights,
//! f32 activations; a prefill's product by bf16 weights rounds them to bf16 where bf16 dot
//! products pay, else widens them a block at a time), embeddings, RMSNorm and tensor/slice
//! conversions.

use crate::error::{Error, Result};
use crate::int8_product::{int8_products_pay, Int8Product};
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use half::bf16;
use mamba_ops::causal_conv1d::{causal_conv1d_update_into, ConvUpdateDims, ConvUpdateInputs};
use mamba_ops::gemm::{
    bf16_products_pay, matmul_bf16_nt, matmul_nt_rows_threaded, matmul_nt_threaded, round_to_bf16,
};
use mamba_ops::gemv::{gemv, Weights};
use mamba_ops::pages::back_with_huge_pages;
use mamba_ops::quant::{QuantMatrix, BLOCK};
use mamba_ops::rmsnorm_gated::{rmsnorm_gated_in_place, rmsnorm_gated_into, NormDims};
use rayon::prelude::*;
use std::cell::Cell;
use std::ops::Range;
use std::sync::{Arc, OnceLock};

pub use mamba_ops::quant::QuantFormat;

/// Rows of activations at or below which a linear layer on the CPU runs the matrix-vector
/// kernels of [`mamba_ops::gemv`] (reading bf16 or quantised weights as they are) instead
/// of a matrix product on dense f32 weights.
const GEMV_MAX_ROWS: usize = 16;

/// How the weights of the linear layers are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WeightFormat {
    F32,
    Bf16,
    /// llama.cpp's 8-bit blocks (see [`mamba_ops::quant`]).
    Q8_0,
    /// llama.cpp's 4-bit blocks.
    Q4_0,
}

impl WeightFormat {
    /// The dtype the checkpoint's tensors are read in before any quantisation.
    pub fn load_dtype(self) -> DType {
        match self {
            WeightFormat::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// The block format, for the quantised ones.
    pub fn quant(self) -> Option<QuantFormat> {
        match self {
            WeightFormat::Q8_0 => Some(QuantFormat::Q8_0),
            WeightFormat::Q4_0 => Some(QuantFormat::Q4_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::Bf16 => "bf16",
            WeightFormat::Q8_0 => "q8_0",
            WeightFormat::Q4_0 => "q4_0",
        }
    }
}

/// `y = x W^T (+ b)` with `W: (out, in)` stored dense (f32 or bf16, as in the checkpoint)
/// or block-quantised.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    /// Quantised weights on candle's integer kernels for prefills, made at the first one
    /// (`None` inside where those kernels do not take the matrix).
    int8: Arc<OnceLock<Option<Int8Product>>>,
    /// Set once the weights have been offered to huge pages ([`mamba_ops::pages`], where
    /// turned on), at the first product on the host (decoding's, which streams them from
    /// memory every token).
    huge_pages: Arc<OnceLock<()>>,
}

#[derive(Debug, Clone)]
enum LinearWeight {
    /// `(out, in)`, f32 or bf16, on any device; the form training updates.
    Dense(Tensor),
    /// `(out, in)` in q8_0 or q4_0 blocks, on the CPU.
    Quantized(Arc<QuantMatrix>),
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: LinearWeight::Dense(weight),
            bias,
            int8: Arc::default(),
            huge_pages: Arc::default(),
        }
    }

    /// Loads `{name}.weight` of shape `(out, in)` and, if `with_bias`, `{name}.bias` (f32).
    pub fn load(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out, inp), &format!("{name}.weight"))?;
        let bias = with_bias
            .then(|| vb.to_dtype(DType::F32).get(out, &format!("{name}.bias")))
            .transpose()?;
        Ok(Linear::new(weight, bias))
    }

    /// The weight `(out, in)` when it is stored dense (f32 or bf16).
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            LinearWeight::Quantized(_) => None,
        }
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_features(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.dim(0).unwrap_or(0),
            LinearWeight::Quantized(q) => q.rows(),
        }
    }

    /// Bytes of weights one product reads.
    pub fn weight_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Quantized(q) => q.size_in_bytes(),
        }
    }

    /// Stores the weights in `format`. Quantised formats need an input width that fills
    /// 32-value blocks; a layer whose width does not (Mamba-1's `dt_proj`, whose input is
    /// `dt_rank` wide) stays in f32, as llama.cpp leaves such tensors unquantised.
    pub fn convert(&mut self, format: WeightFormat) -> Result<()> {
        let dense = match &self.weight {
            // A dense matrix changes dtype directly (a no-op when it already has it).
            LinearWeight::Dense(w) if format.quant().is_none() => w.clone(),
            _ => self.dense_f32()?,
        };
        let (out, inp) = dense.dims2()?;
        self.weight = match format.quant() {
            Some(q) if inp.is_multiple_of(BLOCK) => {
                let values = f32_vec(&dense)?;
                LinearWeight::Quantized(Arc::new(QuantMatrix::quantize(&values, out, inp, q)?))
            }
            Some(_) | None => LinearWeight::Dense(dense.to_dtype(format.load_dtype())?),
        };
        self.int8 = Arc::default();
        self.huge_pages = Arc::default();
        Ok(())
    }

    /// The weights as a dense f32 tensor `(out, in)` (dequantised if need be).
    fn dense_f32(&self) -> Result<Tensor> {
        Ok(match &self.weight {
            LinearWeight::Dense(w) => w.to_dtype(DType::F32)?,
            LinearWeight::Quantized(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows(), q.cols()), &Device::Cpu)?
            }
        })
    }

    /// Applies the layer to `x: (..., in)` (f32), returning `(..., out)` (f32).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims
            .last()
            .ok_or_else(|| Error::Input("linear layer on a scalar".into()))?;
        let rows = x.elem_count() / inp.max(1);
        let x2 = x.reshape((rows, inp))?;
        let dense_f32 = matches!(&self.weight, LinearWeight::Dense(w) if w.dtype() == DType::F32);
        let y = if rows <= GEMV_MAX_ROWS && x.device().is_cpu() && !dense_f32 {
            // bf16 or quantised weights read as they are stored; the bias is added there.
            let mut y = vec![0.0f32; rows * self.out_features()];
            self.forward_host(&f32_vec(&x2)?, &mut y)?;
            Tensor::from_vec(y, (rows, self.out_features()), x.device())?
        } else {
            let y = match self.gpu_bf16_weight(rows, x.device()) {
                Some(w) => gpu_bf16_product(&x2, w)?,
                None => x2.matmul(&self.dense_f32()?.to_device(x.device())?.t()?)?,
            };
            match &self.bias {
                Some(b) => y.broadcast_add(b)?,
                None => y,
            }
        };
        let mut out_dims = dims;
        *out_dims.last_mut().expect("checked above") = self.out_features();
        Ok(y.reshape(out_dims)?)
    }

    /// The bf16 weight to multiply by as it is stored: on a GPU, for more than
    /// [`GEMV_MAX_ROWS`] rows (a prefill). Fewer rows (the ops decoding step) keep the
    /// widened f32 product, whose numerics the fused decoder is tested against.
    fn gpu_bf16_weight(&self, rows: usize, device: &Device) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w)
                if w.dtype() == DType::BF16 && !device.is_cpu() && rows > GEMV_MAX_ROWS =>
            {
                Some(w)
            }
            _ => None,
        }
    }
}

/// `x w^T` for f32 `x: (rows, in)` and bf16 `w: (out, in)` on a GPU, as PyTorch runs a bf16
/// model: `x` rounded to bf16, one tensor-core GEMM accumulating in f32, its bf16 result
/// widened back to f32 `(rows, out)`.
fn gpu_bf16_product(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.to_dtype(DType::BF16)?
        .matmul(&w.t()?)?
        .to_dtype(DType::F32)?)
}

impl Linear {
    /// [`Linear::forward`] on host slices, `x: (rows, in)` → `y: (rows, out)`, through the
    /// matrix-vector kernels of [`mamba_ops::gemv`] (meant for a few rows, as decoding
    /// has). The weights must be on the CPU.
    pub fn forward_host(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let out = self.out_features();
        let rows = y.len() / out.max(1);
        let inp = x.len().checked_div(rows).unwrap_or(0);
        self.huge_pages
            .get_or_init(|| self.back_weights_with_huge_pages());
        match &self.weight {
            LinearWeight::Dense(w) => with_host_values(w, |w| {
                gemv(w.weights(), out, inp, x, y).map_err(Error::from)
            })?,
            LinearWeight::Quantized(q) => gemv(Weights::Quant(q), out, inp, x, y)?,
        }
        self.add_bias_host(y, 0..out)
    }

    /// Asks for huge pages under the weights where they are turned on (host memory only; a
    /// hint, see [`mamba_ops::pages`]).
    fn back_weights_with_huge_pages(&self) {
        match &self.weight {
            LinearWeight::Dense(w) => {
                // Weights on an accelerator have no host pages to offer.
                let _ = with_host_values(w, |values| {
                    Ok(match values {
                        HostValues::F32(v) => back_with_huge_pages(v),
                        HostValues::Bf16(v) => back_with_huge_pages(v),
                    })
                });
            }
            LinearWeight::Quantized(q) => q.back_with_huge_pages(),
        }
    }

    /// [`Linear::forward_host`] for one decoding step of `rows` sequences: the
    /// matrix-vector kernels, except for f32 weights past [`GEMV_MAX_ROWS`] sequences, which
    /// take a GEMM (mamba-130m f32 at 64 sequences, 2 threads: 158 -> 219 tokens/s). bf16 and
    /// quantised weights keep their own kernels at every batch: widening or dequantising the
    /// whole matrix for a GEMM every step costs more than it saves at decoding's batches
    /// (mamba2-130m bf16 at 32 sequences: 208-214 against 149-183 tokens/s).
    pub fn forward_step_host(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        match &self.weight {
            LinearWeight::Dense(w) if w.dtype() == DType::F32 => self.forward_rows_host(x, y),
            _ => self.forward_host(x, y),
        }
    }
}

impl Linear {
    /// [`Linear::forward`] on host slices for any number of rows, `x: (rows, in)` →
    /// `y: (rows, out)`: a few rows go to the matrix-vector kernels, more to one threaded
    /// matrix product: bf16 weights, and q4_0 weights dequantised to bf16, on the CPU's bf16
    /// dot products where they pay ([`bf16_dot_products`], [`dequantised_bf16_products`]);
    /// q8_0 weights (and q4_0 elsewhere) on candle's integer kernels where they take the
    /// matrix (`int8_product`); the rest widened to f32 for it.
    pub fn forward_rows_host(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        self.forward_rows_host_parts(x, &mut [y])
    }

    /// [`Linear::forward_rows_host`] with the output's columns cut into consecutive parts,
    /// each its own contiguous `(rows, width)` buffer (the widths add up to `out`): each part
    /// is the product of its rows of the weights, so that a mixer takes its projection's
    /// pieces (z, x, Δ, B, C) without copying columns afterwards.
    pub fn forward_rows_host_parts(&self, x: &[f32], parts: &mut [&mut [f32]]) -> Result<()> {
        let out = self.out_features();
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let rows = total / out.max(1);
        if rows == 0 {
            return Ok(());
        }
        if rows * out != total || parts.iter().any(|p| p.len() % rows != 0) {
            return Err(Error::Input(format!(
                "output parts of {total} values do not split {out}-wide rows"
            )));
        }
        let few_rows = rows <= GEMV_MAX_ROWS;
        if parts.len() > 1 && (few_rows || out <= NARROW_OUTPUT_MOST) {
            return self.forward_whole_then_parts(x, rows, parts);
        }
        if let ([y], true) = (&mut *parts, few_rows) {
            return self.forward_host(x, y); // the matrix-vector kernels
        }
        let inp = x.len() / rows;
        let products = |w: &[f32], parts: &mut [&mut [f32]]| {
            for (columns, part) in parts_with_columns(parts, rows) {
                matmul_nt_threaded(
                    (rows, columns.len(), inp),
                    part,
                    columns.len(),
                    x,
                    &w[columns.start * inp..columns.end * inp],
                );
            }
        };
        // The f32 product on weights widened a block of rows at a time by `rows_into`.
        let widened_products = |rows_into: &WidenRows, parts: &mut [&mut [f32]]| {
            for (columns, part) in parts_with_columns(parts, rows) {
                let start = columns.start;
                matmul_nt_rows_threaded(
                    (rows, columns.len(), inp),
                    part,
                    columns.len(),
                    x,
                    |r, out| rows_into(start + r.start..start + r.end, out),
                );
            }
        };
        match &self.weight {
            LinearWeight::Dense(w) => with_host_values(w, |v| {
                match v {
                    HostValues::F32(v) => products(v, parts),
                    HostValues::Bf16(v) => {
                        if !bf16_dot_products(x, v, (rows, inp), parts) {
                            let rows_into = |r: Range<usize>, out: &mut [f32]| {
                                widen_bf16(&v[r.start * inp..r.end * inp], out)
                            };
                            widened_products(&rows_into, parts)
                        }
                    }
                }
                Ok(())
            })?,
            LinearWeight::Quantized(q) if dequantised_bf16_products(x, q, (rows, inp), parts) => {}
            LinearWeight::Quantized(q) => match self.int8_product(q)? {
                Some(product) => match parts {
                    [y] => product.forward(x, y)?,
                    // The integer kernels take the whole matrix: its columns go to the parts.
                    _ => return self.forward_whole_then_parts(x, rows, parts),
                },
                None => widened_products(&|r, out| q.dequantize_rows_into(r, out), parts),
            },
        }
        for (columns, part) in parts_with_columns(parts, rows) {
            self.add_bias_host(part, columns)?;
        }
        Ok(())
    }

    /// [`Linear::forward_rows_host_parts`] as one product over all the columns (bias
    /// included), then each part's columns copied out: for a narrow projection (Mamba-1's
    /// x_proj: Δ, B and C, 48 + 16 + 16 columns; products 16 columns wide leave the GEMM's
    /// kernel mostly idle: mamba-130m's three x_proj products over 2048 tokens took a quarter
    /// to a third longer than one, 4.5 against 3.4 ms on one thread), for a few rows (the
    /// matrix-vector kernels make the whole output) and for candle's integer kernels, which
    /// take the whole matrix.
    fn forward_whole_then_parts(
        &self,
        x: &[f32],
        rows: usize,
        parts: &mut [&mut [f32]],
    ) -> Result<()> {
        let out = self.out_features();
        with_bounded_scratch(&WHOLE_OUTPUT, rows * out, |y| {
            self.forward_rows_host_parts(x, &mut [&mut *y])?;
            for (columns, part) in parts_with_columns(parts, rows) {
                copy_columns(y, out, columns.start, columns.len(), part);
            }
            Ok(())
        })
    }

    /// The prefill product on candle's integer kernels for `q` (this layer's weights), made
    /// at the first call; `None` where those kernels do not take the matrix.
    fn int8_product(&self, q: &QuantMatrix) -> Result<Option<&Int8Product>> {
        if !int8_products_pay() {
            return Ok(None);
        }
        if self.int8.get().is_none() {
            // Two threads may both make it; the first one stored wins, the same product.
            let _ = self.int8.set(Int8Product::new(q)?);
        }
        Ok(self.int8.get().and_then(Option::as_ref))
    }

    /// Adds the bias's `columns` (if there is a bias) to each row of `y`.
    fn add_bias_host(&self, y: &mut [f32], columns: Range<usize>) -> Result<()> {
        let Some(bias) = &self.bias else {
            return Ok(());
        };
        with_host_values(bias, |b| {
            let HostValues::F32(b) = b else {
                return Err(Error::Input("a bias must be f32".into()));
            };
            let b = &b[columns];
            y.chunks_mut(b.len().max(1))
                .for_each(|row| row.iter_mut().zip(b).for_each(|(v, b)| *v += b));
            Ok(())
        })
    }
}

/// Each part of a `rows`-row output cut into consecutive column ranges, with the output
/// columns it holds (its width is its length over `rows`).
fn parts_with_columns<'p, 'b>(
    parts: &'p mut [&'b mut [f32]],
    rows: usize,
) -> impl Iterator<Item = (Range<usize>, &'p mut [f32])> + use<'p, 'b> {
    parts.iter_mut().scan(0, move |first, part| {
        let columns = *first..*first + part.len() / rows;
        *first = columns.end;
        Some((columns, &mut **part))
    })
}

/// The widest projection whose parts [`Linear::forward_rows_host_parts`] computes as one
/// product ([`Linear::forward_whole_then_parts`]).
const NARROW_OUTPUT_MOST: usize = 256;

thread_local! {
    /// The whole output of a prefill product cut into parts
    /// ([`Linear::forward_whole_then_parts`]), before its columns go to them.
    static WHOLE_OUTPUT: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
    /// A prefill's activations rounded to bf16 for a product by bf16 weights.
    static ROUNDED: Cell<Vec<bf16>> = const { Cell::new(Vec::new()) };
    /// A q4_0 matrix dequantised to bf16 for a prefill's product.
    static DEQUANTISED: Cell<Vec<bf16>> = const { Cell::new(Vec::new()) };
    /// A prefill piece's projections and the like inside one layer (the mixers'
    /// `forward_host`), reused from layer to layer: no zeroing and no fresh pages per layer.
    pub(crate) static PIECE_SCRATCH: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// Most values a prefill's per-thread scratch ([`WHOLE_OUTPUT`], [`ROUNDED`],
/// [`DEQUANTISED`], [`PIECE_SCRATCH`]) keeps (64 MB of f32: a mamba2-130m layer's
/// intermediates for 2048 tokens, 55 MB); larger buffers are made for the call, so that a
/// thread does not hold on to a model-sized one.
pub(crate) const SCRATCH_MAX: usize = 16 << 20;

/// Runs `f` on `len` values (contents unspecified) of the per-thread `pool` when they fit
/// [`SCRATCH_MAX`], otherwise on a buffer of their own.
pub(crate) fn with_bounded_scratch<T: Copy + Default, R>(
    pool: &'static std::thread::LocalKey<Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    if len <= SCRATCH_MAX {
        with_scratch(pool, len, f)
    } else {
        f(&mut vec![T::default(); len])
    }
}

/// Writes rows `rows` of a matrix stored as bf16 or quantised blocks as f32 into `out: (rows,
/// cols)`, for [`matmul_nt_rows_threaded`].
type WidenRows<'a> = dyn Fn(Range<usize>, &mut [f32]) + Sync + 'a;

/// `x (rows, inp)` times the bf16 weights `w (out, inp)` into the output's parts, on the CPU's
/// bf16 dot products: `x` rounded to bf16 once, as PyTorch and llama.cpp multiply by bf16
/// weights, and the products of bf16 pairs summed in f32 (twice the f32 product's rate on AMD;
/// the weights are read as stored instead of widened). `false`, with nothing written, where
/// they do not pay on this CPU ([`bf16_products_pay`]).
fn bf16_dot_products(
    x: &[f32],
    w: &[bf16],
    (rows, inp): (usize, usize),
    parts: &mut [&mut [f32]],
) -> bool {
    if !bf16_products_pay() {
        return false;
    }
    with_bounded_scratch(&ROUNDED, x.len(), |xb| {
        round_to_bf16(x, xb);
        for (columns, part) in parts_with_columns(parts, rows) {
            let weights = &w[columns.start * inp..columns.end * inp];
            let width = columns.len();
            matmul_bf16_nt((rows, width, inp), part, width, xb, weights);
        }
    });
    true
}

/// [`bf16_dot_products`] by q4_0 weights dequantised to bf16 for the product: a q4_0 value
/// (4 bits times an f16 scale) rounded to bf16 moves by at most 2^-9 of itself, far inside its
/// 4-bit step. (A q8_0 value would move by as much as its own rounding: q8_0 keeps exact
/// weights, on candle's integer kernels or widened.)
fn dequantised_bf16_products(
    x: &[f32],
    q: &QuantMatrix,
    (rows, inp): (usize, usize),
    parts: &mut [&mut [f32]],
) -> bool {
    q.format() == QuantFormat::Q4_0
        && bf16_products_pay()
        && with_bounded_scratch(&DEQUANTISED, q.rows() * q.cols(), |w| {
            q.dequantize_into_bf16(w);
            bf16_dot_products(x, w, (rows, inp), parts)
        })
}

/// `out[i] = v[i]` as f32.
fn widen_bf16(v: &[bf16], out: &mut [f32]) {
    out.iter_mut().zip(v).for_each(|(o, v)| *o = v.to_f32());
}

/// The values of a CPU tensor, borrowed.
#[derive(Debug, Clone, Copy)]
pub enum HostValues<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> HostValues<'a> {
    fn weights(self) -> Weights<'a> {
        match self {
            HostValues::F32(v) => Weights::F32(v),
            HostValues::Bf16(v) => Weights::Bf16(v),
        }
    }
}

/// Runs `f` on the values of a contiguous f32 or bf16 tensor in host memory, without
/// copying them.
pub fn with_host_values<R>(t: &Tensor, f: impl FnOnce(HostValues) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::Input(
            "host slices of a tensor on an accelerator".into(),
        ));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Input("tensor is not contiguous".into()))?;
    match t.dtype() {
        DType::F32 => f(HostValues::F32(&cpu.as_slice::<f32>()?[start..end])),
        DType::BF16 => f(HostValues::Bf16(&cpu.as_slice::<bf16>()?[start..end])),
        other => Err(Error::Input(format!(
            "{other:?} tensors are not read on the host"
        ))),
    }
}

/// Runs `f` on a per-thread buffer of `len` values (contents unspecified) kept from call
/// to call, so that the decoding step allocates nothing once it has run once.
pub fn with_scratch<T: Copy + Default, R>(
    pool: &'static std::thread::LocalKey<std::cell::Cell<Vec<T>>>,
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let mut buf = pool.take();
    if buf.len() < len {
        buf.resize(len, T::default());
    }
    let result = f(&mut buf[..len]);
    pool.set(buf);
    result
}

/// Cuts `buf` into consecutive slices of the given lengths.
fn split_scratch<const N: usize>(mut buf: &mut [f32], lens: [usize; N]) -> [&mut [f32]; N] {
    lens.map(|len| {
        let (head, tail) = std::mem::take(&mut buf).split_at_mut(len);
        buf = tail;
        head
    })
}

/// [`with_scratch`] on consecutive slices of the given lengths, one buffer for them all.
pub fn with_split_scratch<const N: usize, R>(
    pool: &'static std::thread::LocalKey<std::cell::Cell<Vec<f32>>>,
    lens: [usize; N],
    f: impl FnOnce([&mut [f32]; N]) -> R,
) -> R {
    with_scratch(pool, lens.iter().sum(), |buf| f(split_scratch(buf, lens)))
}

/// [`with_bounded_scratch`] on consecutive slices of the given lengths.
pub(crate) fn with_bounded_split_scratch<const N: usize, R>(
    pool: &'static std::thread::LocalKey<Cell<Vec<f32>>>,
    lens: [usize; N],
    f: impl FnOnce([&mut [f32]; N]) -> R,
) -> R {
    with_bounded_scratch(pool, lens.iter().sum(), |buf| f(split_scratch(buf, lens)))
}

/// One new input per channel and sequence through a Mamba mixer's depthwise causal conv
/// with SiLU, on host slices (the decoding step): `x, out: (batch, dim)`, `weight: (dim, W)`,
/// `state: (batch, dim, W-1)` advanced in place.
pub fn conv_step_silu_host(
    state: &mut [f32],
    x: &[f32],
    (weight, bias): (&[f32], Option<&[f32]>),
    (batch, width): (usize, usize),
    out: &mut [f32],
) -> Result<()> {
    let dims = ConvUpdateDims {
        batch,
        dim: weight.len() / width.max(1),
        width,
        state_len: width - 1,
        steps: 1,
    };
    let inputs = ConvUpdateInputs {
        x,
        weight,
        bias,
        silu: true,
    };
    dims.check(state, &inputs)?;
    causal_conv1d_update_into(&dims, state, &inputs, out);
    Ok(())
}

/// Copies columns `[start, start + width)` of each `row_len`-wide row of `src` to `dst`
/// (rows of `width`); a prefill's copies (megabytes per layer) spread over rayon's threads.
pub fn copy_columns(src: &[f32], row_len: usize, start: usize, width: usize, dst: &mut [f32]) {
    let copy_rows = |src: &[f32], dst: &mut [f32]| {
        for (row, out) in src.chunks_exact(row_len).zip(dst.chunks_exact_mut(width)) {
            out.copy_from_slice(&row[start..start + width]);
        }
    };
    let rows_per_task = PARALLEL_COPY_VALUES.div_ceil(width.max(1));
    if dst.len() < 2 * PARALLEL_COPY_VALUES || rayon::current_num_threads() == 1 {
        return copy_rows(src, dst);
    }
    src.par_chunks(rows_per_task * row_len)
        .zip(dst.par_chunks_mut(rows_per_task * width))
        .for_each(|(src, dst)| copy_rows(src, dst));
}

/// Values copied by one task of [`copy_columns`]: enough to outweigh handing the task over.
const PARALLEL_COPY_VALUES: usize = 1 << 16;

/// Token embeddings `(vocab, hidden)`.
#[derive(Debug, Clone)]
pub struct Embedding {
    weight: Tensor,
}

impl Embedding {
    pub fn new(weight: Tensor) -> Self {
        Embedding { weight }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The rows of `ids` written to `out: (ids, hidden)` (host slices, f32).
    pub fn rows_host(&self, ids: &[u32], out: &mut [f32]) -> Result<()> {
        let (vocab, hidden) = self.weight.dims2()?;
        check_ids(ids, vocab)?;
        with_host_values(&self.weight, |w| {
            for (id, row) in ids.iter().zip(out.chunks_exact_mut(hidden)) {
                let at = *id as usize * hidden;
                match w {
                    HostValues::F32(w) => row.copy_from_slice(&w[at..at + hidden]),
                    HostValues::Bf16(w) => row
                        .iter_mut()
                        .zip(&w[at..at + hidden])
                        .for_each(|(v, b)| *v = b.to_f32()),
                }
            }
            Ok(())
        })
    }

    /// Looks up `ids: (batch, len)`, giving `(batch, len, hidden)` in f32. Ids outside the
    /// vocabulary are an input error.
    pub fn forward(&self, ids: &[u32], batch: usize) -> Result<Tensor> {
        check_ids(ids, self.weight.dim(0)?)?;
        if batch == 0 || ids.is_empty() || !ids.len().is_multiple_of(batch) {
            return Err(Error::Input("empty input or ragged batch".into()));
        }
        let index = Tensor::from_slice(ids, ids.len(), self.weight.device())?;
        let rows = self.weight.index_select(&index, 0)?.to_dtype(DType::F32)?;
        Ok(rows.reshape((batch, ids.len() / batch, self.weight.dim(1)?))?)
    }
}

/// An input error for the first id outside a vocabulary of `vocab`.
fn check_ids(ids: &[u32], vocab: usize) -> Result<()> {
    match ids.iter().find(|&&id| id as usize >= vocab) {
        Some(bad) => Err(Error::Input(format!(
            "token id {bad} is out of range for a vocabulary of {vocab}"
        ))),
        None => Ok(()),
    }
}

/// `x / sqrt(mean(x^2) + eps) * weight` over the last dimension (f32), differentiable.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(vb: &VarBuilder, name: &str, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm {
            weight: load_f32(vb, name, &[size])?,
            eps: eps as f32,
        })
    }

    /// The weight `(hidden)`, f32.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn eps(&self) -> f32 {
        self.eps
    }

    /// The norm of each `hidden`-wide row of `x`, written to `out` (host slices).
    pub fn forward_host(&self, x: &[f32], out: &mut [f32]) -> Result<()> {
        let dims = self.dims_for(x.len());
        self.with_f32_weight(|w| Ok(rmsnorm_gated_into(&dims, x, w, None, out)?))
    }

    /// The norm of each row of `x`, in place.
    pub fn normalize_host(&self, x: &mut [f32]) -> Result<()> {
        let dims = self.dims_for(x.len());
        self.with_f32_weight(|w| Ok(rmsnorm_gated_in_place(&dims, x, w, None)?))
    }

    /// The plain RMSNorm's sizes over `len` values: one group per row, no gate.
    fn dims_for(&self, len: usize) -> NormDims {
        let hidden = self.weight.elem_count();
        NormDims {
            rows: len / hidden.max(1),
            hidden,
            group_size: hidden,
            eps: self.eps,
            norm_before_gate: true,
        }
    }

    /// `f` on the weight's host values (a norm's weight stays f32 in every weight format).
    fn with_f32_weight(&self, f: impl FnOnce(&[f32]) -> Result<()>) -> Result<()> {
        with_host_values(&self.weight, |w| match w {
            HostValues::F32(w) => f(w),
            HostValues::Bf16(_) => Err(Error::Input("norm weights must be f32".into())),
        })
    }

    /// One group over the whole last dimension, no gate: the plain RMSNorm.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let hidden = self.weight.elem_count();
        Ok(mamba_ops::tensor::rmsnorm_gated(
            x,
            &self.weight,
            None,
            hidden,
            self.eps,
            true,
        )?)
    }
}

/// RMSNorm without a weight over the last dimension (FalconMamba's B, C, Δ norms).
pub fn rms_normalize(x: &Tensor, eps: f64) -> Result<Tensor> {
    let mean_sq = x.sqr()?.mean_keepdim(D::Minus1)?;
    Ok(x.broadcast_div(&(mean_sq + eps)?.sqrt()?)?)
}

/// The values of a tensor as a contiguous f32 vector.
pub fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// A small parameter (A_log, D, biases, conv weights, norm weights) as an f32 tensor of
/// `shape`; it stays a training variable when the builder holds variables.
pub fn load_f32(vb: &VarBuilder, name: &str, shape: &[usize]) -> Result<Tensor> {
    Ok(vb.to_dtype(DType::F32).get(shape, name)?)
}

/// Columns `[start, start + width)` of the last dimension.
pub fn columns(t: &Tensor, start: usize, width: usize) -> Result<Tensor> {
    Ok(t.narrow(D::Minus1, start, width)?)
}

/// `(b, L, C)` → `(b, C, L)` and back, contiguous.
pub fn swap_time_channels(t: &Tensor) -> Result<Tensor> {
    Ok(t.transpose(1, 2)?.contiguous()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mamba_testing::{lcg_values, max_abs_diff};

    /// The output's columns `[first, first + width)` of each `out`-wide row.
    fn column_range(y: &[f32], out: usize, first: usize, width: usize) -> Vec<f32> {
        y.chunks(out)
            .flat_map(|row| row[first..first + width].iter().copied())
            .collect()
    }

    /// Each part of a split projection equals its columns of the whole product through
    /// the tensors (bias included), for a few rows (matrix-vector kernels) and many (GEMM),
    /// dense and quantised weights, narrow projections (one product, then its columns) and
    /// wide ones (a product per part). The activations are bf16 values, which the product by
    /// bf16 weights on bf16 dot instructions takes exactly; q4_0 weights there are rounded to
    /// bf16, by at most 2^-9 of each weight.
    #[test]
    fn projection_parts_are_the_columns_of_the_whole_product() {
        let wide = NARROW_OUTPUT_MOST + 25;
        for (out, widths) in [(40, [7, 25, 8]), (wide + 15, [7, wide, 8])] {
            parts_are_the_columns_of_the_whole_product(out, widths);
        }
    }

    fn parts_are_the_columns_of_the_whole_product(out: usize, widths: [usize; 3]) {
        let inp = 64;
        let weight = Tensor::from_vec(lcg_values(out * inp, 3), (out, inp), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(lcg_values(out, 4), out, &Device::Cpu).unwrap();
        let formats = [
            WeightFormat::F32,
            WeightFormat::Bf16,
            WeightFormat::Q8_0,
            WeightFormat::Q4_0,
        ];
        for format in formats {
            let mut linear = Linear::new(weight.clone(), Some(bias.clone()));
            linear.convert(format).unwrap();
            for rows in [3, GEMV_MAX_ROWS + 21] {
                let x: Vec<f32> = lcg_values(rows * inp, 5)
                    .into_iter()
                    .map(|v| bf16::from_f32(v).to_f32())
                    .collect();
                let want = f32_vec(
                    &linear
                        .forward(&Tensor::from_slice(&x, (rows, inp), &Device::Cpu).unwrap())
                        .unwrap(),
                )
                .unwrap();
                let mut parts = widths.map(|w| vec![0.0f32; rows * w]);
                let mut views: Vec<&mut [f32]> = parts.iter_mut().map(|p| &mut p[..]).collect();
                linear.forward_rows_host_parts(&x, &mut views).unwrap();
                let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let tol = match format {
                    WeightFormat::Q4_0 => 5e-3 * scale,
                    _ => 1e-4,
                };
                let mut first = 0;
                for (part, width) in parts.iter().zip(widths) {
                    let diff = max_abs_diff(part, &column_range(&want, out, first, width));
                    assert!(
                        diff < tol,
                        "{format:?}, {rows} rows, columns from {first}: differ by {diff}"
                    );
                    first += width;
                }
            }
        }
    }

    /// A q8_0 projection wide enough for candle's integer kernels, and too wide to be one
    /// narrow product (296 rows: 288 on them, 8 widened; a part across the boundary) gives
    /// its parts, and its unsplit output, the dequantised product's columns but for the
    /// activations' 8-bit rounding.
    #[test]
    fn an_int8_prefill_projection_fills_its_parts() {
        let (out, inp, widths, rows) = (296, 512, [7, 286, 3], GEMV_MAX_ROWS + 21);
        assert!(out > NARROW_OUTPUT_MOST);
        let weight = Tensor::from_vec(lcg_values(out * inp, 6), (out, inp), &Device::Cpu).unwrap();
        let bias = Tensor::from_vec(lcg_values(out, 7), out, &Device::Cpu).unwrap();
        let mut linear = Linear::new(weight, Some(bias.clone()));
        linear.convert(WeightFormat::Q8_0).unwrap();
        let dequantised = Linear::new(linear.dense_f32().unwrap(), Some(bias));
        let x = lcg_values(rows * inp, 8);
        let mut want = vec![0.0f32; rows * out];
        dequantised.forward_rows_host(&x, &mut want).unwrap();
        let mut parts = widths.map(|w| vec![0.0f32; rows * w]);
        let mut views: Vec<&mut [f32]> = parts.iter_mut().map(|p| &mut p[..]).collect();
        linear.forward_rows_host_parts(&x, &mut views).unwrap();
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut first = 0;
        for (part, width) in parts.iter().zip(widths) {
            let diff = max_abs_diff(part, &column_range(&want, out, first, width));
            assert!(
                diff < 1e-2 * scale,
                "columns from {first}: differ by {diff} (largest value {scale})"
            );
            first += width;
        }
        // Unsplit, the product goes straight to the output.
        let mut whole = vec![0.0f32; rows * out];
        linear.forward_rows_host(&x, &mut whole).unwrap();
        let diff = max_abs_diff(&whole, &want);
        assert!(diff < 1e-2 * scale, "whole output: differs by {diff}");
    }
}
