//! `mamba score`: mean negative log-likelihood and perplexity of token sequences, and
//! optionally their logits as a safetensors file.

use crate::args::{ScoreArgs, ScoreInput};
use crate::loading::{file_token_ids, load, require_tokenizer, Loaded};
use crate::memory::peak_rss_bytes;
use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use mamba_models::generate::{score, Score};
use mamba_models::tokenizer::Tokenizer;
use serde_json::json;
use std::io::{self, Write};
use std::path::Path;

pub fn run(args: &ScoreArgs, json: bool) -> Result<()> {
    let Loaded { model, tokenizer } = load(&args.model)?;
    let sequences = sequences(&args.input, tokenizer.as_ref())?;
    if args.logits_out.is_some() {
        check_equal_lengths(&sequences)?;
    }
    let (scores, logits): (Vec<Score>, Vec<Option<Vec<f32>>>) = sequences
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            score(
                &model,
                ids,
                args.chunk.chunk_size,
                args.logits_out.is_some(),
            )
            .with_context(|| format!("sequence {i}"))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    if let Some(path) = &args.logits_out {
        let shape = (sequences.len(), sequences[0].len(), model.vocab_size());
        save_logits(
            path,
            logits.into_iter().flatten().flatten().collect(),
            shape,
        )?;
    }
    if json {
        print_json(&sequences, &scores)
    } else {
        print_lines(&sequences, &scores)
    }
}

/// The token ids of each sequence to score.
fn sequences(input: &ScoreInput, tokenizer: Option<&Tokenizer>) -> Result<Vec<Vec<u32>>> {
    if !input.ids.is_empty() {
        return Ok(input.ids.iter().map(|ids| ids.0.clone()).collect());
    }
    let tokenizer = || require_tokenizer(tokenizer, "--ids");
    Ok(vec![match (&input.text, &input.file) {
        (Some(text), _) => tokenizer()?.encode(text)?,
        (None, Some(path)) => file_token_ids(path, tokenizer()?)?,
        (None, None) => bail!("give the sequences with --text, --file or --ids"),
    }])
}

/// Logits of several sequences form one tensor only when the sequences are equally long.
fn check_equal_lengths(sequences: &[Vec<u32>]) -> Result<()> {
    let lengths: Vec<usize> = sequences.iter().map(Vec::len).collect();
    if lengths.windows(2).any(|w| w[0] != w[1]) {
        let listed: Vec<String> = lengths.iter().map(usize::to_string).collect();
        bail!(
            "--logits-out needs sequences of equal length, got lengths {}",
            listed.join(", ")
        );
    }
    Ok(())
}

/// Writes `logits` as the f32 tensor `logits` of shape `(batch, len, vocab)`.
fn save_logits(path: &Path, logits: Vec<f32>, shape: (usize, usize, usize)) -> Result<()> {
    Tensor::from_vec(logits, shape, &Device::Cpu)?
        .save_safetensors("logits", path)
        .with_context(|| format!("cannot write {}", path.display()))
}

fn print_json(sequences: &[Vec<u32>], scores: &[Score]) -> Result<()> {
    let rows: Vec<_> = sequences
        .iter()
        .zip(scores)
        .map(|(ids, s)| {
            json!({
                "tokens": ids.len(),
                "mean_nll": s.mean_nll,
                "perplexity": s.perplexity(),
            })
        })
        .collect();
    let report = json!({ "sequences": rows, "peak_rss_bytes": peak_rss_bytes() });
    writeln!(io::stdout().lock(), "{report}")?;
    Ok(())
}

fn print_lines(sequences: &[Vec<u32>], scores: &[Score]) -> Result<()> {
    let mut out = io::stdout().lock();
    for (i, (ids, s)) in sequences.iter().zip(scores).enumerate() {
        writeln!(
            out,
            "sequence {i}: {} tokens, mean NLL {:.6} nats, perplexity {:.4}",
            ids.len(),
            s.mean_nll,
            s.perplexity()
        )?;
    }
    Ok(())
}
