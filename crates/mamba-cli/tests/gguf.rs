//! `mamba convert --to gguf` and `--model FILE.gguf`: a converted fixture generates and
//! scores as its checkpoint does, and bad conversions and bad files fail cleanly.

mod common;

use common::*;
use mamba_testing::{fixtures_dir, max_abs_diff};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn checkpoint(model: &str) -> PathBuf {
    fixtures_dir().join("models").join(model).join("checkpoint")
}

/// `mamba convert` of a fixture into `dir/{model}{suffix}.gguf`, with `extra` flags.
fn convert(model: &str, dir: &Path, extra: &[&str]) -> PathBuf {
    let out = dir.join(format!("{model}{}.gguf", extra.join("")));
    let ckpt = checkpoint(model);
    let mut args = vec![
        "convert",
        "--model",
        path_arg(&ckpt),
        "--to",
        "gguf",
        "--out",
        path_arg(&out),
        "--json",
    ];
    args.extend(extra);
    let report = json_output(&mamba(&args));
    assert_eq!(report["out"], path_arg(&out));
    assert!(out.is_file());
    out
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect()
}

/// `generate --json` of `model` (a folder or a file) with `prompt` flags.
fn generate(model: &Path, prompt: &[&str]) -> Value {
    let mut args = vec!["generate", "--model", path_arg(model), "--max-tokens", "8"];
    args.extend(prompt);
    args.push("--json");
    json_output(&mamba(&args))
}

/// The logits `score --logits-out` writes for `ids`.
fn score_logits(model: &Path, ids: &str, dir: &Path) -> Vec<f32> {
    let out = dir.join("logits.safetensors");
    let report = json_output(&mamba(&[
        "score",
        "--model",
        path_arg(model),
        "--ids",
        ids,
        "--logits-out",
        path_arg(&out),
        "--json",
    ]));
    assert!(report["sequences"][0]["mean_nll"].as_f64().unwrap() > 0.0);
    mamba_testing::read_safetensors(&out)["logits"].f32()
}

#[test]
fn converted_models_generate_and_score_like_their_checkpoints() {
    let dir = TempDir::new().unwrap();
    for model in ["mamba_tied", "falcon_mamba", "mamba2"] {
        let gguf = convert(model, dir.path(), &[]);
        let prompt = ["--prompt-ids", "5,17,42,99,3"];
        let want = generate(&checkpoint(model), &prompt);
        let got = generate(&gguf, &prompt);
        assert_eq!(
            ids(&got["generated_ids"]),
            ids(&want["generated_ids"]),
            "{model}"
        );

        let sequence = "5,17,42,99,3,200,11";
        let want = score_logits(&checkpoint(model), sequence, dir.path());
        let got = score_logits(&gguf, sequence, dir.path());
        // FalconMamba's Δ/B/C norms take the layer norm's epsilon in GGUF (llama.cpp's
        // convention) instead of mixer_rms_eps: close, not equal.
        let tolerance = if model == "falcon_mamba" { 1e-3 } else { 1e-6 };
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= tolerance, "{model}: logits differ by {diff}");
    }
}

#[test]
fn text_prompts_use_the_files_vocabulary() {
    let dir = TempDir::new().unwrap();
    for model in ["mamba_tied", "mamba2"] {
        let gguf = convert(model, dir.path(), &[]);
        let prompt = ["--prompt", "Hello there, été"];
        let got = generate(&gguf, &prompt);
        // mamba_tied has the tokenizer.json the file's vocabulary came from; mamba2 is
        // byte-level.
        let want = generate(&checkpoint(model), &prompt);
        assert_eq!(ids(&got["prompt_ids"]), ids(&want["prompt_ids"]), "{model}");
        assert_eq!(
            ids(&got["generated_ids"]),
            ids(&want["generated_ids"]),
            "{model}"
        );
    }
}

