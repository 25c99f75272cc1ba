//! Checks and times the CUDA kernels on a GPU (cargo feature `cuda`):
//!
//! 1. every op fixture (`--fixtures DIR`, a copy of `shared/fixtures/ops`) runs through the
//!    `mamba_ops::tensor` functions on the GPU and is compared with the fixture's outputs at the
//!    manifest's tolerances (`|got - want| <= atol + rtol * |want|`);
//! 2. fresh random inputs at the sizes of one mamba-130m layer (d = 1536, N = 16, L = 2048) and
//!    one mamba2-130m layer (H = 24, P = 64, N = 128, L = 2048), plus decoding steps at batch 1
//!    and 64, run on the GPU with f32 and with bf16 inputs and are compared with the fast CPU path
//!    on the same (rounded) values by relative L2 error;
//! 3. the backward kernels (gated RMSNorm, causal conv1d, selective scan, SSD) at those sizes,
//!    mamba-2.8b's scan, mamba2-2.7b's SSD, a long narrow scan, one small grouped scan and one
//!    small gated SSD, on fresh random inputs and output gradients: gradients of every input
//!    compared with the fast CPU backward by relative L2 error, two GPU runs compared bit for
//!    bit (the summed weight gradients are deterministic), and the conv fixtures' gradients of
//!    `sum(out * proj_out)` through candle's autograd on the GPU;
//! 4. each kernel is timed with CUDA events (warm-up, then the median of many batches of
//!    launches queued behind a long copy, so that the device runs them back to back, rotating
//!    between input sets so that L2 does not hold them): the kernel alone (`PackedCall::run`)
//!    and the whole op (packing included), and the host time to queue each; bandwidth is the
//!    bytes of the inputs and outputs over the kernel's time, against a measured
//!    device-to-device copy.
//!
//! Outputs are poisoned with NaNs before every checked run, so an unwritten element fails.
//! Prints a short table last and writes the full log to `--out DIR` (default `.`); exits with
//! status 1 when a check fails. `--cases TEXT` keeps the model-size cases whose name contains
//! TEXT (`--cases ^TEXT`: whose name starts with TEXT), `--no-fixtures` skips part 1 and
//! `--no-timings` part 4 (for runs under a profiler or `compute-sanitizer`).
//!
//! `cargo run --release -p mamba-ops --features cuda --example cuda_check -- --fixtures DIR`

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaSlice, CudaStream};
use candle_core::{DType, Device, Storage, Tensor, Var};
use mamba_ops::math::NO_DT_LIMIT;
use mamba_ops::tensor::{
    causal_conv1d, causal_conv1d_call, causal_conv1d_update, causal_conv1d_update_call,
    rmsnorm_gated, rmsnorm_gated_call, selective_scan, selective_scan_call, selective_state_update,
    selective_state_update_call, ssd, ssd_call, PackedCall, ScanOptions, SsdOptions, StepOptions,
};
use mamba_testing::{read_json, read_safetensors, tolerance};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Relative L2 error allowed between the GPU and the fast CPU path (both accumulate in f32).
const MODEL_SIZE_LIMIT: f64 = 1e-4;
/// The same for gradients returned in bf16 (bf16 inputs): their rounding alone is ~2e-3.
const BF16_GRAD_LIMIT: f64 = 1e-2;
/// Launches per timed batch, timed batches per measurement, input sets rotated through.
const BATCH: usize = 5;
const SAMPLES: usize = 40;
const ROTATE: usize = 3;

/// Everything printed, kept for the log file.
struct Log {
    text: String,
}

impl Log {
    fn line(&mut self, line: impl AsRef<str>) {
        println!("{}", line.as_ref());
        let _ = writeln!(self.text, "{}", line.as_ref());
    }
}

/// One line of the final table.
struct Row {
    what: String,
    measure: String,
    pass: bool,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str, default: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
            .map_or(default.to_string(), String::clone)
    };
    let plan = Plan {
        fixtures: PathBuf::from(arg("--fixtures", ".gpu/fixtures/ops")),
        cases: args
            .iter()
            .position(|a| a == "--cases")
            .and_then(|i| args.get(i + 1).cloned()),
        fixtures_too: !args.iter().any(|a| a == "--no-fixtures"),
        timings: !args.iter().any(|a| a == "--no-timings"),
    };
    let out = PathBuf::from(arg("--out", "."));
    let mut log = Log {
        text: String::new(),
    };
    let result = run(&plan, &mut log);
    let failed = match result {
        Ok(rows) => {
            log.line("\n== summary ==");
            for r in &rows {
                let mark = if r.pass { "ok  " } else { "FAIL" };
                log.line(format!("{mark} {:<48} {}", r.what, r.measure));
            }
            rows.iter().any(|r| !r.pass)
        }
        Err(e) => {
            log.line(format!("error: {e}"));
            true
        }
    };
    let path = out.join("cuda_check.log");
    if let Err(e) = std::fs::File::create(&path).and_then(|mut f| f.write_all(log.text.as_bytes()))
    {
        eprintln!("{}: {e}", path.display());
    }
    std::process::exit(i32::from(failed));
}

/// What to run.
struct Plan {
    fixtures: PathBuf,
    /// Only the model-size cases whose name contains this.
    cases: Option<String>,
    fixtures_too: bool,
    timings: bool,
}

impl Plan {
    /// Whether `--cases` keeps the case named `name`: every case without it; else those whose
    /// name contains its text, or starts with it when the text begins with `^`.
    fn wants(&self, name: &str) -> bool {
        self.cases
            .as_deref()
            .is_none_or(|only| match only.strip_prefix('^') {
                Some(prefix) => name.starts_with(prefix),
                None => name.contains(only),
            })
    }
}

