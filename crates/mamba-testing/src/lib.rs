//! Test support shared by the workspace: locating `../shared/fixtures`, reading its
//! safetensors files and manifests, and comparing within the recommended tolerances.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The fixtures folder, `../shared/fixtures` from the repository root.
///
/// # Panics
/// With a clear message when the folder is missing.
pub fn fixtures_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join("../shared/fixtures");
    assert!(
        dir.join("README.md").is_file(),
        "golden fixtures not found at {}: the tests need ../shared/fixtures beside the repository",
        dir.display()
    );
    dir
}

/// A tensor read from a fixture: values widened to f64 and its shape.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Tensor {
    pub fn f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }

    pub fn i64(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }
}

/// Every tensor of a safetensors file, by name.
pub fn read_safetensors(path: &Path) -> HashMap<String, Tensor> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            let data = decode(view.dtype(), view.data());
            (
                name,
                Tensor {
                    shape: view.shape().to_vec(),
                    data,
                },
            )
        })
        .collect()
}

fn decode(dtype: safetensors::Dtype, bytes: &[u8]) -> Vec<f64> {
    use safetensors::Dtype;
    match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::I64 => bytes
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        other => panic!("fixture dtype {other:?} not handled"),
    }
}

/// One fixture case folder: its inputs, outputs and manifest.
pub struct Case {
    pub dir: PathBuf,
    pub manifest: serde_json::Value,
    pub inputs: HashMap<String, Tensor>,
    pub outputs: HashMap<String, Tensor>,
}

impl Case {
    /// Loads `ops/<op>/<case>` (relative to the fixtures folder).
    pub fn op(op: &str, case: &str) -> Case {
        let dir = fixtures_dir().join("ops").join(op).join(case);
        let manifest = read_json(&dir.join("manifest.json"));
        Case {
            inputs: read_safetensors(&dir.join("inputs.safetensors")),
            outputs: read_safetensors(&dir.join("outputs.safetensors")),
            manifest,
            dir,
        }
    }

    /// The names of every case of an op.
    pub fn names(op: &str) -> Vec<String> {
        let dir = fixtures_dir().join("ops").join(op);
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    pub fn input(&self, name: &str) -> Vec<f32> {
        self.inputs
            .get(name)
            .unwrap_or_else(|| panic!("{}: no input {name}", self.dir.display()))
            .f32()
    }

    pub fn optional_input(&self, name: &str) -> Option<Vec<f32>> {
        self.inputs.get(name).map(Tensor::f32)
    }

    pub fn output(&self, name: &str) -> &Tensor {
        self.outputs
            .get(name)
            .unwrap_or_else(|| panic!("{}: no output {name}", self.dir.display()))
    }

    pub fn param(&self, name: &str) -> &serde_json::Value {
        &self.manifest["params"][name]
    }

    /// Asserts `got` matches output `name` within the manifest's recommended tolerance.
    pub fn assert_output(&self, name: &str, got: &[f32]) {
        self.assert_output_as(name, name, got);
    }

    /// Like [`Case::assert_output`] with the tolerance of another output (`tol_name`).
    pub fn assert_output_as(&self, name: &str, tol_name: &str, got: &[f32]) {
        let tol = tolerance(&self.manifest, tol_name);
        let label = format!("{} {name}", self.dir.display());
        assert_close(&label, got, &self.output(name).data, tol);
    }
}

/// `(atol, rtol)` recommended for tensor `name` in a manifest.
pub fn tolerance(manifest: &serde_json::Value, name: &str) -> (f64, f64) {
    let t = &manifest["tolerances"][name];
    let atol = t["recommended_atol"].as_f64();
    let rtol = t["recommended_rtol"].as_f64();
    match (atol, rtol) {
        (Some(a), Some(r)) => (a, r),
        _ => panic!("manifest has no tolerance for {name}"),
    }
}

pub fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Asserts `|got - want| <= atol + rtol * |want|` element-wise, with a report of the worst.
pub fn assert_close(label: &str, got: &[f32], want: &[f64], (atol, rtol): (f64, f64)) {
    assert_eq!(
        got.len(),
        want.len(),
        "{label}: length {} != {}",
        got.len(),
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        // NaN counts as the worst possible excess.
        let excess = ((g as f64 - w).abs() - (atol + rtol * w.abs())).max(f64::NEG_INFINITY);
        let excess = if excess.is_nan() {
            f64::INFINITY
        } else {
            excess
        };
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{label}: element {i} is {} but expected {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

/// The largest absolute difference between two f32 slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// `n` deterministic pseudo-random values in [-1, 1) from a 64-bit LCG seeded by `seed`:
/// the same on every machine and every run, without a random-number crate.
pub fn lcg_values(n: usize, seed: u64) -> Vec<f32> {
    const MUL: u64 = 6364136223846793005;
    const ADD: u64 = 1442695040888963407;
    let mut s = seed.wrapping_mul(MUL).wrapping_add(ADD);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(MUL).wrapping_add(ADD);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// `n` values of [`lcg_values`] moved into `[lo, hi)`.
pub fn lcg_values_in(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    lcg_values(n, seed)
        .into_iter()
        .map(|v| lo + (hi - lo) * 0.5 * (v + 1.0))
        .collect()
}
