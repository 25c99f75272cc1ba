//! The vocabulary of a GGUF file: llama.cpp's `tokenizer.ggml.*` metadata, made from a
//! Hugging Face byte-level BPE `tokenizer.json`, from the 256 bytes of a byte-level model,
//! or copied from another GGUF file; and a [`Tokenizer`] made from it.

use super::{candle_message, gguf_error};
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::path::Path;

/// llama.cpp's token types (`llama_token_type`).
pub const TOKEN_NORMAL: i32 = 1;
pub const TOKEN_CONTROL: i32 = 3;
pub const TOKEN_USER_DEFINED: i32 = 4;
pub const TOKEN_UNUSED: i32 = 5;

const KEY_MODEL: &str = "tokenizer.ggml.model";
const KEY_PRE: &str = "tokenizer.ggml.pre";
const KEY_TOKENS: &str = "tokenizer.ggml.tokens";
const KEY_TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
const KEY_MERGES: &str = "tokenizer.ggml.merges";
const KEY_BOS: &str = "tokenizer.ggml.bos_token_id";
const KEY_EOS: &str = "tokenizer.ggml.eos_token_id";

/// The `tokenizer.ggml.pre` values whose pre-tokenizer is GPT-2's regex in llama.cpp
/// (`llama-vocab.cpp`), the one a Hugging Face `ByteLevel` pre-tokenizer applies.
const GPT2_REGEX_PRES: &[&str] = &["default", "gpt-2", "mpt", "olmo", "jais", "trillion"];

/// A GGUF vocabulary: the token list with types and merges, and the other
/// `tokenizer.ggml.*` keys (special token ids, scores, flags) as they are.
#[derive(Debug, Clone)]
pub struct GgufVocab {
    /// `tokenizer.ggml.model`, e.g. `gpt2`.
    pub model: String,
    /// `tokenizer.ggml.pre`, e.g. `gpt-2`.
    pub pre: Option<String>,
    pub tokens: Vec<String>,
    pub token_types: Vec<i32>,
    /// `"left right"` pairs, highest priority first.
    pub merges: Vec<String>,
    /// Every other `tokenizer.ggml.*` key, sorted by name.
    pub other: Vec<(String, Value)>,
}

impl GgufVocab {
    /// The vocabulary in a GGUF file's metadata, `None` when it has none.
    pub fn from_metadata(metadata: &HashMap<String, Value>, path: &Path) -> Result<Option<Self>> {
        let Some(model) = metadata.get(KEY_MODEL) else {
            return Ok(None);
        };
        let bad = |key: &str| gguf_error(path, format!("malformed {key}"));
        let model = model.to_string().map_err(|_| bad(KEY_MODEL))?.clone();
        let pre = metadata
            .get(KEY_PRE)
            .map(|v| v.to_string().cloned().map_err(|_| bad(KEY_PRE)))
            .transpose()?;
        let tokens = string_array(metadata, KEY_TOKENS)
            .ok_or_else(|| bad(KEY_TOKENS))?
            .unwrap_or_default();
        let token_types = match metadata.get(KEY_TOKEN_TYPE) {
            None => vec![TOKEN_NORMAL; tokens.len()],
            Some(v) => int_array(v).ok_or_else(|| bad(KEY_TOKEN_TYPE))?,
        };
        if token_types.len() != tokens.len() {
            return Err(gguf_error(
                path,
                format!(
                    "{} token types for {} tokens",
                    token_types.len(),
                    tokens.len()
                ),
            ));
        }
        let merges = string_array(metadata, KEY_MERGES)
            .ok_or_else(|| bad(KEY_MERGES))?
            .unwrap_or_default();
        let named = [KEY_MODEL, KEY_PRE, KEY_TOKENS, KEY_TOKEN_TYPE, KEY_MERGES];
        let mut other: Vec<(String, Value)> = metadata
            .iter()
            .filter(|(k, _)| k.starts_with("tokenizer.ggml.") && !named.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        other.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(GgufVocab {
            model,
            pre,
            tokens,
            token_types,
            merges,
            other,
        }))
    }