fn run(plan: &Plan, log: &mut Log) -> R<Vec<Row>> {
    let gpu = Device::new_cuda(0)?;
    mamba_ops::cuda::set_poison_outputs(true);
    let mut rows = Vec::new();
    if plan.fixtures_too {
        log.line(format!("== fixtures ({}) ==", plan.fixtures.display()));
        check_fixtures(&plan.fixtures, &gpu, log, &mut rows)?;
    }
    let seed: u64 = rand::rng().random();
    log.line(format!(
        "\n== model sizes, GPU vs fast CPU (seed {seed}) =="
    ));
    let mut rng = StdRng::seed_from_u64(seed);
    let cases: Vec<ModelCase> = model_cases()
        .into_iter()
        .filter(|c| plan.wants(c.name))
        .collect();
    for case in &cases {
        check_model_case(case, &gpu, &mut rng, log, &mut rows)?;
    }
    log.line("\n== backward at model sizes, GPU vs fast CPU backward ==");
    let bwd_cases: Vec<ModelCase> = backward_cases()
        .into_iter()
        .filter(|c| plan.wants(c.name))
        .collect();
    for case in &bwd_cases {
        check_backward_case(case, &gpu, &mut rng, log, &mut rows)?;
    }
    mamba_ops::cuda::set_poison_outputs(false);
    if !plan.timings {
        return Ok(rows);
    }
    log.line("\n== timings ==");
    log.line(
        "device time per launch (median of batches queued behind a copy), kernel alone and the \
         whole op with its packing; host time to queue one launch; bytes of inputs + outputs",
    );
    let mut timer = Timer::new(&gpu)?;
    let copy = timer.copy_bandwidth()?;
    log.line(format!(
        "device-to-device copy: {:.0} GB/s (bytes read + written)",
        copy / 1e9
    ));
    rows.push(Row {
        what: "device-to-device copy".into(),
        measure: format!("{:.0} GB/s", copy / 1e9),
        pass: true,
    });
    for case in &cases {
        for dtype in [DType::F32, DType::BF16] {
            let row = time_model_case(case, dtype, &gpu, &mut rng, &mut timer, copy)?;
            log.line(format!("{:<48} {}", row.what, row.measure));
            rows.push(row);
        }
    }
    for case in &bwd_cases {
        for dtype in [DType::F32, DType::BF16] {
            let row = time_backward_case(case, dtype, &gpu, &mut rng, &mut timer, copy)?;
            log.line(format!("{:<48} {}", row.what, row.measure));
            rows.push(row);
        }
    }
    Ok(rows)
}

// ---------------------------------------------------------------------------------------
// Fixtures

/// One fixture case: its manifest, inputs and expected outputs.
struct Fixture {
    name: String,
    manifest: serde_json::Value,
    inputs: HashMap<String, mamba_testing::Tensor>,
    outputs: HashMap<String, mamba_testing::Tensor>,
}

impl Fixture {
    /// The fixture in `dir`; its gradients (`grads.safetensors`, where present) join the
    /// outputs under their own names (`grad_x`, ...).
    fn load(dir: &Path, name: String) -> Fixture {
        let mut outputs = read_safetensors(&dir.join("outputs.safetensors"));
        let grads = dir.join("grads.safetensors");
        if grads.exists() {
            outputs.extend(read_safetensors(&grads));
        }
        Fixture {
            manifest: read_json(&dir.join("manifest.json")),
            inputs: read_safetensors(&dir.join("inputs.safetensors")),
            outputs,
            name,
        }
    }

    /// Input `name` on `dev`, in the fixture's shape.
    fn input(&self, name: &str, dev: &Device) -> R<Option<Tensor>> {
        self.inputs
            .get(name)
            .map(|t| Ok(Tensor::from_vec(t.f32(), t.shape.as_slice(), dev)?))
            .transpose()
    }

    fn required(&self, name: &str, dev: &Device) -> R<Tensor> {
        self.input(name, dev)?
            .ok_or_else(|| format!("{}: no input {name}", self.name).into())
    }

    fn param(&self, name: &str) -> &serde_json::Value {
        &self.manifest["params"][name]
    }

    fn usize_param(&self, name: &str) -> R<usize> {
        self.param(name)
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| format!("{}: no param {name}", self.name).into())
    }

    /// Compares `got` with output `name` at the tolerance of output `tol_name`.
    fn compare(&self, name: &str, tol_name: &str, got: &Tensor, rows: &mut Vec<Row>) -> R<()> {
        let want = self
            .outputs
            .get(name)
            .ok_or_else(|| format!("{}: no output {name}", self.name))?;
        let got = got.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        let (atol, rtol) = tolerance(&self.manifest, tol_name);
        let (mut max_abs, mut worst) = (0f64, 0f64);
        for (&g, &w) in got.iter().zip(&want.data) {
            let err = (g as f64 - w).abs();
            let ratio = err / (atol + rtol * w.abs());
            max_abs = max_abs.max(if err.is_nan() { f64::INFINITY } else { err });
            worst = worst.max(if ratio.is_nan() { f64::INFINITY } else { ratio });
        }
        let pass = got.len() == want.data.len() && worst <= 1.0;
        rows.push(Row {
            what: format!("{} {name}", self.name),
            measure: format!(
                "max err {max_abs:.1e}, {worst:.2} of tolerance (atol {atol:.0e}, rtol {rtol:.0e})"
            ),
            pass,
        });
        Ok(())
    }
}

fn check_fixtures(root: &Path, gpu: &Device, log: &mut Log, rows: &mut Vec<Row>) -> R<()> {
    let first = rows.len();
    for op in [
        "selective_scan",
        "causal_conv1d",
        "causal_conv1d_update",
        "selective_state_update",
        "ssd",
        "rmsnorm_gated",
    ] {
        let mut names: Vec<String> = std::fs::read_dir(root.join(op))?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?;
        names.sort();
        for name in names {
            let f = Fixture::load(&root.join(op).join(&name), format!("{op}/{name}"));
            match op {
                "selective_scan" => fixture_scan(&f, gpu, rows)?,
                "causal_conv1d" => fixture_conv(&f, gpu, rows)?,
                "causal_conv1d_update" => fixture_conv_update(&f, gpu, rows)?,
                "selective_state_update" => fixture_step(&f, gpu, rows)?,
                "ssd" => fixture_ssd(&f, gpu, rows)?,
                _ => fixture_norm(&f, gpu, rows)?,
            }
            gpu.synchronize()?;
        }
    }
    for r in &rows[first..] {
        log.line(format!(
            "{} {:<48} {}",
            if r.pass { "ok  " } else { "FAIL" },
            r.what,
            r.measure
        ));
    }
    Ok(())
}

/// Channel-major `(b, d, L)` to token-major `(b, L, d)`, and back.
fn swap_last(t: &Tensor) -> R<Tensor> {
    Ok(t.transpose(1, 2)?.contiguous()?)
}

