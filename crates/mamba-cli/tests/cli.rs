//! The `mamba` binary against the golden fixtures in ../shared/fixtures/models: greedy
//! generation, scoring and logits, `info` sizes, `bench` output, and clean failures on
//! bad input.

mod common;

use common::*;
use mamba_models::tokenizer::Tokenizer;
use mamba_testing::{assert_close, fixtures_dir, read_json, read_safetensors, Tensor};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The fixture models that `generate` must reproduce.
const MODELS: [&str; 5] = [
    "mamba_tied",
    "mamba_untied",
    "falcon_mamba",
    "mamba2",
    "jamba",
];

/// Blanket float32 tolerance for the fixtures' logits (see the fixtures README).
const LOGITS_TOLERANCE: (f64, f64) = (1e-4, 1e-3);

fn checkpoint(model: &str) -> PathBuf {
    fixtures_dir().join("models").join(model).join("checkpoint")
}

fn expected(model: &str) -> HashMap<String, Tensor> {
    read_safetensors(
        &fixtures_dir()
            .join("models")
            .join(model)
            .join("expected.safetensors"),
    )
}

fn token_ids(t: &Tensor) -> Vec<u32> {
    t.i64().iter().map(|&v| u32::try_from(v).unwrap()).collect()
}

/// `1,2,3`, as `--prompt-ids` and `--ids` take them.
fn ids_arg(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

fn u32_list(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not a list"))
        .iter()
        .map(|x| u32::try_from(x.as_u64().unwrap()).unwrap())
        .collect()
}

/// A writable copy of a fixture checkpoint.
fn copy_checkpoint(model: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    for entry in std::fs::read_dir(checkpoint(model)).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, dir.path().join(path.file_name().unwrap())).unwrap();
    }
    dir
}

/// Rewrites `dir/config.json` through `edit`.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) {
    let path = dir.join("config.json");
    let mut config = read_json(&path);
    edit(config.as_object_mut().unwrap());
    std::fs::write(&path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
}

/// The expected new tokens as `generate` gives them: HF generated without an EOS, but the
/// CLI stops after the config's `eos_token_id`, so the expected ids end at its first
/// occurrence (inclusive). None of the current fixtures produces its EOS within 16 tokens.
fn expected_until_eos(new_tokens: &[u32], eos: Option<u32>) -> Vec<u32> {
    match eos.and_then(|e| new_tokens.iter().position(|&id| id == e)) {
        Some(i) => new_tokens[..=i].to_vec(),
        None => new_tokens.to_vec(),
    }
}

#[test]
fn generate_reproduces_greedy_fixture_ids() {
    for model in MODELS {
        let expected = expected(model);
        let prompt = token_ids(&expected["prompt_ids"]);
        let all = token_ids(&expected["generated_ids"]);
        let config = read_json(&checkpoint(model).join("config.json"));
        let eos = config["eos_token_id"].as_u64().map(|e| e as u32);
        let want = expected_until_eos(&all[prompt.len()..], eos);
        assert_eq!(want.len(), 16, "{model}: the fixture now stops at its EOS");

        let ckpt = checkpoint(model);
        let out = mamba(&[
            "generate",
            "--model",
            path_arg(&ckpt),
            "--prompt-ids",
            &ids_arg(&prompt),
            "--max-tokens",
            "16",
            "--json",
        ]);
        let report = json_output(&out);
        assert_eq!(
            stdout(&out).lines().count(),
            1,
            "{model}: --json prints one line"
        );
        assert_eq!(u32_list(&report["prompt_ids"]), prompt, "{model}");
        assert_eq!(u32_list(&report["generated_ids"]), want, "{model}");
        assert_eq!(report["prefill_tokens"], prompt.len(), "{model}");
        assert_eq!(report["decode_tokens"], want.len() - 1, "{model}");
        for key in ["prefill_tokens_per_s", "decode_tokens_per_s"] {
            assert!(report[key].as_f64().unwrap() > 0.0, "{model}: {key}");
        }
    }
}

