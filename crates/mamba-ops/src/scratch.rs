//! Per-thread working buffers kept from call to call: once warm, an op allocates and zeroes
//! nothing per call, and no thread keeps a buffer past [`KEPT_MAX`].

use std::cell::Cell;
use std::thread::LocalKey;

/// A thread's kept buffer (declare with `thread_local!` and `Cell::new(Vec::new())`).
pub(crate) type Scratch = LocalKey<Cell<Vec<f32>>>;

/// Most values a thread keeps in one [`Scratch`] (16 MB of f32; a prefill piece of 512 tokens
/// of a 130m model needs 3 MB for its SSD states): larger buffers are made for the call and
/// dropped after it.
pub(crate) const KEPT_MAX: usize = 4 << 20;

/// The thread's buffer in `key`, grown to `len` values or more: the values a last use left
/// (zeros where it grew), so a caller writes every value it reads. Give it back with
/// [`give_back`]; a use nested on the same thread (rayon's work stealing) finds it empty
/// and makes its own.
pub(crate) fn reused(key: &'static Scratch, len: usize) -> Vec<f32> {
    let mut buf = key.take();
    if buf.len() < len {
        buf.resize(len, 0.0);
    }
    buf
}

/// Keeps `buf` in the thread's `key` for the next [`reused`], unless it is over [`KEPT_MAX`].
pub(crate) fn give_back(key: &'static Scratch, buf: Vec<f32>) {
    if buf.len() <= KEPT_MAX {
        key.set(buf);
    }
}