fn fixture_scan(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let (batch, dim, len) = (
        f.usize_param("batch")?,
        f.usize_param("dim")?,
        f.usize_param("seqlen")?,
    );
    let n = f.usize_param("dstate")?;
    // B and C become (batch, L, G, N): one group, G groups, or (time-invariant) one group per
    // channel holding that channel's row at every step.
    let to_tokens = |t: Tensor| -> R<Tensor> {
        Ok(match t.rank() {
            2 => t
                .reshape((1, 1, dim, n))?
                .broadcast_as((batch, len, dim, n))?
                .contiguous()?,
            3 => swap_last(&t)?.reshape((batch, len, 1, n))?,
            _ => t.permute((0, 3, 1, 2))?.contiguous()?,
        })
    };
    let b = to_tokens(f.required("B", gpu)?)?;
    let c = to_tokens(f.required("C", gpu)?)?;
    let z = f.input("z", gpu)?.map(|z| swap_last(&z)).transpose()?;
    let (d, bias) = (f.input("D", gpu)?, f.input("delta_bias", gpu)?);
    let (out, last) = selective_scan(
        &swap_last(&f.required("u", gpu)?)?,
        &swap_last(&f.required("delta", gpu)?)?,
        &f.required("A", gpu)?,
        &b,
        &c,
        ScanOptions {
            d: d.as_ref(),
            z: z.as_ref(),
            delta_bias: bias.as_ref(),
            delta_softplus: f.param("delta_softplus").as_bool() == Some(true),
            initial_state: None,
        },
    )?;
    f.compare("out", "out", &swap_last(&out)?, rows)?;
    f.compare("last_state", "last_state", &last, rows)
}

/// The conv fixture's outputs, and its gradients of `sum(out * proj_out)` through candle's
/// autograd on the GPU (the conv's GPU backward kernels).
fn fixture_conv(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let var = |name: &str| -> R<Option<Var>> {
        Ok(f.input(name, gpu)?
            .map(|t| Var::from_tensor(&t))
            .transpose()?)
    };
    let (x, weight) = (
        Var::from_tensor(&f.required("x", gpu)?)?,
        Var::from_tensor(&f.required("weight", gpu)?)?,
    );
    let (bias, init) = (var("bias")?, var("initial_states")?);
    let (out, final_states) = causal_conv1d(
        x.as_tensor(),
        weight.as_tensor(),
        bias.as_ref().map(Var::as_tensor),
        init.as_ref().map(Var::as_tensor),
        f.param("activation").as_str() == Some("silu"),
    )?;
    f.compare("out", "out", &out, rows)?;
    f.compare("final_states", "final_states", &final_states, rows)?;
    let Some(proj) = f.input("proj_out", gpu)? else {
        return Ok(());
    };
    let grads = (out * proj)?.sum_all()?.backward()?;
    let named = [
        ("grad_x", Some(&x)),
        ("grad_weight", Some(&weight)),
        ("grad_bias", bias.as_ref()),
        ("grad_initial_states", init.as_ref()),
    ];
    for (name, v) in named {
        if let Some(v) = v {
            let g = grads
                .get(v.as_tensor())
                .ok_or_else(|| format!("{}: no gradient for {name}", f.name))?;
            f.compare(name, name, g, rows)?;
        }
    }
    Ok(())
}

fn fixture_conv_update(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let bias = f.input("bias", gpu)?;
    let (out, state) = causal_conv1d_update(
        &f.required("conv_state", gpu)?,
        &f.required("x", gpu)?,
        &f.required("weight", gpu)?,
        bias.as_ref(),
        f.param("activation").as_str() == Some("silu"),
    )?;
    f.compare("out", "out", &out, rows)?;
    f.compare("conv_state_out", "conv_state_out", &state, rows)
}

fn fixture_step(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let (d, z, dt_bias) = (
        f.input("D", gpu)?,
        f.input("z", gpu)?,
        f.input("dt_bias", gpu)?,
    );
    let (state, x, dt, a) = (
        f.required("state", gpu)?,
        f.required("x", gpu)?,
        f.required("dt", gpu)?,
        f.required("A", gpu)?,
    );
    let (b, c) = (f.required("B", gpu)?, f.required("C", gpu)?);
    let opts = StepOptions {
        d: d.as_ref(),
        z: z.as_ref(),
        dt_bias: dt_bias.as_ref(),
        dt_softplus: f.param("dt_softplus").as_bool() == Some(true),
        dt_limit: NO_DT_LIMIT,
    };
    let (y, new_state) = selective_state_update(&state, &x, &dt, &a, &b, &c, opts)?;
    f.compare("out", "out", &y, rows)?;
    f.compare("state_out", "state_out", &new_state, rows)?;
    if f.param("tied_per_head").as_bool() == Some(true) {
        // The same step with one value per head, as Mamba-2 models hold them.
        let heads = a.dim(0)?;
        let first = |t: &Tensor, shape: &[usize]| -> R<Tensor> {
            let mut v = t.clone();
            for axis in shape.len()..t.rank() {
                v = v.narrow(axis, 0, 1)?;
            }
            Ok(v.reshape(shape)?)
        };
        let batch = x.dim(0)?;
        let per_head = |t: &Option<Tensor>| t.as_ref().map(|t| first(t, &[heads])).transpose();
        let (d_h, bias_h) = (per_head(&d)?, per_head(&dt_bias)?);
        let (y, new_state) = selective_state_update(
            &state,
            &x,
            &first(&dt, &[batch, heads])?,
            &first(&a, &[heads])?,
            &b,
            &c,
            StepOptions {
                d: d_h.as_ref(),
                dt_bias: bias_h.as_ref(),
                ..opts
            },
        )?;
        f.compare("out", "out", &y, rows)?;
        f.compare("state_out", "state_out", &new_state, rows)?;
    }
    Ok(())
}

