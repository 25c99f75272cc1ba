//! Resident memory of this process and of others, as Linux's `/proc` reports it.

/// This process's peak resident set size (`VmHWM`), where `/proc` reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    status_bytes("/proc/self/status", "VmHWM:")
}

/// The current resident set size (`VmRSS`) of process `pid`, while it runs.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    status_bytes(&format!("/proc/{pid}/status"), "VmRSS:")
}

/// The `key` line of a `/proc/.../status` file, given in KiB there, in bytes.
fn status_bytes(path: &str, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
