//! 2 MiB ("huge") pages for the weights that decoding streams from memory.
//!
//! A decoding step reads every weight matrix once, from memory. With the 4 KiB pages Linux
//! gives anonymous memory by default, that stream crosses a page, and needs a new address
//! translation, every 4 KiB; with 2 MiB pages every 2 MiB. Measured on this project's Zen 4
//! host (mamba2-130m's 24 `in_proj` and `out_proj` matrices and its output head in bf16,
//! the same products alternating between a 4 KiB and a 2 MiB copy, 40 rounds, three runs):
//! the layers' products took 3-11 % less time, the head 1-15 %, the 2 MiB copy faster in
//! 30-35 of 40 rounds.
//!
//! Linux backs a range with huge pages where it is advised to (`MADV_HUGEPAGE`, which the
//! common transparent-huge-page mode "madvise" requires), at the next page faults; weights
//! are written before anyone can advise their pages, so [`back_with_huge_pages`] also asks
//! for `MADV_COLLAPSE` (Linux 6.1 and later), which moves the written pages into huge pages
//! at once (where the kernel's background thread would take minutes). Both change where the
//! memory lies, never what it holds.
//!
//! Moving takes a copy of the range, and on hosts whose hypervisor takes back free guest
//! memory (this project's Firecracker VM) every fresh huge page also faults in from the host:
//! the 257 MB of mamba2-130m's bf16 weights took 1.1-2.3 s there, as long as 100 decoding
//! steps, and on a background thread the copy slowed the steps beside it more than twice over.
//! So the requests are off unless turned on ([`set_huge_pages`]; `mamba --huge-pages`): for
//! long generations, benchmarks of the steady state, and hosts where memory is cheap to move.

use std::sync::atomic::{AtomicBool, Ordering};

/// The huge page size of x86-64 and of 4 KiB-page ARM64 kernels.
pub const HUGE_PAGE: usize = 2 << 20;

/// Slices smaller than this are left alone: [`back_with_huge_pages`] rounds the range out to
/// whole huge pages, which would mostly be other memory.
pub const MIN_BYTES: usize = HUGE_PAGE / 2;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns [`back_with_huge_pages`] on or off (the default) for the whole process.
pub fn set_huge_pages(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

/// Whether [`back_with_huge_pages`] asks the kernel for anything.
pub fn huge_pages_enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What became of a request for huge pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePages {
    /// The kernel moved the range into huge pages.
    Collapsed,
    /// The range is advised for huge pages, but the kernel did not move all of it at once
    /// (no `MADV_COLLAPSE` before Linux 6.1, no free huge page, or an unmapped part of the
    /// range rounded out, around which it moved the rest).
    Advised,
    /// Nothing was asked: turned off (the default), a slice below [`MIN_BYTES`], or not
    /// Linux.
    NotAsked,
    /// The kernel refused the advice (huge pages turned off for the system).
    Refused,
}

/// Asks the kernel to back the memory under `values` with huge pages: the range rounded out
/// to whole huge pages (a few-MiB matrix holds few whole ones; the pages around it belong to
/// the same process, and a huge page changes where they lie, not what they hold). Takes the
/// time of copying the range once; a hint: the values are the same whatever the answer.
pub fn back_with_huge_pages<T>(values: &[T]) -> HugePages {
    let bytes = std::mem::size_of_val(values);
    if !huge_pages_enabled() || bytes < MIN_BYTES {
        return HugePages::NotAsked;
    }
    let start = values.as_ptr() as usize / HUGE_PAGE * HUGE_PAGE;
    let end = (values.as_ptr() as usize + bytes).next_multiple_of(HUGE_PAGE);
    advise_and_collapse(start, end - start)
}

#[cfg(target_os = "linux")]
fn advise_and_collapse(start: usize, len: usize) -> HugePages {
    /// `MADV_COLLAPSE` of `linux/mman.h` (Linux 6.1), which the libc crate defines for some
    /// targets only.
    const MADV_COLLAPSE: libc::c_int = 25;
    // Ok, or the error number.
    let advise = |advice| {
        // SAFETY: `start..start + len` is page-aligned and covers memory of this process;
        // MADV_HUGEPAGE and MADV_COLLAPSE change which physical pages back the range, not its
        // contents.
        match unsafe { libc::madvise(start as *mut libc::c_void, len, advice) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error().raw_os_error()),
        }
    };
    // ENOMEM: part of the range (rounded out) is not mapped; the rest took the advice.
    match advise(libc::MADV_HUGEPAGE) {
        Ok(()) | Err(Some(libc::ENOMEM)) => {}
        Err(_) => return HugePages::Refused,
    }
    match advise(MADV_COLLAPSE) {
        Ok(()) => HugePages::Collapsed,
        Err(_) => HugePages::Advised,
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_and_collapse(_start: usize, _len: usize) -> HugePages {
    HugePages::NotAsked
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Kilobytes of huge pages (`AnonHugePages` of `/proc/self/smaps`) in the mappings that
    /// overlap `range`.
    #[cfg(target_os = "linux")]
    fn huge_kib_around(range: std::ops::Range<usize>) -> usize {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let mut overlaps = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let first = line.split_whitespace().next().unwrap_or("");
            if let Some((a, b)) = first.split_once('-') {
                if let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
                {
                    overlaps = a < range.end && range.start < b;
                    continue;
                }
            }
            if let (true, Some(rest)) = (overlaps, line.strip_prefix("AnonHugePages:")) {
                kib += rest
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<usize>()
                    .unwrap();
            }
        }
        kib
    }

    fn pattern(n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| i.wrapping_mul(2654435761)).collect()
    }

    /// One test, because it turns the requests on and off: `cargo test` runs the tests of a
    /// binary on several threads.
    #[test]
    fn collapsing_keeps_the_values_and_uses_huge_pages() {
        let values = pattern(3 * HUGE_PAGE / 4); // 6 MiB of u32
        assert_eq!(
            back_with_huge_pages(&values),
            HugePages::NotAsked,
            "off by default"
        );
        set_huge_pages(true);
        let answer = back_with_huge_pages(&values);
        assert_eq!(values, pattern(values.len()), "the values changed");
        #[cfg(target_os = "linux")]
        if answer == HugePages::Collapsed {
            let start = values.as_ptr() as usize;
            let huge = huge_kib_around(start..start + 4 * values.len());
            // At least the two whole huge pages inside the 6 MiB.
            assert!(huge >= 2 * HUGE_PAGE / 1024, "{huge} KiB in huge pages");
        }
        #[cfg(not(target_os = "linux"))]
        assert_eq!(answer, HugePages::NotAsked);

        let small = pattern(MIN_BYTES / 4 - 1);
        assert_eq!(back_with_huge_pages(&small), HugePages::NotAsked);
        set_huge_pages(false);
        assert_eq!(back_with_huge_pages(&values), HugePages::NotAsked);
    }
}