/// Mean over positions of `-log softmax(logits[t])[ids[t + 1]]`, in f64.
fn mean_nll(logits: &[f64], ids: &[u32], vocab: usize) -> f64 {
    let total: f64 = (0..ids.len() - 1)
        .map(|t| {
            let row = &logits[t * vocab..][..vocab];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let log_sum = row.iter().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
            log_sum - row[ids[t + 1] as usize]
        })
        .sum();
    total / (ids.len() - 1) as f64
}

#[test]
fn score_matches_fixture_logits_and_nll() {
    for model in ["mamba2", "mamba_tied", "jamba"] {
        let expected = expected(model);
        let input = &expected["input_ids"];
        let (batch, len) = (input.shape[0], input.shape[1]);
        let rows: Vec<Vec<u32>> = token_ids(input).chunks(len).map(<[u32]>::to_vec).collect();
        let want_logits = &expected["logits"];
        let vocab = want_logits.shape[2];

        let dir = TempDir::new().unwrap();
        let logits_path = dir.path().join("logits.safetensors");
        let ckpt = checkpoint(model);
        let (row0, row1) = (ids_arg(&rows[0]), ids_arg(&rows[1]));
        let report = json_output(&mamba(&[
            "score",
            "--model",
            path_arg(&ckpt),
            "--ids",
            &row0,
            "--ids",
            &row1,
            "--logits-out",
            path_arg(&logits_path),
            "--json",
        ]));

        let written = read_safetensors(&logits_path);
        let logits = &written["logits"];
        assert_eq!(written.len(), 1, "{model}: only the logits tensor");
        assert_eq!(logits.shape, vec![batch, len, vocab], "{model}");
        assert_close(
            &format!("{model} logits"),
            &logits.f32(),
            &want_logits.data,
            LOGITS_TOLERANCE,
        );

        let sequences = report["sequences"].as_array().unwrap();
        assert_eq!(sequences.len(), batch, "{model}");
        for (b, (row, got)) in rows.iter().zip(sequences).enumerate() {
            let want = mean_nll(
                &want_logits.data[b * len * vocab..][..len * vocab],
                row,
                vocab,
            );
            let nll = got["mean_nll"].as_f64().unwrap();
            assert!(
                (nll - want).abs() < 1e-4,
                "{model} row {b}: NLL {nll} != {want}"
            );
            let ppl = got["perplexity"].as_f64().unwrap();
            assert!((ppl - nll.exp()).abs() <= 1e-9 * ppl, "{model} row {b}");
            assert_eq!(got["tokens"], len, "{model} row {b}");
        }
    }
}

#[test]
fn generate_from_text_prompt_streams_decoded_text() {
    let ckpt = checkpoint("mamba_tied");
    let tokenizer = Tokenizer::from_file(&ckpt.join("tokenizer.json")).unwrap();
    let prompt = "The state space model";
    let args = [
        "generate",
        "--model",
        path_arg(&ckpt),
        "--prompt",
        prompt,
        "--max-tokens",
        "5",
    ];

    let report = json_output(&mamba(&[&args[..], &["--json"]].concat()));
    let generated = u32_list(&report["generated_ids"]);
    assert_eq!(generated.len(), 5);
    let text = tokenizer.decode(&generated).unwrap();
    assert_eq!(report["text"], text.as_str());
    let fixture_prompt = token_ids(&expected("mamba_tied")["prompt_ids"]);
    assert_eq!(u32_list(&report["prompt_ids"]), fixture_prompt);

    let streamed = mamba(&args);
    assert_success(&streamed);
    assert!(!text.is_empty());
    assert_eq!(stdout(&streamed), format!("{text}\n"));
    assert!(stderr(&streamed).contains("tokens/s"), "no speed summary");
}

/// Elements in every tensor of a safetensors file.
fn stored_parameters(path: &Path) -> usize {
    read_safetensors(path)
        .values()
        .map(|t| t.shape.iter().product::<usize>())
        .sum()
}

