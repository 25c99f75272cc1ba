#!/usr/bin/env bash
# The CUDA check of mamba-ops (examples/cuda_check.rs), built here and run on a GPU machine.
#
#   bash crates/mamba-ops/gpu-check.sh prepare [FIXTURES]
#       on a machine without a GPU, from the repository root: builds the example with the
#       `cuda` feature into target-cuda/ (the CPU build in target/ is left alone), using the
#       toolchain of ../shared/tools/cuda-toolchain.sh, and packs the stripped binary, the op
#       fixtures with their gradients (default ../shared/fixtures/ops) and this script into .gpu/ (ignored by git:
#       add /.gpu/ and /target-cuda to .git/info/exclude).
#   bash .gpu/gpu-check.sh run
#       on the GPU machine, from the repository root (.gpu carried there): finds the CUDA
#       libraries, runs the full check (fixtures, model sizes, timings), then per-kernel times
#       under ncu and memcheck/racecheck under compute-sanitizer on the fixtures. Logs go to $OUT.
set -u
here=$(cd "$(dirname "$0")" && pwd)

prepare() {
  local fixtures=${1:-../shared/fixtures/ops}
  set -e
  eval "$(bash ../shared/tools/cuda-toolchain.sh)"
  CARGO_TARGET_DIR=target-cuda nice -n 10 cargo build --release -p mamba-ops --features cuda --example cuda_check
  rm -rf .gpu && mkdir -p .gpu/fixtures
  (cd "$fixtures" && find . -name manifest.json -o -name inputs.safetensors -o -name outputs.safetensors -o -name grads.safetensors) |
    while read -r f; do mkdir -p ".gpu/fixtures/ops/$(dirname "$f")"; cp "$fixtures/$f" ".gpu/fixtures/ops/$f"; done
  strip -o .gpu/cuda_check target-cuda/release/examples/cuda_check
  gzip -9 .gpu/cuda_check
  cp "$here/gpu-check.sh" .gpu/
  du -sh .gpu
}

run() {
  local out=${OUT:-/tmp/out}
  mkdir -p "$out"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,temperature.gpu --format=csv | tee "$out/smi.txt"
  local libs
  libs=$(find /usr /opt /lib -xdev \( -name 'libnvrtc.so.13*' -o -name 'libcublas.so.13*' -o -name 'libcurand.so.10*' -o -name 'libcudart.so.13*' \) 2>/dev/null |
    xargs -r -n1 dirname | sort -u | tr '\n' ':')
  export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:-}"
  gunzip -c .gpu/cuda_check.gz > /tmp/cuda_check && chmod +x /tmp/cuda_check
  ldd /tmp/cuda_check | grep -E "cuda|nvrtc|cublas|curand|not found"
  echo "=== full check"
  timeout 200 /tmp/cuda_check --fixtures .gpu/fixtures/ops --out "$out" > "$out/check.txt" 2>&1
  echo "exit $?" | tee -a "$out/check.txt"
  echo "=== ncu"
  for case in "m1 selective_scan" "m2 ssd" "m2 rmsnorm" "m1 causal_conv1d d" "bwd m2 rmsnorm_gated 2048x1536" "bwd m2 causal_conv1d"; do
    timeout 45 ncu --clock-control none \
      --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed \
      -k regex:'ssd_|selective_scan_|rmsnorm_gated_|causal_conv1d_fwd|causal_conv1d_bwd|sum_parts' -c 16 \
      /tmp/cuda_check --no-fixtures --cases "$case" --no-timings --out /tmp >> "$out/ncu.txt" 2>&1
  done
  echo "=== compute-sanitizer"
  for tool in memcheck racecheck; do
    timeout 60 compute-sanitizer --tool $tool /tmp/cuda_check --fixtures .gpu/fixtures/ops --cases NONE \
      --no-timings --out /tmp > "$out/sanitizer_$tool.txt" 2>&1
    echo "$tool exit $?"; tail -1 "$out/sanitizer_$tool.txt"
  done
  echo "=== check output tail"
  tail -60 "$out/check.txt"
}

case "${1:-}" in
  prepare) shift; prepare "$@" ;;
  run) run ;;
  *) echo "usage: $0 prepare [FIXTURES] | run" >&2; exit 2 ;;
esac
