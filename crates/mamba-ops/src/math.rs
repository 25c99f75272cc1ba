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

/// [`process_dt`] with [`softplus_fast`], for vectorised loops.
#[inline(always)]
pub fn process_dt_fast(raw: f32, bias: f32, apply_softplus: bool, limit: (f32, f32)) -> f32 {
    let dt = raw + bias;
    let dt = if apply_softplus {
        softplus_fast(dt)
    } else {
        dt
    };
    dt.clamp(limit.0, limit.1)
}

/// No clamp on Δ.
pub const NO_DT_LIMIT: (f32, f32) = (f32::NEG_INFINITY, f32::INFINITY);

/// `sigmoid(x) = 1 / (1 + exp(-x))`: the derivative of [`softplus`].
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// [`sigmoid`] built from [`exp_fast`], for vectorised loops.
#[inline(always)]
pub fn sigmoid_fast(x: f32) -> f32 {
    1.0 / (1.0 + exp_fast(-x))
}

/// `d silu(x) / dx = sigmoid(x) * (1 + x * (1 - sigmoid(x)))`, built from [`exp_fast`].
#[inline(always)]
pub fn silu_grad_fast(x: f32) -> f32 {
    let s = sigmoid_fast(x);
    s * x.mul_add(1.0 - s, 1.0)
}

/// [`process_dt`] and its derivative with respect to `raw`: `sigmoid(raw + bias)` through
/// the softplus (1 above its threshold, 1 without it), and 0 where the clamp is active.
#[inline(always)]
pub fn process_dt_with_grad(
    raw: f32,
    bias: f32,
    apply_softplus: bool,
    limit: (f32, f32),
) -> (f32, f32) {
    let v = raw + bias;
    let (dt, grad) = match (apply_softplus, v > 20.0) {
        (true, false) => (softplus(v), sigmoid(v)),
        _ => (v, 1.0),
    };
    if dt < limit.0 || dt > limit.1 {
        (dt.clamp(limit.0, limit.1), 0.0)
    } else {
        (dt, grad)
    }
}

/// Double-precision versions of the pointwise functions, for the reference backward passes.
pub mod f64_ref {
    /// `sigmoid(x)` in f64.
    pub fn sigmoid(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// `silu(x)` in f64.
    pub fn silu(x: f64) -> f64 {
        x * sigmoid(x)
    }

    /// `d silu(x) / dx` in f64.
    pub fn silu_grad(x: f64) -> f64 {
        let s = sigmoid(x);
        s * (1.0 + x * (1.0 - s))
    }

    /// [`super::process_dt_with_grad`] in f64: `(dt, d dt / d raw)`.
    pub fn process_dt(raw: f32, bias: f32, apply_softplus: bool, limit: (f32, f32)) -> (f64, f64) {
        let v = raw as f64 + bias as f64;
        let (dt, grad) = match (apply_softplus, v > 20.0) {
            (true, false) => (v.exp().ln_1p(), sigmoid(v)),
            _ => (v, 1.0),
        };
        let (lo, hi) = (limit.0 as f64, limit.1 as f64);
        if dt < lo || dt > hi {
            (dt.clamp(lo, hi), 0.0)
        } else {
            (dt, grad)
        }
    }
}

/// `exp(x)` in f32 without branches or library calls (Cephes polynomial, about 1 ulp),
/// so that a loop over it compiles to SIMD. Inputs below -87 give about 1e-38, not 0.
/// Uses fused multiply-adds: call it from code compiled for FMA (see [`with_simd`]).
#[inline(always)]
pub fn exp_fast(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to the nearest integer, kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x.mul_add(LOG2E, ROUND);
    let n = shifted - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let poly = (p * r).mul_add(r, r) + 1.0;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) << 23) as u32);
    poly * scale
}