fn config_usize(config: &Value, key: &str) -> usize {
    config[key].as_u64().unwrap() as usize
}

#[test]
fn info_reports_parameters_and_state_size() {
    for model in ["mamba2", "mamba_tied"] {
        let ckpt = checkpoint(model);
        let config = read_json(&ckpt.join("config.json"));
        let c = |key| config_usize(&config, key);
        let floats_per_layer = if model == "mamba2" {
            let d_inner = c("num_heads") * c("head_dim");
            let conv_dim = d_inner + 2 * c("n_groups") * c("state_size");
            conv_dim * (c("conv_kernel") - 1) + d_inner * c("state_size")
        } else {
            let d_inner = c("intermediate_size");
            d_inner * (c("conv_kernel") - 1) + d_inner * c("state_size")
        };
        let state_bytes = c("num_hidden_layers") * floats_per_layer * 4;
        let parameters = stored_parameters(&ckpt.join("model.safetensors"));

        let report = json_output(&mamba(&["info", "--model", path_arg(&ckpt), "--json"]));
        assert_eq!(report["parameters"], parameters, "{model}");
        assert_eq!(
            report["weight_bytes"],
            parameters * 4,
            "{model}: f32 weights"
        );
        assert_eq!(report["state_bytes_per_sequence"], state_bytes, "{model}");
        assert_eq!(report["layers"], c("num_hidden_layers"), "{model}");
        assert_eq!(report["vocab_size"], c("vocab_size"), "{model}");

        let human = mamba(&["info", "--model", path_arg(&ckpt)]);
        assert_success(&human);
        let text = stdout(&human);
        assert!(
            text.contains(&format!("parameters: {parameters}\n")),
            "{text}"
        );
        assert!(text.contains(&format!(
            "family: {}\n",
            config["model_type"].as_str().unwrap()
        )));
        assert!(text.contains("kv cache bytes per token: 0\n"), "{text}");
    }
}

/// Jamba: what each layer is made of, the recurrent state of its Mamba layers and the
/// key/value cache of its attention layers, all derived from `config.json`.
#[test]
fn info_reports_jamba_layout_and_cache_sizes() {
    let ckpt = checkpoint("jamba");
    let config = read_json(&ckpt.join("config.json"));
    let c = |key| config_usize(&config, key);
    let layers = c("num_hidden_layers");
    let is_attention = |i: usize| i % c("attn_layer_period") == c("attn_layer_offset");
    let has_experts = |i: usize| i % c("expert_layer_period") == c("expert_layer_offset");
    let layout: Vec<String> = (0..layers)
        .map(|i| {
            let mixer = if is_attention(i) {
                "attention"
            } else {
                "mamba"
            };
            let ffn = if has_experts(i) { "+moe" } else { "" };
            format!("{mixer}{ffn}")
        })
        .collect();
    let attention_layers = (0..layers).filter(|&i| is_attention(i)).count();
    let d_inner = c("mamba_expand") * c("hidden_size");
    let mamba_floats = d_inner * (c("mamba_d_conv") - 1) + d_inner * c("mamba_d_state");
    let state_bytes = (layers - attention_layers) * mamba_floats * 4;
    let head_dim = c("hidden_size") / c("num_attention_heads");
    let kv_bytes = attention_layers * 2 * c("num_key_value_heads") * head_dim * 4;
    let parameters = stored_parameters(&ckpt.join("model.safetensors"));
    assert!(
        attention_layers > 0 && attention_layers < layers,
        "a hybrid"
    );

    let report = json_output(&mamba(&["info", "--model", path_arg(&ckpt), "--json"]));
    assert_eq!(report["family"], "jamba");
    assert_eq!(report["parameters"], parameters);
    assert_eq!(report["layers"], layers);
    assert_eq!(report["layer_layout"], serde_json::json!(layout));
    assert_eq!(report["state_bytes_per_sequence"], state_bytes);
    assert_eq!(report["kv_cache_bytes_per_token"], kv_bytes);
    assert_eq!(report["kv_heads"], c("num_key_value_heads"));
    assert_eq!(report["experts"], c("num_experts"));

    let human = mamba(&["info", "--model", path_arg(&ckpt)]);
    assert_success(&human);
    let text = stdout(&human);
    assert!(text.contains("family: jamba\n"), "{text}");
    assert!(
        text.contains(&format!("layer layout: {}\n", layout.join(", "))),
        "{text}"
    );
    assert!(
        text.contains(&format!("kv cache bytes per token: {kv_bytes}\n")),
        "{text}"
    );
}

