//! The fused CUDA decoding step (one recorded graph per token) against candle's ops on the
//! same GPU: the same logits step after step and the same state left behind, for every
//! family it covers, f32 and bf16 weights, one and several sequences (11: past the
//! matrix-vector kernel's tile, through cuBLAS), fixture checkpoints and a model of
//! mamba-130m's / mamba2-130m's widths, and the same bits on every run. Also a hybrid with
//! attention (the Jamba fixture), which decodes through the ops with its key/value cache kept
//! on the device, against the CPU. Skips when no GPU is found.
#![cfg(feature = "cuda")]

use candle_core::Device;
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::{preset, ModelConfig};
use mamba_models::init::init_tensors;
use mamba_models::layers::f32_vec;
use mamba_models::{Model, State, WeightFormat};
use mamba_testing::fixtures_dir;
use std::sync::{Mutex, MutexGuard};

/// Held by each test while it uses the GPU: candle's ops on one thread can fail with
/// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` while another thread records a decoder's graph
/// (seen on the H200 with two test threads), so the tests take the device in turn.
static ONE_TEST_AT_A_TIME: Mutex<()> = Mutex::new(());

fn gpu() -> Option<(MutexGuard<'static, ()>, Device)> {
    let turn = ONE_TEST_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match Device::new_cuda(0) {
        Ok(d) => Some((turn, d)),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn fixture(name: &str, format: WeightFormat, device: &Device) -> Model {
    let dir = fixtures_dir().join("models").join(name).join("checkpoint");
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let mut model = Model::load_on(&checkpoint, format.load_dtype(), device).unwrap();
    model.convert_weights(format).unwrap();
    model
}

/// A random model of `preset`'s widths with only `layers` layers.
fn random(preset_name: &str, layers: usize, format: WeightFormat, device: &Device) -> Model {
    let mut config = preset(preset_name).unwrap();
    match &mut config {
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => c.num_hidden_layers = layers,
        ModelConfig::Mamba2(c) => c.num_hidden_layers = layers,
        _ => unreachable!("a Mamba preset"),
    }
    let dtype = format.load_dtype();
    let tensors = init_tensors(&config, dtype, 7).unwrap();
    Model::from_tensors_on(tensors, &config, dtype, device).unwrap()
}

/// `|a - b| / |b|` (Euclidean norms).
fn relative_error(a: &[f32], b: &[f32]) -> f32 {
    let diff: f32 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    let norm: f32 = b.iter().map(|y| y * y).sum();
    (diff / norm).sqrt()
}

/// Token `t` of sequence `b` fed while decoding: fixed, so both paths see the same input.
fn token(t: usize, b: usize, vocab: usize) -> u32 {
    ((t * 7919 + b * 104_729 + 11) % vocab) as u32
}

/// Logits of `steps` decoding steps from `state`, and the state they leave (on the host).
fn decode(model: &Model, mut state: State, steps: usize) -> (Vec<Vec<f32>>, State) {
    let batch = state.batch;
    let logits = (0..steps)
        .map(|t| {
            let ids: Vec<u32> = (0..batch)
                .map(|b| token(t, b, model.vocab_size()))
                .collect();
            f32_vec(&model.step(&ids, &mut state).unwrap()).unwrap()
        })
        .collect();
    (logits, state.to_host().unwrap())
}

/// Prefills a prompt, then decodes through candle's ops and through the fused step from the
/// same state, and checks they agree within `tol` (relative).
fn check_fused_matches_ops(label: &str, model: &Model, batch: usize, tol: f32) {
    let prompt: Vec<u32> = (0..batch * 9)
        .map(|i| token(i, 1, model.vocab_size()))
        .collect();
    let mut state = model.new_state(batch);
    model.prefill(&prompt, &mut state).unwrap();
    model.set_fused_decode(false);
    let (want, want_state) = decode(model, state.clone(), 6);
    model.set_fused_decode(true);
    let (got, got_state) = decode(model, state, 6);
    let engine = model.decode_engine();
    assert!(engine.starts_with("fused"), "{label}: decoded by {engine}");
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = relative_error(g, w);
        assert!(
            err < tol,
            "{label} batch {batch} step {t}: logits differ by {err}"
        );
    }
    for (g, w) in got_state.layers.iter().zip(&want_state.layers) {
        let (conv, ssm) = (
            relative_error(&g.conv, &w.conv),
            relative_error(&g.ssm, &w.ssm),
        );
        assert!(
            conv < tol && ssm < tol,
            "{label}: states differ by {conv} / {ssm}"
        );
    }
    assert_eq!(got_state.tokens_seen, want_state.tokens_seen, "{label}");
}

/// The bound for a batch past 8 sequences, whose products go through cuBLAS: that multiplies
/// bf16 weights by inputs rounded to bf16 (the ops path keeps them f32), so a looser bound
/// for bf16 (`tol` above 1e-5).
fn past_one_tile(tol: f32) -> f32 {
    if tol > 1e-5 {
        2e-2
    } else {
        tol
    }
}

#[test]
fn fused_step_matches_the_ops_on_the_fixtures() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    for name in ["mamba_tied", "mamba_untied", "falcon_mamba", "mamba2"] {
        for (format, tol) in [(WeightFormat::F32, 1e-5), (WeightFormat::Bf16, 2e-3)] {
            let model = fixture(name, format, &device);
            // 17 sequences: the cuBLAS products and the tiled Mamba-1 step, whose last block
            // of sequences holds one (17 = 4 x 4 + 1 at these widths).
            for (batch, tol) in [(1, tol), (3, tol), (17, past_one_tile(tol))] {
                check_fused_matches_ops(&format!("{name} {format:?}"), &model, batch, tol);
            }
        }
    }
}