/// `2^x` in f32 for `x` clamped to `[-126, 126]`, without branches or library calls (a
/// degree-5 polynomial for `2^f` on `[-0.5, 0.5]`, relative error below 3e-7), so that a loop
/// over it compiles to SIMD: a third fewer operations than [`exp_fast`], for exponentials
/// whose argument can be scaled by `log2(e)` ahead of time. Uses fused multiply-adds.
#[inline(always)]
pub fn exp2_fast(x: f32) -> f32 {
    // 1.5 * 2^23 + 127: adding it rounds x to the nearest integer n and leaves n + 127, the
    // biased exponent of 2^n, in the low mantissa bits (shifted into place below).
    const ROUND_BIASED: f32 = 12_582_912.0 + 127.0;
    let x = x.clamp(-126.0, 126.0);
    let shifted = x + ROUND_BIASED;
    let f = x - (shifted - ROUND_BIASED);
    let mut p = EXP2_POLY[0];
    for c in &EXP2_POLY[1..] {
        p = p.mul_add(f, *c);
    }
    p * f32::from_bits(shifted.to_bits() << 23)
}

/// The coefficients of [`exp2_fast`]'s polynomial for `2^f` on `[-0.5, 0.5]`, highest power
/// first.
const EXP2_POLY: [f32; 6] = [
    1.327_647_2e-3,
    9.675_542e-3,
    5.550_713e-2,
    0.240_221_2,
    0.693_146_94,
    1.000_000_1,
];

/// [`exp2_fast`] of sixteen values in an AVX-512 register: `x` cut to `n + f` by `roundscale`
/// (to nearest, ties to even `n`), the same polynomial, then `scalef` for the factor `2^n`
/// instead of building it from bits, and no clamp (`scalef` takes `2^n` to subnormals and zero
/// below -126, where [`exp2_fast`] stops at `2^-126`, and to infinity from 128 on, where
/// [`exp2_fast`] stops at `2^126`): four vector operations fewer. Equal to [`exp2_fast`] lane by
/// lane for `-126 <= x <= 126` except at the ties `x = k + 1/2`, which [`exp2_fast`] rounds to
/// even `n + 127`: there the other neighbour, both within the polynomial's error.
///
/// # Safety
/// The CPU must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
pub unsafe fn exp2_avx512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(x);
    let f = _mm512_sub_ps(x, n);
    let mut p = _mm512_set1_ps(EXP2_POLY[0]);
    for c in &EXP2_POLY[1..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(*c));
    }
    _mm512_scalef_ps(p, n)
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

