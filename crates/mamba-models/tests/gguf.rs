//! GGUF files: fixture checkpoints written as llama.cpp GGUF and loaded back give the
//! checkpoint's model (f32 exactly; q8_0 / q4_0 the same as quantising in memory), and
//! damaged or foreign files are clear errors.

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use mamba_models::checkpoint::Checkpoint;
use mamba_models::config::ModelConfig;
use mamba_models::gguf::{self, GgufVocab, WriteOptions};
use mamba_models::init::init_tensors;
use mamba_models::layers::{f32_vec, QuantFormat};
use mamba_models::{Model, WeightFormat};
use mamba_ops::quant::QuantMatrix;
use mamba_testing::{fixtures_dir, max_abs_diff};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// The fixtures whose architecture llama.cpp has (Mamba-1 tied with a BPE tokenizer,
/// FalconMamba and Mamba-2 byte-level).
const MODELS: [&str; 3] = ["mamba_tied", "falcon_mamba", "mamba2"];

fn checkpoint(model: &str) -> Checkpoint {
    let dir = fixtures_dir().join("models").join(model).join("checkpoint");
    Checkpoint::open(&dir).unwrap()
}

/// Writes `model` as `dir/{model}.gguf`.
fn write_gguf(model: &str, dir: &Path, quant: Option<QuantFormat>) -> PathBuf {
    let out = dir.join(format!("{model}.gguf"));
    let options = WriteOptions {
        quant,
        ..WriteOptions::default()
    };
    gguf::write_checkpoint(&checkpoint(model), &out, &options).unwrap();
    out
}

/// The checkpoint's config as a GGUF file records it: no chunk size (transformers' 256,
/// which changes only the rounding) and FalconMamba's Δ/B/C norms with the layer norm's
/// epsilon, as llama.cpp runs them; no padding token.
fn as_gguf_records(config: &ModelConfig) -> ModelConfig {
    let mut config = config.clone();
    match &mut config {
        ModelConfig::Mamba2(c) => {
            c.chunk_size = 256;
            c.pad_token_id = None;
        }
        ModelConfig::Mamba(c) | ModelConfig::FalconMamba(c) => {
            c.mixer_rms_eps = c.mixer_rms_eps.map(|_| c.layer_norm_epsilon);
            c.pad_token_id = None;
        }
        _ => {}
    }
    config
}

/// Every tensor of a checkpoint's weight files, in f32.
fn checkpoint_tensors(ckpt: &Checkpoint) -> HashMap<String, Tensor> {
    ckpt.weight_files
        .iter()
        .flat_map(|f| candle_core::safetensors::load(f, &Device::Cpu).unwrap())
        .map(|(name, t)| (name, t.to_dtype(DType::F32).unwrap()))
        .collect()
}

/// Ids for two sequences of `len` tokens spread over the vocabulary.
fn sample_ids(vocab: usize, len: usize) -> Vec<u32> {
    (0..2 * len)
        .map(|i| ((i * 37 + 5) % vocab) as u32)
        .collect()
}

/// The logits of a prefill over every position, then of three decoding steps.
fn logits_trace(model: &Model) -> Vec<f32> {
    let ids = sample_ids(model.vocab_size(), 11);
    let mut state = model.new_state(2);
    let hidden = model.forward(&ids, &mut state).unwrap();
    let mut trace = f32_vec(&model.logits(&hidden).unwrap()).unwrap();
    for step in 0..3u32 {
        let logits = model.step(&[step, 7 + step], &mut state).unwrap();
        trace.extend(f32_vec(&logits).unwrap());
    }
    trace
}

#[test]
fn f32_round_trip_gives_the_checkpoints_logits() {
    let dir = TempDir::new().unwrap();
    for name in MODELS {
        let ckpt = checkpoint(name);
        let path = write_gguf(name, dir.path(), None);
        let loaded = gguf::load(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.weight_format, WeightFormat::F32, "{name}");

        let want_config = as_gguf_records(&ckpt.config);
        let got_config = &loaded.model.config;
        assert_eq!(got_config.family(), want_config.family(), "{name}");
        assert_eq!(got_config.vocab_size(), want_config.vocab_size(), "{name}");
        assert_eq!(
            got_config.tie_word_embeddings(),
            want_config.tie_word_embeddings(),
            "{name}"
        );
        assert_eq!(
            got_config.eos_token_id(),
            want_config.eos_token_id(),
            "{name}"
        );

        let vb = ckpt.var_builder(DType::F32, &Device::Cpu).unwrap();
        let reference = Model::from_var_builder(&vb, &want_config).unwrap();
        let want = logits_trace(&reference);
        let got = logits_trace(&loaded.model);
        assert_eq!(got.len(), want.len(), "{name}");
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= 1e-6, "{name}: logits differ by {diff}");
    }
}