    /// The vocabulary of another GGUF file (`--vocab-from`).
    pub fn from_gguf_file(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let content = Content::read(&mut file).map_err(|e| {
            gguf_error(
                path,
                format!("not a readable GGUF file: {}", candle_message(e)),
            )
        })?;
        Self::from_metadata(&content.metadata, path)?
            .ok_or_else(|| gguf_error(path, "the file has no tokenizer.ggml.* vocabulary"))
    }

    /// The vocabulary of a Hugging Face byte-level BPE `tokenizer.json` (GPT-2, GPT-NeoX),
    /// as llama.cpp's converter writes it: every id below `rows` (the embedding's rows) gets
    /// a token, ids the tokenizer lacks become `[PAD{id}]` (unused); added tokens are
    /// control tokens when special, user-defined otherwise.
    pub fn from_tokenizer_json(path: &Path, rows: usize, special: SpecialIds) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|cause| Error::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|cause| Error::Json {
                path: path.to_path_buf(),
                cause,
            })?;
        let not_bpe = || {
            Error::Tokenizer(format!(
                "{}: not a byte-level BPE tokenizer (GPT-2 style), which is all a GGUF gpt2 vocabulary can hold: give the vocabulary with --vocab-from FILE.gguf",
                path.display()
            ))
        };
        if value["model"]["type"] != "BPE" || !mentions_byte_level(&value["pre_tokenizer"]) {
            return Err(not_bpe());
        }
        let mut spelled: HashMap<usize, (String, i32)> = HashMap::new();
        for (token, id) in value["model"]["vocab"].as_object().ok_or_else(not_bpe)? {
            let id = id.as_u64().ok_or_else(not_bpe)? as usize;
            spelled.insert(id, (token.clone(), TOKEN_NORMAL));
        }
        for added in value["added_tokens"].as_array().into_iter().flatten() {
            let (Some(id), Some(content)) = (added["id"].as_u64(), added["content"].as_str())
            else {
                return Err(not_bpe());
            };
            let kind = if added["special"].as_bool().unwrap_or(false) {
                TOKEN_CONTROL
            } else {
                TOKEN_USER_DEFINED
            };
            spelled.insert(id as usize, (content.to_string(), kind));
        }
        if let Some(&beyond) = spelled.keys().filter(|&&id| id >= rows).max() {
            return Err(Error::Tokenizer(format!(
                "{}: token id {beyond} is beyond the model's vocabulary of {rows} embeddings",
                path.display()
            )));
        }
        let (tokens, token_types) = (0..rows)
            .map(|id| {
                spelled
                    .remove(&id)
                    .unwrap_or_else(|| (pad_token(id), TOKEN_UNUSED))
            })
            .unzip();
        let merges = value["model"]["merges"]
            .as_array()
            .into_iter()
            .flatten()
            .map(merge_text)
            .collect::<Option<Vec<String>>>()
            .ok_or_else(not_bpe)?;
        Ok(GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens,
            token_types,
            merges,
            other: special.metadata(),
        })
    }

    /// The vocabulary of a byte-level model (token id = byte value): the 256 bytes spelled
    /// with GPT-2's byte-to-character map and no merges, so that llama.cpp's gpt2 tokenizer
    /// turns text into its bytes; ids from 256 to `rows` are unused `[PAD{id}]` tokens.
    pub fn bytes(rows: usize, special: SpecialIds) -> Result<Self> {
        if rows < 256 {
            return Err(Error::Input(format!(
                "a byte-level vocabulary needs at least 256 embeddings, the model has {rows}"
            )));
        }
        let chars = byte_chars();
        let tokens = (0..rows)
            .map(|id| chars.get(id).map_or_else(|| pad_token(id), char::to_string))
            .collect();
        let token_types = (0..rows)
            .map(|id| if id < 256 { TOKEN_NORMAL } else { TOKEN_UNUSED })
            .collect();
        Ok(GgufVocab {
            model: "gpt2".into(),
            pre: Some("gpt-2".into()),
            tokens,
            token_types,
            merges: Vec::new(),
            other: special.metadata(),
        })
    }

    /// Makes the token list as long as the embedding (`rows`), which llama.cpp requires:
    /// missing ids become unused `[PAD{id}]` tokens; more tokens than rows is an error.
    pub fn fit_to(&mut self, rows: usize) -> Result<()> {
        if self.tokens.len() > rows {
            return Err(Error::Tokenizer(format!(
                "the vocabulary has {} tokens but the model only {rows} embeddings",
                self.tokens.len()
            )));
        }
        for id in self.tokens.len()..rows {
            self.tokens.push(pad_token(id));
            self.token_types.push(TOKEN_UNUSED);
        }
        Ok(())
    }

    /// The `tokenizer.ggml.*` metadata entries, in the converter's order.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let strings = |v: &[String]| Value::Array(v.iter().cloned().map(Value::String).collect());
        let mut entries = vec![(KEY_MODEL.to_string(), Value::String(self.model.clone()))];
        if let Some(pre) = &self.pre {
            entries.push((KEY_PRE.to_string(), Value::String(pre.clone())));
        }
        entries.push((KEY_TOKENS.to_string(), strings(&self.tokens)));
        entries.push((
            KEY_TOKEN_TYPE.to_string(),
            Value::Array(self.token_types.iter().copied().map(Value::I32).collect()),
        ));
        if self.model == "gpt2" || !self.merges.is_empty() {
            entries.push((KEY_MERGES.to_string(), strings(&self.merges)));
        }
        entries.extend(self.other.iter().cloned());
        entries
    }

    /// `tokenizer.ggml.eos_token_id`, when present.
    pub fn eos_token_id(&self) -> Option<u32> {
        self.special_id(KEY_EOS)
    }

    /// `tokenizer.ggml.bos_token_id`, when present.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.special_id(KEY_BOS)
    }

    fn special_id(&self, key: &str) -> Option<u32> {
        self.other
            .iter()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| int_value(v))
            .and_then(|id| u32::try_from(id).ok())
    }

    /// A [`Tokenizer`] for a `gpt2` (byte-level BPE) vocabulary whose pre-tokenizer is
    /// GPT-2's regex; `None` for other tokenizer models, which this crate cannot rebuild.
    /// Unused tokens (`[PAD…]`) are left out, so ids beyond the real vocabulary have no text.
    pub fn tokenizer(&self) -> Result<Option<Tokenizer>> {
        let gpt2_pre = self
            .pre
            .as_deref()
            .is_none_or(|p| GPT2_REGEX_PRES.contains(&p));
        if self.model != "gpt2" || !gpt2_pre {
            return Ok(None);
        }
        let json = self.tokenizer_json().to_string();
        Tokenizer::from_json_bytes(json.as_bytes(), "GGUF vocabulary").map(Some)
    }

    /// The Hugging Face `tokenizer.json` of a byte-level BPE with this vocabulary.
    fn tokenizer_json(&self) -> serde_json::Value {
        let mut vocab = serde_json::Map::new();
        let mut added = Vec::new();
        let mut seen = HashSet::new();
        for (id, (token, &kind)) in self.tokens.iter().zip(&self.token_types).enumerate() {
            if kind == TOKEN_UNUSED || !seen.insert(token.as_str()) {
                continue;
            }
            vocab.insert(token.clone(), json!(id));
            if kind == TOKEN_CONTROL || kind == TOKEN_USER_DEFINED {
                added.push(json!({
                    "id": id, "content": token, "single_word": false, "lstrip": false,
                    "rstrip": false, "normalized": false, "special": kind == TOKEN_CONTROL,
                }));
            }
        }
        let byte_level = |prefix: bool| json!({"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": true, "use_regex": true});
        json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": byte_level(false),
            "post_processor": null,
            "decoder": byte_level(true),
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": self.merges,
            },
        })
    }
}

