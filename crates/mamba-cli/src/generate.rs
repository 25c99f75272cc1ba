//! `mamba generate`: text from a prompt, streamed to stdout as tokens arrive, or one
//! JSON object with the ids, text and speeds.

use crate::args::{GenerateArgs, PromptArgs};
use crate::loading::{file_token_ids, is_decodable, load, require_tokenizer, stop_tokens, Loaded};
use crate::memory::peak_rss_bytes;
use anyhow::{bail, Result};
use mamba_models::generate::{generate, GenerateOptions, Generation};
use mamba_models::tokenizer::{TokenStream, Tokenizer};
use mamba_models::Model;
use serde_json::json;
use std::io::{self, Write};

pub fn run(args: &GenerateArgs, json: bool) -> Result<()> {
    let sampling = args.sampling();
    sampling.validate()?;
    let Loaded { model, tokenizer } = load(&args.model)?;
    let tokenizer = tokenizer.as_ref();
    let prompt = prompt_ids(&args.prompt, tokenizer)?;
    let options = GenerateOptions {
        max_tokens: args.max_tokens,
        sampling,
        stop_tokens: stop_tokens(&model.config, tokenizer),
        chunk_size: args.chunk.chunk_size,
    };
    let generation = if json {
        generate(&model, std::slice::from_ref(&prompt), &options, |_, _| {
            Ok(())
        })?
    } else {
        generate_streaming(&model, &prompt, &options, tokenizer)?
    };
    let generated = &generation.generated[0];
    if let Some(t) = tokenizer {
        note_undecodable(t, generated);
    }
    if json {
        let text = tokenizer.map(|t| decoded_text(t, generated)).transpose()?;
        let listed_prompt = args.prompt.prompt_file.is_none().then_some(&prompt[..]);
        print_json(prompt.len(), listed_prompt, &generation, text)
    } else {
        eprintln!("{}", speed_summary(&generation));
        Ok(())
    }
}

/// The prompt's token ids: given directly, or the encoding of the prompt text or file.
fn prompt_ids(prompt: &PromptArgs, tokenizer: Option<&Tokenizer>) -> Result<Vec<u32>> {
    let tokenizer = || require_tokenizer(tokenizer, "--prompt-ids");
    match (&prompt.prompt, &prompt.prompt_file, &prompt.prompt_ids) {
        (_, _, Some(ids)) => Ok(ids.0.clone()),
        (Some(text), _, None) => Ok(tokenizer()?.encode(text)?),
        (None, Some(path), None) => file_token_ids(path, tokenizer()?),
        (None, None, None) => bail!("give a prompt with --prompt, --prompt-file or --prompt-ids"),
    }
}

/// Generates while writing each new piece of text (or each id, without a tokenizer) to
/// stdout, then ends the line.
fn generate_streaming(
    model: &Model,
    prompt: &[u32],
    options: &GenerateOptions,
    tokenizer: Option<&Tokenizer>,
) -> Result<Generation> {
    let mut out = io::stdout().lock();
    let mut decoder = tokenizer.map(|t| (t, t.stream()));
    let mut first = true;
    let generation = generate(model, &[prompt.to_vec()], options, |_, id| {
        let piece = match decoder.as_mut() {
            Some((t, stream)) => next_text(t, stream, id)?,
            None => Some(id_text(id, first)),
        };
        first = false;
        match piece {
            Some(piece) => write_flushed(&mut out, &piece).map_err(stdout_error),
            None => Ok(()),
        }
    })?;
    if let Some((_, stream)) = decoder.as_mut() {
        if let Some(rest) = stream.finish()? {
            write_flushed(&mut out, &rest)?;
        }
    }
    writeln!(out)?;
    Ok(generation)
}

/// The text completed by token `id`; ids beyond the tokenizer's vocabulary add none.
fn next_text(
    tokenizer: &Tokenizer,
    stream: &mut TokenStream,
    id: u32,
) -> mamba_models::Result<Option<String>> {
    if is_decodable(tokenizer, id) {
        stream.push(id)
    } else {
        Ok(None)
    }
}

/// A token id as streamed without a tokenizer: space-separated.
fn id_text(id: u32, first: bool) -> String {
    if first {
        id.to_string()
    } else {
        format!(" {id}")
    }
}

fn write_flushed(out: &mut impl Write, text: &str) -> io::Result<()> {
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// A failed write to stdout (such as a closed pipe) as an error that stops generation.
fn stdout_error(cause: io::Error) -> mamba_models::Error {
    mamba_models::Error::Caller(Box::new(cause))
}

/// The text of the generated ids the tokenizer knows.
fn decoded_text(tokenizer: &Tokenizer, ids: &[u32]) -> Result<String> {
    let known: Vec<u32> = ids
        .iter()
        .copied()
        .filter(|&id| is_decodable(tokenizer, id))
        .collect();
    Ok(tokenizer.decode(&known)?)
}

/// Tells on stderr when generated ids fall outside the tokenizer (padded vocabularies).
fn note_undecodable(tokenizer: &Tokenizer, ids: &[u32]) {
    let unknown = ids
        .iter()
        .filter(|&&id| !is_decodable(tokenizer, id))
        .count();
    if unknown > 0 {
        eprintln!(
            "note: {unknown} generated ids are beyond the tokenizer's {} tokens and have no text",
            tokenizer.vocab_size()
        );
    }
}

/// The report of `--json`; `prompt_ids` lists the prompt unless it came from a file
/// (which may hold millions of tokens), `prompt_tokens` counts it.
fn print_json(
    prompt_tokens: usize,
    prompt_ids: Option<&[u32]>,
    generation: &Generation,
    text: Option<String>,
) -> Result<()> {
    let mut report = json!({
        "prompt_tokens": prompt_tokens,
        "generated_ids": generation.generated[0],
        "text": text,
        "prefill_tokens": generation.prefill_tokens,
        "prefill_seconds": generation.prefill_seconds,
        "prefill_tokens_per_s": generation.prefill_tokens_per_s(),
        "decode_tokens": generation.decode_tokens,
        "decode_seconds": generation.decode_seconds,
        "decode_tokens_per_s": generation.decode_tokens_per_s(),
        "peak_rss_bytes": peak_rss_bytes(),
    });
    if let Some(ids) = prompt_ids {
        report["prompt_ids"] = json!(ids);
    }
    writeln!(io::stdout().lock(), "{report}")?;
    Ok(())
}

fn speed_summary(g: &Generation) -> String {
    format!(
        "prefill: {} tokens in {:.3} s ({:.1} tokens/s); decode: {} tokens in {:.3} s ({:.1} tokens/s)",
        g.prefill_tokens,
        g.prefill_seconds,
        g.prefill_tokens_per_s(),
        g.decode_tokens,
        g.decode_seconds,
        g.decode_tokens_per_s()
    )
}