/// The model that quantising the checkpoint in memory gives, with the embedding as a
/// quantised file stores it (its rows go through the format and back).
fn quantised_in_memory(ckpt: &Checkpoint, format: WeightFormat) -> Model {
    let quant = format.quant().unwrap();
    let mut tensors = checkpoint_tensors(ckpt);
    let embedding = &tensors["backbone.embeddings.weight"];
    let (rows, cols) = embedding.dims2().unwrap();
    let blocks = QuantMatrix::quantize(&f32_vec(embedding).unwrap(), rows, cols, quant).unwrap();
    let stored = Tensor::from_vec(blocks.dequantize(), (rows, cols), &Device::Cpu).unwrap();
    tensors.insert("backbone.embeddings.weight".into(), stored);
    let config = as_gguf_records(&ckpt.config);
    let mut model = Model::from_tensors(tensors, &config, DType::F32).unwrap();
    model.convert_weights(format).unwrap();
    model
}

#[test]
fn quantised_files_load_as_in_memory_quantisation() {
    let dir = TempDir::new().unwrap();
    for (quant, format) in [
        (QuantFormat::Q8_0, WeightFormat::Q8_0),
        (QuantFormat::Q4_0, WeightFormat::Q4_0),
    ] {
        for name in MODELS {
            let path = write_gguf(name, dir.path(), Some(quant));
            let loaded = gguf::load(&path, &Device::Cpu).unwrap();
            assert_eq!(loaded.weight_format, format, "{name}");
            assert_eq!(loaded.model.weight_format(), format, "{name}");
            let reference = quantised_in_memory(&checkpoint(name), format);
            assert_eq!(
                loaded.model.weight_bytes_per_token(),
                reference.weight_bytes_per_token(),
                "{name} {quant:?}"
            );
            let diff = max_abs_diff(&logits_trace(&loaded.model), &logits_trace(&reference));
            assert!(diff <= 1e-6, "{name} {quant:?}: logits differ by {diff}");
        }
    }
}

#[test]
fn quantised_files_keep_small_tensors_in_f32() {
    let dir = TempDir::new().unwrap();
    let path = write_gguf("mamba_tied", dir.path(), Some(QuantFormat::Q8_0));
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    for (name, info) in &content.tensor_infos {
        let linear = ["ssm_in.", "ssm_x.", "ssm_out.", "token_embd."]
            .iter()
            .any(|p| name.contains(p));
        let width = *info.shape.dims().last().unwrap();
        let want = if linear && width % 32 == 0 {
            GgmlDType::Q8_0
        } else {
            GgmlDType::F32
        };
        assert_eq!(info.ggml_dtype, want, "{name}");
    }
    // Tied: llama.cpp reuses token_embd as the output head.
    assert!(!content.tensor_infos.contains_key("output.weight"));
    assert_eq!(
        content.metadata["general.file_type"].to_u32().unwrap(),
        7,
        "MOSTLY_Q8_0"
    );
}

