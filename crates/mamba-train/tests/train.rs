//! Training end to end on tiny models: a small text is memorised (pure Mamba models,
//! hybrids with attention and MLPs, MoE-Mamba), the routers' load-balancing loss enters the
//! objective, an interrupted and resumed run lands exactly where an uninterrupted one
//! does, bad data is a clear error, and (with `--features cuda`, on a GPU) training there
//! follows the CPU.

use candle_core::DType;
use mamba_models::config::ModelConfig;
use mamba_models::init::init_tensors;
use mamba_train::checkpoint;
use mamba_train::data::{Batches, Corpus, Encoding};
use mamba_train::train::{train, TrainConfig, Trainable};
use std::path::PathBuf;

fn tiny_config(family: &str) -> ModelConfig {
    let json = match family {
        "mamba" => {
            r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
            "num_hidden_layers": 2, "state_size": 8, "expand": 2, "conv_kernel": 4, "time_step_rank": 4}"#
        }
        "mamba2" => {
            r#"{"architectures": ["Mamba2ForCausalLM"], "vocab_size": 256, "hidden_size": 32,
            "num_hidden_layers": 2, "state_size": 16, "expand": 2, "num_heads": 4, "head_dim": 16,
            "n_groups": 1, "chunk_size": 16, "conv_kernel": 4}"#
        }
        // A Mamba-1 layer, then rotary attention; a gated MLP after each.
        "hybrid" => {
            r#"{"d_model": 32, "n_layer": 2, "vocab_size": 256, "ssm_cfg": {"d_state": 8,
            "dt_rank": 4}, "attn_layer_idx": [1], "attn_cfg": {"num_heads": 4, "num_heads_kv": 2,
            "rotary_emb_dim": 8, "causal": true}, "d_intermediate": 64}"#
        }
        "moe_mamba" => {
            r#"{"architectures": ["MoEMambaForCausalLM"], "vocab_size": 256, "hidden_size": 32,
            "num_hidden_layers": 2, "state_size": 8, "expand": 2, "conv_kernel": 4,
            "time_step_rank": 4, "num_experts": 4, "num_experts_per_tok": 1,
            "moe_intermediate_size": 32, "router_aux_loss_coef": 0.01}"#
        }
        other => panic!("no tiny {other} config"),
    };
    ModelConfig::from_json_str(json).unwrap()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mamba-train-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

const TEXT: &str = "the quick brown fox jumps over the lazy dog. ";

fn batches(seq_len: usize, batch: usize) -> (Batches, Batches) {
    let tokens: Vec<u32> = TEXT.repeat(40).bytes().map(u32::from).collect();
    let corpus = Corpus::split(tokens, 0.2);
    (
        Batches::new(corpus.train, seq_len, batch, 1).unwrap(),
        Batches::new(corpus.val, seq_len, batch, 1).unwrap(),
    )
}

/// Loss falls from ln(256) ~ 5.5 to below 1.0 nats per byte on a repeated sentence.
fn memorise(family: &str) {
    let config = tiny_config(family);
    let model = Trainable::new(&config, init_tensors(&config, DType::F32, 0).unwrap()).unwrap();
    let (train_b, val_b) = batches(32, 4);
    let mut cfg = TrainConfig::for_steps(120);
    (cfg.batch, cfg.seq_len, cfg.lr, cfg.eval_batches) = (4, 32, 1e-2, 2);
    let out = temp_dir(&format!("memorise-{family}"));
    let summary = train(model, &train_b, &val_b, &cfg, &out, false, |_| true).unwrap();
    assert!(
        summary.final_train_loss < 1.0,
        "{family}: train loss {}",
        summary.final_train_loss
    );
    assert!(
        summary.final_val_loss < 1.0,
        "{family}: validation loss {}",
        summary.final_val_loss
    );
    assert!(out.join("loss.svg").is_file() && out.join(checkpoint::WEIGHTS).is_file());
    // The output folder is a checkpoint the inference code loads.
    let loaded = mamba_models::checkpoint::Checkpoint::open(&out).unwrap();
    assert_eq!(loaded.config, config);
    mamba_models::Model::load(&loaded, DType::F32).unwrap();
}

#[test]
fn tiny_models_memorise_a_sentence() {
    memorise("mamba");
    memorise("mamba2");
}

#[test]
fn tiny_hybrid_and_moe_mamba_memorise_a_sentence() {
    memorise("hybrid");
    memorise("moe_mamba");
}