fn fixture_ssd(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let (d, z) = (f.input("D", gpu)?, f.input("z", gpu)?);
    let (dt_bias, init) = (f.input("dt_bias", gpu)?, f.input("initial_states", gpu)?);
    let (x, dt, a) = (
        f.required("x", gpu)?,
        f.required("dt", gpu)?,
        f.required("A", gpu)?,
    );
    let (b, c) = (f.required("B", gpu)?, f.required("C", gpu)?);
    let opts = SsdOptions {
        d: d.as_ref(),
        z: z.as_ref(),
        dt_bias: dt_bias.as_ref(),
        dt_softplus: f.param("dt_softplus").as_bool() == Some(true),
        initial_states: init.as_ref(),
        ..Default::default()
    };
    let (y, last) = ssd(&x, &dt, &a, &b, &c, opts)?;
    f.compare("y_seq", "y_seq", &y, rows)?;
    f.compare("final_state_seq", "final_state_seq", &last, rows)?;
    // Without the D skip and the z gate: the paper's minimal listing.
    let q = f.param("chunk_sizes")[0]
        .as_u64()
        .ok_or("ssd fixture without chunk sizes")?;
    let (y, last) = ssd(
        &x,
        &dt,
        &a,
        &b,
        &c,
        SsdOptions {
            d: None,
            z: None,
            ..opts
        },
    )?;
    let (y_name, s_name) = (
        format!("y_minimal_cs{q}"),
        format!("final_state_minimal_cs{q}"),
    );
    f.compare(&y_name, &y_name, &y, rows)?;
    f.compare(&s_name, &s_name, &last, rows)
}

fn fixture_norm(f: &Fixture, gpu: &Device, rows: &mut Vec<Row>) -> R<()> {
    let (x, weight, z) = (
        f.required("x", gpu)?,
        f.required("weight", gpu)?,
        f.input("z", gpu)?,
    );
    let hidden = weight.elem_count();
    let out = rmsnorm_gated(
        &x,
        &weight,
        z.as_ref(),
        f.param("group_size")
            .as_u64()
            .map_or(hidden, |g| g as usize),
        f.param("eps").as_f64().ok_or("no eps")? as f32,
        f.param("norm_before_gate").as_bool() == Some(true),
    )?;
    f.compare("out", "out", &out, rows)
}

// ---------------------------------------------------------------------------------------
// Model sizes

/// One random input: name, shape and the uniform range it is drawn from.
#[derive(Clone)]
struct Spec {
    name: &'static str,
    shape: Vec<usize>,
    range: (f32, f32),
}

fn spec(name: &'static str, shape: &[usize], lo: f32, hi: f32) -> Spec {
    Spec {
        name,
        shape: shape.to_vec(),
        range: (lo, hi),
    }
}

/// An op at model size: its inputs and the call that packs them.
struct ModelCase {
    name: &'static str,
    specs: Vec<Spec>,
    call: fn(&[Tensor]) -> mamba_ops::Result<PackedCall>,
    /// Multiply-adds of the op's products, for the chunked SSD (0 elsewhere).
    flops: f64,
}

/// Mamba-1 130m: d_inner 1536, N 16. Mamba-2 130m: H 24, P 64 (d_inner 1536), N 128, G 1,
/// conv over d_inner + 2 G N = 1792 channels. Sequences of 2048 tokens; decoding at batch 1 and 64.
fn model_cases() -> Vec<ModelCase> {
    const L: usize = 2048;
    let (d1, n1, w) = (1536, 16, 4);
    let (h, p, n2, conv2) = (24, 64, 128, 1792);
    let step_m1 = |batch: usize| {
        vec![
            spec("state", &[batch, d1, n1], -1.0, 1.0),
            spec("x", &[batch, d1], -1.0, 1.0),
            spec("dt", &[batch, d1], -0.5, 0.5),
            spec("A", &[d1, n1], -16.0, -1.0),
            spec("B", &[batch, n1], -1.0, 1.0),
            spec("C", &[batch, n1], -1.0, 1.0),
            spec("D", &[d1], 0.5, 1.5),
            spec("z", &[batch, d1], -2.0, 2.0),
            spec("dt_bias", &[d1], -6.0, -2.0),
        ]
    };
    let step_m2 = |batch: usize| {
        vec![
            spec("state", &[batch, h, p, n2], -1.0, 1.0),
            spec("x", &[batch, h, p], -1.0, 1.0),
            spec("dt", &[batch, h], -0.5, 0.5),
            spec("A", &[h], -16.0, -1.0),
            spec("B", &[batch, 1, n2], -1.0, 1.0),
            spec("C", &[batch, 1, n2], -1.0, 1.0),
            spec("D", &[h], 0.5, 1.5),
            spec("dt_bias", &[h], -6.0, -2.0),
        ]
    };
    let conv = |channels: usize| {
        vec![
            spec("x", &[1, channels, L], -1.0, 1.0),
            spec("weight", &[channels, w], -0.5, 0.5),
            spec("bias", &[channels], -0.5, 0.5),
        ]
    };
    let conv_update = |batch: usize, channels: usize| {
        vec![
            spec("conv_state", &[batch, channels, w], -1.0, 1.0),
            spec("x", &[batch, channels], -1.0, 1.0),
            spec("weight", &[channels, w], -0.5, 0.5),
            spec("bias", &[channels], -0.5, 0.5),
        ]
    };
    vec![
        ModelCase {
            name: "m1 causal_conv1d d1536 L2048",
            specs: conv(d1),
            call: |t| causal_conv1d_call(&t[0], &t[1], Some(&t[2]), None, true),
            flops: 0.0,
        },
        scan_case("m1 selective_scan d1536 N16 L2048", 1, d1, L, false),
        scan_case("m1 selective_scan d5120 N16 L2048", 1, 5120, L, false),
        // Short prompts of a batch (the forward's chunk shrinks to 64 steps here).
        scan_case("m1 selective_scan b5 d1536 N16 L40", 5, d1, 40, true),
        // Short prompts of a large batch: a thread per channel.
        scan_case("m1 selective_scan b64 d1536 N16 L1", 64, d1, 1, true),
        scan_case("m1 selective_scan b64 d1536 N16 L32", 64, d1, 32, true),
        ModelCase {
            name: "m1 causal_conv1d_update b1",
            specs: conv_update(1, d1),
            call: |t| causal_conv1d_update_call(&t[0], &t[1], &t[2], Some(&t[3]), true),
            flops: 0.0,
        },
        ModelCase {
            name: "m1 selective_state_update b1",
            specs: step_m1(1),
            call: m1_step,
            flops: 0.0,
        },
        ModelCase {
            name: "m1 selective_state_update b64",
            specs: step_m1(64),
            call: m1_step,
            flops: 0.0,
        },
        ModelCase {
            name: "m2 causal_conv1d d1792 L2048",
            specs: conv(conv2),
            call: |t| causal_conv1d_call(&t[0], &t[1], Some(&t[2]), None, true),
            flops: 0.0,
        },
        ssd_case("m2 ssd H24 P64 N128 L2048", h, L),
        ssd_case("m2 ssd H80 P64 N128 L2048", 80, L),
        // A last chunk cut short inside its second tile (the GPU's chunks are 128 steps).
        ssd_case("m2 ssd H8 P64 N128 L200", 8, 200),
        ModelCase {
            name: "m2 rmsnorm_gated 2048x1536",
            specs: vec![
                spec("x", &[1, L, d1], -1.0, 1.0),
                spec("weight", &[d1], 0.5, 1.5),
                spec("z", &[1, L, d1], -2.0, 2.0),
            ],
            call: |t| rmsnorm_gated_call(&t[0], &t[1], Some(&t[2]), 1536, 1e-5, false),
            flops: 0.0,
        },
        ModelCase {
            name: "m2 causal_conv1d_update b1",
            specs: conv_update(1, conv2),
            call: |t| causal_conv1d_update_call(&t[0], &t[1], &t[2], Some(&t[3]), true),
            flops: 0.0,
        },
        ModelCase {
            name: "m2 selective_state_update b1",
            specs: step_m2(1),
            call: m2_step,
            flops: 0.0,
        },
        ModelCase {
            name: "m2 selective_state_update b64",
            specs: step_m2(64),
            call: m2_step,
            flops: 0.0,
        },
    ]
}