#[test]
fn layout_follows_llama_cpp() {
    let dir = TempDir::new().unwrap();
    let path = write_gguf("mamba2", dir.path(), None);
    let content = Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
    let dims = |name: &str| content.tensor_infos[name].shape.dims().to_vec();
    // Row-major here; llama.cpp's `ne` order is the reverse ({d_conv, channels}, {1, heads}
    // and {d_inner / groups, groups} in src/models/mamba2.cpp).
    assert_eq!(dims("blk.0.ssm_conv1d.weight"), [192, 4]);
    assert_eq!(dims("blk.0.ssm_a"), [8, 1]);
    assert_eq!(dims("blk.0.ssm_d"), [8, 1]);
    assert_eq!(dims("blk.0.ssm_norm.weight"), [2, 64]);
    assert_eq!(dims("blk.1.ssm_in.weight"), [2 * 128 + 2 * 2 * 16 + 8, 64]);
    let a = content
        .tensor(
            &mut std::fs::File::open(&path).unwrap(),
            "blk.0.ssm_a",
            &Device::Cpu,
        )
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap();
    let a_log = &checkpoint_tensors(&checkpoint("mamba2"))["backbone.layers.0.mixer.A_log"];
    let want = f32_vec(&a_log.exp().unwrap().neg().unwrap()).unwrap();
    assert_eq!(f32_vec(&a).unwrap(), want, "ssm_a holds -exp(A_log)");
    let key = |k: &str| content.metadata[k].to_u32().unwrap();
    assert_eq!(key("mamba2.ssm.time_step_rank"), 8, "heads");
    assert_eq!(key("mamba2.ssm.group_count"), 2);
    assert_eq!(key("mamba2.ssm.inner_size"), 128);
    assert_eq!(key("mamba2.feed_forward_length"), 0);
    assert_eq!(key("mamba2.context_length"), 1 << 20);
}

#[test]
fn vocabularies_tokenize_like_the_checkpoint() {
    let dir = TempDir::new().unwrap();
    let texts = [
        "Hello world",
        "  two  spaces\nand a line",
        "été 🦙 <|endoftext|>",
    ];
    // A BPE tokenizer.json rebuilt from tokens and merges.
    let path = write_gguf("mamba_tied", dir.path(), None);
    let loaded = gguf::load(&path, &Device::Cpu).unwrap();
    let tokenizer = loaded.tokenizer.unwrap();
    let ckpt = checkpoint("mamba_tied");
    let original =
        mamba_models::tokenizer::Tokenizer::from_file(ckpt.tokenizer_file.as_ref().unwrap())
            .unwrap();
    for text in texts {
        let ids = original.encode(text).unwrap();
        assert_eq!(tokenizer.encode(text).unwrap(), ids, "{text:?}");
        assert_eq!(
            tokenizer.decode(&ids).unwrap(),
            original.decode(&ids).unwrap()
        );
    }
    // Bytes spelled as GPT-2 characters, no merges.
    let path = write_gguf("mamba2", dir.path(), None);
    let tokenizer = gguf::load(&path, &Device::Cpu).unwrap().tokenizer.unwrap();
    for text in texts {
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(tokenizer.encode(text).unwrap(), bytes, "{text:?}");
    }
}

#[test]
fn a_vocabulary_copied_from_another_file_is_kept() {
    let dir = TempDir::new().unwrap();
    let donor = write_gguf("mamba_tied", dir.path(), None);
    let vocab = GgufVocab::from_gguf_file(&donor).unwrap();
    // mamba2 has 256 embeddings, fewer than the donor's 320 tokens: refused.
    let out = dir.path().join("too-small.gguf");
    let options = WriteOptions {
        vocab: Some(vocab.clone()),
        ..WriteOptions::default()
    };
    let err = gguf::write_checkpoint(&checkpoint("mamba2"), &out, &options).unwrap_err();
    assert!(err.to_string().contains("320 tokens"), "{err}");
    assert!(!out.exists(), "no partial file is left");
    // The same tokenizer's model takes it as is.
    let out = dir.path().join("copied.gguf");
    let options = WriteOptions {
        vocab: Some(vocab.clone()),
        ..WriteOptions::default()
    };
    gguf::write_checkpoint(&checkpoint("mamba_tied"), &out, &options).unwrap();
    let copied = GgufVocab::from_gguf_file(&out).unwrap();
    assert_eq!(copied.tokens, vocab.tokens);
    assert_eq!(copied.merges, vocab.merges);
    assert_eq!(copied.eos_token_id(), vocab.eos_token_id());
}

#[test]
fn models_llama_cpp_cannot_run_are_refused() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("x.gguf");
    for (name, needle) in [("mamba_untied", "use_bias"), ("jamba", "jamba")] {
        let err =
            gguf::write_checkpoint(&checkpoint(name), &out, &WriteOptions::default()).unwrap_err();
        assert!(err.to_string().contains(needle), "{name}: {err}");
    }
}

