//! The fast paths against the reference implementations on random inputs of sizes the
//! fixtures do not cover (longer sequences, more channels, initial states, splits).

use mamba_ops::causal_conv1d::*;
use mamba_ops::gemm::Products;
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::selective_scan::*;
use mamba_ops::selective_state_update::*;
use mamba_ops::ssd::*;
use mamba_testing::max_abs_diff;
use rand::rngs::StdRng;
use rand::SeedableRng;

mod common;
use common::{random, RandomScan};

#[test]
fn fast_scan_matches_reference_with_initial_state() {
    let mut rng = StdRng::seed_from_u64(1);
    for bc in [
        BcForm::Varying { groups: 1 },
        BcForm::Varying { groups: 4 },
        BcForm::TimeInvariant,
    ] {
        for state in [16, 5] {
            let dims = ScanDims {
                batch: 2,
                dim: 24,
                len: 300,
                state,
                bc,
            };
            let data = RandomScan::new(&mut rng, &dims);
            let want = selective_scan_reference(&dims, &data.inputs()).unwrap();
            let got = selective_scan(&dims, &data.inputs()).unwrap();
            assert!(max_abs_diff(&got.out, &want.out) < 1e-4, "{bc:?} out");
            assert!(
                max_abs_diff(&got.last_state, &want.last_state) < 1e-5,
                "{bc:?} state"
            );
        }
    }
}

/// Splitting the sequence in two and carrying the state gives the whole-sequence result.
#[test]
fn scan_in_two_pieces_equals_whole() {
    let mut rng = StdRng::seed_from_u64(2);
    let dims = ScanDims {
        batch: 1,
        dim: 8,
        len: 64,
        state: 16,
        bc: BcForm::Varying { groups: 1 },
    };
    let data = RandomScan::new(&mut rng, &dims);
    let whole = selective_scan(
        &dims,
        &ScanInputs {
            initial_state: None,
            ..data.inputs()
        },
    )
    .unwrap();
    let split = 40;
    let piece = |v: &[f32], rows: usize, from: usize, to: usize| -> Vec<f32> {
        v.chunks(dims.len)
            .take(rows)
            .flat_map(|r| r[from..to].to_vec())
            .collect()
    };
    let mut outs = Vec::new();
    let mut state: Option<Vec<f32>> = None;
    for (from, to) in [(0, split), (split, dims.len)] {
        let (u, delta, z) = (
            piece(&data.u, 8, from, to),
            piece(&data.delta, 8, from, to),
            piece(&data.z, 8, from, to),
        );
        let (b, c) = (piece(&data.b, 16, from, to), piece(&data.c, 16, from, to));
        let part = ScanDims {
            len: to - from,
            ..dims
        };
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            z: Some(&z),
            b: &b,
            c: &c,
            initial_state: state.as_deref(),
            ..data.inputs()
        };
        let out = selective_scan(&part, &inputs).unwrap();
        outs.push(out.out);
        state = Some(out.last_state);
    }
    let joined: Vec<f32> = outs[0]
        .chunks(split)
        .zip(outs[1].chunks(dims.len - split))
        .flat_map(|(a, b)| [a, b].concat())
        .collect();
    assert!(max_abs_diff(&joined, &whole.out) < 1e-5);
    assert!(max_abs_diff(state.as_ref().unwrap(), &whole.last_state) < 1e-6);
}

/// Running the one-token step L times reproduces the scan.
#[test]
fn repeated_state_updates_reproduce_the_scan() {
    let mut rng = StdRng::seed_from_u64(3);
    let dims = ScanDims {
        batch: 2,
        dim: 6,
        len: 20,
        state: 8,
        bc: BcForm::Varying { groups: 1 },
    };
    let data = RandomScan::new(&mut rng, &dims);
    let scan = selective_scan(
        &dims,
        &ScanInputs {
            initial_state: None,
            ..data.inputs()
        },
    )
    .unwrap();
    let step = StepDims::mamba1(dims.batch, dims.dim, dims.state);
    let mut state = vec![0.0; 2 * 6 * 8];
    for t in 0..dims.len {
        let at = |v: &[f32]| -> Vec<f32> { v.chunks(dims.len).map(|r| r[t]).collect() };
        let (x, dt, z) = (at(&data.u), at(&data.delta), at(&data.z));
        let (b, c) = (at(&data.b), at(&data.c));
        let inputs = StepInputs {
            x: &x,
            dt: &dt,
            a: &data.a,
            b: &b,
            c: &c,
            d: Some(&data.d),
            z: Some(&z),
            dt_bias: Some(&data.bias),
            dt_softplus: true,
            dt_limit: NO_DT_LIMIT,
        };
        let y = selective_state_update(&step, &mut state, &inputs).unwrap();
        let want: Vec<f32> = scan.out.chunks(dims.len).map(|r| r[t]).collect();
        assert!(max_abs_diff(&y, &want) < 1e-5, "step {t}");
    }
    assert!(max_abs_diff(&state, &scan.last_state) < 1e-6);
}

