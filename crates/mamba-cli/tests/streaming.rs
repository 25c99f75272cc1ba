//! Long inputs through the binary: `score --file` and `generate --prompt-file` run the
//! model in chunks, give what one pass gives, and take peak memory that does not grow
//! with the input's length; `scaling` writes its tables and plots and stops points that
//! run over its limits.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A two-layer byte-level Mamba: text files are its token ids, one byte each.
const TINY_CONFIG: &str = r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 256,
    "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8, "expand": 2,
    "conv_kernel": 4, "time_step_rank": 4}"#;

/// Input lengths of the memory test, in tokens (bytes).
const SHORT: usize = 20_000;
const LONG: usize = 80_000;

/// Peak RSS may grow by at most this much from the short to the long input when
/// streaming (measured: 0.2–0.5 MB scoring, 3.5–3.8 MB generating). One pass over the
/// whole input holds at least every position's final hidden state, 256 bytes per token of
/// this model (15 MB for 60 000 more tokens; scoring also every position's logits), and
/// grows by more (which the test checks too).
const GROWTH_BOUND: u64 = 8 << 20;

/// A freshly initialised tiny model in `dir/model`.
fn tiny_model(dir: &Path) -> PathBuf {
    init_model(dir, TINY_CONFIG)
}

/// A text file of `len` bytes of varied words.
fn text_file(dir: &Path, len: usize) -> PathBuf {
    let words = [
        "state ",
        "space ",
        "model ",
        "selective ",
        "scan\n",
        "mamba ",
    ];
    let text: String = words
        .iter()
        .cycle()
        .flat_map(|w| w.chars())
        .take(len)
        .collect();
    let path = dir.join(format!("text-{len}.txt"));
    std::fs::write(&path, text).unwrap();
    path
}

fn peak_rss(report: &Value) -> u64 {
    report["peak_rss_bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no peak_rss_bytes in {report}"))
}

/// A run of the binary on `(model, file, chunk size)`, giving its JSON report.
type FileCommand = fn(&Path, &Path, usize) -> Value;

fn score_file(model: &Path, file: &Path, chunk: usize) -> Value {
    json_output(&mamba(&[
        "score",
        "--model",
        path_arg(model),
        "--file",
        path_arg(file),
        "--chunk-size",
        &chunk.to_string(),
        "--json",
    ]))
}

fn generate_from_file(model: &Path, file: &Path, chunk: usize) -> Value {
    json_output(&mamba(&[
        "generate",
        "--model",
        path_arg(model),
        "--prompt-file",
        path_arg(file),
        "--max-tokens",
        "4",
        "--chunk-size",
        &chunk.to_string(),
        "--json",
    ]))
}

/// How much more peak memory `run` takes on the long file than on the short one.
fn rss_growth(dir: &Path, run: impl Fn(&Path) -> Value) -> u64 {
    let short = peak_rss(&run(&text_file(dir, SHORT)));
    let long = peak_rss(&run(&text_file(dir, LONG)));
    long.saturating_sub(short)
}

#[test]
fn streaming_peak_memory_does_not_grow_with_the_input() {
    let dir = TempDir::new().unwrap();
    let model = tiny_model(dir.path());
    let commands: [(&str, FileCommand); 2] =
        [("score", score_file), ("generate", generate_from_file)];
    for (name, command) in commands {
        let streamed = rss_growth(dir.path(), |file| command(&model, file, 1024));
        assert!(
            streamed < GROWTH_BOUND,
            "{name}: peak RSS grew by {streamed} bytes from {SHORT} to {LONG} tokens"
        );
        // The bound tells streaming apart: one pass over the whole input exceeds it.
        let whole = rss_growth(dir.path(), |file| command(&model, file, LONG));
        assert!(
            whole > GROWTH_BOUND,
            "{name}: one pass grew by only {whole} bytes, the bound cannot fail"
        );
    }
}

#[test]
fn chunked_score_and_generate_match_one_pass() {
    let dir = TempDir::new().unwrap();
    let model = tiny_model(dir.path());
    let file = text_file(dir.path(), 3000);
    let whole = score_file(&model, &file, 3000);
    let want = whole["sequences"][0]["mean_nll"].as_f64().unwrap();
    let want_ids = &generate_from_file(&model, &file, 3000)["generated_ids"];
    for chunk in [1000, 777] {
        let got = score_file(&model, &file, chunk);
        let nll = got["sequences"][0]["mean_nll"].as_f64().unwrap();
        assert!(
            (nll - want).abs() < 1e-5,
            "chunks of {chunk}: NLL {nll} != {want}"
        );
        assert_eq!(got["sequences"][0]["tokens"], 3000);
        let generated = generate_from_file(&model, &file, chunk);
        assert_eq!(&generated["generated_ids"], want_ids, "chunks of {chunk}");
        assert_eq!(generated["prompt_tokens"], 3000);
        assert_eq!(generated["prefill_tokens"], 3000);
    }
}