/// The Mamba-1 selective scan of `batch` sequences of `len` tokens over `d` channels, N 16 (d
/// 1536: mamba-130m; 5120: mamba-2.8b), from an initial state when `init`.
fn scan_case(name: &'static str, batch: usize, d: usize, len: usize, init: bool) -> ModelCase {
    let n = 16;
    let mut specs = vec![
        spec("u", &[batch, len, d], -1.0, 1.0),
        spec("delta", &[batch, len, d], -0.5, 0.5),
        spec("A", &[d, n], -16.0, -1.0),
        spec("B", &[batch, len, 1, n], -1.0, 1.0),
        spec("C", &[batch, len, 1, n], -1.0, 1.0),
        spec("D", &[d], 0.5, 1.5),
        spec("z", &[batch, len, d], -2.0, 2.0),
        spec("delta_bias", &[d], -6.0, -2.0),
    ];
    if init {
        specs.push(spec("initial_state", &[batch, d, n], -1.0, 1.0));
    }
    ModelCase {
        name,
        specs,
        call: |t| {
            selective_scan_call(
                &t[0],
                &t[1],
                &t[2],
                &t[3],
                &t[4],
                ScanOptions {
                    d: Some(&t[5]),
                    z: Some(&t[6]),
                    delta_bias: Some(&t[7]),
                    delta_softplus: true,
                    initial_state: t.get(8),
                },
            )
        },
        flops: 0.0,
    }
}

/// The Mamba-2 SSD over `len` tokens of `h` heads of 64 channels, N 128, one group (24 heads:
/// mamba2-130m; 80: mamba2-2.7b).
fn ssd_case(name: &'static str, h: usize, len: usize) -> ModelCase {
    ModelCase {
        name,
        specs: ssd_init_specs(len, h, 64, 128),
        call: ssd_with_init,
        flops: ssd_flops(h, len),
    }
}

/// The SSD backward at a head dimension and state size off the kernels' multiples of 32 (20
/// and 12, padded in shared memory), with an initial state and two chunks, the second partial.
fn ssd_padded_case() -> ModelCase {
    ModelCase {
        name: "bwd ssd b1 H4 G1 P20 N12 L90 init",
        specs: ssd_init_specs(90, 4, 20, 12),
        call: ssd_with_init,
        flops: 0.0,
    }
}

/// The SSD backward at P 128 with N 128, whose chunk kernel fits the shared memory only with
/// bf16 inputs (f32 inputs keep the tensor-operation backward): one chunk and a partial one.
/// Eight heads: g_A, g_D and g_dt_bias are one sum per head, and with two the relative error of
/// a bf16 run now and then met the limit where both sums were small.
fn ssd_wide_case() -> ModelCase {
    ModelCase {
        name: "bwd ssd b1 H8 G1 P128 N128 L100 init",
        specs: ssd_init_specs(100, 8, 128, 128),
        call: ssd_with_init,
        flops: 0.0,
    }
}

/// The inputs of [`ssd_with_init`]: `len` tokens of `h` heads of `p` channels, one group of
/// state size `n`.
fn ssd_init_specs(len: usize, h: usize, p: usize, n: usize) -> Vec<Spec> {
    vec![
        spec("x", &[1, len, h, p], -1.0, 1.0),
        spec("dt", &[1, len, h], -0.5, 0.5),
        spec("A", &[h], -16.0, -1.0),
        spec("B", &[1, len, 1, n], -1.0, 1.0),
        spec("C", &[1, len, 1, n], -1.0, 1.0),
        spec("D", &[h], 0.5, 1.5),
        spec("dt_bias", &[h], -6.0, -2.0),
        spec("initial_states", &[1, h, p, n], -0.1, 0.1),
    ]
}

/// The SSD with D per head, dt_bias, the softplus and an initial state, packed.
fn ssd_with_init(t: &[Tensor]) -> mamba_ops::Result<PackedCall> {
    ssd_of(
        t,
        SsdOptions {
            d: Some(&t[5]),
            dt_bias: Some(&t[6]),
            dt_softplus: true,
            initial_states: Some(&t[7]),
            ..Default::default()
        },
    )
}

/// The SSD of the inputs `x, dt, A, B, C` in `t[..5]` with `opts`, packed.
fn ssd_of(t: &[Tensor], opts: SsdOptions) -> mamba_ops::Result<PackedCall> {
    ssd_call(&t[0], &t[1], &t[2], &t[3], &t[4], opts)
}