/// Rewrites a GGUF file with `edit` applied to its metadata and tensors.
fn rewrite(
    from: &Path,
    to: &Path,
    edit: impl FnOnce(&mut Vec<(String, Value)>, &mut Vec<(String, QTensor)>),
) {
    let mut file = std::fs::File::open(from).unwrap();
    let content = Content::read(&mut file).unwrap();
    let mut metadata: Vec<(String, Value)> = content.metadata.clone().into_iter().collect();
    let mut tensors: Vec<(String, QTensor)> = content
        .tensor_infos
        .keys()
        .map(|name| {
            (
                name.clone(),
                content.tensor(&mut file, name, &Device::Cpu).unwrap(),
            )
        })
        .collect();
    edit(&mut metadata, &mut tensors);
    let metadata: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut out = std::fs::File::create(to).unwrap();
    gguf_file::write(&mut out, &metadata, &tensors).unwrap();
}

fn load_error(path: &Path) -> String {
    gguf::load(path, &Device::Cpu).unwrap_err().to_string()
}

#[test]
fn damaged_and_foreign_files_are_clear_errors() {
    let dir = TempDir::new().unwrap();
    let good = write_gguf("mamba2", dir.path(), None);
    let bytes = std::fs::read(&good).unwrap();

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&truncated);
    assert!(
        err.contains("truncated.gguf") && err.contains("cannot read tensor"),
        "{err}"
    );

    let header_cut = dir.path().join("header-cut.gguf");
    std::fs::write(&header_cut, &bytes[..200]).unwrap();
    let err = load_error(&header_cut);
    assert!(
        err.contains("not a GGUF file, or a damaged or truncated one"),
        "{err}"
    );

    let not_gguf = dir.path().join("text.gguf");
    std::fs::write(&not_gguf, "this is not a model").unwrap();
    assert!(load_error(&not_gguf).contains("not a GGUF file"));

    let llama = dir.path().join("llama.gguf");
    rewrite(&good, &llama, |metadata, _| {
        for (key, value) in metadata.iter_mut() {
            if key == "general.architecture" {
                *value = Value::String("llama".into());
            }
        }
    });
    let err = load_error(&llama);
    assert!(
        err.contains("architecture \"llama\" is not supported"),
        "{err}"
    );

    // Q8_K: ggml's activation blocks, never a model's weights.
    let q8k_file = dir.path().join("q8k.gguf");
    rewrite(&good, &q8k_file, |_, tensors| {
        let zeros = Tensor::zeros((64, 256), DType::F32, &Device::Cpu).unwrap();
        let q8k = QTensor::quantize(&zeros, GgmlDType::Q8K).unwrap();
        tensors.push(("blk.0.extra.weight".into(), q8k));
    });
    let err = load_error(&q8k_file);
    assert!(
        err.contains("Q8_K") && err.contains("not supported"),
        "{err}"
    );

    // A type id candle does not know (39 is ggml's MXFP4) in ssm_out's tensor info:
    // name, u32 dimension count, u64 per dimension, then the u32 type.
    let mut patched = bytes.clone();
    let name = b"blk.0.ssm_out.weight";
    let at = patched.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let type_at = at + 4 + 2 * 8;
    patched[type_at..type_at + 4].copy_from_slice(&39u32.to_le_bytes());
    let mxfp4 = dir.path().join("mxfp4.gguf");
    std::fs::write(&mxfp4, patched).unwrap();
    let err = load_error(&mxfp4);
    assert!(
        err.contains("MXFP4") && err.contains("not supported"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shapes_are_named() {
    let dir = TempDir::new().unwrap();
    let good = write_gguf("mamba2", dir.path(), None);
    let bad = dir.path().join("bad.gguf");
    rewrite(&good, &bad, |_, tensors| {
        for (name, tensor) in tensors.iter_mut() {
            if name == "blk.1.ssm_d" {
                let t = Tensor::zeros((4, 1), DType::F32, &Device::Cpu).unwrap();
                *tensor = QTensor::quantize(&t, GgmlDType::F32).unwrap();
            }
        }
    });
    let err = load_error(&bad);
    assert!(
        err.contains("blk.1.ssm_d") && err.contains("[8, 1]"),
        "{err}"
    );
}

/// A two-layer, one-group Mamba-2 whose matrices are 256 columns wide (k-quant blocks) and
/// its f32 GGUF file, in `dir`.
fn wide_mamba2_gguf(dir: &Path) -> PathBuf {
    let json = r#"{"architectures": ["Mamba2ForCausalLM"], "vocab_size": 256, "hidden_size": 256,
        "num_hidden_layers": 2, "state_size": 16, "expand": 2, "head_dim": 64, "num_heads": 8,
        "n_groups": 1, "conv_kernel": 4, "tie_word_embeddings": true}"#;
    let config = ModelConfig::from_json_str(json).unwrap();
    let tensors = init_tensors(&config, DType::F32, 3).unwrap();
    let model_dir = dir.join("wide");
    std::fs::create_dir_all(&model_dir).unwrap();
    candle_core::safetensors::save(&tensors, model_dir.join("model.safetensors")).unwrap();
    std::fs::write(model_dir.join("config.json"), json).unwrap();
    let out = dir.join("wide.gguf");
    gguf::write_checkpoint(
        &Checkpoint::open(&model_dir).unwrap(),
        &out,
        &WriteOptions::default(),
    )
    .unwrap();
    out
}

/// `tensor` as ggml type `ty`, and its values back in f32 (as a reader dequantises them).
fn through(tensor: &QTensor, ty: GgmlDType) -> (QTensor, QTensor) {
    let values = tensor.dequantize(&Device::Cpu).unwrap();
    let blocks = QTensor::quantize(&values, ty).unwrap();
    let back = blocks.dequantize(&Device::Cpu).unwrap();
    (blocks, QTensor::quantize(&back, GgmlDType::F32).unwrap())
}

/// What `llama-quantize` writes and our writer does not: k-quant layers (Q4_K), the
/// embedding in Q6_K (its q4_0 files), and unit dimensions dropped (a one-group Mamba-2's
/// `ssm_norm` of `[1, d_inner]` as `[d_inner]`). Such a file loads as its values would in
/// f32 and then quantised in memory: the layers in q4_0, the tied head in q8_0.
#[test]
fn llama_quantize_files_load_in_the_nearest_formats() {
    let dir = TempDir::new().unwrap();
    let f32_file = wide_mamba2_gguf(dir.path());
    let (k_file, values_file) = (dir.path().join("k.gguf"), dir.path().join("values.gguf"));
    let mut dequantised = HashMap::new();
    rewrite(&f32_file, &k_file, |_, tensors| {
        for (name, tensor) in tensors.iter_mut() {
            let ty = if name.ends_with("ssm_in.weight") || name.ends_with("ssm_out.weight") {
                GgmlDType::Q4K
            } else if name == "token_embd.weight" {
                GgmlDType::Q6K
            } else {
                if name.ends_with("ssm_norm.weight") {
                    assert_eq!(tensor.shape().dims(), &[1, 512]);
                    let values = tensor.dequantize(&Device::Cpu).unwrap().flatten_all();
                    *tensor = QTensor::quantize(&values.unwrap(), GgmlDType::F32).unwrap();
                }
                continue;
            };
            let (blocks, values) = through(tensor, ty);
            *tensor = blocks;
            dequantised.insert(name.clone(), values);
        }
    });
    rewrite(&f32_file, &values_file, |_, tensors| {
        for (name, tensor) in tensors.iter_mut() {
            if let Some(values) = dequantised.remove(name) {
                *tensor = values;
            }
        }
    });

    let loaded = gguf::load(&k_file, &Device::Cpu).unwrap();
    assert_eq!(loaded.weight_format, WeightFormat::Q4_0);
    let mut reference = gguf::load(&values_file, &Device::Cpu).unwrap().model;
    reference.convert_weights(WeightFormat::Q4_0).unwrap();
    reference.convert_head(WeightFormat::Q8_0).unwrap();
    assert_eq!(
        loaded.model.weight_bytes_per_token(),
        reference.weight_bytes_per_token()
    );
    let diff = max_abs_diff(&logits_trace(&loaded.model), &logits_trace(&reference));
    assert!(diff <= 1e-6, "logits differ by {diff}");
}
