//! Backward passes: reference and fast, against the golden gradients in
//! ../shared/fixtures/ops/*/grads.safetensors, against finite differences (gated RMSNorm,
//! which has no fixture gradients), and fast against reference on larger random problems.

mod common;

use common::{random, usize_param, ConvFixture, RandomScan, ScanFixture, SsdFixture};
use mamba_ops::causal_conv1d::*;
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::rmsnorm_gated::*;
use mamba_ops::selective_scan::*;
use mamba_ops::ssd::*;
use mamba_testing::{assert_close, read_safetensors, tolerance, Case, Tensor};
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::HashMap;

/// The gradient tolerance the issue states, used between the fast and reference paths.
/// (Against the fixtures both paths pass the manifests' tighter recommended tolerances.)
const GRAD_TOL: f64 = 5e-4;

/// The fixture gradients of a case, `grads.safetensors`.
fn fixture_grads(case: &Case) -> HashMap<String, Tensor> {
    read_safetensors(&case.dir.join("grads.safetensors"))
}

/// Checks every `grad_*` tensor of a case against `got(input name)`, within the manifest's
/// recommended tolerance for that gradient.
fn assert_grads(case: &Case, label: &str, got: impl Fn(&str) -> Option<Vec<f32>>) {
    let want = fixture_grads(case);
    let mut names: Vec<&String> = want.keys().collect();
    names.sort();
    for name in names {
        let input = name.strip_prefix("grad_").expect("grad_ prefix");
        let got = got(input).unwrap_or_else(|| panic!("{label}: no gradient for {input}"));
        let tol = tolerance(&case.manifest, name);
        let where_ = format!("{} {label} {name}", case.dir.display());
        assert_close(&where_, &got, &want[name].data, tol);
    }
}

// ----------------------------------------------------------------------------- scan

fn scan_grad<'a>(g: &'a ScanGrads, input: &str) -> Option<&'a Vec<f32>> {
    match input {
        "u" => Some(&g.u),
        "delta" => Some(&g.delta),
        "A" => Some(&g.a),
        "B" => Some(&g.b),
        "C" => Some(&g.c),
        "D" => g.d.as_ref(),
        "z" => g.z.as_ref(),
        "delta_bias" => g.delta_bias.as_ref(),
        "initial_state" => g.initial_state.as_ref(),
        _ => None,
    }
}

#[test]
fn scan_backward_matches_fixtures() {
    for name in Case::names("selective_scan") {
        let case = Case::op("selective_scan", &name);
        let fixture = ScanFixture::load(&case);
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        let (proj_out, proj_last) = (case.input("proj_out"), case.input("proj_last_state"));
        for (label, run) in [
            (
                "reference",
                selective_scan_backward_reference as ScanBackward,
            ),
            ("fast", selective_scan_backward),
        ] {
            let g = run(&dims, &inputs, &proj_out, Some(&proj_last)).unwrap();
            assert_eq!(
                g.d.is_some(),
                fixture.d.is_some(),
                "{label}: D grad presence"
            );
            assert_eq!(
                g.z.is_some(),
                fixture.z.is_some(),
                "{label}: z grad presence"
            );
            assert!(g.initial_state.is_none(), "{label}: no initial state given");
            assert_grads(&case, label, |input| scan_grad(&g, input).cloned());
        }
    }
}

type ScanBackward =
    fn(&ScanDims, &ScanInputs, &[f32], Option<&[f32]>) -> mamba_ops::Result<ScanGrads>;

// ----------------------------------------------------------------------------- conv

type ConvBackward =
    fn(&ConvDims, &ConvInputs, &[f32], Option<&[f32]>) -> mamba_ops::Result<ConvGrads>;