#[test]
fn fused_step_matches_the_ops_at_130m_widths() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    for name in ["mamba-130m", "mamba2-130m"] {
        for (format, tol) in [(WeightFormat::F32, 1e-5), (WeightFormat::Bf16, 2e-3)] {
            let model = random(name, 3, format, &device);
            // 11: cuBLAS with the row kernel's Mamba-1 step; 17: with the tiled step.
            for (batch, tol) in [(1, tol), (11, past_one_tile(tol)), (17, past_one_tile(tol))] {
                check_fused_matches_ops(&format!("{name} {format:?}"), &model, batch, tol);
            }
        }
    }
}

/// No step sums across blocks in the order they happen to finish (no float atomics):
/// decoding twice from one state gives the same bits, in f32 and bf16, one and three sequences.
#[test]
fn fused_step_gives_the_same_bits_every_run() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    for format in [WeightFormat::F32, WeightFormat::Bf16] {
        let model = random("mamba-130m", 2, format, &device);
        for batch in [1, 3] {
            let mut state = model.new_state(batch);
            let prompt: Vec<u32> = (0..batch * 5)
                .map(|i| token(i, 2, model.vocab_size()))
                .collect();
            model.prefill(&prompt, &mut state).unwrap();
            let (first, first_state) = decode(&model, state.clone(), 4);
            let (again, again_state) = decode(&model, state, 4);
            assert!(model.decode_engine().starts_with("fused"));
            assert_eq!(first, again, "{format:?} batch {batch}: logits");
            assert_eq!(
                first_state.layers, again_state.layers,
                "{format:?} batch {batch}"
            );
        }
    }
}

#[test]
fn fused_step_refuses_out_of_range_ids() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    let model = fixture("mamba_tied", WeightFormat::F32, &device);
    let mut state = model.new_state(1);
    let vocab = model.vocab_size() as u32;
    let err = model.step(&[vocab], &mut state).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
}

#[test]
fn a_clone_of_a_device_state_is_independent() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    let model = fixture("mamba2", WeightFormat::F32, &device);
    let mut state = model.new_state(1);
    model.prefill(&[1, 2, 3], &mut state).unwrap();
    let before = state.clone();
    let kept = before.to_host().unwrap();
    model.step(&[4], &mut state).unwrap();
    assert_eq!(before.to_host().unwrap(), kept);
    assert_ne!(state.to_host().unwrap().layers, kept.layers);
}