#[test]
fn quantised_files_run_in_their_format() {
    let dir = TempDir::new().unwrap();
    let q8 = convert("mamba2", dir.path(), &["--quant", "q8_0"]);
    let f32_file = convert("mamba2", dir.path(), &[]);
    let size = |p: &Path| std::fs::metadata(p).unwrap().len();
    assert!(size(&q8) * 2 < size(&f32_file), "q8_0 is smaller");
    let info = json_output(&mamba(&["info", "--model", path_arg(&q8), "--json"]));
    assert_eq!(info["weight_format"], "q8_0");
    assert_eq!(info["family"], "mamba2");
    // The checkpoint quantised in memory picks the same tokens.
    let prompt = ["--prompt-ids", "5,17,42,99,3"];
    let want = generate(
        &checkpoint("mamba2"),
        &["--prompt-ids", "5,17,42,99,3", "--dtype", "q8_0"],
    );
    let got = generate(&q8, &prompt);
    assert_eq!(ids(&got["generated_ids"]), ids(&want["generated_ids"]));
}

/// `convert --model {model} --out {out}` as owned arguments.
fn convert_args(model: &Path, out: &Path) -> Vec<String> {
    [
        "convert",
        "--model",
        path_arg(model),
        "--out",
        path_arg(out),
    ]
    .map(String::from)
    .to_vec()
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn conversions_llama_cpp_cannot_load_fail_cleanly() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("out.gguf");
    let untied = convert_args(&checkpoint("mamba_untied"), &out);
    assert_fails_with(&strs(&untied), "use_bias");
    let jamba = convert_args(&checkpoint("jamba"), &out);
    assert_fails_with(&strs(&jamba), "jamba");

    // A 320-token vocabulary without its tokenizer.json: neither BPE nor bytes.
    let bare = TempDir::new().unwrap();
    for name in ["config.json", "model.safetensors"] {
        std::fs::copy(checkpoint("mamba_tied").join(name), bare.path().join(name)).unwrap();
    }
    let mut args = convert_args(bare.path(), &out);
    assert_fails_with(&strs(&args), "--vocab-from");
    assert!(!out.exists(), "a failed conversion leaves no file");

    // --vocab-from supplies it.
    let donor = convert("mamba_tied", dir.path(), &[]);
    args.extend(["--vocab-from".to_string(), path_arg(&donor).to_string()]);
    assert_success(&mamba(&strs(&args)));
    let got = generate(&out, &["--prompt", "Hello there"]);
    let want = generate(&checkpoint("mamba_tied"), &["--prompt", "Hello there"]);
    assert_eq!(ids(&got["prompt_ids"]), ids(&want["prompt_ids"]));
}

#[test]
fn bad_gguf_files_fail_cleanly() {
    let dir = TempDir::new().unwrap();
    let good = convert("mamba2", dir.path(), &[]);
    let bytes = std::fs::read(&good).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"GGUF but not really").unwrap();
    // Another architecture: the same bytes with general.architecture's value renamed
    // (same length, so the layout holds): u32 value type, u64 length 6, then "mamba2".
    let mut other = bytes.clone();
    let key = b"general.architecture";
    let value_at = other.windows(key.len()).position(|w| w == key).unwrap() + key.len() + 4 + 8;
    assert_eq!(&other[value_at..value_at + 6], b"mamba2");
    other[value_at..value_at + 6].copy_from_slice(b"gemma3");
    let gemma = dir.path().join("gemma.gguf");
    std::fs::write(&gemma, other).unwrap();

    for (file, needle) in [
        (&truncated, "cannot read tensor"),
        (&garbage, "not a GGUF file"),
        (&gemma, "architecture \"gemma3\" is not supported"),
    ] {
        let model = path_arg(file);
        assert_fails_with(
            &["generate", "--model", model, "--prompt-ids", "1,2"],
            needle,
        );
        assert_fails_with(&["score", "--model", model, "--ids", "1,2"], needle);
        assert_fails_with(&["info", "--model", model], needle);
    }
}
