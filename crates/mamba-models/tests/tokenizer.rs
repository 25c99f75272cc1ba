//! The tokenizer wrapper against the fixture's `examples.json` (produced by HF
//! `tokenizers`), streaming decoding, and the byte-level fallback.

use mamba_models::tokenizer::Tokenizer;
use mamba_models::Error;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn tokenizer_fixtures() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/tokenizer");
    assert!(
        dir.join("tokenizer.json").is_file(),
        "golden fixtures not found at {}: the shared fixture set must sit next to the workspace",
        dir.display()
    );
    dir
}

fn fixture_tokenizer() -> Tokenizer {
    Tokenizer::from_file(&tokenizer_fixtures().join("tokenizer.json")).unwrap()
}

/// One entry of `examples.json`.
struct Example {
    text: String,
    ids: Vec<u32>,
    decoded: String,
    decoded_skip_special: String,
}

fn examples() -> Vec<Example> {
    let path = tokenizer_fixtures().join("examples.json");
    let value: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let text = |e: &Value, key: &str| e[key].as_str().unwrap().to_string();
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|e| Example {
            text: text(e, "text"),
            ids: e["ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|id| id.as_u64().unwrap() as u32)
                .collect(),
            decoded: text(e, "decoded"),
            decoded_skip_special: text(e, "decoded_skip_special"),
        })
        .collect()
}

/// Pushes `ids` one at a time; returns every piece `push` and `finish` produced.
fn stream_pieces(tokenizer: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut stream = tokenizer.stream();
    let mut pieces: Vec<String> = ids
        .iter()
        .filter_map(|&id| stream.push(id).unwrap())
        .collect();
    pieces.extend(stream.finish().unwrap());
    assert_eq!(stream.ids(), ids);
    pieces
}

#[test]
fn encode_matches_the_reference_ids() {
    let tokenizer = fixture_tokenizer();
    for ex in examples() {
        assert_eq!(tokenizer.encode(&ex.text).unwrap(), ex.ids, "{:?}", ex.text);
    }
}

#[test]
fn decode_keeps_special_tokens_and_can_skip_them() {
    let tokenizer = fixture_tokenizer();
    for ex in examples() {
        assert_eq!(
            tokenizer.decode(&ex.ids).unwrap(),
            ex.decoded,
            "{:?}",
            ex.text
        );
        assert_eq!(
            tokenizer.decode_skipping_special(&ex.ids).unwrap(),
            ex.decoded_skip_special,
            "{:?}",
            ex.text
        );
    }
}

#[test]
fn vocabulary_lookups() {
    let tokenizer = fixture_tokenizer();
    assert_eq!(tokenizer.vocab_size(), 320);
    assert_eq!(tokenizer.token_id("<|endoftext|>"), Some(0));
    assert_eq!(tokenizer.token_id("<|padding|>"), Some(1));
    assert_eq!(tokenizer.token_id("no such token"), None);
}

#[test]
fn streamed_pieces_concatenate_to_decode() {
    let tokenizer = fixture_tokenizer();
    let mut all_ids = Vec::new();
    for ex in examples() {
        let pieces = stream_pieces(&tokenizer, &ex.ids);
        assert_eq!(
            pieces.concat(),
            tokenizer.decode(&ex.ids).unwrap(),
            "{:?}",
            ex.text
        );
        all_ids.extend(ex.ids);
    }
    let pieces = stream_pieces(&tokenizer, &all_ids);
    assert_eq!(pieces.concat(), tokenizer.decode(&all_ids).unwrap());
}

#[test]
fn streaming_holds_back_split_characters() {
    let tokenizer = fixture_tokenizer();
    let ex = examples()
        .into_iter()
        .find(|e| e.text.contains('🙂'))
        .expect("examples.json has a text with an emoji");
    // The byte-level vocabulary is too small to hold every character in one token.
    let mut stream = tokenizer.stream();
    let mut held_back = 0;
    let mut text = String::new();
    for &id in &ex.ids {
        match stream.push(id).unwrap() {
            Some(piece) => {
                assert!(
                    !piece.contains('\u{FFFD}'),
                    "incomplete character emitted: {piece:?}"
                );
                text.push_str(&piece);
            }
            None => held_back += 1,
        }
    }
    assert!(held_back > 0, "no character was split across tokens");
    assert_eq!(stream.finish().unwrap(), None);
    assert_eq!(text, ex.text);
}

#[test]
fn finish_flushes_an_incomplete_character() {
    let tokenizer = Tokenizer::bytes();
    let mut stream = tokenizer.stream();
    assert_eq!(stream.push(u32::from(b'a')).unwrap().as_deref(), Some("a"));
    let euro = "€".as_bytes();
    assert_eq!(stream.push(u32::from(euro[0])).unwrap(), None);
    assert_eq!(stream.push(u32::from(euro[1])).unwrap(), None);
    assert_eq!(stream.finish().unwrap().as_deref(), Some("\u{FFFD}"));
    // The stream goes on after a flush.
    assert_eq!(stream.push(u32::from(b'b')).unwrap().as_deref(), Some("b"));
    assert_eq!(stream.finish().unwrap(), None);
}

#[test]
fn byte_tokenizer_round_trips_utf8() {
    let tokenizer = Tokenizer::bytes();
    let text = "naïve 日本語 🙂";
    let ids = tokenizer.encode(text).unwrap();
    assert_eq!(ids, text.bytes().map(u32::from).collect::<Vec<_>>());
    assert_eq!(tokenizer.decode(&ids).unwrap(), text);
    assert_eq!(stream_pieces(&tokenizer, &ids).concat(), text);
    assert_eq!(tokenizer.vocab_size(), 256);
    assert_eq!(tokenizer.token_id("A"), Some(65));
    assert_eq!(tokenizer.token_id("AB"), None);
}

#[test]
fn byte_tokenizer_decodes_lossily_and_rejects_large_ids() {
    let tokenizer = Tokenizer::bytes();
    assert_eq!(tokenizer.decode(&[104, 0xFF, 105]).unwrap(), "h\u{FFFD}i");
    assert!(matches!(
        tokenizer.decode(&[104, 256]),
        Err(Error::Tokenizer(_))
    ));
    let mut stream = tokenizer.stream();
    assert!(matches!(stream.push(1000), Err(Error::Tokenizer(_))));
}

#[test]
fn unreadable_tokenizer_files_are_errors() {
    let dir = std::env::temp_dir().join(format!(
        "mamba-models-test-tokenizer-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let missing = dir.join("missing.json");
    match Tokenizer::from_file(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        Err(other) => panic!("expected Io error, got {other:?}"),
        Ok(_) => panic!("a missing file was accepted"),
    }
    let garbage = dir.join("tokenizer.json");
    std::fs::write(&garbage, b"{\"model\": 42}").unwrap();
    let result = Tokenizer::from_file(&garbage);
    std::fs::remove_dir_all(&dir).unwrap();
    match result {
        Err(Error::Tokenizer(msg)) => assert!(msg.contains("tokenizer.json"), "{msg}"),
        Err(other) => panic!("expected Tokenizer error, got {other:?}"),
        Ok(_) => panic!("a garbage file was accepted"),
    }
}