/// `new_state` on the GPU makes the zero states there (as `(batch, values)` tensors, which
/// the layers reshape), and a prefill or a decode from them gives the same bits as from the
/// same zeros made on the host and copied over.
#[test]
fn a_fresh_state_is_made_on_the_gpu_and_runs_as_a_host_one() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    let batch = 3;
    for name in ["mamba_tied", "mamba2"] {
        let model = fixture(name, WeightFormat::F32, &device);
        let fresh = model.new_state(batch);
        assert!(
            fresh
                .layers
                .iter()
                .all(|l| l.device.is_some() && l.conv.is_empty() && l.ssm.is_empty()),
            "{name}: the zeros are on the GPU"
        );
        let host = fresh.to_host().unwrap();
        assert!(host
            .layers
            .iter()
            .all(|l| l.device.is_none() && l.ssm.iter().chain(&l.conv).all(|&v| v == 0.0)));
        let (got, got_state) = decode(&model, fresh.clone(), 3);
        let (want, want_state) = decode(&model, host.clone(), 3);
        assert_eq!(got, want, "{name}: decoding from fresh states");
        assert_eq!(got_state, want_state, "{name}: states after decoding");
        let prompt: Vec<u32> = (0..batch * 5)
            .map(|i| token(i, 2, model.vocab_size()))
            .collect();
        let (mut on_device, mut from_host) = (fresh, host);
        let got = f32_vec(&model.prefill(&prompt, &mut on_device).unwrap()).unwrap();
        let want = f32_vec(&model.prefill(&prompt, &mut from_host).unwrap()).unwrap();
        assert_eq!(got, want, "{name}: prefill from fresh states");
        assert_eq!(on_device.to_host().unwrap(), from_host.to_host().unwrap());
    }
}

#[test]
fn jamba_decodes_on_the_gpu_as_on_the_cpu_with_its_cache_on_the_device() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    let (cpu, gpu) = (
        fixture("jamba", WeightFormat::F32, &Device::Cpu),
        fixture("jamba", WeightFormat::F32, &device),
    );
    let batch = 2;
    // 20 tokens per sequence: past the matrix-vector rows, as a prefill runs.
    let prompt: Vec<u32> = (0..batch * 20)
        .map(|i| token(i, 3, cpu.vocab_size()))
        .collect();
    let (mut on_cpu, mut on_gpu) = (cpu.new_state(batch), gpu.new_state(batch));
    let want = f32_vec(&cpu.prefill(&prompt, &mut on_cpu).unwrap()).unwrap();
    let got = f32_vec(&gpu.prefill(&prompt, &mut on_gpu).unwrap()).unwrap();
    assert!(relative_error(&got, &want) < 1e-4, "prefill logits");
    let caches = || on_gpu.layers.iter().filter_map(|l| l.kv.as_ref());
    assert!(caches().count() > 0, "the fixture has attention layers");
    for kv in caches() {
        assert!(kv
            .sequences
            .iter()
            .all(|s| s.device.is_some() && s.keys.is_empty()));
    }
    let (want, want_state) = decode(&cpu, on_cpu, 4);
    let (got, got_state) = decode(&gpu, on_gpu, 4);
    for (t, (g, w)) in got.iter().zip(&want).enumerate() {
        let err = relative_error(g, w);
        assert!(err < 1e-4, "step {t}: logits differ by {err}");
    }
    for (g, w) in got_state.layers.iter().zip(&want_state.layers) {
        if let (Some(g), Some(w)) = (&g.kv, &w.kv) {
            for (gs, ws) in g.sequences.iter().zip(&w.sequences) {
                assert_eq!(gs.keys.len(), ws.keys.len());
                let (k, v) = (
                    relative_error(&gs.keys, &ws.keys),
                    relative_error(&gs.values, &ws.values),
                );
                assert!(k < 1e-4 && v < 1e-4, "caches differ by {k} / {v}");
            }
        }
    }
}

#[test]
fn a_bf16_prefill_on_tensor_cores_stays_near_the_cpu() {
    let Some((_turn, device)) = gpu() else {
        return;
    };
    for name in ["mamba-130m", "mamba2-130m"] {
        let (cpu, gpu) = (
            random(name, 3, WeightFormat::Bf16, &Device::Cpu),
            random(name, 3, WeightFormat::Bf16, &device),
        );
        // 48 tokens: the products run as bf16 GEMMs on the GPU (inputs rounded to bf16),
        // and with f32 inputs on the CPU.
        let prompt: Vec<u32> = (0..48).map(|i| token(i, 5, cpu.vocab_size())).collect();
        let (mut on_cpu, mut on_gpu) = (cpu.new_state(1), gpu.new_state(1));
        let want = f32_vec(&cpu.prefill(&prompt, &mut on_cpu).unwrap()).unwrap();
        let got = f32_vec(&gpu.prefill(&prompt, &mut on_gpu).unwrap()).unwrap();
        let err = relative_error(&got, &want);
        assert!(err < 2e-2, "{name}: bf16 prefill logits differ by {err}");
    }
}
