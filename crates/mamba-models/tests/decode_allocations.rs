//! Decoding on the CPU allocates (almost) nothing per token once warm: the fused step keeps
//! its intermediates in per-thread scratch buffers. Counted with a counting allocator, so
//! this file holds one test only (other tests' allocations would be counted too).

use candle_core::DType;
use mamba_models::config::ModelConfig;
use mamba_models::{Model, WeightFormat};
use mamba_testing::fixtures_dir;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, counting allocations.
struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations per decoded token: the logits the step returns (their vector and tensor)
/// and rayon's bookkeeping, not one per layer or per matrix product (the models below have
/// 16 layers, so one allocation per layer alone would exceed it).
const MAX_PER_TOKEN: usize = 8;

/// A fixture's architecture with 16 layers and fresh random weights.
fn deep_model(name: &str, format: WeightFormat) -> Model {
    let path = fixtures_dir()
        .join("models")
        .join(name)
        .join("checkpoint")
        .join("config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    json["num_hidden_layers"] = 16.into();
    let config = ModelConfig::from_json_str(&json.to_string()).unwrap();
    let mut model = Model::random(&config, DType::F32, 0).unwrap();
    model.convert_weights(format).unwrap();
    model
}

#[test]
fn warm_decoding_allocates_only_its_logits() {
    for name in ["mamba_tied", "falcon_mamba", "mamba2"] {
        for format in [WeightFormat::F32, WeightFormat::Bf16, WeightFormat::Q8_0] {
            let model = deep_model(name, format);
            assert_eq!(model.config.num_layers(), 16);
            let mut state = model.new_state(1);
            for id in [1, 2, 3] {
                model.step(&[id], &mut state).unwrap(); // warm-up: scratch buffers grow
            }
            let steps = 20;
            let before = ALLOCATIONS.load(Ordering::Relaxed);
            for id in 0..steps {
                model.step(&[id as u32 + 4], &mut state).unwrap();
            }
            let per_token = (ALLOCATIONS.load(Ordering::Relaxed) - before) / steps;
            assert!(
                per_token <= MAX_PER_TOKEN,
                "{name} {format:?}: {per_token} allocations per token"
            );
        }
    }
}
