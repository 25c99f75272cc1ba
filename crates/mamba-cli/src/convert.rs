//! `mamba convert`: a checkpoint as a llama.cpp GGUF file.

use crate::args::{ConvertArgs, ConvertFormat, ConvertQuant};
use anyhow::Result;
use mamba_models::checkpoint::Checkpoint;
use mamba_models::gguf::{write_checkpoint, GgufVocab, WriteOptions};
use mamba_models::layers::QuantFormat;
use serde_json::json;

pub fn run(args: &ConvertArgs, json: bool) -> Result<()> {
    match args.to {
        ConvertFormat::Gguf => to_gguf(args, json),
    }
}

fn to_gguf(args: &ConvertArgs, json: bool) -> Result<()> {
    let checkpoint = Checkpoint::open(&args.model)?;
    let options = WriteOptions {
        quant: args.quant.map(|q| match q {
            ConvertQuant::Q8_0 => QuantFormat::Q8_0,
            ConvertQuant::Q4_0 => QuantFormat::Q4_0,
        }),
        name: args.name.clone(),
        vocab: args
            .vocab_from
            .as_deref()
            .map(GgufVocab::from_gguf_file)
            .transpose()?,
    };
    let summary = write_checkpoint(&checkpoint, &args.out, &options)?;
    let quant = options.quant.map_or("f32", |q| q.name());
    if json {
        println!(
            "{}",
            json!({
                "out": args.out.display().to_string(),
                "architecture": summary.architecture,
                "weights": quant,
                "tensors": summary.tensors,
                "quantized_tensors": summary.quantized_tensors,
                "vocab_tokens": summary.vocab_tokens,
                "bytes": summary.bytes,
            })
        );
    } else {
        println!(
            "wrote {} ({}, {quant}: {} tensors, {} quantised; {} tokens; {} bytes)",
            args.out.display(),
            summary.architecture,
            summary.tensors,
            summary.quantized_tensors,
            summary.vocab_tokens,
            summary.bytes
        );
    }
    Ok(())
}