/// The fast step against the reference where it works in blocks of rows and in several
/// tasks per sequence: Mamba-1's form at a width past one task (with gate, D and Δ bias),
/// and the per-`(head, p)` form with groups (without them).
#[test]
fn fast_state_update_matches_reference_across_blocks_and_tasks() {
    let mut rng = StdRng::seed_from_u64(11);
    let wide = StepDims::mamba1(2, 600, 16);
    let grouped = StepDims {
        batch: 2,
        heads: 6,
        head_dim: 50,
        state: 16,
        groups: 3,
        per_head: false,
    };
    for (dims, extras) in [(wide, true), (grouped, false)] {
        let rows = dims.batch * dims.heads * dims.head_dim;
        let per_seq = dims.heads * dims.head_dim;
        let bc = dims.batch * dims.groups * dims.state;
        let x = random(&mut rng, rows, -1.0, 1.0);
        // Raw Δ around the softplus knee, or already positive when there is no softplus.
        let dt = if extras {
            random(&mut rng, rows, -3.0, 1.0)
        } else {
            random(&mut rng, rows, 0.01, 1.0)
        };
        let a = random(&mut rng, per_seq * dims.state, -2.0, -0.1);
        let (b, c) = (
            random(&mut rng, bc, -1.0, 1.0),
            random(&mut rng, bc, -1.0, 1.0),
        );
        let d = random(&mut rng, per_seq, -1.0, 1.0);
        let z = random(&mut rng, rows, -2.0, 2.0);
        let bias = random(&mut rng, per_seq, -0.5, 0.5);
        let inputs = StepInputs {
            x: &x,
            dt: &dt,
            a: &a,
            b: &b,
            c: &c,
            d: extras.then_some(&d[..]),
            z: extras.then_some(&z[..]),
            dt_bias: extras.then_some(&bias[..]),
            dt_softplus: extras,
            dt_limit: NO_DT_LIMIT,
        };
        let start = random(&mut rng, rows * dims.state, -1.0, 1.0);
        let (mut want_state, mut got_state) = (start.clone(), start);
        let want = selective_state_update_reference(&dims, &mut want_state, &inputs).unwrap();
        let got = selective_state_update(&dims, &mut got_state, &inputs).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-5, "{dims:?} y differs by {diff}");
        assert!(
            max_abs_diff(&got_state, &want_state) < 1e-5,
            "{dims:?} state"
        );
    }
}

