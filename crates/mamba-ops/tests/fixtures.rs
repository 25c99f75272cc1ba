//! Every op, reference and fast path, against the golden outputs in ../shared/fixtures/ops.

mod common;

use common::{usize_param, ConvFixture, ScanFixture, SsdFixture};
use mamba_ops::causal_conv1d::*;
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::rmsnorm_gated::*;
use mamba_ops::selective_scan::*;
use mamba_ops::selective_state_update::*;
use mamba_ops::ssd::*;
use mamba_testing::Case;

#[test]
fn selective_scan_matches_fixtures() {
    for name in Case::names("selective_scan") {
        let case = Case::op("selective_scan", &name);
        let fixture = ScanFixture::load(&case);
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        for run in [selective_scan_reference, selective_scan] {
            let got = run(&dims, &inputs).unwrap();
            case.assert_output("out", &got.out);
            case.assert_output("last_state", &got.last_state);
        }
    }
}

#[test]
fn causal_conv1d_matches_fixtures() {
    for name in Case::names("causal_conv1d") {
        let case = Case::op("causal_conv1d", &name);
        let fixture = ConvFixture::load(&case);
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        for run in [causal_conv1d_reference, causal_conv1d] {
            let got = run(&dims, &inputs).unwrap();
            case.assert_output("out", &got.out);
            case.assert_output("final_states", &got.final_states);
        }
    }
}

#[test]
fn causal_conv1d_update_matches_fixtures() {
    for name in Case::names("causal_conv1d_update") {
        let case = Case::op("causal_conv1d_update", &name);
        let (x, weight, bias) = (
            case.input("x"),
            case.input("weight"),
            case.optional_input("bias"),
        );
        let steps = case.param("seqlen").as_u64().map_or(1, |s| s as usize);
        let dims = ConvUpdateDims {
            batch: usize_param(&case, "batch"),
            dim: usize_param(&case, "dim"),
            width: usize_param(&case, "width"),
            state_len: usize_param(&case, "state_len"),
            steps,
        };
        let inputs = ConvUpdateInputs {
            x: &x,
            weight: &weight,
            bias: bias.as_deref(),
            silu: case.param("activation").as_str() == Some("silu"),
        };
        for run in [causal_conv1d_update_reference, causal_conv1d_update] {
            let mut state = case.input("conv_state");
            let out = run(&dims, &mut state, &inputs).unwrap();
            case.assert_output("out", &out);
            case.assert_output("conv_state_out", &state);
        }
    }
}

#[test]
fn selective_state_update_matches_fixtures() {
    for name in Case::names("selective_state_update") {
        let case = Case::op("selective_state_update", &name);
        let batch = usize_param(&case, "batch");
        let state_size = usize_param(&case, "dstate");
        let heads_form = case.param("form").as_str().unwrap().starts_with("heads");
        let full = StepDims {
            batch,
            heads: if heads_form {
                usize_param(&case, "nheads")
            } else {
                usize_param(&case, "dim")
            },
            head_dim: if heads_form {
                usize_param(&case, "headdim")
            } else {
                1
            },
            state: state_size,
            groups: if heads_form {
                usize_param(&case, "ngroups")
            } else {
                1
            },
            per_head: false,
        };
        let (x, dt, a, b, c) = (
            case.input("x"),
            case.input("dt"),
            case.input("A"),
            case.input("B"),
            case.input("C"),
        );
        let (d, z, dt_bias) = (
            case.optional_input("D"),
            case.optional_input("z"),
            case.optional_input("dt_bias"),
        );
        let inputs = StepInputs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d: d.as_deref(),
            z: z.as_deref(),
            dt_bias: dt_bias.as_deref(),
            dt_softplus: case.param("dt_softplus").as_bool().unwrap(),
            dt_limit: NO_DT_LIMIT,
        };
        for run in [selective_state_update_reference, selective_state_update] {
            let mut state = case.input("state");
            let out = run(&full, &mut state, &inputs).unwrap();
            case.assert_output("out", &out);
            case.assert_output("state_out", &state);
        }
        if case.param("tied_per_head").as_bool() == Some(true) {
            // The same step with one value per head, as Mamba-2 models hold them.
            let (h, p) = (full.heads, full.head_dim);
            let per_head =
                |v: &[f32], stride: usize| (0..h).map(|i| v[i * stride]).collect::<Vec<f32>>();
            let a_h = per_head(&a, p * state_size);
            let dt_h: Vec<f32> = (0..batch)
                .flat_map(|bi| per_head(&dt[bi * h * p..], p))
                .collect();
            let d_h = d.as_deref().map(|v| per_head(v, p));
            let bias_h = dt_bias.as_deref().map(|v| per_head(v, p));
            let tied = StepInputs {
                dt: &dt_h,
                a: &a_h,
                d: d_h.as_deref(),
                dt_bias: bias_h.as_deref(),
                ..inputs
            };
            let dims = StepDims {
                per_head: true,
                ..full
            };
            for run in [selective_state_update_reference, selective_state_update] {
                let mut state = case.input("state");
                let out = run(&dims, &mut state, &tied).unwrap();
                case.assert_output("out", &out);
                case.assert_output("state_out", &state);
            }
        }
    }
}