#[test]
fn conv_backward_matches_fixtures() {
    for name in Case::names("causal_conv1d") {
        let case = Case::op("causal_conv1d", &name);
        let fixture = ConvFixture::load(&case);
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        let proj_out = case.input("proj_out");
        for (label, run) in [
            (
                "reference",
                causal_conv1d_backward_reference as ConvBackward,
            ),
            ("fast", causal_conv1d_backward),
        ] {
            let g = run(&dims, &inputs, &proj_out, None).unwrap();
            assert_eq!(
                g.bias.is_some(),
                fixture.bias.is_some(),
                "{label}: bias grad presence"
            );
            assert_eq!(
                g.initial_states.is_some(),
                fixture.initial_states.is_some(),
                "{label}: init grad"
            );
            assert_grads(&case, label, |input| match input {
                "x" => Some(g.x.clone()),
                "weight" => Some(g.weight.clone()),
                "bias" => g.bias.clone(),
                "initial_states" => g.initial_states.clone(),
                _ => None,
            });
        }
    }
}

// ----------------------------------------------------------------------------- ssd

type SsdBackward = fn(&SsdDims, &SsdInputs, &[f32], Option<&[f32]>) -> mamba_ops::Result<SsdGrads>;

fn ssd_grad<'a>(g: &'a SsdGrads, input: &str) -> Option<&'a Vec<f32>> {
    match input {
        "x" => Some(&g.x),
        "dt" => Some(&g.dt),
        "A" => Some(&g.a),
        "B" => Some(&g.b),
        "C" => Some(&g.c),
        "D" => g.d.as_ref(),
        "z" => g.z.as_ref(),
        "dt_bias" => g.dt_bias.as_ref(),
        "initial_states" => g.initial_states.as_ref(),
        _ => None,
    }
}

#[test]
fn ssd_backward_matches_fixtures() {
    for name in Case::names("ssd") {
        let case = Case::op("ssd", &name);
        let fixture = SsdFixture::load(&case, usize_param(&case, "grad_chunk_size"));
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        let (proj_y, proj_final) = (case.input("proj_y"), case.input("proj_final_state"));
        for (label, run) in [
            ("reference", ssd_backward_reference as SsdBackward),
            ("fast", ssd_backward),
        ] {
            let g = run(&dims, &inputs, &proj_y, Some(&proj_final)).unwrap();
            assert_eq!(
                g.d.is_some(),
                fixture.d.is_some(),
                "{label}: D grad presence"
            );
            assert_eq!(
                g.z.is_some(),
                fixture.z.is_some(),
                "{label}: z grad presence"
            );
            assert_eq!(
                g.initial_states.is_some(),
                fixture.initial_states.is_some(),
                "{label}: init grad"
            );
            assert_grads(&case, label, |input| ssd_grad(&g, input).cloned());
        }
    }
}

// ----------------------------------------------------------------------------- fast vs reference

/// Asserts two gradients agree within [`GRAD_TOL`] (absolute and relative).
fn assert_same(label: &str, got: &[f32], want: &[f32]) {
    let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
    assert_close(label, got, &want, (GRAD_TOL, GRAD_TOL));
}

/// [`assert_same`] for optional gradients, which must be present in both or neither.
fn assert_same_optional(label: &str, got: &Option<Vec<f32>>, want: &Option<Vec<f32>>) {
    match (got, want) {
        (Some(g), Some(w)) => assert_same(label, g, w),
        (None, None) => {}
        _ => panic!("{label}: present in one gradient only"),
    }
}

struct ScanData {
    scan: RandomScan,
    /// A positive Δ used as it is (no softplus).
    delta_plain: Vec<f32>,
    grad_out: Vec<f32>,
    grad_last: Vec<f32>,
}

impl ScanData {
    fn random(rng: &mut StdRng, dims: &ScanDims) -> Self {
        let (b, d, l, n) = (dims.batch, dims.dim, dims.len, dims.state);
        ScanData {
            scan: RandomScan::new(rng, dims),
            delta_plain: random(rng, b * d * l, 0.01, 0.5),
            grad_out: random(rng, b * d * l, -1.0, 1.0),
            grad_last: random(rng, b * d * n, -1.0, 1.0),
        }
    }

    /// Every optional input given when `full`, none (and no softplus) otherwise.
    fn inputs(&self, full: bool) -> ScanInputs<'_> {
        if full {
            return self.scan.inputs();
        }
        ScanInputs {
            delta: &self.delta_plain,
            d: None,
            z: None,
            delta_bias: None,
            delta_softplus: false,
            initial_state: None,
            ..self.scan.inputs()
        }
    }
}