#[test]
fn fast_conv_matches_reference_and_update_continues_it() {
    let mut rng = StdRng::seed_from_u64(4);
    for width in [2, 4] {
        let dims = ConvDims {
            batch: 2,
            dim: 10,
            len: 33,
            width,
        };
        let x = random(&mut rng, 2 * 10 * 33, -1.0, 1.0);
        let weight = random(&mut rng, 10 * width, -1.0, 1.0);
        let bias = random(&mut rng, 10, -1.0, 1.0);
        let init = random(&mut rng, 2 * 10 * (width - 1), -1.0, 1.0);
        let inputs = ConvInputs {
            x: &x,
            weight: &weight,
            bias: Some(&bias),
            initial_states: Some(&init),
            silu: true,
        };
        let want = causal_conv1d_reference(&dims, &inputs).unwrap();
        let got = causal_conv1d(&dims, &inputs).unwrap();
        assert!(max_abs_diff(&got.out, &want.out) < 1e-6);
        assert_eq!(got.final_states, want.final_states);
        // Decoding 3 more inputs from the final state equals convolving the longer sequence.
        let more = random(&mut rng, 2 * 10 * 3, -1.0, 1.0);
        let mut state = got.final_states.clone();
        let upd = ConvUpdateDims {
            batch: 2,
            dim: 10,
            width,
            state_len: width - 1,
            steps: 3,
        };
        let upd_in = ConvUpdateInputs {
            x: &more,
            weight: &weight,
            bias: Some(&bias),
            silu: true,
        };
        let stepped = causal_conv1d_update(&upd, &mut state, &upd_in).unwrap();
        let longer: Vec<f32> = x
            .chunks(33)
            .zip(more.chunks(3))
            .flat_map(|(a, b)| [a, b].concat())
            .collect();
        let full = causal_conv1d(
            &ConvDims { len: 36, ..dims },
            &ConvInputs {
                x: &longer,
                ..inputs
            },
        )
        .unwrap();
        let tail: Vec<f32> = full.out.chunks(36).flat_map(|r| r[33..].to_vec()).collect();
        assert!(max_abs_diff(&stepped, &tail) < 1e-6);
        assert_eq!(state, full.final_states);
    }
}

/// The width-4, one-input-per-channel decoding update has its own fast loop: over several
/// steps, with and without a bias and the activation, it gives the reference's outputs and
/// states (an odd channel count, three sequences).
#[test]
fn width4_single_step_conv_update_matches_reference() {
    let mut rng = StdRng::seed_from_u64(11);
    let dims = ConvUpdateDims {
        batch: 3,
        dim: 37,
        width: 4,
        state_len: 3,
        steps: 1,
    };
    let weight = random(&mut rng, 37 * 4, -1.0, 1.0);
    let bias = random(&mut rng, 37, -1.0, 1.0);
    for (with_bias, silu) in [(true, true), (false, false)] {
        let mut fast_state = random(&mut rng, 3 * 37 * 3, -1.0, 1.0);
        let mut slow_state = fast_state.clone();
        for _ in 0..4 {
            let x = random(&mut rng, 3 * 37, -1.0, 1.0);
            let inputs = ConvUpdateInputs {
                x: &x,
                weight: &weight,
                bias: with_bias.then_some(&bias[..]),
                silu,
            };
            let got = causal_conv1d_update(&dims, &mut fast_state, &inputs).unwrap();
            let want = causal_conv1d_update_reference(&dims, &mut slow_state, &inputs).unwrap();
            assert!(
                max_abs_diff(&got, &want) < 1e-6,
                "bias {with_bias}, silu {silu}"
            );
            assert_eq!(fast_state, slow_state);
        }
    }
}

#[test]
fn chunked_ssd_matches_sequential_at_every_chunk_size() {
    let mut rng = StdRng::seed_from_u64(5);
    let base = SsdDims {
        batch: 2,
        len: 70,
        heads: 6,
        head_dim: 8,
        groups: 2,
        state: 16,
        chunk_size: 1,
    };
    let (b, l, h, p, g, n) = (2, 70, 6, 8, 2, 16);
    let x = random(&mut rng, b * l * h * p, -1.0, 1.0);
    let dt = random(&mut rng, b * l * h, -3.0, 1.0);
    let a = random(&mut rng, h, -3.0, -0.2);
    let bm = random(&mut rng, b * l * g * n, -1.0, 1.0);
    let cm = random(&mut rng, b * l * g * n, -1.0, 1.0);
    let d = random(&mut rng, h, -1.0, 1.0);
    let z = random(&mut rng, b * l * h * p, -2.0, 2.0);
    let bias = random(&mut rng, h, -1.0, 0.5);
    let init = random(&mut rng, b * h * p * n, -1.0, 1.0);
    let inputs = SsdInputs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &bm,
        c: &cm,
        d: Some(&d),
        z: Some(&z),
        dt_bias: Some(&bias),
        dt_softplus: true,
        dt_limit: (0.001, 2.0),
        initial_states: Some(&init),
    };
    let want = ssd_reference(&base, &inputs).unwrap();
    for q in [1, 7, 16, 64, 256] {
        let got = ssd(
            &SsdDims {
                chunk_size: q,
                ..base
            },
            &inputs,
        )
        .unwrap();
        assert!(max_abs_diff(&got.y, &want.y) < 2e-4, "chunk {q}: y");
        assert!(
            max_abs_diff(&got.final_state, &want.final_state) < 2e-4,
            "chunk {q}: state"
        );
    }
    // ssd_into overwrites every value of the caller's y (filled with NaN, which max_abs_diff
    // passes over, hence the finiteness check), twice: the second call runs on the buffers
    // the first left in the threads. A y of the wrong length is an error.
    let dims = SsdDims {
        chunk_size: 16,
        ..base
    };
    for round in 0..2 {
        let mut y = vec![f32::NAN; x.len()];
        let final_state = ssd_into(&dims, &inputs, Products::F32, &mut y).unwrap();
        assert!(y.iter().all(|v| v.is_finite()), "round {round}: y written");
        assert!(max_abs_diff(&y, &want.y) < 2e-4, "round {round}: y");
        assert!(max_abs_diff(&final_state, &want.final_state) < 2e-4);
    }
    let mut short = vec![0.0; x.len() - 1];
    assert!(ssd_into(&dims, &inputs, Products::F32, &mut short).is_err());
}

