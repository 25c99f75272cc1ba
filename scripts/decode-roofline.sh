#!/usr/bin/env bash
# Decoding against the memory roofline: for each thread count, the triad example (STREAM's
# triad and a read-only pass) before and after `mamba bench` decodes every model and weight
# format, then the bytes each step moves (weights read once, the recurrent state read and
# written) over the bandwidths measured around it.
#
#   bash scripts/decode-roofline.sh OUT_DIR
#
# THREADS (default "1 2"), FORMATS (default "f32 bf16 q8_0 q4_0") and MODELS (default
# "mamba-130m mamba2-130m") narrow the sweep. Results: OUT_DIR/*.json, OUT_DIR/triad-t*.txt
# and the table OUT_DIR/decode-roofline.md.
set -euo pipefail

out=${1:?usage: bash scripts/decode-roofline.sh OUT_DIR}
threads=${THREADS:-"1 2"}
formats=${FORMATS:-"f32 bf16 q8_0 q4_0"}
models=${MODELS:-"mamba-130m mamba2-130m"}
repo=$(cd "$(dirname "$0")/.." && pwd)
mamba=${MAMBA:-$repo/target/release/mamba}
triad=${TRIAD:-$repo/target/release/examples/triad}
[ -x "$mamba" ] || (cd "$repo" && cargo build --release -p mamba-cli)
[ -x "$triad" ] || (cd "$repo" && cargo build --release -p mamba-ops --example triad)
mkdir -p "$out"

for t in $threads; do
  RAYON_NUM_THREADS=$t "$triad" > "$out/triad-t$t.txt"
  for model in $models; do
    for format in $formats; do
      echo "== $model $format t$t" >&2
      "$mamba" --threads "$t" --json bench --preset "$model" --dtype "$format" \
        --prompt-len 16 --gen-len 128 > "$out/$model-$format-t$t.json"
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
rows = ["| model | weights | threads | tokens/s | MB moved per token | GB/s | triad GB/s | read GB/s | of triad | of read |",
        "|---|---|---|---|---|---|---|---|---|---|"]
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    m = json.load(open(path))
    t = m["threads"]
    moved = m["weight_bytes_per_token"] + 2 * m["state_bytes_per_sequence"] * m["batch"]
    rate = m["decode_tokens_per_s"] * moved / 1e9
    triad, read = bandwidth(t, "triad"), bandwidth(t, "read")
    rows.append(f"| {m['preset']} | {m['dtype']} | {t} | {m['decode_tokens_per_s']:.1f} | "
                f"{moved / 1e6:.1f} | {rate:.1f} | {triad:.1f} | {read:.1f} | "
                f"{100 * rate / triad:.0f} % | {100 * rate / read:.0f} % |")
table = "\n".join(rows) + "\n"
open(os.path.join(out, "decode-roofline.md"), "w").write(table)
print(table)
PY