#[test]
fn bench_reports_positive_speeds() {
    for preset in ["mamba-130m", "mamba2-130m", "transformer-130m"] {
        let report = json_output(&mamba(&[
            "bench",
            "--preset",
            preset,
            "--prompt-len",
            "16",
            "--gen-len",
            "4",
            "--json",
            "--threads",
            "1",
        ]));
        assert_eq!(report["preset"], preset);
        assert_eq!(report["dtype"], "f32");
        assert_eq!(report["threads"], 1);
        assert_eq!(report["batch"], 1);
        assert_eq!(report["prompt_len"], 16);
        assert_eq!(report["gen_len"], 4);
        assert_eq!(report["warmup"], true);
        for key in [
            "prefill_tokens_per_s",
            "decode_tokens_per_s",
            "ms_per_decode_step",
            "peak_rss_bytes",
        ] {
            let value = report[key].as_f64();
            assert!(
                value.is_some_and(|v| v > 0.0),
                "{preset}: {key} = {}",
                report[key]
            );
        }
        assert!(
            report["peak_device_bytes"].is_null(),
            "{preset}: on the CPU"
        );
        assert_eq!(report["decode_engine"], "host step", "{preset}");
    }
}

#[test]
fn bench_times_the_first_prefill_when_asked() {
    let report = json_output(&mamba(&[
        "bench",
        "--preset",
        "mamba-130m",
        "--prompt-len",
        "8",
        "--gen-len",
        "2",
        "--no-warmup",
        "--json",
    ]));
    assert_eq!(report["warmup"], false);
    assert!(report["prefill_tokens_per_s"]
        .as_f64()
        .is_some_and(|v| v > 0.0));
}

/// `--huge-pages` moves the decoding weights (here 4 MiB `in_proj` matrices of a
/// two-layer Mamba, in f32 and in q8_0) into huge pages: the same greedy tokens as without.
#[test]
fn huge_pages_generate_the_same_tokens() {
    let dir = TempDir::new().unwrap();
    let model = init_model(
        dir.path(),
        r#"{"architectures": ["MambaForCausalLM"], "vocab_size": 256, "hidden_size": 512,
            "num_hidden_layers": 2, "state_size": 8, "expand": 2, "conv_kernel": 4,
            "time_step_rank": 32}"#,
    );
    for dtype in ["f32", "q8_0"] {
        let tokens = |pages: &[&str]| {
            let mut args = vec!["generate", "--model", path_arg(&model), "--dtype", dtype];
            args.extend(["--prompt-ids", "1,2,3", "--max-tokens", "12", "--json"]);
            args.extend(pages);
            u32_list(&json_output(&mamba(&args))["generated_ids"])
        };
        let plain = tokens(&[]);
        assert!(!plain.is_empty(), "{dtype}: nothing generated");
        assert_eq!(tokens(&["--huge-pages"]), plain, "{dtype}");
    }
}

fn generate_args(model_dir: &Path) -> Vec<String> {
    [
        "generate",
        "--model",
        path_arg(model_dir),
        "--prompt-ids",
        "1,2",
    ]
    .map(String::from)
    .to_vec()
}

