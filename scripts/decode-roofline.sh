#!/usr/bin/env bash
# Decoding against the memory roofline: for each thread count, the triad example (STREAM's
# triad and a read-only pass) before and after `mamba bench` decodes every model and weight
# format, then the bytes each step moves (weights read once, the recurrent state read and
# written) over the bandwidths measured around it.
#
#   bash scripts/decode-roofline.sh OUT_DIR
#
# THREADS (default "1 2"), FORMATS (default "f32 bf16 q8_0 q4_0") and MODELS (default
# "mamba-130m mamba2-130m") narrow the sweep; MAMBA_FLAGS adds global flags to ours (e.g.
# "--huge-pages"). Results: OUT_DIR/*.json, OUT_DIR/triad-t*.txt and the table
# OUT_DIR/decode-roofline.md.
#
# With LLAMA_BENCH and GGUF_DIR set (as for scripts/side-by-side.sh), llama.cpp's
# `llama-bench -p 0 -n 128` decodes the same model file right after ours, between the same
# two bandwidth runs, and the table adds its tokens/s, the bandwidth that is at our bytes per
# step, and the bandwidth that 1.3x its speed would take, as a share of the read-only pass:
# past 100 % the issue's decoding target is above this host's memory roofline.
set -euo pipefail

out=${1:?usage: bash scripts/decode-roofline.sh OUT_DIR}
threads=${THREADS:-"1 2"}
formats=${FORMATS:-"f32 bf16 q8_0 q4_0"}
models=${MODELS:-"mamba-130m mamba2-130m"}
repo=$(cd "$(dirname "$0")/.." && pwd)
mamba=${MAMBA:-$repo/target/release/mamba}
mamba_flags=${MAMBA_FLAGS:-}
triad=${TRIAD:-$repo/target/release/examples/triad}
[ -x "$mamba" ] || (cd "$repo" && cargo build --release -p mamba-cli)
[ -x "$triad" ] || (cd "$repo" && cargo build --release -p mamba-ops --example triad)
mkdir -p "$out"

for t in $threads; do
  RAYON_NUM_THREADS=$t "$triad" > "$out/triad-t$t.txt"
  for model in $models; do
    for format in $formats; do
      echo "== $model $format t$t" >&2
      "$mamba" --threads "$t" --json $mamba_flags bench --preset "$model" --dtype "$format" \
        --prompt-len 16 --gen-len 128 > "$out/$model-$format-t$t.json"
      gguf=${GGUF_DIR:-}/$model-$format.gguf
      if [ -n "${LLAMA_BENCH:-}" ] && [ -f "$gguf" ]; then
        "$LLAMA_BENCH" -m "$gguf" -p 0 -n 128 -t "$t" -r 3 -o json > "$out/$model-$format-t$t.llama"
      fi
    done
  done
  RAYON_NUM_THREADS=$t "$triad" >> "$out/triad-t$t.txt"
done

python3 - "$out" <<'PY'
import glob, json, os, re, sys
out = sys.argv[1]
def bandwidth(t, kind):
    text = open(os.path.join(out, f"triad-t{t}.txt")).read()
    runs = [float(v) for v in re.findall(rf"^{kind}: ([0-9.]+) GB/s", text, re.M)]
    return sum(runs) / len(runs)
peers = glob.glob(os.path.join(out, "*.llama"))
rows = ["| model | weights | threads | tokens/s | MB moved per token | GB/s | triad GB/s | read GB/s | of triad | of read |"
        + (" llama.cpp tokens/s | its GB/s | ours / llama.cpp | 1.3x needs, of read |" if peers else ""),
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|---|---|---|" if peers else "")]
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = json.load(open(path))
    t = m["threads"]
    moved = m["weight_bytes_per_token"] + 2 * m["state_bytes_per_sequence"] * m["batch"]
    rate = m["decode_tokens_per_s"] * moved / 1e9
    triad, read = bandwidth(t, "triad"), bandwidth(t, "read")
    rows.append(f"| {m['preset']} | {m['dtype']} | {t} | {m['decode_tokens_per_s']:.1f} | "
                f"{moved / 1e6:.1f} | {rate:.1f} | {triad:.1f} | {read:.1f} | "
                f"{100 * rate / triad:.0f} % | {100 * rate / read:.0f} % |")
    peer = path[:-len(".json")] + ".llama"
    if os.path.exists(peer):
        theirs = json.load(open(peer))[0]["avg_ts"]
        their_rate = theirs * moved / 1e9
        rows[-1] += (f" {theirs:.1f} | {their_rate:.1f} | {m['decode_tokens_per_s'] / theirs:.2f}x | "
                     f"{100 * 1.3 * their_rate / read:.0f} % |")
    elif peers:
        rows[-1] += " | | | |"
table = "\n".join(rows) + "\n"
open(os.path.join(out, "decode-roofline.md"), "w").write(table)
print(table)
PY