/// Heads of one group whose decays within a chunk are mild (the diagonal blocks taken as
/// one factored product) beside heads whose decays span far more than f32's range (a
/// product per head): both against the sequential definition.
#[test]
fn chunked_ssd_with_mild_and_steep_decays_matches_sequential() {
    let mut rng = StdRng::seed_from_u64(12);
    let dims = SsdDims {
        batch: 1,
        len: 200,
        heads: 4,
        head_dim: 16,
        groups: 2,
        state: 8,
        chunk_size: 64,
    };
    let (l, h, p, n, g) = (200, 4, 16, 8, 2);
    let x = random(&mut rng, l * h * p, -1.0, 1.0);
    let dt = random(&mut rng, l * h, -1.0, 1.0);
    // dt = softplus(raw) is 0.3-1.3: per step |dt A| about 0.007 and 0.7 (mild) against 6
    // and 11 (steep), one of each in both groups.
    let a = vec![-0.01, -8.0, -1.0, -16.0];
    let bm = random(&mut rng, l * g * n, -1.0, 1.0);
    let cm = random(&mut rng, l * g * n, -1.0, 1.0);
    let d = random(&mut rng, h, -1.0, 1.0);
    let init = random(&mut rng, h * p * n, -1.0, 1.0);
    let inputs = SsdInputs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &bm,
        c: &cm,
        d: Some(&d),
        z: None,
        dt_bias: None,
        dt_softplus: true,
        dt_limit: NO_DT_LIMIT,
        initial_states: Some(&init),
    };
    let want = ssd_reference(&dims, &inputs).unwrap();
    let got = ssd(&dims, &inputs).unwrap();
    let diff = max_abs_diff(&got.y, &want.y);
    assert!(diff < 2e-4, "y differs by {diff}");
    assert!(max_abs_diff(&got.final_state, &want.final_state) < 2e-4);
}

/// The chunked SSD with bf16 products (a bf16 model's prefill) stays within bf16's rounding of
/// the sequential definition, with mild decays (factored diagonal blocks) and steep ones (a
/// product per head), two groups, a gate, initial states and a last chunk cut short; on a CPU
/// with bf16 dot products it does round (it differs from the f32 products).
#[test]
fn chunked_ssd_with_bf16_products_stays_near_sequential() {
    let mut rng = StdRng::seed_from_u64(21);
    let (b, l, h, p, g, n) = (2, 150, 4, 16, 2, 32);
    let x = random(&mut rng, b * l * h * p, -1.0, 1.0);
    let dt = random(&mut rng, b * l * h, -1.0, 1.0);
    let a = vec![-0.01, -8.0, -1.0, -16.0];
    let bm = random(&mut rng, b * l * g * n, -1.0, 1.0);
    let cm = random(&mut rng, b * l * g * n, -1.0, 1.0);
    let d = random(&mut rng, h, -1.0, 1.0);
    let z = random(&mut rng, b * l * h * p, -2.0, 2.0);
    let init = random(&mut rng, b * h * p * n, -1.0, 1.0);
    let inputs = SsdInputs {
        x: &x,
        dt: &dt,
        a: &a,
        b: &bm,
        c: &cm,
        d: Some(&d),
        z: Some(&z),
        dt_bias: None,
        dt_softplus: true,
        dt_limit: NO_DT_LIMIT,
        initial_states: Some(&init),
    };
    for chunk_size in [64, 128] {
        let dims = SsdDims {
            batch: b,
            len: l,
            heads: h,
            head_dim: p,
            groups: g,
            state: n,
            chunk_size,
        };
        let want = ssd_reference(&dims, &inputs).unwrap();
        let got = ssd_with(&dims, &inputs, Products::Bf16).unwrap();
        for (what, got, want) in [
            ("y", &got.y, &want.y),
            ("state", &got.final_state, &want.final_state),
        ] {
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(got, want);
            assert!(
                diff < 1e-2 * scale,
                "chunk {chunk_size}, {what}: differs by {diff} (scale {scale})"
            );
        }
        if Products::Bf16.in_bf16() {
            let in_f32 = ssd(&dims, &inputs).unwrap();
            assert!(
                max_abs_diff(&got.y, &in_f32.y) > 0.0,
                "chunk {chunk_size}: not rounded"
            );
        }
    }
}