/// The SSD's other paths, for the backward: batch 2, two groups, the z gate, D per channel,
/// a clamped step, no initial state, and a last chunk that ends inside the backward's chunk.
fn ssd_gated_case() -> ModelCase {
    let (b, len, h, g, p, n) = (2, 200, 8, 2, 64, 64);
    ModelCase {
        name: "bwd ssd b2 H8 G2 P64 N64 L200 z D(H,P) clamp",
        specs: vec![
            spec("x", &[b, len, h, p], -1.0, 1.0),
            spec("dt", &[b, len, h], -0.5, 0.5),
            spec("A", &[h], -8.0, -1.0),
            spec("B", &[b, len, g, n], -1.0, 1.0),
            spec("C", &[b, len, g, n], -1.0, 1.0),
            spec("D", &[h, p], 0.5, 1.5),
            spec("z", &[b, len, h, p], -2.0, 2.0),
            spec("dt_bias", &[h], -4.0, -2.0),
        ],
        call: |t| {
            ssd_of(
                t,
                SsdOptions {
                    d: Some(&t[5]),
                    z: Some(&t[6]),
                    dt_bias: Some(&t[7]),
                    dt_softplus: true,
                    dt_limit: (0.0, 0.05),
                    ..Default::default()
                },
            )
        },
        flops: 0.0,
    }
}

/// Multiply-adds (2 flops each) of the chunked SSD's products over `len` tokens at `h` heads,
/// counted for chunks of 64 whatever the kernels use (a fixed measure of the work): CB, chunk
/// states, off-diagonal and (full square) diagonal products.
fn ssd_flops(h: usize, len: usize) -> f64 {
    let chunks = len.div_ceil(64) as f64;
    let (q, hf, pf, nf) = (64.0, h as f64, 64.0, 128.0);
    2.0 * chunks * (q * q * nf + hf * (pf * nf * q * 2.0 + q * q * pf))
}

fn m1_step(t: &[Tensor]) -> mamba_ops::Result<PackedCall> {
    selective_state_update_call(
        &t[0],
        &t[1],
        &t[2],
        &t[3],
        &t[4],
        &t[5],
        StepOptions {
            d: Some(&t[6]),
            z: Some(&t[7]),
            dt_bias: Some(&t[8]),
            dt_softplus: true,
            dt_limit: NO_DT_LIMIT,
        },
    )
}

fn m2_step(t: &[Tensor]) -> mamba_ops::Result<PackedCall> {
    selective_state_update_call(
        &t[0],
        &t[1],
        &t[2],
        &t[3],
        &t[4],
        &t[5],
        StepOptions {
            d: Some(&t[6]),
            z: None,
            dt_bias: Some(&t[7]),
            dt_softplus: true,
            dt_limit: NO_DT_LIMIT,
        },
    )
}

/// Fresh inputs of a case on the CPU, rounded through `dtype`, in f32.
fn draw(specs: &[Spec], rng: &mut StdRng, dtype: DType) -> R<Vec<Tensor>> {
    specs
        .iter()
        .map(|s| {
            let n: usize = s.shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|_| rng.random_range(s.range.0..s.range.1))
                .collect();
            let t = Tensor::from_vec(v, s.shape.as_slice(), &Device::Cpu)?;
            Ok(t.to_dtype(dtype)?.to_dtype(DType::F32)?)
        })
        .collect()
}

fn on_gpu(inputs: &[Tensor], dtype: DType, gpu: &Device) -> R<Vec<Tensor>> {
    inputs
        .iter()
        .map(|t| Ok(t.to_device(gpu)?.to_dtype(dtype)?))
        .collect()
}

/// `|gpu - cpu|_2 / |cpu|_2` and the largest absolute difference.
fn relative_error(gpu: &Tensor, cpu: &Tensor) -> R<(f64, f64)> {
    let g = gpu.flatten_all()?.to_vec1::<f32>()?;
    let c = cpu.flatten_all()?.to_vec1::<f32>()?;
    if g.len() != c.len() {
        return Err(format!("{} GPU values against {} CPU values", g.len(), c.len()).into());
    }
    let (mut diff, mut norm, mut max_abs) = (0f64, 0f64, 0f64);
    for (&a, &b) in g.iter().zip(&c) {
        let d = (a as f64 - b as f64).abs();
        diff += d * d;
        norm += (b as f64) * (b as f64);
        max_abs = max_abs.max(if d.is_nan() { f64::INFINITY } else { d });
    }
    let rel = (diff / norm.max(f64::MIN_POSITIVE)).sqrt();
    Ok((if rel.is_nan() { f64::INFINITY } else { rel }, max_abs))
}