#[test]
fn prompt_file_is_the_prompt_text() {
    let dir = TempDir::new().unwrap();
    let model = tiny_model(dir.path());
    let file = dir.path().join("prompt.txt");
    std::fs::write(&file, "in the beginning").unwrap();
    let args = [
        "generate",
        "--model",
        path_arg(&model),
        "--max-tokens",
        "6",
        "--json",
    ];
    let from_text = json_output(&mamba(
        &[&args[..], &["--prompt", "in the beginning"]].concat(),
    ));
    let from_file = json_output(&mamba(
        &[
            &args[..],
            &["--prompt-file", path_arg(&file), "--chunk-size", "5"],
        ]
        .concat(),
    ));
    assert_eq!(from_file["generated_ids"], from_text["generated_ids"]);
    assert_eq!(from_file["prompt_tokens"], 16);
    assert!(
        from_file.get("prompt_ids").is_none(),
        "file prompts are not listed"
    );
    assert_eq!(from_text["prompt_ids"].as_array().unwrap().len(), 16);
}

#[test]
fn bad_long_inputs_fail_cleanly() {
    let dir = TempDir::new().unwrap();
    let model = tiny_model(dir.path());
    let model = path_arg(&model);
    let absent = dir.path().join("absent.txt");
    let absent = path_arg(&absent);
    assert_fails_with(
        &["generate", "--model", model, "--prompt-file", absent],
        "absent.txt",
    );
    assert_fails_with(&["score", "--model", model, "--file", absent], "absent.txt");
    let file = text_file(dir.path(), 100);
    assert_fails_with(
        &[
            "score",
            "--model",
            model,
            "--file",
            path_arg(&file),
            "--chunk-size",
            "0",
        ],
        "--chunk-size",
    );
    assert_fails_with(
        &[
            "generate",
            "--model",
            model,
            "--prompt",
            "x",
            "--prompt-file",
            path_arg(&file),
        ],
        "--prompt-file",
    );
}

/// `mamba scaling` over a tiny model: tiny lengths and batches, then limits so small that
/// the first point is stopped.
fn scaling(dir: &Path, out: &str, extra: &[&str]) -> Value {
    let config = dir.join("config.json");
    std::fs::write(&config, TINY_CONFIG).unwrap();
    let out = dir.join(out);
    let mut args = vec![
        "scaling",
        "--config",
        path_arg(&config),
        "--min-len",
        "64",
        "--max-len",
        "256",
        "--max-batch",
        "2",
        "--batch-prompt-len",
        "64",
        "--gen-len",
        "2",
        "--out",
        path_arg(&out),
        "--json",
    ];
    args.extend_from_slice(extra);
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    json_output(&mamba(&refs))
}

fn statuses(report: &Value) -> Vec<(String, u64, u64, String)> {
    report["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["sweep"].as_str().unwrap().to_string(),
                p["prompt_len"].as_u64().unwrap(),
                p["batch"].as_u64().unwrap(),
                p["status"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn scaling_writes_tables_and_plots() {
    let dir = TempDir::new().unwrap();
    let report = scaling(dir.path(), "out", &[]);
    let out = dir.path().join("out");
    let expected_points: Vec<(String, u64, u64, String)> = [
        ("length", 64, 1),
        ("length", 128, 1),
        ("length", 256, 1),
        ("batch", 64, 1),
        ("batch", 64, 2),
    ]
    .iter()
    .map(|&(s, l, b)| (s.to_string(), l, b, "ok".to_string()))
    .collect();
    assert_eq!(statuses(&report), expected_points);
    for point in report["points"].as_array().unwrap() {
        for key in ["prefill_seconds", "decode_tokens_per_s", "wall_seconds"] {
            assert!(point[key].as_f64().unwrap() > 0.0, "{key}: {point}");
        }
        assert!(point["peak_rss_bytes"].as_u64().unwrap() > 0);
        // On the CPU there is no device memory to record.
        assert!(point["peak_device_bytes"].is_null(), "{point}");
    }
    assert_eq!(report["settings"]["device"], "cpu");
    let model = &report["models"][0];
    assert_eq!(model["name"], "config");
    assert_eq!(model["family"], "mamba");
    assert!(model["prefill_slope"].as_f64().is_some(), "{model}");
    assert_eq!(model["longest_prompt"], 256);

    let csv = std::fs::read_to_string(out.join("scaling.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + expected_points.len());
    let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
    for line in csv.lines() {
        assert_eq!(line.split(',').count(), header.len(), "{line}");
    }
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scaling.json")).unwrap()).unwrap();
    assert_eq!(written, report);
    for plot in [
        "prefill_time",
        "memory",
        "decode_vs_context",
        "decode_vs_batch",
    ] {
        let svg = std::fs::read_to_string(out.join(format!("{plot}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("config"), "{plot}");
    }
}

#[test]
fn scaling_stops_points_over_its_limits() {
    let dir = TempDir::new().unwrap();
    // 1 MiB: less than any process takes.
    let report = scaling(dir.path(), "budget", &["--memory-budget", "0.001"]);
    let got: Vec<String> = statuses(&report).into_iter().map(|p| p.3).collect();
    assert_eq!(
        got,
        [
            "over_budget",
            "skipped",
            "skipped",
            "over_budget",
            "skipped"
        ]
    );
    assert!(report["models"][0]["prefill_slope"].is_null());
    // A millisecond: less than any process takes to start.
    let report = scaling(dir.path(), "timeout", &["--point-timeout", "0.001"]);
    let got: Vec<String> = statuses(&report).into_iter().map(|p| p.3).collect();
    assert_eq!(got, ["timeout", "skipped", "skipped", "timeout", "skipped"]);
}
