//! Scalar math shared by the ops, written so that loops over them vectorise.

/// `x * sigmoid(x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// `ln(1 + exp(x))`, returning `x` itself above 20 as PyTorch does.
#[inline(always)]
pub fn softplus(x: f32) -> f32 {
    if x > 20.0 {
        x
    } else {
        x.exp().ln_1p()
    }
}

/// The Δ that the SSM uses: bias added, softplus applied if asked, then clamped to `limit`.
#[inline(always)]
pub fn process_dt(raw: f32, bias: f32, apply_softplus: bool, limit: (f32, f32)) -> f32 {
    let dt = raw + bias;
    let dt = if apply_softplus { softplus(dt) } else { dt };
    dt.clamp(limit.0, limit.1)
}

/// No clamp on Δ.
pub const NO_DT_LIMIT: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);

/// `exp(x)` in f32 without branches or library calls (Cephes polynomial, about 1 ulp),
/// so that a loop over it compiles to SIMD. Inputs below -87 give about 1e-38, not 0.
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let poly = p * r * r + r + 1.0;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    poly * scale
}

/// `a . b` with eight independent partial sums, so that it vectorises.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = a.len().min(b.len());
    let mut acc = [0.0f32; LANES];
    let (a_body, a_tail) = a[..n].split_at(n - n % LANES);
    let (b_body, b_tail) = b[..n].split_at(n - n % LANES);
    for (ac, bc) in a_body.chunks_exact(LANES).zip(b_body.chunks_exact(LANES)) {
        for i in 0..LANES {
            acc[i] += ac[i] * bc[i];
        }
    }
    let tail: f32 = a_tail.iter().zip(b_tail).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// Runs `body` compiled for AVX2+FMA when the CPU has them, otherwise as built.
/// `body` must be `#[inline(always)]` code so that it is compiled inside the
/// feature-enabled function.
#[inline(always)]
pub fn with_simd<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected on this CPU just above.
            return unsafe { run_avx2(body) };
        }
    }
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_is_close_to_std_exp() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = (exp_fast(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 4e-7, "worst relative error {worst}");
    }

    #[test]
    fn softplus_matches_definition_and_threshold() {
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert!((softplus(-3.0) - (1.0 + (-3f32).exp()).ln()).abs() < 1e-7);
        assert_eq!(softplus(25.0), 25.0);
    }
}
