//! Reading the op fixtures of ../shared/fixtures/ops into each op's dims and inputs, and
//! random inputs for sizes the fixtures do not cover, shared by the op test files.
#![allow(dead_code)] // each test file uses its own subset

use mamba_ops::causal_conv1d::{ConvDims, ConvInputs};
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::selective_scan::{BcForm, ScanDims, ScanInputs};
use mamba_ops::ssd::{SsdDims, SsdInputs};
use mamba_testing::Case;
use rand::rngs::StdRng;
use rand::Rng;

/// `n` values drawn uniformly from `[lo, hi)`.
pub fn random(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Random inputs of a selective scan with every optional input, in the ranges a model
/// gives them (negative `A`, Δ around the softplus knee).
pub struct RandomScan {
    pub u: Vec<f32>,
    pub delta: Vec<f32>,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
    pub c: Vec<f32>,
    pub d: Vec<f32>,
    pub z: Vec<f32>,
    pub bias: Vec<f32>,
    pub h0: Vec<f32>,
}

impl RandomScan {
    pub fn new(rng: &mut StdRng, dims: &ScanDims) -> Self {
        let (b, d, l, n) = (dims.batch, dims.dim, dims.len, dims.state);
        let bc = match dims.bc {
            BcForm::Varying { groups } => b * groups * n * l,
            BcForm::TimeInvariant => d * n,
        };
        RandomScan {
            u: random(rng, b * d * l, -1.0, 1.0),
            delta: random(rng, b * d * l, -3.0, 1.0),
            a: random(rng, d * n, -4.0, -0.1),
            b: random(rng, bc, -1.0, 1.0),
            c: random(rng, bc, -1.0, 1.0),
            d: random(rng, d, -1.0, 1.0),
            z: random(rng, b * d * l, -2.0, 2.0),
            bias: random(rng, d, -1.0, 0.5),
            h0: random(rng, b * d * n, -1.0, 1.0),
        }
    }

    /// Every input given, with the softplus.
    pub fn inputs(&self) -> ScanInputs<'_> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: Some(&self.d),
            z: Some(&self.z),
            delta_bias: Some(&self.bias),
            delta_softplus: true,
            initial_state: Some(&self.h0),
        }
    }
}

pub fn usize_param(case: &Case, name: &str) -> usize {
    case.param(name)
        .as_u64()
        .unwrap_or_else(|| panic!("param {name}")) as usize
}

/// A `selective_scan` case: shapes, and inputs with no initial state.
pub struct ScanFixture {
    pub dims: ScanDims,
    u: Vec<f32>,
    delta: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    pub d: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    delta_bias: Option<Vec<f32>>,
    softplus: bool,
}

impl ScanFixture {
    pub fn load(case: &Case) -> Self {
        // B is (d, N) time-invariant, (b, N, L) shared, or (b, G, N, L) grouped.
        let b_shape = &case.inputs["B"].shape;
        let bc = match b_shape.len() {
            2 => BcForm::TimeInvariant,
            3 => BcForm::Varying { groups: 1 },
            _ => BcForm::Varying { groups: b_shape[1] },
        };
        ScanFixture {
            dims: ScanDims {
                batch: usize_param(case, "batch"),
                dim: usize_param(case, "dim"),
                len: usize_param(case, "seqlen"),
                state: usize_param(case, "dstate"),
                bc,
            },
            u: case.input("u"),
            delta: case.input("delta"),
            a: case.input("A"),
            b: case.input("B"),
            c: case.input("C"),
            d: case.optional_input("D"),
            z: case.optional_input("z"),
            delta_bias: case.optional_input("delta_bias"),
            softplus: case.param("delta_softplus").as_bool().unwrap(),
        }
    }

    pub fn inputs(&self) -> ScanInputs<'_> {
        ScanInputs {
            u: &self.u,
            delta: &self.delta,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            delta_bias: self.delta_bias.as_deref(),
            delta_softplus: self.softplus,
            initial_state: None,
        }
    }
}

/// A `causal_conv1d` case.
pub struct ConvFixture {
    pub dims: ConvDims,
    x: Vec<f32>,
    weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub initial_states: Option<Vec<f32>>,
    silu: bool,
}

impl ConvFixture {
    pub fn load(case: &Case) -> Self {
        ConvFixture {
            dims: ConvDims {
                batch: usize_param(case, "batch"),
                dim: usize_param(case, "dim"),
                len: usize_param(case, "seqlen"),
                width: usize_param(case, "width"),
            },
            x: case.input("x"),
            weight: case.input("weight"),
            bias: case.optional_input("bias"),
            initial_states: case.optional_input("initial_states"),
            silu: case.param("activation").as_str() == Some("silu"),
        }
    }

    pub fn inputs(&self) -> ConvInputs<'_> {
        ConvInputs {
            x: &self.x,
            weight: &self.weight,
            bias: self.bias.as_deref(),
            initial_states: self.initial_states.as_deref(),
            silu: self.silu,
        }
    }
}

/// An `ssd` case, run with the given chunk size.
pub struct SsdFixture {
    pub dims: SsdDims,
    x: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    pub d: Option<Vec<f32>>,
    pub z: Option<Vec<f32>>,
    dt_bias: Option<Vec<f32>>,
    pub initial_states: Option<Vec<f32>>,
    softplus: bool,
}

impl SsdFixture {
    pub fn load(case: &Case, chunk_size: usize) -> Self {
        SsdFixture {
            dims: SsdDims {
                batch: usize_param(case, "batch"),
                len: usize_param(case, "seqlen"),
                heads: usize_param(case, "nheads"),
                head_dim: usize_param(case, "headdim"),
                groups: usize_param(case, "ngroups"),
                state: usize_param(case, "dstate"),
                chunk_size,
            },
            x: case.input("x"),
            dt: case.input("dt"),
            a: case.input("A"),
            b: case.input("B"),
            c: case.input("C"),
            d: case.optional_input("D"),
            z: case.optional_input("z"),
            dt_bias: case.optional_input("dt_bias"),
            initial_states: case.optional_input("initial_states"),
            softplus: case.param("dt_softplus").as_bool().unwrap(),
        }
    }

    pub fn inputs(&self) -> SsdInputs<'_> {
        SsdInputs {
            x: &self.x,
            dt: &self.dt,
            a: &self.a,
            b: &self.b,
            c: &self.c,
            d: self.d.as_deref(),
            z: self.z.as_deref(),
            dt_bias: self.dt_bias.as_deref(),
            dt_softplus: self.softplus,
            dt_limit: NO_DT_LIMIT,
            initial_states: self.initial_states.as_deref(),
        }
    }
}