/// `sum(v)` with eight independent partial sums, so that it vectorises.
#[inline(always)]
pub fn lane_sum(v: &[f32]) -> f32 {
    const LANES: usize = 8;
    let mut acc = [0.0f32; LANES];
    let mut chunks = v.chunks_exact(LANES);
    for c in &mut chunks {
        for l in 0..LANES {
            acc[l] += c[l];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// `ln(x)` for positive normal `x` without branches or library calls (Cephes polynomial).
/// Uses fused multiply-adds: call it from code compiled for FMA (see [`with_simd`]).
#[inline(always)]
pub fn ln_fast(x: f32) -> f32 {
    const SQRT_HALF: f32 = std::f32::consts::FRAC_1_SQRT_2;
    let bits = x.to_bits();
    // x = m * 2^e with m in [0.5, 1).
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < SQRT_HALF;
    let e = (e - small as i32) as f32;
    let r = if small { m + m - 1.0 } else { m - 1.0 };
    let z = r * r;
    let mut p = 7.037_683_6e-2_f32;
    p = p.mul_add(r, -1.151_461e-1);
    p = p.mul_add(r, 1.167_699_9e-1);
    p = p.mul_add(r, -1.242_014_1e-1);
    p = p.mul_add(r, 1.424_932_3e-1);
    p = p.mul_add(r, -1.666_805_8e-1);
    p = p.mul_add(r, 2.000_071_4e-1);
    p = p.mul_add(r, -2.499_999_4e-1);
    p = p.mul_add(r, 0.333_333_3);
    let y = (p * r).mul_add(z, e.mul_add(-2.121_944_4e-4, -0.5 * z));
    e.mul_add(0.693_359_4, r + y)
}

/// [`softplus`] built from [`exp_fast`] and [`ln_fast`], for vectorised loops:
/// `max(x, 0) + ln(1 + exp(-|x|))`, and `x` itself above 20 as PyTorch does.
#[inline(always)]
pub fn softplus_fast(x: f32) -> f32 {
    let y = x.max(0.0) + ln_fast(1.0 + exp_fast(-x.abs()));
    if x > 20.0 {
        x
    } else {
        y
    }
}

/// [`silu`] built from [`exp_fast`], for vectorised loops.
#[inline(always)]
pub fn silu_fast(x: f32) -> f32 {
    x / (1.0 + exp_fast(-x))
}

/// Runs `body` compiled for AVX-512 or AVX2+FMA when the CPU has them, otherwise as
/// built. `body` should be `#[inline(always)]` code so that it is compiled inside the
/// feature-enabled function.
#[inline(always)]
pub fn with_simd<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        if has!("avx512f") && has!("avx512vl") && has!("fma") {
            // SAFETY: the features were detected on this CPU just above.
            return unsafe { run_avx512(body) };
        }
        if has!("avx2") && has!("fma") {
            // SAFETY: as above.
            return unsafe { run_avx2(body) };
        }
    }
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn run_avx512<R>(body: impl FnOnce() -> R) -> R {
    body()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(body: impl FnOnce() -> R) -> R {
    body()
}

/// Runs `body` with the CPU flushing subnormal f32 values to zero, inputs and results (x86's
/// MXCSR DAZ and FTZ bits, as oneDNN and PyTorch's `set_flush_denormal` do), then restores
/// the thread's previous mode (also when `body` panics). Intel cores take a slow microcode
/// assist for each multiply that reads or makes a subnormal: the SSD's decays (`exp` of sums
/// far below zero) give them by the thousand, which made the SSD's prefill 1.8 times slower on
/// the project's Xeon host. Values that small (below 1.2e-38) are far below f32's precision
/// relative to any sum they join. Elsewhere `body` runs as it is.
pub fn with_subnormals_flushed<R>(body: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        let _mode = x86_flush::FlushSubnormals::new();
        body()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        body()
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_flush {
    use std::arch::asm;

    /// MXCSR's flush-to-zero (bit 15) and denormals-are-zero (bit 6).
    const FTZ_DAZ: u32 = (1 << 15) | (1 << 6);

    /// The thread's MXCSR with FTZ and DAZ set while it lives, the previous value after.
    pub(super) struct FlushSubnormals {
        previous: u32,
    }

    impl FlushSubnormals {
        pub(super) fn new() -> Self {
            let previous = read_mxcsr();
            write_mxcsr(previous | FTZ_DAZ);
            FlushSubnormals { previous }
        }
    }

    impl Drop for FlushSubnormals {
        fn drop(&mut self) {
            write_mxcsr(self.previous);
        }
    }

    fn read_mxcsr() -> u32 {
        let mut value = 0u32;
        // SAFETY: stmxcsr stores the 4-byte MXCSR register at the given address, a live u32.
        unsafe { asm!("stmxcsr [{}]", in(reg) &mut value, options(nostack, preserves_flags)) };
        value
    }

    fn write_mxcsr(value: u32) {
        // SAFETY: ldmxcsr loads MXCSR from a live u32; the values written are the thread's own
        // with only the FTZ and DAZ bits changed, which no reserved bit touches (no fault).
        unsafe {
            asm!("ldmxcsr [{}]", in(reg) &value, options(nostack, preserves_flags, readonly))
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn subnormals_flush_to_zero_inside_and_not_after() {
        use std::hint::black_box;
        let tiny = || black_box(black_box(1e-30_f32) * black_box(1e-10_f32));
        assert!(tiny() > 0.0 && !tiny().is_normal(), "a subnormal product");
        assert_eq!(with_subnormals_flushed(tiny), 0.0);
        // A subnormal input reads as zero too.
        let subnormal = black_box(f32::MIN_POSITIVE / 4.0);
        assert_eq!(with_subnormals_flushed(|| black_box(subnormal * 2.0)), 0.0);
        assert!(tiny() > 0.0, "the mode is restored after");
    }

    /// The AVX-512 form gives exp2_fast's bits from -126 to 126 (within the polynomial's error
    /// at the ties, where the two round to different neighbours), smaller values below, and
    /// 2^x above (infinity from 128).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp2_avx512_equals_exp2_fast_in_its_range() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        let xs: Vec<f32> = (0..=25_200 * 16)
            .map(|i| -126.0 + i as f32 / 1600.0)
            .collect();
        for chunk in xs.chunks_exact(16) {
            let mut got = [0.0f32; 16];
            // SAFETY: AVX-512F was detected above; the pointers cover sixteen values.
            unsafe {
                use std::arch::x86_64::*;
                let v = exp2_avx512(_mm512_loadu_ps(chunk.as_ptr()));
                _mm512_storeu_ps(got.as_mut_ptr(), v);
            }
            for (x, g) in chunk.iter().zip(got) {
                let want = exp2_fast(*x);
                if x.fract().abs() == 0.5 {
                    assert!((g - want).abs() <= 6e-7 * want, "2^{x}: {g} against {want}");
                } else {
                    assert_eq!(g.to_bits(), want.to_bits(), "2^{x}");
                }
            }
        }
        let mut below = [0.0f32; 16];
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            let v = exp2_avx512(_mm512_set1_ps(-140.0));
            _mm512_storeu_ps(below.as_mut_ptr(), v);
        }
        assert!(below.iter().all(|v| *v >= 0.0 && *v < exp2_fast(-126.0)));
        // Above 126 it keeps following 2^x, to infinity past the largest f32.
        let mut above = [0.0f32; 16];
        // SAFETY: as above.
        unsafe {
            use std::arch::x86_64::*;
            let xs = _mm512_setr_ps(
                127.0, 127.25, 127.5, 127.75, 128.0, 200.0, 126.5, 126.75, 127.0, 127.0, 127.0,
                127.0, 127.0, 127.0, 127.0, 127.0,
            );
            _mm512_storeu_ps(above.as_mut_ptr(), exp2_avx512(xs));
        }
        for (x, v) in [127.0f32, 127.25, 127.5, 127.75, 126.5, 126.75]
            .into_iter()
            .zip([above[0], above[1], above[2], above[3], above[6], above[7]])
        {
            let want = 2f64.powf(x as f64);
            assert!(
                ((v as f64) - want).abs() <= 1e-6 * want,
                "2^{x}: {v} against {want}"
            );
        }
        assert!(above[4].is_infinite() && above[5].is_infinite());
    }

    #[test]
    fn exp2_fast_is_close_to_powers_of_two() {
        let mut worst = 0.0f64;
        let mut x = -126.0f32;
        while x <= 126.0 {
            let want = 2f64.powf(x as f64);
            worst = worst.max((exp2_fast(x) as f64 - want).abs() / want);
            x += 0.00731;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp2_fast(-1000.0), exp2_fast(-126.0));
    }

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
    fn fast_ln_softplus_and_silu_are_close_to_std() {
        let mut x = -30.0f32;
        while x < 30.0 {
            let sp = softplus(x);
            assert!(
                (softplus_fast(x) - sp).abs() <= 2e-7 * sp.max(1.0),
                "softplus({x})"
            );
            assert!(
                (silu_fast(x) - silu(x)).abs() <= 1e-6 * silu(x).abs().max(1.0),
                "silu({x})"
            );
            let y = x.abs() * 7.3 + 1e-3;
            assert!(
                (ln_fast(y) - y.ln()).abs() <= 2e-7 * y.ln().abs().max(1.0),
                "ln({y})"
            );
            x += 0.0173;
        }
    }

    #[test]
    fn softplus_matches_definition_and_threshold() {
        assert!((softplus(0.0) - 2f32.ln()).abs() < 1e-7);
        assert!((softplus(-3.0) - (1.0 + (-3f32).exp()).ln()).abs() < 1e-7);
        assert_eq!(softplus(25.0), 25.0);
    }
}
