//! Forward and backward timings of every op at the sizes of one mamba-130m / mamba2-130m
//! layer over 512 tokens, reference against fast:
//! `RAYON_NUM_THREADS=2 cargo run --release -p mamba-ops --example op_timing`.

use mamba_ops::causal_conv1d::{
    causal_conv1d, causal_conv1d_backward, causal_conv1d_backward_reference,
    causal_conv1d_token_major, ConvDims, ConvInputs,
};
use mamba_ops::gemm::Products;
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::rmsnorm_gated::{
    rmsnorm_gated, rmsnorm_gated_backward, rmsnorm_gated_backward_reference, NormDims,
};
use mamba_ops::selective_scan::{
    selective_scan, selective_scan_backward, selective_scan_backward_reference,
    selective_scan_token_major, BcForm, ScanDims, ScanInputs,
};
use mamba_ops::ssd::{ssd, ssd_backward, ssd_backward_reference, ssd_with, SsdDims, SsdInputs};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn random(rng: &mut StdRng, n: usize, lo: f32, hi: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi)).collect()
}

/// Seconds per call of `f`: the best of `runs` after a warm-up call.
fn seconds<T>(runs: usize, mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    (0..runs)
        .map(|_| {
            let start = std::time::Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn report(what: &str, forward: f64, reference: f64, fast: f64) {
    println!(
        "{what}: forward {:.2} ms; backward reference {:.1} ms, fast {:.2} ms ({:.0}x)",
        forward * 1e3,
        reference * 1e3,
        fast * 1e3,
        reference / fast
    );
}

fn scan(rng: &mut StdRng) {
    let (d, l, n) = (1536, 512, 16);
    let dims = ScanDims {
        batch: 1,
        dim: d,
        len: l,
        state: n,
        bc: BcForm::Varying { groups: 1 },
    };
    let (u, delta, a) = (
        random(rng, d * l, -1.0, 1.0),
        random(rng, d * l, -3.0, 1.0),
        random(rng, d * n, -4.0, -0.1),
    );
    let (b, c, z) = (
        random(rng, n * l, -1.0, 1.0),
        random(rng, n * l, -1.0, 1.0),
        random(rng, d * l, -2.0, 2.0),
    );
    let (dd, bias, g) = (
        random(rng, d, -1.0, 1.0),
        random(rng, d, -1.0, 0.5),
        random(rng, d * l, -1.0, 1.0),
    );
    let x = ScanInputs {
        u: &u,
        delta: &delta,
        a: &a,
        b: &b,
        c: &c,
        d: Some(&dd),
        z: Some(&z),
        delta_bias: Some(&bias),
        delta_softplus: true,
        initial_state: None,
    };
    let forward = seconds(5, || selective_scan(&dims, &x));
    let reference = seconds(1, || selective_scan_backward_reference(&dims, &x, &g, None));
    let fast = seconds(5, || selective_scan_backward(&dims, &x, &g, None));
    report("selective scan d=1536 L=512 N=16", forward, reference, fast);
    // The same sizes read as token-major inputs (random data either way): prefill's scan.
    let token_major = seconds(5, || selective_scan_token_major(&dims, &x));
    println!(
        "selective scan, token-major (prefill): forward {:.2} ms",
        token_major * 1e3
    );
}

fn chunked_ssd(rng: &mut StdRng) {
    let dims = SsdDims {
        batch: 1,
        len: 512,
        heads: 24,
        head_dim: 64,
        groups: 1,
        state: 128,
        chunk_size: 128,
    };
    let (l, h, p, n) = (dims.len, dims.heads, dims.head_dim, dims.state);
    let (xs, dt, a) = (
        random(rng, l * h * p, -1.0, 1.0),
        random(rng, l * h, -3.0, 1.0),
        random(rng, h, -4.0, -0.5),
    );
    let (b, c) = (random(rng, l * n, -1.0, 1.0), random(rng, l * n, -1.0, 1.0));
    let (dd, bias, g) = (
        random(rng, h, -1.0, 1.0),
        random(rng, h, -1.0, 0.5),
        random(rng, l * h * p, -1.0, 1.0),
    );
    let x = SsdInputs {
        x: &xs,
        dt: &dt,
        a: &a,
        b: &b,
        c: &c,
        d: Some(&dd),
        z: None,
        dt_bias: Some(&bias),
        dt_softplus: true,
        dt_limit: NO_DT_LIMIT,
        initial_states: None,
    };
    let forward = seconds(5, || ssd(&dims, &x));
    let reference = seconds(1, || ssd_backward_reference(&dims, &x, &g, None));
    let fast = seconds(5, || ssd_backward(&dims, &x, &g, None));
    report("SSD L=512 H=24 P=64 N=128 Q=128", forward, reference, fast);
    let bf16 = seconds(5, || ssd_with(&dims, &x, Products::Bf16));
    println!(
        "  forward with bf16 products (a bf16 model's prefill): {:.2} ms",
        bf16 * 1e3
    );
}

fn conv(rng: &mut StdRng) {
    let dims = ConvDims {
        batch: 1,
        dim: 1536,
        len: 512,
        width: 4,
    };
    let xs = random(rng, dims.dim * dims.len, -1.0, 1.0);
    let (weight, bias) = (
        random(rng, dims.dim * dims.width, -1.0, 1.0),
        random(rng, dims.dim, -1.0, 1.0),
    );
    let x = ConvInputs {
        x: &xs,
        weight: &weight,
        bias: Some(&bias),
        initial_states: None,
        silu: true,
    };
    let forward = seconds(5, || causal_conv1d(&dims, &x));
    let reference = seconds(2, || causal_conv1d_backward_reference(&dims, &x, &xs, None));
    let fast = seconds(5, || causal_conv1d_backward(&dims, &x, &xs, None));
    report("causal conv1d d=1536 L=512 W=4", forward, reference, fast);
    // The same sizes read as token-major inputs: prefill's convolution.
    let token_major = seconds(5, || causal_conv1d_token_major(&dims, &x));
    println!(
        "causal conv1d, token-major (prefill): forward {:.3} ms",
        token_major * 1e3
    );
}

fn norm(rng: &mut StdRng) {
    let dims = NormDims {
        rows: 512,
        hidden: 1536,
        group_size: 1536,
        eps: 1e-5,
        norm_before_gate: false,
    };
    let n = dims.rows * dims.hidden;
    let (x, z, g) = (
        random(rng, n, -1.0, 1.0),
        random(rng, n, -2.0, 2.0),
        random(rng, n, -1.0, 1.0),
    );
    let weight = random(rng, dims.hidden, 0.5, 1.5);
    let forward = seconds(5, || rmsnorm_gated(&dims, &x, &weight, Some(&z)));
    let reference = seconds(2, || {
        rmsnorm_gated_backward_reference(&dims, &x, &weight, Some(&z), &g)
    });
    let fast = seconds(5, || {
        rmsnorm_gated_backward(&dims, &x, &weight, Some(&z), &g)
    });
    report(
        "gated RMSNorm rows=512 hidden=1536",
        forward,
        reference,
        fast,
    );
}

fn main() {
    println!("{} threads", rayon::current_num_threads());
    let mut rng = StdRng::seed_from_u64(17);
    scan(&mut rng);
    chunked_ssd(&mut rng);
    conv(&mut rng);
    norm(&mut rng);
}
