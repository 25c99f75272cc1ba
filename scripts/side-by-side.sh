#!/usr/bin/env bash
# Side-by-side CPU benchmark: llama.cpp's `llama-bench` and our `mamba bench` on the same
# model dimensions and weight precision, one after the other in one run on one machine.
#
# llama.cpp is not part of this project: build it yourself outside the repository and
# convert the checkpoints with its converter (BENCHMARKS.md, "CPU against llama.cpp", says
# how). Then:
#
#   LLAMA_BENCH=/path/to/llama-bench GGUF_DIR=/path/to/ggufs bash scripts/side-by-side.sh OUT_DIR
#
# GGUF_DIR holds {mamba-130m,mamba2-130m}-{f32,bf16,q8_0,q4_0}.gguf (missing ones are
# skipped). THREADS (default "1 2"), FORMATS (default "f32 bf16 q8_0 q4_0") and MODELS
# (default "mamba-130m mamba2-130m") narrow the sweep; MAMBA_FLAGS adds global flags to
# ours (e.g. "--huge-pages"); ROUNDS (default 1) repeats each cell, llama.cpp's then ours,
# that many times in a row, and the table gives the medians and the range of the paired
# ratios. Results: OUT_DIR/llama/*.json, OUT_DIR/mamba/*.json (one per cell and round) and the
# table OUT_DIR/side-by-side.md.
set -euo pipefail

out=${1:?usage: LLAMA_BENCH=... GGUF_DIR=... bash scripts/side-by-side.sh OUT_DIR}
: "${LLAMA_BENCH:?set LLAMA_BENCH to the llama-bench binary of llama.cpp}"
: "${GGUF_DIR:?set GGUF_DIR to the folder of converted GGUF files}"
threads=${THREADS:-"1 2"}
formats=${FORMATS:-"f32 bf16 q8_0 q4_0"}
models=${MODELS:-"mamba-130m mamba2-130m"}
repo=$(cd "$(dirname "$0")/.." && pwd)
mamba=${MAMBA:-$repo/target/release/mamba}
mamba_flags=${MAMBA_FLAGS:-}
[ -x "$mamba" ] || (cd "$repo" && cargo build --release -p mamba-cli)
mkdir -p "$out/llama" "$out/mamba"

for model in $models; do
  for format in $formats; do
    gguf=$GGUF_DIR/$model-$format.gguf
    [ -f "$gguf" ] || { echo "skip $gguf (missing)" >&2; continue; }
    for t in $threads; do
      for round in $(seq "${ROUNDS:-1}"); do
        tag=$model-$format-t$t-r$round
        echo "== $tag" >&2
        "$LLAMA_BENCH" -m "$gguf" -p 512,2048 -n 128 -t "$t" -r 3 -o json > "$out/llama/$tag.json"
        for p in 512 2048; do
          "$mamba" --threads "$t" --json $mamba_flags bench --preset "$model" --dtype "$format" \
            --prompt-len "$p" --gen-len 128 > "$out/mamba/$tag-p$p.json"
        done
      done
    done
  done
done

python3 - "$out" <<'PY'
import glob, json, os, statistics, sys
out = sys.argv[1]
cells = {}
for path in sorted(glob.glob(os.path.join(out, "llama", "*-r*.json"))):
    tag = os.path.basename(path)[:-5]
    model, fmt, t, _round = tag.rsplit("-", 3)
    llama = {}
    for r in json.load(open(path)):
        test = f"pp{r['n_prompt']}" if r["n_prompt"] else f"tg{r['n_gen']}"
        llama[test] = r["avg_ts"]
    ours = {}
    for p in (512, 2048):
        m = json.load(open(os.path.join(out, "mamba", f"{tag}-p{p}.json")))
        ours[f"pp{p}"] = m["prefill_tokens_per_s"]
        ours.setdefault("tg128", []).append(m["decode_tokens_per_s"])
    ours["tg128"] = sum(ours["tg128"]) / len(ours["tg128"])  # decoding after each prompt
    for test in ("pp512", "pp2048", "tg128"):
        if test in llama:
            cells.setdefault((model, fmt, t[1:], test), []).append((llama[test], ours[test]))
order = {"pp512": 0, "pp2048": 1, "tg128": 2}
rows = ["| model | weights | threads | test | rounds | llama.cpp tok/s | ours tok/s | ours / llama.cpp | range over rounds |",
        "|---|---|---|---|---|---|---|---|---|"]
for (model, fmt, t, test), runs in sorted(cells.items(), key=lambda c: (c[0][:3], order[c[0][3]])):
    theirs = statistics.median(l for l, _ in runs)
    ours = statistics.median(o for _, o in runs)
    ratios = [o / l for l, o in runs]
    rows.append(f"| {model} | {fmt} | {t} | {test} | {len(runs)} | {theirs:.1f} | {ours:.1f} | "
                f"{ours / theirs:.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |")
table = "\n".join(rows) + "\n"
open(os.path.join(out, "side-by-side.md"), "w").write(table)
print(table)
PY
