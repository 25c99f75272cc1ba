#!/usr/bin/env python3
"""Times mamba_ssm's Triton kernels at the shapes of `cuda_check`'s model cases
(crates/mamba-ops/examples/cuda_check.rs), for the side-by-side table in BENCHMARKS.md: the
SSD forward, the SSD forward and backward together (its backward alone is the difference), and
the decoding steps.

Needs PyTorch with CUDA, Triton, einops, and mamba_ssm's `ops/triton` package importable
(a checkout of state-spaces/mamba on PYTHONPATH; its compiled extensions are not needed,
these kernels are Triton). Timing as in cuda_check: device time per call, the median of
SAMPLES replays of a CUDA graph holding CALLS calls (so no host launch cost is counted).

    python3 scripts/mamba_ssm_bench.py            # prints one line per case
    python3 scripts/mamba_ssm_bench.py --only selective_state_update   # cases containing TEXT
    ncu ... python3 scripts/mamba_ssm_bench.py --once ...   # each case called twice, no graph:
                                                            # kernel times from the profiler
"""
import statistics
import sys

import torch

try:
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from mamba_ssm.ops.triton.selective_state_update import selective_state_update
except ImportError as e:
    sys.exit(f"mamba_ssm's Triton ops are not importable ({e}): put a checkout on PYTHONPATH")

L = 2048
CALLS, SAMPLES = 20, 15
DEV = "cuda"


def uniform(shape, lo, hi, dtype=torch.float32):
    return (torch.rand(shape, device=DEV) * (hi - lo) + lo).to(dtype)


def device_us(fn):
    """Median device time of one call of `fn`, in microseconds."""
    for _ in range(3):  # Triton compiles and autotunes on the first calls
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(CALLS):
                fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(SAMPLES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(samples)


def queued_us(fn):
    """Median time of one call of `fn` queued back to back (host launch cost included when the
    host is slower than the device)."""
    torch.cuda.synchronize()
    samples = []
    for _ in range(SAMPLES):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS):
            fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / CALLS)
    return statistics.median(samples)


def ssd(heads, chunk, dtype):
    p, n = 64, 128
    x = uniform((1, L, heads, p), -1, 1, dtype)
    dt = uniform((1, L, heads), -0.5, 0.5, dtype)
    a = uniform((heads,), -16, -1)
    b = uniform((1, L, 1, n), -1, 1, dtype)
    c = uniform((1, L, 1, n), -1, 1, dtype)
    d = uniform((heads,), 0.5, 1.5)
    dt_bias = uniform((heads,), -6, -2)
    h0 = uniform((1, heads, p, n), -0.1, 0.1)
    return lambda: mamba_chunk_scan_combined(
        x, dt, a, b, c, chunk, D=d, dt_bias=dt_bias, initial_states=h0,
        dt_softplus=True, return_final_states=True)


def ssd_backward(heads, chunk, dtype):
    """The SSD's forward and backward (gradients of every input from random output
    gradients); the backward alone is this minus `ssd`'s time."""
    p, n = 64, 128
    leaves = [
        uniform((1, L, heads, p), -1, 1, dtype),
        uniform((1, L, heads), -0.5, 0.5, dtype),
        uniform((heads,), -16, -1),
        uniform((1, L, 1, n), -1, 1, dtype),
        uniform((1, L, 1, n), -1, 1, dtype),
        uniform((heads,), 0.5, 1.5),
        uniform((heads,), -6, -2),
        uniform((1, heads, p, n), -0.1, 0.1),
    ]
    for t in leaves:
        t.requires_grad_(True)
    x, dt, a, b, c, d, dt_bias, h0 = leaves
    g_y = uniform((1, L, heads, p), -1, 1, dtype)
    g_final = uniform((1, heads, p, n), -1, 1)

    def step():
        y, final = mamba_chunk_scan_combined(
            x, dt, a, b, c, chunk, D=d, dt_bias=dt_bias, initial_states=h0,
            dt_softplus=True, return_final_states=True)
        torch.autograd.backward([y, final], [g_y, g_final])

    return step


def m1_step(batch, dtype):
    d, n = 1536, 16
    state = uniform((batch, d, n), -1, 1)
    x = uniform((batch, d), -1, 1, dtype)
    dt = uniform((batch, d), -0.5, 0.5, dtype)
    a = uniform((d, n), -16, -1)
    b = uniform((batch, n), -1, 1, dtype)
    c = uniform((batch, n), -1, 1, dtype)
    dd = uniform((d,), 0.5, 1.5)
    z = uniform((batch, d), -2, 2, dtype)
    dt_bias = uniform((d,), -6, -2)
    return lambda: selective_state_update(state, x, dt, a, b, c, D=dd, z=z, dt_bias=dt_bias,
                                          dt_softplus=True)


def m2_step(batch, dtype):
    h, p, n = 24, 64, 128
    state = uniform((batch, h, p, n), -1, 1)
    x = uniform((batch, h, p), -1, 1, dtype)
    # As mamba_ssm's Mamba2.step: per-head dt, A, D and dt_bias broadcast over the head dim.
    dt = uniform((batch, h), -0.5, 0.5, dtype)[:, :, None].expand(batch, h, p)
    a = uniform((h,), -16, -1)[:, None, None].expand(h, p, n)
    b = uniform((batch, 1, n), -1, 1, dtype)
    c = uniform((batch, 1, n), -1, 1, dtype)
    d = uniform((h,), 0.5, 1.5)[:, None].expand(h, p)
    dt_bias = uniform((h,), -6, -2)[:, None].expand(h, p)
    return lambda: selective_state_update(state, x, dt, a, b, c, D=d, dt_bias=dt_bias,
                                          dt_softplus=True)


def main():
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}")
    cases = []
    for dtype, name in [(torch.float32, "F32"), (torch.bfloat16, "BF16")]:
        for heads in (24, 80):
            for chunk in (64, 256):
                cases.append((f"m2 ssd H{heads} P64 N128 L2048 chunk {chunk} {name}",
                              lambda h=heads, q=chunk, t=dtype: ssd(h, q, t)))
                cases.append((f"m2 ssd forward+backward H{heads} P64 N128 L2048 chunk {chunk} {name}",
                              lambda h=heads, q=chunk, t=dtype: ssd_backward(h, q, t)))
        for batch in (1, 64):
            cases.append((f"m1 selective_state_update b{batch} {name}",
                          lambda b=batch, t=dtype: m1_step(b, t)))
            cases.append((f"m2 selective_state_update b{batch} {name}",
                          lambda b=batch, t=dtype: m2_step(b, t)))
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else ""
    once = "--once" in sys.argv
    for label, make in cases:
        if only not in label:
            continue
        try:
            if once:
                fn = make()
                fn()
                fn()
                torch.cuda.synchronize()
                print(f"{label}: called twice", flush=True)
                continue
            fn = make()
            try:
                print(f"{label}: {device_us(fn):.1f} us", flush=True)
            except RuntimeError as e:  # not capturable: time the calls as the host queues them
                print(f"{label}: {queued_us(fn):.1f} us (no CUDA graph: {str(e)[:60]})", flush=True)
        except Exception as e:  # one failing case should not hide the others
            print(f"{label}: failed: {type(e).__name__}: {e}", flush=True)


if __name__ == "__main__":
    main()