/// The special token ids a converted vocabulary records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpecialIds {
    pub bos: Option<u32>,
    pub eos: Option<u32>,
    pub pad: Option<u32>,
}

impl SpecialIds {
    fn metadata(self) -> Vec<(String, Value)> {
        [
            (KEY_BOS, self.bos),
            (KEY_EOS, self.eos),
            ("tokenizer.ggml.padding_token_id", self.pad),
        ]
        .into_iter()
        .filter_map(|(k, id)| id.map(|id| (k.to_string(), Value::U32(id))))
        .collect()
    }
}

/// The placeholder llama.cpp's converter writes for an id without a token.
fn pad_token(id: usize) -> String {
    format!("[PAD{id}]")
}

/// GPT-2's `bytes_to_unicode`: the printable character standing for each byte value.
pub fn byte_chars() -> Vec<char> {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 256;
    (0..256u32)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

/// Whether a `pre_tokenizer` entry is, or contains, a `ByteLevel` pre-tokenizer.
fn mentions_byte_level(pre: &serde_json::Value) -> bool {
    pre["type"] == "ByteLevel"
        || pre["pretokenizers"]
            .as_array()
            .is_some_and(|all| all.iter().any(mentions_byte_level))
}

/// A merge as `"left right"`, from either of the forms tokenizer.json uses.
fn merge_text(merge: &serde_json::Value) -> Option<String> {
    match merge {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Array(pair) => match pair.as_slice() {
            [a, b] => Some(format!("{} {}", a.as_str()?, b.as_str()?)),
            _ => None,
        },
        _ => None,
    }
}

/// A string array under `key`: `Some(None)` when absent, `None` when malformed. An empty
/// array of another element type (as some writers store an empty list) counts as empty.
fn string_array(metadata: &HashMap<String, Value>, key: &str) -> Option<Option<Vec<String>>> {
    let Some(value) = metadata.get(key) else {
        return Some(None);
    };
    let items = value.to_vec().ok()?;
    items
        .iter()
        .map(|v| v.to_string().ok().cloned())
        .collect::<Option<Vec<_>>>()
        .map(Some)
}

fn int_array(value: &Value) -> Option<Vec<i32>> {
    value
        .to_vec()
        .ok()?
        .iter()
        .map(|v| int_value(v).and_then(|i| i32::try_from(i).ok()))
        .collect()
}

/// An integer metadata value of any width.
pub(crate) fn int_value(value: &Value) -> Option<i64> {
    Some(match *value {
        Value::U8(v) => v.into(),
        Value::I8(v) => v.into(),
        Value::U16(v) => v.into(),
        Value::I16(v) => v.into(),
        Value::U32(v) => v.into(),
        Value::I32(v) => v.into(),
        Value::U64(v) => i64::try_from(v).ok()?,
        Value::I64(v) => v,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_are_gpt2s_map() {
        let chars = byte_chars();
        assert_eq!(chars[b'a' as usize], 'a');
        assert_eq!(chars[b' ' as usize], 'Ġ');
        assert_eq!(chars[b'\n' as usize], 'Ċ');
        let distinct: HashSet<char> = chars.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn byte_vocabulary_tokenizes_text_to_its_bytes() {
        let vocab = GgufVocab::bytes(260, SpecialIds::default()).unwrap();
        let tokenizer = vocab.tokenizer().unwrap().unwrap();
        let text = "In the beginning, été\n";
        let ids = tokenizer.encode(text).unwrap();
        let bytes: Vec<u32> = text.bytes().map(u32::from).collect();
        assert_eq!(ids, bytes);
        assert_eq!(tokenizer.decode(&ids).unwrap(), text);
        assert_eq!(tokenizer.vocab_size(), 256);
    }

    #[test]
    fn fitting_pads_with_unused_tokens_and_refuses_to_cut() {
        let mut vocab = GgufVocab::bytes(256, SpecialIds::default()).unwrap();
        vocab.fit_to(258).unwrap();
        assert_eq!(vocab.tokens[257], "[PAD257]");
        assert_eq!(vocab.token_types[257], TOKEN_UNUSED);
        assert!(vocab.fit_to(100).is_err());
    }
}
