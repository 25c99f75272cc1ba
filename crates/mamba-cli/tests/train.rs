//! `mamba init`, `mamba train` (with `--resume`) and the bundled default model, end to end
//! through the binary, for pure Mamba models, `mamba_ssm`-style hybrids and MoE-Mamba.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use tempfile::TempDir;

/// A two-layer byte-level Mamba small enough to train in a second or two.
const TINY_CONFIG: &str = r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 256,
    "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8, "expand": 2,
    "conv_kernel": 4, "time_step_rank": 4}"#;

/// A `mamba_ssm` hybrid in its native form: Mamba-1, rotary grouped-query attention at
/// layer 1, a gated MLP after every mixer.
const TINY_HYBRID_CONFIG: &str = r#"{"d_model": 32, "n_layer": 3, "vocab_size": 256,
    "ssm_cfg": {"d_state": 8, "dt_rank": 4}, "attn_layer_idx": [1],
    "attn_cfg": {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4, "causal": true},
    "d_intermediate": 64}"#;

/// Two Mamba-1 layers, each followed by four experts of which a token uses two.
const TINY_MOE_MAMBA_CONFIG: &str = r#"{"architectures": ["MoEMambaForCausalLM"],
    "vocab_size": 256, "hidden_size": 32, "num_hidden_layers": 2, "state_size": 8,
    "time_step_rank": 4, "num_experts": 4, "num_experts_per_tok": 2,
    "moe_intermediate_size": 32}"#;

fn write_inputs(dir: &Path) {
    write_inputs_with(dir, TINY_CONFIG);
}

fn write_inputs_with(dir: &Path, config: &str) {
    std::fs::write(dir.join("config.json"), config).unwrap();
    let text = "the quick brown fox jumps over the lazy dog. ".repeat(60);
    std::fs::write(dir.join("data.txt"), text).unwrap();
}