fn assert_scan_grads_same(label: &str, got: &ScanGrads, want: &ScanGrads) {
    assert_same(&format!("{label} u"), &got.u, &want.u);
    assert_same(&format!("{label} delta"), &got.delta, &want.delta);
    assert_same(&format!("{label} A"), &got.a, &want.a);
    assert_same(&format!("{label} B"), &got.b, &want.b);
    assert_same(&format!("{label} C"), &got.c, &want.c);
    assert_same_optional(&format!("{label} D"), &got.d, &want.d);
    assert_same_optional(&format!("{label} z"), &got.z, &want.z);
    assert_same_optional(
        &format!("{label} delta_bias"),
        &got.delta_bias,
        &want.delta_bias,
    );
    let h0 = (&got.initial_state, &want.initial_state);
    assert_same_optional(&format!("{label} initial_state"), h0.0, h0.1);
}

#[test]
fn fast_scan_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    for bc in [
        BcForm::Varying { groups: 1 },
        BcForm::Varying { groups: 4 },
        BcForm::TimeInvariant,
    ] {
        for (state, full) in [(16, true), (5, true), (8, false)] {
            let dims = ScanDims {
                batch: 2,
                dim: 24,
                len: 150,
                state,
                bc,
            };
            let data = ScanData::random(&mut rng, &dims);
            let inputs = data.inputs(full);
            let grad_last = full.then_some(&data.grad_last[..]);
            let want = selective_scan_backward_reference(&dims, &inputs, &data.grad_out, grad_last)
                .unwrap();
            let got = selective_scan_backward(&dims, &inputs, &data.grad_out, grad_last).unwrap();
            assert_scan_grads_same(&format!("{bc:?} N={state} full={full}"), &got, &want);
        }
    }
}

#[test]
fn fast_conv_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(12);
    for (width, len, full) in [
        (4, 40, true),
        (3, 40, false),
        (4, 2, true),
        (2, 17, true),
        (1, 9, true),
    ] {
        let dims = ConvDims {
            batch: 2,
            dim: 10,
            len,
            width,
        };
        let rows = dims.batch * dims.dim;
        let x = random(&mut rng, rows * len, -1.0, 1.0);
        let weight = random(&mut rng, dims.dim * width, -1.0, 1.0);
        let bias = random(&mut rng, dims.dim, -1.0, 1.0);
        let init = random(&mut rng, rows * (width - 1), -1.0, 1.0);
        let grad_out = random(&mut rng, rows * len, -1.0, 1.0);
        let grad_final = random(&mut rng, rows * (width - 1), -1.0, 1.0);
        let inputs = ConvInputs {
            x: &x,
            weight: &weight,
            bias: full.then_some(&bias[..]),
            initial_states: full.then_some(&init[..]),
            silu: full,
        };
        let grad_final = full.then_some(&grad_final[..]);
        let want = causal_conv1d_backward_reference(&dims, &inputs, &grad_out, grad_final).unwrap();
        let got = causal_conv1d_backward(&dims, &inputs, &grad_out, grad_final).unwrap();
        let label = format!("W={width} L={len} full={full}");
        assert_same(&format!("{label} x"), &got.x, &want.x);
        assert_same(&format!("{label} weight"), &got.weight, &want.weight);
        assert_same_optional(&format!("{label} bias"), &got.bias, &want.bias);
        let init = (&got.initial_states, &want.initial_states);
        assert_same_optional(&format!("{label} initial_states"), init.0, init.1);
    }
}