#[test]
fn ssd_matches_fixtures() {
    for name in Case::names("ssd") {
        let case = Case::op("ssd", &name);
        let fixture = SsdFixture::load(&case, 1);
        let (dims, inputs) = (fixture.dims, fixture.inputs());
        let reference = ssd_reference(&dims, &inputs).unwrap();
        case.assert_output("y_seq", &reference.y);
        case.assert_output("final_state_seq", &reference.final_state);
        let no_skip = SsdInputs {
            d: None,
            z: None,
            ..inputs
        };
        for q in case.param("chunk_sizes").as_array().unwrap() {
            let q = q.as_u64().unwrap() as usize;
            let dims = SsdDims {
                chunk_size: q,
                ..dims
            };
            let got = ssd(&dims, &inputs).unwrap();
            case.assert_output(&format!("y_chunked_cs{q}"), &got.y);
            case.assert_output_as("y_seq", &format!("y_chunked_cs{q}"), &got.y);
            case.assert_output(&format!("final_state_chunked_cs{q}"), &got.final_state);
            let raw = ssd(&dims, &no_skip).unwrap();
            case.assert_output(&format!("y_minimal_cs{q}"), &raw.y);
            case.assert_output(&format!("final_state_minimal_cs{q}"), &raw.final_state);
        }
    }
}

#[test]
fn rmsnorm_gated_matches_fixtures() {
    for name in Case::names("rmsnorm_gated") {
        let case = Case::op("rmsnorm_gated", &name);
        let (x, weight, z) = (
            case.input("x"),
            case.input("weight"),
            case.optional_input("z"),
        );
        let hidden = weight.len();
        let dims = NormDims {
            rows: x.len() / hidden,
            hidden,
            group_size: case
                .param("group_size")
                .as_u64()
                .map_or(hidden, |g| g as usize),
            eps: case.param("eps").as_f64().unwrap() as f32,
            norm_before_gate: case.param("norm_before_gate").as_bool().unwrap(),
        };
        for run in [rmsnorm_gated_reference, rmsnorm_gated] {
            let out = run(&dims, &x, &weight, z.as_deref()).unwrap();
            case.assert_output("out", &out);
        }
        // Into a caller's buffer: every value written; a buffer of another length refused.
        let mut out = vec![f32::NAN; x.len()];
        rmsnorm_gated_into(&dims, &x, &weight, z.as_deref(), &mut out).unwrap();
        case.assert_output("out", &out);
        let mut short = vec![0.0; x.len() - 1];
        assert!(rmsnorm_gated_into(&dims, &x, &weight, z.as_deref(), &mut short).is_err());
    }
}