/// The objective is the cross-entropy plus `router_aux_loss_coef` times the mean of the
/// expert layers' load-balancing losses, and that term reaches the routers' gradients.
#[test]
fn router_balance_loss_enters_the_objective() {
    let config = tiny_config("moe_mamba");
    let coef = config.router_aux_loss_coef();
    let model = Trainable::new(&config, init_tensors(&config, DType::F32, 2).unwrap()).unwrap();
    let (train_b, _) = batches(16, 2);
    let batch = train_b.shuffled(0);
    let terms = model.loss_terms(&batch, 2).unwrap();
    let mut state = model.model.new_state(2);
    let aux = model
        .model
        .forward_hidden(&batch.inputs, &mut state, false)
        .unwrap()
        .router_aux_loss
        .expect("a MoE model reports its balance loss");
    let scalar = |t: &candle_core::Tensor| t.to_scalar::<f32>().unwrap() as f64;
    let added = scalar(&terms.objective) - scalar(&terms.cross_entropy);
    assert!(
        (added - coef * scalar(&aux)).abs() < 1e-6,
        "objective - cross-entropy = {added}, coef * aux = {}",
        coef * scalar(&aux)
    );
    assert!(scalar(&aux) > 0.0);

    let router = |name: &str| name.ends_with("moe.router.weight");
    let (objective, cross_entropy) = (
        terms.objective.backward().unwrap(),
        terms.cross_entropy.backward().unwrap(),
    );
    let (name, var) = model.vars().iter().find(|(n, _)| router(n)).unwrap();
    let diff = (objective.get(var.as_tensor()).unwrap()
        - cross_entropy.get(var.as_tensor()).unwrap())
    .unwrap()
    .abs()
    .unwrap()
    .max_all()
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert!(
        diff > 0.0,
        "{name}: the balance loss adds nothing to the gradient"
    );
}

/// Stopping after 3 of 6 steps and resuming gives bit-identical weights.
#[test]
fn resumed_run_matches_uninterrupted_run() {
    let config = tiny_config("mamba");
    let (train_b, val_b) = batches(16, 2);
    let mut cfg = TrainConfig::for_steps(6);
    (cfg.batch, cfg.seq_len, cfg.eval_batches, cfg.grad_accum) = (2, 16, 1, 2);
    let fresh = || Trainable::new(&config, init_tensors(&config, DType::F32, 3).unwrap()).unwrap();

    let whole = temp_dir("whole");
    train(fresh(), &train_b, &val_b, &cfg, &whole, false, |_| true).unwrap();

    let parts = temp_dir("parts");
    train(fresh(), &train_b, &val_b, &cfg, &parts, false, |p| {
        p.step < 3
    })
    .unwrap();
    assert_eq!(checkpoint::load_trainer_state(&parts).unwrap().step, 3);
    train(fresh(), &train_b, &val_b, &cfg, &parts, true, |_| true).unwrap();

    let a = checkpoint::load_tensors(&whole, checkpoint::WEIGHTS).unwrap();
    let b = checkpoint::load_tensors(&parts, checkpoint::WEIGHTS).unwrap();
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let (x, y) = (
            t.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(x, y, "{name} differs after resuming");
    }
    let (sa, sb) = (
        checkpoint::load_trainer_state(&whole).unwrap(),
        checkpoint::load_trainer_state(&parts).unwrap(),
    );
    assert_eq!(sa.train_losses, sb.train_losses);
}

#[test]
fn missing_empty_or_unreadable_data_is_an_error() {
    let dir = temp_dir("bad-data");
    let missing = dir.join("nope.txt");
    let err = Corpus::load(&missing, &Encoding::Bytes, 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("nope.txt"), "{err}");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "").unwrap();
    let err = Corpus::load(&empty, &Encoding::Bytes, 0.1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("no data"), "{err}");
    let empty_dir = dir.join("empty-folder");
    std::fs::create_dir_all(&empty_dir).unwrap();
    assert!(Corpus::load(&empty_dir, &Encoding::Bytes, 0.1).is_err());
    let short = Corpus::split(vec![1, 2, 3], 0.0);
    assert!(Batches::new(short.train, 16, 1, 0).is_err());
}

/// On a GPU (`--features cuda`; skipped without a device), training follows the CPU: the
/// same weights and batches give the same losses step after step.
#[cfg(feature = "cuda")]
#[test]
fn gpu_training_follows_the_cpu() {
    use candle_core::Device;
    let Ok(gpu) = Device::new_cuda(0) else {
        eprintln!("skipped: no CUDA device");
        return;
    };
    for family in ["mamba", "mamba2"] {
        let config = tiny_config(family);
        let losses = |device: &Device| {
            let weights = init_tensors(&config, DType::F32, 4).unwrap();
            let model = Trainable::new_on(&config, weights, device).unwrap();
            let (train_b, val_b) = batches(32, 4);
            let mut cfg = TrainConfig::for_steps(8);
            (cfg.batch, cfg.seq_len, cfg.lr, cfg.eval_batches) = (4, 32, 1e-2, 2);
            let out = temp_dir(&format!("device-{family}-{}", device.is_cuda()));
            let mut seen = Vec::new();
            train(model, &train_b, &val_b, &cfg, &out, false, |p| {
                seen.push(p.loss);
                true
            })
            .unwrap();
            seen
        };
        let (cpu, on_gpu) = (losses(&Device::Cpu), losses(&gpu));
        assert_eq!(cpu.len(), on_gpu.len(), "{family}");
        for (step, (c, g)) in cpu.iter().zip(&on_gpu).enumerate() {
            assert!(
                (c - g).abs() <= 1e-3 * c.abs(),
                "{family} step {step}: cpu loss {c}, gpu loss {g}"
            );
        }
    }
}
