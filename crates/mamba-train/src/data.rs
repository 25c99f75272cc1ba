//! Training data: a text file or a folder of them, encoded as bytes (vocabulary 256,
//! MambaByte style) or with a tokenizer, split into training and validation streams, cut
//! into fixed-length sequences and shuffled deterministically.

use crate::{io_err, Error, Result};
use mamba_models::tokenizer::Tokenizer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::path::{Path, PathBuf};

/// How text becomes token ids.
pub enum Encoding<'a> {
    /// One token per byte (vocabulary 256).
    Bytes,
    Tokenizer(&'a Tokenizer),
}

/// The encoded corpus, split in two streams.
#[derive(Debug, Clone, PartialEq)]
pub struct Corpus {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

/// Every regular file under `path` (or `path` itself), sorted for a stable order.
fn text_files(path: &Path) -> Result<Vec<PathBuf>> {
    let meta = std::fs::metadata(path).map_err(io_err(path))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut pending = vec![path.to_path_buf()];
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let entry = entry.map_err(io_err(&dir))?;
            let p = entry.path();
            if p.is_dir() {
                pending.push(p);
            } else if p.is_file() {
                files.push(p);
            }
        }
    }
    files.sort();
    Ok(files)
}

impl Corpus {
    /// Reads and encodes `path`; the last `val_fraction` of the token stream is validation.
    pub fn load(path: &Path, encoding: &Encoding, val_fraction: f64) -> Result<Corpus> {
        let mut tokens = Vec::new();
        for file in text_files(path)? {
            let bytes = std::fs::read(&file).map_err(io_err(&file))?;
            match encoding {
                Encoding::Bytes => tokens.extend(bytes.iter().map(|&b| b as u32)),
                Encoding::Tokenizer(t) => {
                    let text = String::from_utf8(bytes)
                        .map_err(|_| Error::Data(format!("{}: not UTF-8 text", file.display())))?;
                    tokens.extend(t.encode(&text)?);
                }
            }
        }
        if tokens.is_empty() {
            return Err(Error::Data(format!(
                "{}: no data (empty file or folder)",
                path.display()
            )));
        }
        Ok(Corpus::split(tokens, val_fraction))
    }

    /// Splits a token stream: the last `val_fraction` is validation.
    pub fn split(mut tokens: Vec<u32>, val_fraction: f64) -> Corpus {
        let val_len = ((tokens.len() as f64) * val_fraction.clamp(0.0, 1.0)).round() as usize;
        let val = tokens.split_off(tokens.len() - val_len);
        Corpus { train: tokens, val }
    }
}

/// Cuts a stream into windows of `seq_len + 1` tokens (input plus next-token target),
/// one every `seq_len` tokens, and deals them out in batches: each epoch visits every
/// window once in an order shuffled by `(seed, epoch)`. Batch `k` depends only on `k`,
/// so a resumed run sees exactly the batches an uninterrupted one would.
#[derive(Debug, Clone)]
pub struct Batches {
    tokens: Vec<u32>,
    seq_len: usize,
    batch: usize,
    seed: u64,
}

/// Inputs and next-token targets, both `(batch, seq_len)` row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
}

impl Batches {
    pub fn new(tokens: Vec<u32>, seq_len: usize, batch: usize, seed: u64) -> Result<Self> {
        if seq_len == 0 || batch == 0 {
            return Err(Error::Data(
                "sequence length and batch size must be at least 1".into(),
            ));
        }
        if tokens.len() < seq_len + 1 {
            return Err(Error::Data(format!(
                "{} tokens are too few for one sequence of {seq_len} (+1 target)",
                tokens.len()
            )));
        }
        Ok(Batches {
            tokens,
            seq_len,
            batch,
            seed,
        })
    }

    /// Windows in the stream.
    pub fn windows(&self) -> usize {
        (self.tokens.len() - 1) / self.seq_len
    }

    /// The window order of one epoch.
    fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.windows()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15),
        ));
        order
    }

    fn window(&self, w: usize, batch: &mut Batch) {
        let start = w * self.seq_len;
        let span = &self.tokens[start..start + self.seq_len + 1];
        batch.inputs.extend_from_slice(&span[..self.seq_len]);
        batch.targets.extend_from_slice(&span[1..]);
    }

    /// The `k`-th training batch.
    pub fn shuffled(&self, k: u64) -> Batch {
        let n = self.windows() as u64;
        let mut out = Batch {
            inputs: Vec::new(),
            targets: Vec::new(),
        };
        let mut order: Option<(u64, Vec<usize>)> = None;
        for i in 0..self.batch as u64 {
            let global = k * self.batch as u64 + i;
            let epoch = global / n;
            if order.as_ref().is_none_or(|(e, _)| *e != epoch) {
                order = Some((epoch, self.epoch_order(epoch)));
            }
            let (_, o) = order.as_ref().expect("set above");
            self.window(o[(global % n) as usize], &mut out);
        }
        out
    }

    /// The first `count` batches of windows in stream order (for validation), fewer if
    /// the stream is short.
    pub fn in_order(&self, count: usize) -> Vec<Batch> {
        let per = self.batch;
        let usable = (self.windows() / per).clamp(usize::from(self.windows() > 0), count.max(1));
        (0..usable)
            .map(|b| {
                let mut out = Batch {
                    inputs: Vec::new(),
                    targets: Vec::new(),
                };
                for w in (b * per..(b + 1) * per).map(|w| w % self.windows()) {
                    self.window(w, &mut out);
                }
                out
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_are_shifted_windows_and_deterministic() {
        let tokens: Vec<u32> = (0..101).collect();
        let b = Batches::new(tokens, 10, 3, 7).unwrap();
        assert_eq!(b.windows(), 10);
        let first = b.shuffled(0);
        assert_eq!(first.inputs.len(), 30);
        for (x, y) in first.inputs.iter().zip(&first.targets) {
            assert_eq!(x + 1, *y);
        }
        assert_eq!(b.shuffled(5), b.shuffled(5));
        // One epoch (10 windows) visits each window once.
        let mut starts: Vec<u32> = (0..10u64)
            .flat_map(|k| {
                let batch = Batches {
                    batch: 1,
                    ..b.clone()
                }
                .shuffled(k);
                vec![batch.inputs[0]]
            })
            .collect();
        starts.sort();
        assert_eq!(starts, (0..10).map(|w| w * 10).collect::<Vec<u32>>());
    }

    #[test]
    fn split_and_errors() {
        let c = Corpus::split((0..100).collect(), 0.1);
        assert_eq!((c.train.len(), c.val.len()), (90, 10));
        assert!(Batches::new(vec![1, 2, 3], 8, 1, 0).is_err());
    }
}