/// `generate` and `info` on a broken checkpoint directory both fail cleanly.
fn assert_checkpoint_rejected(dir: &Path, needle: &str) {
    let generate = generate_args(dir);
    assert_fails_with(
        &generate.iter().map(String::as_str).collect::<Vec<_>>(),
        needle,
    );
    assert_fails_with(&["info", "--model", path_arg(dir)], needle);
}

#[test]
fn missing_model_dir_fails_cleanly() {
    let dir = TempDir::new().unwrap();
    assert_checkpoint_rejected(&dir.path().join("absent"), "not a directory");
}

#[test]
fn config_without_weights_fails_cleanly() {
    let dir = TempDir::new().unwrap();
    std::fs::copy(
        checkpoint("mamba2").join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    assert_checkpoint_rejected(dir.path(), "no weights found");
}

#[test]
fn corrupt_weights_fail_cleanly() {
    let weights = std::fs::read(checkpoint("mamba2").join("model.safetensors")).unwrap();
    let truncated = weights[..weights.len() / 2].to_vec();
    let garbage = b"this is not a safetensors file at all".to_vec();
    for (what, bytes) in [
        ("truncated", truncated),
        ("garbage", garbage),
        ("empty", Vec::new()),
    ] {
        let dir = copy_checkpoint("mamba2");
        std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
        let out = mamba(&["info", "--model", path_arg(dir.path())]);
        assert_clean_failure(&out, what);
        assert!(
            stderr(&out).contains("model.safetensors"),
            "{what}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn unknown_architecture_fails_cleanly() {
    let dir = copy_checkpoint("mamba2");
    edit_config(dir.path(), |c| {
        c.insert(
            "architectures".into(),
            serde_json::json!(["LlamaForCausalLM"]),
        );
    });
    assert_checkpoint_rejected(dir.path(), "LlamaForCausalLM");
}

#[test]
fn config_disagreeing_with_tensors_fails_cleanly() {
    // Mamba-2 checks its dimensions against each other first: hidden_size 32 no longer
    // matches num_heads * head_dim.
    let dir = copy_checkpoint("mamba2");
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), 32.into());
    });
    assert_checkpoint_rejected(dir.path(), "hidden_size");

    // Consistent configs whose sizes differ from the stored tensors.
    let dir = copy_checkpoint("mamba2");
    edit_config(dir.path(), |c| {
        c.insert("vocab_size".into(), 512.into());
    });
    assert_checkpoint_rejected(dir.path(), "shape mismatch");
    let dir = copy_checkpoint("mamba_untied");
    edit_config(dir.path(), |c| {
        c.insert("hidden_size".into(), 32.into());
    });
    assert_checkpoint_rejected(dir.path(), "shape mismatch");

    // Jamba: key/value heads that the attention weights do not have, and more experts
    // than the checkpoint stores.
    let dir = copy_checkpoint("jamba");
    edit_config(dir.path(), |c| {
        c.insert("num_key_value_heads".into(), 4.into());
    });
    assert_checkpoint_rejected(dir.path(), "shape mismatch");
    let dir = copy_checkpoint("jamba");
    edit_config(dir.path(), |c| {
        c.insert("num_experts".into(), 5.into());
    });
    assert_checkpoint_rejected(dir.path(), "experts.4");
}

#[test]
fn malformed_config_fails_cleanly() {
    let dir = copy_checkpoint("mamba2");
    std::fs::write(dir.path().join("config.json"), "{ \"architectures\": [").unwrap();
    assert_checkpoint_rejected(dir.path(), "malformed JSON");
}