/// With a linear convolution the gradient of the final states flows straight to the
/// inputs they copy.
#[test]
fn conv_final_state_gradient_reaches_the_copied_inputs() {
    let dims = ConvDims {
        batch: 1,
        dim: 1,
        len: 2,
        width: 4,
    };
    let (x, weight, init) = ([1.0, 2.0], [0.0; 4], [3.0, 4.0, 5.0]);
    let inputs = ConvInputs {
        x: &x,
        weight: &weight,
        bias: None,
        initial_states: Some(&init),
        silu: false,
    };
    // final_states = [init[2], x[0], x[1]].
    let g = causal_conv1d_backward(&dims, &inputs, &[0.0, 0.0], Some(&[10.0, 20.0, 30.0])).unwrap();
    assert_eq!(g.x, vec![20.0, 30.0]);
    assert_eq!(g.initial_states, Some(vec![0.0, 0.0, 10.0]));
}

struct SsdData {
    x: Vec<f32>,
    dt: Vec<f32>,
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    d_head: Vec<f32>,
    d_head_p: Vec<f32>,
    z: Vec<f32>,
    bias: Vec<f32>,
    init: Vec<f32>,
    grad_y: Vec<f32>,
    grad_final: Vec<f32>,
}

impl SsdData {
    fn random(rng: &mut StdRng, dims: &SsdDims) -> Self {
        let (b, l, h, p, g, n) = (
            dims.batch,
            dims.len,
            dims.heads,
            dims.head_dim,
            dims.groups,
            dims.state,
        );
        SsdData {
            x: random(rng, b * l * h * p, -1.0, 1.0),
            dt: random(rng, b * l * h, -3.0, 1.0),
            a: random(rng, h, -3.0, -0.2),
            b: random(rng, b * l * g * n, -1.0, 1.0),
            c: random(rng, b * l * g * n, -1.0, 1.0),
            d_head: random(rng, h, -1.0, 1.0),
            d_head_p: random(rng, h * p, -1.0, 1.0),
            z: random(rng, b * l * h * p, -2.0, 2.0),
            bias: random(rng, h, -1.0, 0.5),
            init: random(rng, b * h * p * n, -1.0, 1.0),
            grad_y: random(rng, b * l * h * p, -1.0, 1.0),
            grad_final: random(rng, b * h * p * n, -1.0, 1.0),
        }
    }
}

fn assert_ssd_grads_same(label: &str, got: &SsdGrads, want: &SsdGrads) {
    assert_same(&format!("{label} x"), &got.x, &want.x);
    assert_same(&format!("{label} dt"), &got.dt, &want.dt);
    assert_same(&format!("{label} A"), &got.a, &want.a);
    assert_same(&format!("{label} B"), &got.b, &want.b);
    assert_same(&format!("{label} C"), &got.c, &want.c);
    assert_same_optional(&format!("{label} D"), &got.d, &want.d);
    assert_same_optional(&format!("{label} z"), &got.z, &want.z);
    assert_same_optional(&format!("{label} dt_bias"), &got.dt_bias, &want.dt_bias);
    let init = (&got.initial_states, &want.initial_states);
    assert_same_optional(&format!("{label} initial_states"), init.0, init.1);
}

