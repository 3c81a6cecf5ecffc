#!/usr/bin/env bash
# Before/after equality for the train and evaluate side of the layout change (issue 15).
# Usage: research/layout_equality_train.sh OUTDIR   (run from the repo root, once on the old code, once on the new)
# Writes OUTDIR/bundle (one train on the fixtures with the tests' tiny BERT, fixed seed) with its sha256 list, and
# OUTDIR/eval-*.json (evaluate on two first-k files: text-sim, hllm, hllm --item-tuning top). Compare two runs with
#   python research/layout_equality_compare.py BEFORE AFTER
# (weights byte for byte; config.json and the JSON with the wall-clock "seconds" fields dropped).
# Pass MODEL=BEFORE/tiny-bert to the second run so both use the same model files.
set -euo pipefail
OUT=${1:?outdir}; mkdir -p "$OUT"
TS=${TOKENSEL:-/work/main/.venv/bin/tokensel}
PY=${PYTHON:-/work/main/.venv/bin/python}
MODEL=${MODEL:-$OUT/tiny-bert}
export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
[ -d "$MODEL" ] || $PY research/make_tiny_bert.py fixtures/items.parquet "$MODEL"
rm -rf "$OUT/bundle"
$TS train fixtures/items.parquet fixtures/interactions.parquet -o "$OUT/bundle" --model "$MODEL" \
    --epochs1 2 --epochs2 1 --negatives 8 > "$OUT/train.log" 2>&1
(cd "$OUT/bundle" && find . -type f | sort | xargs sha256sum) > "$OUT/bundle.sha256"
for k in 16 32; do
  $TS compress fixtures/items.parquet -o "$OUT/first$k.parquet" --strategy first-k --k $k --model "$MODEL" > /dev/null 2>&1
done
run_eval() { name=$1; shift
  $TS evaluate fixtures/items.parquet fixtures/interactions.parquet --texts "$OUT/first16.parquet" \
      --texts "$OUT/first32.parquet" --model "$MODEL" \
      --seeds 2 --epochs 2 --negatives 8 "$@" -o "$OUT/eval-$name.json" > "$OUT/eval-$name.log" 2>&1
}
run_eval textsim --recommender text-sim
run_eval hllm --recommender hllm
run_eval hllm-top --recommender hllm --item-tuning top
echo done