#[test]
fn wrong_lengths_are_errors_not_panics() {
    let dims = ScanDims {
        batch: 1,
        dim: 4,
        len: 3,
        state: 2,
        bc: BcForm::Varying { groups: 1 },
    };
    let v = vec![0.0; 12];
    let inputs = ScanInputs {
        u: &v,
        delta: &v,
        a: &v[..7],
        b: &v[..6],
        c: &v[..6],
        d: None,
        z: None,
        delta_bias: None,
        delta_softplus: true,
        initial_state: None,
    };
    let err = selective_scan(&dims, &inputs).unwrap_err().to_string();
    assert!(err.contains("A has 7 elements, expected 8"), "{err}");
    let grouped = ScanDims {
        bc: BcForm::Varying { groups: 3 },
        ..dims
    };
    assert!(selective_scan(&grouped, &inputs).is_err());
}

/// The token-major scan (the layout models use) equals the channel-major reference,
/// both for the 16-channel block kernel and for the fallback shapes, over more steps than
/// one packed chunk and on 1 and 3 threads (one band of blocks per batch row, and two); the
/// same into a caller's buffer.
#[test]
fn token_major_scan_matches_reference() {
    for threads in [1, 3] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .expect("a pool");
        pool.install(token_major_scan_matches_reference_on_this_pool);
    }
}

fn token_major_scan_matches_reference_on_this_pool() {
    let mut rng = StdRng::seed_from_u64(6);
    for (dim, groups, state) in [(32, 1, 16), (64, 2, 16), (32, 1, 5), (24, 2, 8)] {
        let dims = ScanDims {
            batch: 2,
            dim,
            len: 45,
            state,
            bc: BcForm::Varying { groups },
        };
        let data = RandomScan::new(&mut rng, &dims);
        let want = selective_scan_reference(&dims, &data.inputs()).unwrap();
        let (l, gn) = (dims.len, groups * state);
        let to_tokens = |v: &[f32], width: usize| -> Vec<f32> {
            (0..2 * l * width)
                .map(|i| (i / (l * width), (i / width) % l, i % width))
                .map(|(b, t, c)| v[(b * width + c) * l + t])
                .collect()
        };
        let (u, delta, z) = (
            to_tokens(&data.u, dim),
            to_tokens(&data.delta, dim),
            to_tokens(&data.z, dim),
        );
        let (b, c) = (to_tokens(&data.b, gn), to_tokens(&data.c, gn));
        let inputs = ScanInputs {
            u: &u,
            delta: &delta,
            z: Some(&z),
            b: &b,
            c: &c,
            ..data.inputs()
        };
        let got = selective_scan_token_major(&dims, &inputs).unwrap();
        assert!(
            max_abs_diff(&got.out, &to_tokens(&want.out, dim)) < 1e-4,
            "dim {dim} groups {groups} state {state}"
        );
        assert!(max_abs_diff(&got.last_state, &want.last_state) < 1e-5);
        // Into a caller's buffer: every value overwritten, a buffer of the wrong length refused.
        let mut into = vec![f32::NAN; got.out.len()];
        let last = selective_scan_token_major_into(&dims, &inputs, &mut into).unwrap();
        assert_eq!((into, last), (got.out, got.last_state));
        let mut short = vec![0.0; 2 * l * dim - 1];
        assert!(selective_scan_token_major_into(&dims, &inputs, &mut short).is_err());
    }
}