#[test]
fn fast_ssd_backward_matches_reference_at_every_chunk_size() {
    let mut rng = StdRng::seed_from_u64(13);
    let base = SsdDims {
        batch: 2,
        len: 70,
        heads: 6,
        head_dim: 8,
        groups: 2,
        state: 16,
        chunk_size: 1,
    };
    let data = SsdData::random(&mut rng, &base);
    // Every optional input, D per (head, p), and a Δ clamp that bites at both ends.
    let full = SsdInputs {
        x: &data.x,
        dt: &data.dt,
        a: &data.a,
        b: &data.b,
        c: &data.c,
        d: Some(&data.d_head_p),
        z: Some(&data.z),
        dt_bias: Some(&data.bias),
        dt_softplus: true,
        dt_limit: (0.05, 0.8),
        initial_states: Some(&data.init),
    };
    let want = ssd_backward_reference(&base, &full, &data.grad_y, Some(&data.grad_final)).unwrap();
    let clamped = data
        .dt
        .iter()
        .enumerate()
        .filter(|&(i, &raw)| {
            let v = raw + data.bias[i % base.heads];
            let dt = v.exp().ln_1p();
            !(0.05..=0.8).contains(&dt)
        })
        .map(|(i, _)| i)
        .collect::<Vec<_>>();
    assert!(clamped.len() > 20, "the clamp should be active somewhere");
    for q in [1, 7, 16, 64, 256] {
        let dims = SsdDims {
            chunk_size: q,
            ..base
        };
        let got = ssd_backward(&dims, &full, &data.grad_y, Some(&data.grad_final)).unwrap();
        assert_ssd_grads_same(&format!("chunk {q}"), &got, &want);
        assert!(clamped
            .iter()
            .all(|&i| got.dt[i] == 0.0 && want.dt[i] == 0.0));
    }
    // No optional input, D per head, Δ used as it is (positive), a single group.
    let dt_plain: Vec<f32> = data.dt.iter().map(|v| (v + 3.0) / 8.0 + 0.01).collect();
    let bare_dims = SsdDims {
        groups: 1,
        chunk_size: 16,
        ..base
    };
    let (b1, c1) = (&data.b[..data.b.len() / 2], &data.c[..data.c.len() / 2]);
    for d in [None, Some(&data.d_head[..])] {
        let bare = SsdInputs {
            dt: &dt_plain,
            b: b1,
            c: c1,
            d,
            z: None,
            dt_bias: None,
            dt_softplus: false,
            dt_limit: NO_DT_LIMIT,
            initial_states: None,
            ..full
        };
        let want = ssd_backward_reference(&bare_dims, &bare, &data.grad_y, None).unwrap();
        let got = ssd_backward(&bare_dims, &bare, &data.grad_y, None).unwrap();
        assert_ssd_grads_same(&format!("bare, D {}", d.is_some()), &got, &want);
    }
}

/// The scan is linear in its initial state, so a finite difference of the forward checks
/// the initial state's gradient (which the fixtures do not cover) exactly, up to rounding.
#[test]
fn scan_initial_state_gradient_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(14);
    let dims = ScanDims {
        batch: 2,
        dim: 3,
        len: 12,
        state: 4,
        bc: BcForm::Varying { groups: 1 },
    };
    let data = ScanData::random(&mut rng, &dims);
    let loss = |h0: &[f32]| -> f64 {
        let inputs = ScanInputs {
            initial_state: Some(h0),
            ..data.inputs(true)
        };
        let y = selective_scan_reference(&dims, &inputs).unwrap();
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(&a, &b)| a as f64 * b as f64).sum()
        };
        dot(&y.out, &data.grad_out) + dot(&y.last_state, &data.grad_last)
    };
    for run in [
        selective_scan_backward_reference as ScanBackward,
        selective_scan_backward,
    ] {
        let g = run(
            &dims,
            &data.inputs(true),
            &data.grad_out,
            Some(&data.grad_last),
        )
        .unwrap();
        let g0 = g.initial_state.unwrap();
        for k in 0..data.scan.h0.len() {
            let (mut up, mut down) = (data.scan.h0.clone(), data.scan.h0.clone());
            up[k] += 0.5;
            down[k] -= 0.5;
            let fd = loss(&up) - loss(&down);
            assert!(
                (g0[k] as f64 - fd).abs() < 1e-4 * (1.0 + fd.abs()),
                "h0[{k}]: {} vs {fd}",
                g0[k]
            );
        }
    }
}

// ----------------------------------------------------------------------------- rmsnorm_gated

type NormBackward =
    fn(&NormDims, &[f32], &[f32], Option<&[f32]>, &[f32]) -> mamba_ops::Result<NormGrads>;

/// `sum(out * proj)` of the gated norm, computed in f64 straight from its definition.
fn norm_loss_f64(
    dims: &NormDims,
    x: &[f64],
    weight: &[f64],
    z: Option<&[f64]>,
    proj: &[f32],
) -> f64 {
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let mut v: Vec<f64> = x.to_vec();
    if let (Some(z), false) = (z, dims.norm_before_gate) {
        v.iter_mut().zip(z).for_each(|(v, z)| *v *= silu(*z));
    }
    for group in v.chunks_mut(dims.group_size) {
        let mean_sq = group.iter().map(|a| a * a).sum::<f64>() / group.len() as f64;
        let inv = 1.0 / (mean_sq + dims.eps as f64).sqrt();
        group.iter_mut().for_each(|a| *a *= inv);
    }
    let mut loss = 0.0;
    for (i, v) in v.iter().enumerate() {
        let gate = match (z, dims.norm_before_gate) {
            (Some(z), true) => silu(z[i]),
            _ => 1.0,
        };
        loss += v * weight[i % dims.hidden] * gate * proj[i] as f64;
    }
    loss
}

