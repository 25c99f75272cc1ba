//! Text to token ids and back: a Hugging Face `tokenizer.json`, or raw bytes for
//! byte-level models (vocabulary of 256) that ship no tokenizer, plus incremental
//! decoding for streaming output.

use crate::error::{Error, Result};
use std::fmt;
use std::path::Path;

/// Replacement character that lossy UTF-8 decoding puts where a character is incomplete.
const REPLACEMENT: char = '\u{FFFD}';

/// Number of ids of the byte-level fallback: one per byte value.
const BYTE_VOCAB: usize = 256;

/// A tokenizer: a Hugging Face one, or the identity on bytes.
#[derive(Clone)]
pub struct Tokenizer {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    HuggingFace(Box<tokenizers::Tokenizer>),
    /// Token id = byte value.
    Bytes,
}

impl Tokenizer {
    /// Loads a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        Ok(Tokenizer {
            kind: Kind::HuggingFace(Box::new(inner)),
        })
    }

    /// Parses the text of a Hugging Face `tokenizer.json`; `origin` names it in errors.
    pub fn from_json_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Tokenizer(format!("{origin}: {e}")))?;
        Ok(Tokenizer {
            kind: Kind::HuggingFace(Box::new(inner)),
        })
    }

    /// The byte-level tokenizer: each UTF-8 byte of the text is one token whose id is the
    /// byte value.
    pub fn bytes() -> Self {
        Tokenizer { kind: Kind::Bytes }
    }

    /// Token ids of `text`, without added special tokens (no BOS/EOS).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match &self.kind {
            Kind::HuggingFace(t) => t
                .encode(text, false)
                .map(|enc| enc.get_ids().to_vec())
                .map_err(|e| Error::Tokenizer(format!("cannot encode {text:?}: {e}"))),
            Kind::Bytes => Ok(text.bytes().map(u32::from).collect()),
        }
    }

    /// Text of `ids`, special tokens included. Invalid UTF-8 (such as a character cut
    /// between byte-level tokens) becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, false)
    }

    /// Text of `ids` without the special tokens (such as `<|endoftext|>`).
    pub fn decode_skipping_special(&self, ids: &[u32]) -> Result<String> {
        self.decode_with(ids, true)
    }

    fn decode_with(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        match &self.kind {
            Kind::HuggingFace(t) => t
                .decode(ids, skip_special)
                .map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}"))),
            Kind::Bytes => Ok(String::from_utf8_lossy(&byte_values(ids)?).into_owned()),
        }
    }

    /// The id of the token spelled `s` (e.g. `"<|endoftext|>"`), if the vocabulary has it.
    /// For the byte tokenizer, the id of a one-byte string.
    pub fn token_id(&self, s: &str) -> Option<u32> {
        match &self.kind {
            Kind::HuggingFace(t) => t.token_to_id(s),
            Kind::Bytes => match s.as_bytes() {
                [b] => Some(u32::from(*b)),
                _ => None,
            },
        }
    }

    /// Number of token ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        match &self.kind {
            Kind::HuggingFace(t) => t.get_vocab_size(true),
            Kind::Bytes => BYTE_VOCAB,
        }
    }

    /// A decoder that turns ids pushed one at a time into text pieces.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream::new(self)
    }
}

impl fmt::Debug for Tokenizer {
    /// A summary: the kind and the vocabulary size, not the whole vocabulary.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::HuggingFace(_) => "huggingface",
            Kind::Bytes => "bytes",
        };
        f.debug_struct("Tokenizer")
            .field("kind", &kind)
            .field("vocab_size", &self.vocab_size())
            .finish()
    }
}

/// The bytes that the byte tokenizer's ids stand for.
fn byte_values(ids: &[u32]) -> Result<Vec<u8>> {
    ids.iter()
        .map(|&id| {
            u8::try_from(id).map_err(|_| {
                Error::Tokenizer(format!(
                    "token id {id} is outside the byte vocabulary (0..{BYTE_VOCAB})"
                ))
            })
        })
        .collect()
}

/// Incremental decoding for streaming output.
///
/// Each [`push`](TokenStream::push) returns only the text that became complete with that
/// token, holding back a character whose UTF-8 bytes are split across byte-level tokens
/// until its last byte arrives. The pieces returned by `push` and
/// [`finish`](TokenStream::finish) concatenate to `decode` of all pushed ids.
///
/// It decodes a short window of recent tokens rather than the whole sequence, starting
/// the window one emitted piece back so that decoders which treat the first token
/// specially (such as a leading-space marker) see it in context.
pub struct TokenStream<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    /// Start of the decoding window.
    window_start: usize,
    /// End of the text already returned; `ids[window_start..emitted_end]` is context.
    emitted_end: usize,
}

impl<'a> TokenStream<'a> {
    /// An empty stream over `tokenizer`.
    pub fn new(tokenizer: &'a Tokenizer) -> Self {
        TokenStream {
            tokenizer,
            ids: Vec::new(),
            window_start: 0,
            emitted_end: 0,
        }
    }

    /// Adds one token; returns the new complete text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let pending = self.pending_text()?;
        if pending.as_deref().is_some_and(|t| t.ends_with(REPLACEMENT)) {
            return Ok(None);
        }
        Ok(self.take(pending))
    }

    /// Returns whatever text has been held back (an incomplete character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let pending = self.pending_text()?;
        Ok(self.take(pending))
    }

    /// All ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The text of the tokens not yet returned, `None` when it is empty.
    fn pending_text(&self) -> Result<Option<String>> {
        let context = self
            .tokenizer
            .decode(&self.ids[self.window_start..self.emitted_end])?;
        let window = self.tokenizer.decode(&self.ids[self.window_start..])?;
        Ok(window
            .get(context.len()..)
            .filter(|t| !t.is_empty())
            .map(str::to_string))
    }

    /// Marks every pushed token as returned and passes `text` on.
    fn take(&mut self, text: Option<String>) -> Option<String> {
        if text.is_some() {
            self.window_start = self.emitted_end;
            self.emitted_end = self.ids.len();
        }
        text
    }
}
