//! The decoding ops as tensor functions (`tensor::causal_conv1d_update`,
//! `tensor::selective_state_update`) against the golden outputs, and the tensor functions'
//! size checks.

use candle_core::{Device, Tensor};
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::tensor::{self, StepOptions};
use mamba_testing::Case;

fn input(case: &Case, name: &str) -> Option<Tensor> {
    case.inputs.get(name).map(|t| {
        Tensor::from_vec(t.f32(), t.shape.as_slice(), &Device::Cpu).expect("fixture tensor")
    })
}

fn required(case: &Case, name: &str) -> Tensor {
    input(case, name).unwrap_or_else(|| panic!("{}: no input {name}", case.dir.display()))
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn causal_conv1d_update_tensor_matches_fixtures() {
    for name in Case::names("causal_conv1d_update") {
        let case = Case::op("causal_conv1d_update", &name);
        let x = required(&case, "x");
        let (out, state) = tensor::causal_conv1d_update(
            &required(&case, "conv_state"),
            &x,
            &required(&case, "weight"),
            input(&case, "bias").as_ref(),
            case.param("activation").as_str() == Some("silu"),
        )
        .unwrap();
        assert_eq!(out.dims(), x.dims());
        case.assert_output("out", &values(&out));
        case.assert_output("conv_state_out", &values(&state));
    }
}

/// The first value along every axis past `shape.len()`, reshaped to `shape`.
fn leading(t: &Tensor, shape: &[usize]) -> Tensor {
    let mut v = t.clone();
    for axis in shape.len()..t.rank() {
        v = v.narrow(axis, 0, 1).unwrap();
    }
    v.reshape(shape).unwrap()
}

#[test]
fn selective_state_update_tensor_matches_fixtures() {
    for name in Case::names("selective_state_update") {
        let case = Case::op("selective_state_update", &name);
        let (state, x, dt, a) = (
            required(&case, "state"),
            required(&case, "x"),
            required(&case, "dt"),
            required(&case, "A"),
        );
        let (b, c) = (required(&case, "B"), required(&case, "C"));
        let (d, z, dt_bias) = (
            input(&case, "D"),
            input(&case, "z"),
            input(&case, "dt_bias"),
        );
        let opts = StepOptions {
            d: d.as_ref(),
            z: z.as_ref(),
            dt_bias: dt_bias.as_ref(),
            dt_softplus: case.param("dt_softplus").as_bool().unwrap(),
            dt_limit: NO_DT_LIMIT,
        };
        let (y, new_state) =
            tensor::selective_state_update(&state, &x, &dt, &a, &b, &c, opts).unwrap();
        assert_eq!(y.dims(), x.dims());
        assert_eq!(new_state.dims(), state.dims());
        case.assert_output("out", &values(&y));
        case.assert_output("state_out", &values(&new_state));
        if case.param("tied_per_head").as_bool() == Some(true) {
            let (batch, heads) = (x.dim(0).unwrap(), a.dim(0).unwrap());
            let (d_h, bias_h) = (
                d.as_ref().map(|t| leading(t, &[heads])),
                dt_bias.as_ref().map(|t| leading(t, &[heads])),
            );
            let (y, new_state) = tensor::selective_state_update(
                &state,
                &x,
                &leading(&dt, &[batch, heads]),
                &leading(&a, &[heads]),
                &b,
                &c,
                StepOptions {
                    d: d_h.as_ref(),
                    dt_bias: bias_h.as_ref(),
                    ..opts
                },
            )
            .unwrap();
            case.assert_output("out", &values(&y));
            case.assert_output("state_out", &values(&new_state));
        }
    }
}

#[test]
fn tensor_ops_reject_inconsistent_sizes() {
    let cpu = Device::Cpu;
    let zeros = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &cpu).unwrap();
    // A with the wrong state size.
    let scan = tensor::selective_scan(
        &zeros(&[1, 4, 8]),
        &zeros(&[1, 4, 8]),
        &zeros(&[8, 3]),
        &zeros(&[1, 4, 1, 4]),
        &zeros(&[1, 4, 1, 4]),
        tensor::ScanOptions::default(),
    );
    assert!(scan.is_err());
    // Groups that do not divide the heads.
    let ssd = tensor::ssd(
        &zeros(&[1, 4, 3, 2]),
        &zeros(&[1, 4, 3]),
        &zeros(&[3]),
        &zeros(&[1, 4, 2, 4]),
        &zeros(&[1, 4, 2, 4]),
        tensor::SsdOptions::default(),
    );
    assert!(ssd.is_err());
    // A conv state shorter than the window needs.
    let update = tensor::causal_conv1d_update(
        &zeros(&[1, 2, 1]),
        &zeros(&[1, 2]),
        &zeros(&[2, 4]),
        None,
        false,
    );
    assert!(update.is_err());
    // A state update whose B has the wrong state size.
    let step = tensor::selective_state_update(
        &zeros(&[1, 4, 8]),
        &zeros(&[1, 4]),
        &zeros(&[1, 4]),
        &zeros(&[4, 8]),
        &zeros(&[1, 6]),
        &zeros(&[1, 8]),
        StepOptions::default(),
    );
    assert!(step.is_err());
}