/// Central differences of [`norm_loss_f64`] with respect to one input (`which`: 0 = x,
/// 1 = weight, 2 = z).
fn norm_fd(
    dims: &NormDims,
    x: &[f32],
    weight: &[f32],
    z: Option<&[f32]>,
    proj: &[f32],
    which: usize,
) -> Vec<f64> {
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&a| a as f64).collect() };
    let mut inputs = [wide(x), wide(weight), z.map_or_else(Vec::new, wide)];
    let h = 1e-5;
    (0..inputs[which].len())
        .map(|k| {
            let at = inputs[which][k];
            let eval = |v: f64, inputs: &mut [Vec<f64>; 3]| {
                inputs[which][k] = v;
                let z = z.map(|_| &inputs[2][..]);
                norm_loss_f64(dims, &inputs[0], &inputs[1], z, proj)
            };
            let fd = (eval(at + h, &mut inputs) - eval(at - h, &mut inputs)) / (2.0 * h);
            inputs[which][k] = at;
            fd
        })
        .collect()
}

#[test]
fn norm_backward_matches_finite_differences() {
    let mut rng = StdRng::seed_from_u64(15);
    for (gated, norm_before_gate, group_size) in
        [(true, false, 8), (true, true, 16), (false, false, 4)]
    {
        let dims = NormDims {
            rows: 5,
            hidden: 16,
            group_size,
            eps: 1e-5,
            norm_before_gate,
        };
        let n = dims.rows * dims.hidden;
        let x = random(&mut rng, n, -2.0, 2.0);
        let weight = random(&mut rng, dims.hidden, 0.5, 1.5);
        let z = random(&mut rng, n, -3.0, 3.0);
        let proj = random(&mut rng, n, -1.0, 1.0);
        let z = gated.then_some(&z[..]);
        let fd: Vec<Vec<f64>> = (0..if gated { 3 } else { 2 })
            .map(|which| norm_fd(&dims, &x, &weight, z, &proj, which))
            .collect();
        for (label, run) in [
            (
                "reference",
                rmsnorm_gated_backward_reference as NormBackward,
            ),
            ("fast", rmsnorm_gated_backward),
        ] {
            let g = run(&dims, &x, &weight, z, &proj).unwrap();
            let label = format!("{label} gated={gated} norm_before_gate={norm_before_gate}");
            assert_close(&format!("{label} x"), &g.x, &fd[0], (1e-5, 1e-4));
            assert_close(&format!("{label} weight"), &g.weight, &fd[1], (1e-5, 1e-4));
            assert_eq!(g.z.is_some(), gated, "{label}: z grad presence");
            if let Some(gz) = &g.z {
                assert_close(&format!("{label} z"), gz, &fd[2], (1e-5, 1e-4));
            }
        }
    }
}

#[test]
fn fast_norm_backward_matches_reference() {
    let mut rng = StdRng::seed_from_u64(16);
    for (gated, norm_before_gate, group_size) in
        [(true, false, 64), (true, true, 256), (false, false, 128)]
    {
        let dims = NormDims {
            rows: 67,
            hidden: 256,
            group_size,
            eps: 1e-6,
            norm_before_gate,
        };
        let n = dims.rows * dims.hidden;
        let x = random(&mut rng, n, -2.0, 2.0);
        let weight = random(&mut rng, dims.hidden, 0.5, 1.5);
        let z = random(&mut rng, n, -3.0, 3.0);
        let grad = random(&mut rng, n, -1.0, 1.0);
        let z = gated.then_some(&z[..]);
        let want = rmsnorm_gated_backward_reference(&dims, &x, &weight, z, &grad).unwrap();
        let got = rmsnorm_gated_backward(&dims, &x, &weight, z, &grad).unwrap();
        let label = format!("gated={gated} norm_before_gate={norm_before_gate}");
        assert_same(&format!("{label} x"), &got.x, &want.x);
        assert_same(&format!("{label} weight"), &got.weight, &want.weight);
        assert_same_optional(&format!("{label} z"), &got.z, &want.z);
    }
}