fn train_args<'a>(dir: &'a Path, out: &'a str, steps: &'a str) -> Vec<String> {
    [
        "train",
        "--config",
        path_arg(&dir.join("config.json")),
        "--data",
        path_arg(&dir.join("data.txt")),
        "--out",
        out,
        "--steps",
        steps,
        "--batch",
        "4",
        "--seq-len",
        "32",
        "--lr",
        "1e-2",
        "--val-fraction",
        "0.2",
        "--json",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Value {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    json_output(&mamba(&refs))
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn init_writes_a_checkpoint_that_info_and_generate_load() {
    let dir = TempDir::new().unwrap();
    write_inputs(dir.path());
    let out = dir.path().join("fresh");
    let report = run(&[
        "init".into(),
        "--config".into(),
        path_arg(&dir.path().join("config.json")).into(),
        "--out".into(),
        path_arg(&out).into(),
        "--json".into(),
    ]);
    assert_eq!(report["family"], "mamba");
    let info = json_output(&mamba(&["info", "--model", path_arg(&out), "--json"]));
    assert_eq!(info["parameters"], report["parameters"]);
    let generated = json_output(&mamba(&[
        "generate",
        "--model",
        path_arg(&out),
        "--prompt-ids",
        "1,2,3",
        "--max-tokens",
        "4",
        "--json",
    ]));
    assert_eq!(generated["generated_ids"].as_array().unwrap().len(), 4);
}

#[test]
fn train_learns_writes_checkpoints_and_resumes() {
    let dir = TempDir::new().unwrap();
    write_inputs(dir.path());
    let out = dir.path().join("run");
    let out_arg = path_arg(&out).to_string();
    let first = run(&train_args(dir.path(), &out_arg, "40"));
    assert_eq!(first["steps"], 40);
    // ln(256) = 5.55 nats per byte at the start; a repeated sentence is learnt quickly.
    assert!(number(&first, "final_train_loss") < 2.5, "{first}");
    assert!(number(&first, "final_val_loss") < 2.5, "{first}");
    assert!(number(&first, "tokens_per_s") > 0.0);
    assert!(number(&first, "val_bits_per_byte") > 0.0);
    for file in [
        "config.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
        "loss.svg",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // --resume continues from step 40 to the new total.
    let mut more = train_args(dir.path(), &out_arg, "50");
    more.push("--resume".into());
    let second = run(&more);
    assert_eq!(second["steps"], 50);
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["step"], 50);
    // The trained folder is a model the other commands load.
    let scored = json_output(&mamba(&[
        "score",
        "--model",
        &out_arg,
        "--text",
        "the quick brown fox",
        "--json",
    ]));
    assert!(scored.to_string().contains("perplexity"), "{scored}");
}

/// Bytes of recurrent state per sequence of `mamba_layers` Mamba-1 layers (f32 conv
/// window and SSM state), from the config's sizes.
fn mamba1_state_bytes(mamba_layers: usize, d_inner: usize, d_conv: usize, d_state: usize) -> usize {
    mamba_layers * d_inner * (d_conv - 1 + d_state) * 4
}

/// `init`, a few `train` steps, then `info`, `generate` and `score` on the result.
/// Returns `info`'s report of the trained model.
fn init_train_and_run(config: &str) -> Value {
    let dir = TempDir::new().unwrap();
    write_inputs_with(dir.path(), config);
    let fresh = dir.path().join("fresh");
    let init = run(&[
        "init".into(),
        "--config".into(),
        path_arg(&dir.path().join("config.json")).into(),
        "--out".into(),
        path_arg(&fresh).into(),
        "--json".into(),
    ]);
    let out = dir.path().join("run");
    let out_arg = path_arg(&out).to_string();
    let trained = run(&train_args(dir.path(), &out_arg, "6"));
    assert_eq!(trained["steps"], 6);
    assert!(number(&trained, "final_val_loss").is_finite(), "{trained}");
    let generated = json_output(&mamba(&[
        "generate",
        "--model",
        &out_arg,
        "--prompt",
        "the quick",
        "--max-tokens",
        "5",
        "--json",
    ]));
    assert_eq!(generated["generated_ids"].as_array().unwrap().len(), 5);
    let scored = json_output(&mamba(&[
        "score",
        "--model",
        &out_arg,
        "--text",
        "the lazy dog",
        "--json",
    ]));
    assert!(scored.to_string().contains("perplexity"), "{scored}");
    let info = json_output(&mamba(&["info", "--model", &out_arg, "--json"]));
    assert_eq!(info["family"], init["family"]);
    assert_eq!(info["parameters"], init["parameters"]);
    info
}

/// A hybrid trains and runs; `info` shows its layers and the cache sizes its config
/// implies: recurrent state for the Mamba layers, keys and values for the attention one.
#[test]
fn hybrid_inits_trains_and_runs() {
    let config: Value = serde_json::from_str(TINY_HYBRID_CONFIG).unwrap();
    let c = |path: &str| config.pointer(path).unwrap().as_u64().unwrap() as usize;
    let (d_model, heads) = (c("/d_model"), c("/attn_cfg/num_heads"));
    let kv_bytes = 2 * c("/attn_cfg/num_heads_kv") * (d_model / heads) * 4;
    // mamba_ssm's defaults: expand 2, d_conv 4.
    let state_bytes = mamba1_state_bytes(c("/n_layer") - 1, 2 * d_model, 4, c("/ssm_cfg/d_state"));
    let info = init_train_and_run(TINY_HYBRID_CONFIG);
    assert_eq!(info["family"], "hybrid");
    assert_eq!(
        info["layer_layout"],
        serde_json::json!(["mamba+mlp", "attention+mlp", "mamba+mlp"])
    );
    assert_eq!(info["kv_cache_bytes_per_token"], kv_bytes);
    assert_eq!(info["state_bytes_per_sequence"], state_bytes);
    assert_eq!(info["heads"], heads);
    assert_eq!(
        info["intermediate_size"], 128,
        "d_intermediate rounded up to 128"
    );
}

/// A MoE-Mamba trains and runs; `info` shows its expert layers and their recurrent state.
#[test]
fn moe_mamba_inits_trains_and_runs() {
    let config: Value = serde_json::from_str(TINY_MOE_MAMBA_CONFIG).unwrap();
    let c = |key: &str| config[key].as_u64().unwrap() as usize;
    let layers = c("num_hidden_layers");
    // transformers' MambaConfig defaults: expand 2, conv_kernel 4.
    let state_bytes = mamba1_state_bytes(layers, 2 * c("hidden_size"), 4, c("state_size"));
    let info = init_train_and_run(TINY_MOE_MAMBA_CONFIG);
    assert_eq!(info["family"], "moe_mamba");
    assert_eq!(
        info["layer_layout"],
        serde_json::json!(vec!["mamba+moe"; layers])
    );
    assert_eq!(info["kv_cache_bytes_per_token"], 0);
    assert_eq!(info["state_bytes_per_sequence"], state_bytes);
    assert_eq!(info["experts"], c("num_experts"));
    assert_eq!(info["experts_per_token"], c("num_experts_per_tok"));
}

#[test]
fn train_on_missing_or_empty_data_fails_cleanly() {
    let dir = TempDir::new().unwrap();
    write_inputs(dir.path());
    let missing = dir.path().join("missing.txt");
    let mut args = train_args(dir.path(), "unused-out", "2");
    args[4] = path_arg(&missing).into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails_with(&refs, "missing.txt");
    std::fs::write(dir.path().join("empty.txt"), "").unwrap();
    args[4] = path_arg(&dir.path().join("empty.txt")).into();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_fails_with(&refs, "no data");
}

#[test]
fn generate_without_model_runs_the_bundled_model() {
    let out = mamba(&[
        "generate",
        "--prompt",
        "And God said",
        "--max-tokens",
        "40",
        "--json",
    ]);
    let report = json_output(&out);
    let text = report["text"].as_str().expect("bundled model decodes text");
    assert_eq!(report["generated_ids"].as_array().unwrap().len(), 40);
    // Byte-level English: mostly letters and spaces.
    let letters = text
        .chars()
        .filter(|c| c.is_ascii_alphabetic() || *c == ' ')
        .count();
    assert!(
        letters * 10 >= text.chars().count() * 7,
        "not English-like: {text:?}"
    );
}
