//! Asking the L2 cache for memory ahead of the loads that need it (x86's `prefetcht1`), as the
//! decoding kernels do where one core's plain stream waits on memory latency.

/// Asks the L2 cache for every 64-byte line of the `bytes` bytes at `at` (at least the line
/// holding `at`). A prefetch reads nothing into the program and cannot fault, wherever it
/// points, so `at` may lie past the end of any allocation.
#[inline(always)]
pub(crate) fn lines_to_l2(at: *const u8, bytes: usize) {
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
    for line in (0..bytes.max(1)).step_by(64) {
        // SAFETY: see above; `wrapping_add` keeps the address arithmetic defined.
        unsafe { _mm_prefetch::<_MM_HINT_T1>(at.wrapping_add(line) as *const i8) };
    }
}