fn check_model_case(
    case: &ModelCase,
    gpu: &Device,
    rng: &mut StdRng,
    log: &mut Log,
    rows: &mut Vec<Row>,
) -> R<()> {
    let shapes: Vec<String> = case
        .specs
        .iter()
        .map(|s| format!("{} {:?}", s.name, s.shape))
        .collect();
    log.line(format!("{}: {}", case.name, shapes.join(", ")));
    for dtype in [DType::F32, DType::BF16] {
        let cpu_inputs = draw(&case.specs, rng, dtype)?;
        let cpu = (case.call)(&cpu_inputs)?.run()?;
        let got = (case.call)(&on_gpu(&cpu_inputs, dtype, gpu)?)?.run()?;
        gpu.synchronize()?;
        for (i, (g, c)) in got.iter().zip(&cpu).enumerate() {
            let (rel, max_abs) = relative_error(g, c)?;
            let row = Row {
                what: format!("{} {dtype:?} output {i}", case.name),
                measure: format!(
                    "rel L2 {rel:.1e} (limit {MODEL_SIZE_LIMIT:.0e}), max abs {max_abs:.1e}"
                ),
                pass: rel <= MODEL_SIZE_LIMIT,
            };
            log.line(format!(
                "{} {:<48} {}",
                if row.pass { "ok  " } else { "FAIL" },
                row.what,
                row.measure
            ));
            rows.push(row);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Backward at model sizes

/// The ops with GPU backward kernels, at model sizes: every path of their kernels (bias and
/// initial states of the conv; gating first and last, one group and several, of the norm; every
/// optional input of the scan, and none with two groups, batch 2 and a ragged last segment).
fn backward_cases() -> Vec<ModelCase> {
    const L: usize = 2048;
    let (d1, conv2, w) = (1536, 1792, 4);
    let conv = |channels: usize| {
        vec![
            spec("x", &[1, channels, L], -1.0, 1.0),
            spec("weight", &[channels, w], -0.5, 0.5),
            spec("bias", &[channels], -0.5, 0.5),
            spec("initial_states", &[1, channels, w - 1], -1.0, 1.0),
        ]
    };
    let norm = vec![
        spec("x", &[1, L, d1], -1.0, 1.0),
        spec("weight", &[d1], 0.5, 1.5),
        spec("z", &[1, L, d1], -2.0, 2.0),
    ];
    vec![
        scan_case("bwd m1 selective_scan d1536 N16 L2048", 1, d1, 2048, true),
        scan_case("bwd m1 selective_scan d5120 N16 L2048", 1, 5120, 2048, true),
        // 160 segments: the combines' runs of 20 take their loads in two turns.
        scan_case("bwd selective_scan d64 N16 L5000", 1, 64, 5000, true),
        ModelCase {
            name: "bwd selective_scan b2 d64 G2 N4 L37 plain",
            specs: vec![
                spec("u", &[2, 37, 64], -1.0, 1.0),
                spec("delta", &[2, 37, 64], 0.01, 0.5),
                spec("A", &[64, 4], -4.0, -0.5),
                spec("B", &[2, 37, 2, 4], -1.0, 1.0),
                spec("C", &[2, 37, 2, 4], -1.0, 1.0),
            ],
            call: |t| selective_scan_call(&t[0], &t[1], &t[2], &t[3], &t[4], Default::default()),
            flops: 0.0,
        },
        ModelCase {
            name: "bwd m1 causal_conv1d d1536 L2048",
            specs: conv(d1)[..3].to_vec(),
            call: |t| causal_conv1d_call(&t[0], &t[1], Some(&t[2]), None, true),
            flops: 0.0,
        },
        ModelCase {
            name: "bwd m2 causal_conv1d d1792 L2048 init",
            specs: conv(conv2),
            call: |t| causal_conv1d_call(&t[0], &t[1], Some(&t[2]), Some(&t[3]), true),
            flops: 0.0,
        },
        ModelCase {
            name: "bwd m2 ssd H24 P64 N128 L2048",
            ..ssd_case("", 24, 2048)
        },
        ModelCase {
            name: "bwd m2 ssd H80 P64 N128 L2048",
            ..ssd_case("", 80, 2048)
        },
        ssd_gated_case(),
        ssd_padded_case(),
        ssd_wide_case(),
        ModelCase {
            name: "bwd m2 rmsnorm_gated 2048x1536",
            specs: norm.clone(),
            call: |t| rmsnorm_gated_call(&t[0], &t[1], Some(&t[2]), 1536, 1e-5, false),
            flops: 0.0,
        },
        ModelCase {
            name: "bwd m2 rmsnorm_gated 2048x1536 g256 gate-last",
            specs: norm,
            call: |t| rmsnorm_gated_call(&t[0], &t[1], Some(&t[2]), 256, 1e-5, true),
            flops: 0.0,
        },
    ]
}

/// A random output gradient for `call` (on the CPU): one value per element of its flat output.
fn draw_grad(call: &PackedCall, rng: &mut StdRng) -> R<Tensor> {
    let n: usize = call.run()?.iter().map(Tensor::elem_count).sum();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
    Ok(Tensor::from_vec(v, n, &Device::Cpu)?)
}

fn check_backward_case(
    case: &ModelCase,
    gpu: &Device,
    rng: &mut StdRng,
    log: &mut Log,
    rows: &mut Vec<Row>,
) -> R<()> {
    for dtype in [DType::F32, DType::BF16] {
        let cpu_inputs = draw(&case.specs, rng, dtype)?;
        let cpu_call = (case.call)(&cpu_inputs)?;
        let grad = draw_grad(&cpu_call, rng)?;
        let want = cpu_call.backward(&grad)?;
        let gpu_call = (case.call)(&on_gpu(&cpu_inputs, dtype, gpu)?)?;
        let grad_gpu = grad.to_device(gpu)?;
        let got = gpu_call.backward(&grad_gpu)?.to_dtype(DType::F32)?;
        let again = gpu_call.backward(&grad_gpu)?.to_dtype(DType::F32)?;
        gpu.synchronize()?;
        let limit = if dtype == DType::F32 {
            MODEL_SIZE_LIMIT
        } else {
            BF16_GRAD_LIMIT
        };
        let mut offset = 0;
        for s in &case.specs {
            let n: usize = s.shape.iter().product();
            let (rel, max_abs) =
                relative_error(&got.narrow(0, offset, n)?, &want.narrow(0, offset, n)?)?;
            offset += n;
            rows.push(Row {
                what: format!("{} {dtype:?} grad {}", case.name, s.name),
                measure: format!("rel L2 {rel:.1e} (limit {limit:.0e}), max abs {max_abs:.1e}"),
                pass: rel <= limit,
            });
        }
        let (a, b) = (got.to_vec1::<f32>()?, again.to_vec1::<f32>()?);
        let same = a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits());
        rows.push(Row {
            what: format!("{} {dtype:?} run to run", case.name),
            measure: if same {
                "bit-identical".into()
            } else {
                "DIFFERENT".into()
            },
            pass: same,
        });
        for r in &rows[rows.len() - case.specs.len() - 1..] {
            log.line(format!(
                "{} {:<48} {}",
                if r.pass { "ok  " } else { "FAIL" },
                r.what,
                r.measure
            ));
        }
    }
    Ok(())
}

/// Times the op's backward alone ([`PackedCall::backward`]) on the GPU. Bytes: the packed
/// inputs and the output gradient read, the input gradients written (f32, then cast for bf16).
fn time_backward_case(
    case: &ModelCase,
    dtype: DType,
    gpu: &Device,
    rng: &mut StdRng,
    timer: &mut Timer,
    copy: f64,
) -> R<Row> {
    let calls: Vec<PackedCall> = (0..ROTATE)
        .map(|_| {
            Ok((case.call)(&on_gpu(
                &draw(&case.specs, rng, dtype)?,
                dtype,
                gpu,
            )?)?)
        })
        .collect::<R<_>>()?;
    let grads: Vec<Tensor> = calls
        .iter()
        .map(|c| Ok(draw_grad(c, rng)?.to_device(gpu)?))
        .collect::<R<_>>()?;
    let packed = calls[0].packed();
    let bytes = (packed.elem_count() * (packed.dtype().size_in_bytes() + 4)
        + grads[0].elem_count() * 4) as f64;
    let t = timer.time(gpu, |i| {
        calls[i % ROTATE].backward(&grads[i % ROTATE])?;
        Ok(())
    })?;
    let bandwidth = bytes / (t.median * 1e-6);
    Ok(Row {
        what: format!("{} {dtype:?}", case.name),
        measure: format!(
            "backward {:7.1} us (min {:.1}, max {:.1}); host {:5.1} us; {:6.1} MB, {:5.0} GB/s = {:3.0}% of copy",
            t.median,
            t.min,
            t.max,
            t.host,
            bytes / 1e6,
            bandwidth / 1e9,
            100.0 * bandwidth / copy
        ),
        pass: true,
    })
}

// ---------------------------------------------------------------------------------------
// Timings

/// Device and host time of one launch, in microseconds.
struct Timing {
    /// Device time per launch: median, min and max over the timed batches.
    median: f64,
    min: f64,
    max: f64,
    /// Host time to queue one launch (median over the batches).
    host: f64,
}

/// Times launches with CUDA events. Before each timed batch the GPU is kept busy by a 2 GiB
/// copy, so the host has queued the whole batch by the time it starts: the events then measure
/// the launches back to back on the device, not the host's pace.
struct Timer {
    stream: Arc<CudaStream>,
    busy_src: CudaSlice<f32>,
    busy_dst: CudaSlice<f32>,
}

impl Timer {
    fn new(gpu: &Device) -> R<Timer> {
        let n = 512 << 20;
        let stream = gpu.as_cuda_device()?.cuda_stream();
        let random = Tensor::rand(-1f32, 1f32, n, gpu)?;
        let (storage, _) = random.storage_and_layout();
        let Storage::Cuda(storage) = &*storage else {
            return Err("the random tensor is not on the GPU".into());
        };
        let busy_src = storage.as_cuda_slice::<f32>()?.try_clone()?;
        let busy_dst = stream.alloc_zeros::<f32>(n)?;
        Ok(Timer {
            stream,
            busy_src,
            busy_dst,
        })
    }

    /// Queues the 2 GiB device-to-device copy.
    fn occupy(&mut self) -> R<()> {
        self.stream
            .memcpy_dtod(&self.busy_src, &mut self.busy_dst)?;
        Ok(())
    }

    fn event(&self) -> R<CudaEvent> {
        Ok(self
            .stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?)
    }

    /// The copy's bandwidth in bytes per second (read + written), after a warm-up that also
    /// brings the clocks up.
    fn copy_bandwidth(&mut self) -> R<f64> {
        for _ in 0..100 {
            self.occupy()?;
        }
        let mut samples = Vec::with_capacity(SAMPLES);
        for _ in 0..SAMPLES {
            let start = self.event()?;
            self.occupy()?;
            let end = self.event()?;
            samples.push(start.elapsed_ms(&end)? as f64 * 1e-3);
        }
        samples.sort_by(f64::total_cmp);
        Ok(2.0 * self.busy_src.num_bytes() as f64 / samples[SAMPLES / 2])
    }

    /// Times `f(i)` (launch number `i`): a warm-up, then `SAMPLES` batches of `BATCH` launches.
    fn time(&mut self, gpu: &Device, mut f: impl FnMut(usize) -> R<()>) -> R<Timing> {
        for i in 0..2 * ROTATE {
            f(i)?;
        }
        gpu.synchronize()?;
        let (mut device, mut host) = (Vec::new(), Vec::new());
        for s in 0..SAMPLES {
            self.occupy()?;
            let start = self.event()?;
            let queued = Instant::now();
            for i in 0..BATCH {
                f(s * BATCH + i)?;
            }
            host.push(queued.elapsed().as_secs_f64() * 1e6 / BATCH as f64);
            let end = self.event()?;
            device.push(start.elapsed_ms(&end)? as f64 * 1e3 / BATCH as f64);
        }
        device.sort_by(f64::total_cmp);
        host.sort_by(f64::total_cmp);
        Ok(Timing {
            median: device[SAMPLES / 2],
            min: device[0],
            max: device[SAMPLES - 1],
            host: host[SAMPLES / 2],
        })
    }
}

fn time_model_case(
    case: &ModelCase,
    dtype: DType,
    gpu: &Device,
    rng: &mut StdRng,
    timer: &mut Timer,
    copy: f64,
) -> R<Row> {
    let sets: Vec<Vec<Tensor>> = (0..ROTATE)
        .map(|_| on_gpu(&draw(&case.specs, rng, dtype)?, dtype, gpu))
        .collect::<R<_>>()?;
    let calls: Vec<PackedCall> = sets
        .iter()
        .map(|s| (case.call)(s))
        .collect::<mamba_ops::Result<_>>()?;
    let outputs = calls[0].run()?;
    let in_bytes = calls[0].packed().elem_count() * calls[0].packed().dtype().size_in_bytes();
    let out_bytes: usize = outputs.iter().map(|t| t.elem_count() * 4).sum();
    let bytes = (in_bytes + out_bytes) as f64;
    let kernel = timer.time(gpu, |i| {
        calls[i % ROTATE].run()?;
        Ok(())
    })?;
    let op = timer.time(gpu, |i| {
        (case.call)(&sets[i % ROTATE])?.run()?;
        Ok(())
    })?;
    let bandwidth = bytes / (kernel.median * 1e-6);
    let mut measure = format!(
        "kernel {:7.1} us (min {:.1}, max {:.1}), op {:7.1} us; host {:5.1} / {:5.1} us; {:6.1} MB, {:5.0} GB/s = {:3.0}% of copy",
        kernel.median,
        kernel.min,
        kernel.max,
        op.median,
        kernel.host,
        op.host,
        bytes / 1e6,
        bandwidth / 1e9,
        100.0 * bandwidth / copy
    );
    if case.flops > 0.0 {
        let _ = write!(
            measure,
            ", {:.1} TFLOP/s",
            case.flops / (kernel.median * 1e-6) / 1e12
        );
    }
    Ok(Row {
        what: format!("{} {dtype:?}", case.name),
        measure,
        pass: true,
    })
}
