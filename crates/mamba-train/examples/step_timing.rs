//! Where one training step's time goes: forward with the loss, backward, the gradient norm
//! and the AdamW update, each timed with the device synchronised, for a preset's
//! dimensions with random weights and random tokens.
//!
//! `cargo run --release -p mamba-train --example step_timing -- [PRESET] [SEQ_LEN] [DEVICE]`
//! (defaults: mamba-130m, 2048, cpu; DEVICE `cuda` needs the `cuda` feature).

use candle_core::{DType, Device};
use mamba_models::config::preset;
use mamba_models::init::init_tensors;
use mamba_train::data::Batch;
use mamba_train::optim::{AdamW, AdamWConfig};
use mamba_train::train::Trainable;
use std::time::Instant;

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn main() -> R<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map_or("mamba-130m", String::as_str);
    let seq_len: usize = args.get(1).map_or(Ok(2048), |s| s.parse())?;
    let device = match args.get(2).map_or("cpu", String::as_str) {
        "cpu" => Device::Cpu,
        cuda => Device::new_cuda(cuda.strip_prefix("cuda:").map_or(Ok(0), str::parse)?)?,
    };
    let config = preset(name)?;
    let model = Trainable::new_on(&config, init_tensors(&config, DType::F32, 0)?, &device)?;
    let mut opt = AdamW::new(model.vars().to_vec(), AdamWConfig::default())?;
    let vocab = model.model.vocab_size() as u64;
    let ids: Vec<u32> = (0..=seq_len as u64)
        .map(|i| ((i * 2_654_435_761) % vocab) as u32)
        .collect();
    let batch = Batch {
        inputs: ids[..seq_len].to_vec(),
        targets: ids[1..].to_vec(),
    };
    let sync = || device.synchronize();
    println!("{name}, {seq_len} tokens, {device:?}: seconds per phase");
    for step in 0..4 {
        let t = Instant::now();
        let loss = model.loss(&batch, 1)?;
        sync()?;
        let forward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let grads = loss.backward()?;
        sync()?;
        let backward = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        let grad_norm = t.elapsed().as_secs_f64();
        let t = Instant::now();
        opt.step(&grads, 1e-4, 1.0)?;
        sync()?;
        let update = t.elapsed().as_secs_f64();
        let total = forward + backward + grad_norm + update;
        println!(
            "step {step}: forward {forward:.4} backward {backward:.4} grad norm {grad_norm:.4} \
             update {update:.4} total {total:.4} ({:.0} tokens/s; norm {norm:.3})",
            seq_len as f64 / total
        );
    }
    Ok(())
}