#[test]
fn bad_prompts_fail_cleanly() {
    let mamba2 = checkpoint("mamba2");
    let tied = checkpoint("mamba_tied");
    let jamba = checkpoint("jamba");
    let generate = |model: &Path, flag: &'static str, value: &'static str| {
        let model = path_arg(model).to_string();
        move || mamba(&["generate", "--model", &model, flag, value])
    };
    let cases = [
        (
            "id beyond vocab",
            generate(&mamba2, "--prompt-ids", "99999"),
            "out of range",
        ),
        (
            "id beyond vocab, jamba",
            generate(&jamba, "--prompt-ids", "3,256"),
            "out of range",
        ),
        ("empty text", generate(&tied, "--prompt", ""), "empty"),
        (
            "empty text, bytes",
            generate(&mamba2, "--prompt", ""),
            "empty",
        ),
        (
            "empty ids",
            generate(&mamba2, "--prompt-ids", ""),
            "no token ids",
        ),
        ("bad id", generate(&mamba2, "--prompt-ids", "1,x"), "\"x\""),
    ];
    for (what, run, needle) in cases {
        let out = run();
        assert_clean_failure(&out, what);
        assert!(stderr(&out).contains(needle), "{what}: {}", stderr(&out));
    }
}

#[test]
fn text_prompt_without_tokenizer_asks_for_ids() {
    // mamba_tied's 320-token vocabulary is not byte-level: without tokenizer.json, text
    // cannot be encoded.
    let dir = copy_checkpoint("mamba_tied");
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let model = path_arg(dir.path());
    assert_fails_with(
        &["generate", "--model", model, "--prompt", "hi"],
        "--prompt-ids",
    );
    assert_fails_with(&["score", "--model", model, "--text", "hi"], "--ids");
}

#[test]
fn bad_flag_values_fail_cleanly() {
    let model = checkpoint("mamba2");
    let model = path_arg(&model);
    assert_fails_with(&["bench", "--preset", "mamba-7b"], "unknown preset");
    assert_fails_with(
        &["score", "--model", model, "--ids", "5"],
        "at least 2 tokens",
    );
    assert_fails_with(
        &["score", "--model", model, "--ids", "1,99999"],
        "out of range",
    );
    assert_fails_with(
        &[
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1",
            "--temperature",
            "-1",
        ],
        "temperature",
    );
    assert_fails_with(
        &[
            "generate",
            "--model",
            model,
            "--prompt-ids",
            "1",
            "--dtype",
            "f16",
        ],
        "f16",
    );
    assert_fails_with(&["info", "--model", model, "--threads", "0"], "--threads");
    assert_fails_with(&["generate", "--model", model], "--prompt");
}

#[test]
fn logits_of_unequal_sequences_are_refused() {
    let dir = TempDir::new().unwrap();
    let model = checkpoint("mamba2");
    let out_path = dir.path().join("logits.safetensors");
    assert_fails_with(
        &[
            "score",
            "--model",
            path_arg(&model),
            "--ids",
            "1,2,3",
            "--ids",
            "1,2",
            "--logits-out",
            path_arg(&out_path),
        ],
        "equal length",
    );
    assert!(!out_path.exists());
}

/// A CPU-only build refuses `--device cuda` with one clear line; a malformed device is a
/// usage error. (With `--features cuda` the device is opened instead.)
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_cuda_build_fails_cleanly() {
    let model = checkpoint("mamba_tied");
    for command in ["generate", "score"] {
        let input = if command == "generate" {
            "--prompt-ids"
        } else {
            "--ids"
        };
        assert_fails_with(
            &[
                command,
                "--model",
                path_arg(&model),
                input,
                "1,2,3",
                "--device",
                "cuda",
            ],
            "rebuild with --features cuda",
        );
    }
    assert_fails_with(
        &["bench", "--preset", "mamba-130m", "--device", "cuda:1"],
        "rebuild with --features cuda",
    );
    let out_dir = tempfile::tempdir().unwrap();
    assert_fails_with(
        &[
            "train",
            "--preset",
            "mamba-130m",
            "--data",
            path_arg(&model),
            "--out",
            path_arg(out_dir.path()),
            "--device",
            "cuda",
        ],
        "rebuild with --features cuda",
    );
    let out = mamba(&["bench", "--preset", "mamba-130m", "--device", "gpu"]);
    assert!(
        !out.status.success() && stderr(&out).contains("cuda:N"),
        "{}",
        stderr(&out)
    );
}