/// `(batch, rows, cols)` → `(batch, cols, rows)`.
fn transpose_inner(x: &[f32], batch: usize, rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0.0; x.len()];
    for b in 0..batch {
        for r in 0..rows {
            for c in 0..cols {
                t[(b * cols + c) * rows + r] = x[(b * rows + r) * cols + c];
            }
        }
    }
    t
}

/// The conv's output cut into channel parts (as Mamba-2 takes x, B and C) holds the columns
/// of the whole output, every value overwritten (the parts start as NaN), over lengths of one
/// and of several tasks; parts that do not split the channels are an error.
#[test]
fn token_major_conv_into_parts_gives_the_columns_of_the_whole() {
    let mut rng = StdRng::seed_from_u64(8);
    for len in [3, 150] {
        let (batch, dim, width) = (2, 24, 4);
        let rows = batch * len;
        let dims = ConvDims {
            batch,
            dim,
            len,
            width,
        };
        let x = random(&mut rng, rows * dim, -1.0, 1.0);
        let weight = random(&mut rng, dim * width, -1.0, 1.0);
        let init = random(&mut rng, batch * dim * (width - 1), -1.0, 1.0);
        let inputs = ConvInputs {
            x: &x,
            weight: &weight,
            bias: None,
            initial_states: Some(&init),
            silu: true,
        };
        let whole = causal_conv1d_token_major(&dims, &inputs).unwrap();
        let widths = [16, 3, 5];
        let mut parts: Vec<Vec<f32>> = widths.iter().map(|w| vec![f32::NAN; w * rows]).collect();
        let mut views: Vec<&mut [f32]> = parts.iter_mut().map(Vec::as_mut_slice).collect();
        let final_states = causal_conv1d_token_major_into(&dims, &inputs, &mut views).unwrap();
        assert_eq!(final_states, whole.final_states, "len {len}");
        let mut start = 0;
        for (part, width) in parts.iter().zip(widths) {
            let columns: Vec<f32> = whole
                .out
                .chunks(dim)
                .flat_map(|row| row[start..start + width].iter().copied())
                .collect();
            assert_eq!(part, &columns, "len {len}, columns from {start}");
            start += width;
        }
        let mut short = vec![0.0; 20 * rows];
        assert!(causal_conv1d_token_major_into(&dims, &inputs, &mut [&mut short]).is_err());
    }
}

#[test]
fn token_major_conv_matches_the_reference_on_transposed_inputs() {
    let mut rng = StdRng::seed_from_u64(5);
    // Lengths shorter than the window, and longer than one task of positions.
    for (width, len, with_state) in [(4, 2, true), (4, 150, true), (2, 70, false)] {
        let (batch, dim) = (2, 24);
        let dims = ConvDims {
            batch,
            dim,
            len,
            width,
        };
        let x_tokens = random(&mut rng, batch * len * dim, -1.0, 1.0); // (b, L, dim)
        let weight = random(&mut rng, dim * width, -1.0, 1.0);
        let bias = random(&mut rng, dim, -1.0, 1.0);
        let init = random(&mut rng, batch * dim * (width - 1), -1.0, 1.0);
        let x_channels = transpose_inner(&x_tokens, batch, len, dim);
        let inputs = |x| ConvInputs {
            x,
            weight: &weight,
            bias: Some(&bias),
            initial_states: with_state.then_some(init.as_slice()),
            silu: true,
        };
        let want = causal_conv1d_reference(&dims, &inputs(&x_channels)).unwrap();
        let got = causal_conv1d_token_major(&dims, &inputs(&x_tokens)).unwrap();
        let want_tokens = transpose_inner(&want.out, batch, dim, len);
        assert!(
            max_abs_diff(&got.out, &want_tokens) < 1e-6,
            "width {width} len {len}"
        );
        assert_eq!(
            got.final_states, want.final_states,
            "width {width} len {len}"
        );
    }
}