// ----------------------------------------------------------------------------- shapes

#[test]
fn wrong_gradient_lengths_are_errors_not_panics() {
    let v = vec![0.5f32; 64];
    let scan_dims = ScanDims {
        batch: 1,
        dim: 2,
        len: 3,
        state: 2,
        bc: BcForm::Varying { groups: 1 },
    };
    let scan = ScanInputs {
        u: &v[..6],
        delta: &v[..6],
        a: &v[..4],
        b: &v[..6],
        c: &v[..6],
        d: None,
        z: None,
        delta_bias: None,
        delta_softplus: true,
        initial_state: None,
    };
    for run in [
        selective_scan_backward_reference as ScanBackward,
        selective_scan_backward,
    ] {
        let err = run(&scan_dims, &scan, &v[..5], None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("grad_out has 5 elements, expected 6"), "{err}");
        assert!(run(&scan_dims, &scan, &v[..6], Some(&v[..3])).is_err());
        let bad_input = ScanInputs { a: &v[..3], ..scan };
        assert!(run(&scan_dims, &bad_input, &v[..6], None).is_err());
    }
    let conv_dims = ConvDims {
        batch: 1,
        dim: 2,
        len: 3,
        width: 3,
    };
    let conv = ConvInputs {
        x: &v[..6],
        weight: &v[..6],
        bias: None,
        initial_states: None,
        silu: true,
    };
    for run in [
        causal_conv1d_backward_reference as ConvBackward,
        causal_conv1d_backward,
    ] {
        assert!(run(&conv_dims, &conv, &v[..7], None).is_err());
        let err = run(&conv_dims, &conv, &v[..6], Some(&v[..3]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grad_final_states has 3 elements, expected 4"),
            "{err}"
        );
    }
    let ssd_dims = SsdDims {
        batch: 1,
        len: 2,
        heads: 2,
        head_dim: 2,
        groups: 1,
        state: 2,
        chunk_size: 2,
    };
    let ssd = SsdInputs {
        x: &v[..8],
        dt: &v[..4],
        a: &v[..2],
        b: &v[..4],
        c: &v[..4],
        d: Some(&v[..3]),
        z: None,
        dt_bias: None,
        dt_softplus: true,
        dt_limit: NO_DT_LIMIT,
        initial_states: None,
    };
    for run in [ssd_backward_reference as SsdBackward, ssd_backward] {
        assert!(run(&ssd_dims, &ssd, &v[..8], None).is_err(), "D of 3");
        let ok = SsdInputs {
            d: Some(&v[..2]),
            ..ssd
        };
        assert!(run(&ssd_dims, &ok, &v[..8], None).is_ok());
        assert!(run(&ssd_dims, &ok, &v[..9], None).is_err());
        let err = run(&ssd_dims, &ok, &v[..8], Some(&v[..7]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("grad_final_state has 7 elements, expected 8"),
            "{err}"
        );
    }
    let norm_dims = NormDims {
        rows: 2,
        hidden: 4,
        group_size: 4,
        eps: 1e-5,
        norm_before_gate: false,
    };
    for run in [
        rmsnorm_gated_backward_reference as NormBackward,
        rmsnorm_gated_backward,
    ] {
        assert!(run(&norm_dims, &v[..8], &v[..4], None, &v[..7]).is_err());
        assert!(run(&norm_dims, &v[..8], &v[..4], Some(&v[..7]), &v[..8]).is_err());
        assert!(run(&norm_dims, &v[..8], &v[..4], None, &v[..8]).is_ok());
    }
}
