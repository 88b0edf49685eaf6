#!/usr/bin/env bash
# The many-task study of issue 25 (docs/RESULTS_MULTITASK.md, "The Nth task nearly free"): every
# classification data set that loads offline, MiniLM r=8 query/value, one seed, a very small budget.
# Usage: bash docs/studies/taskcore.sh [OUT_ROOT] [stream]   (default runs/taskcore; stream a, b or all).
# Two streams (a: separate LoRAs, their compression into cores, continual ShareA; b: the task-core runs)
# can run side by side, one core each. Rerunning resumes.
set -euo pipefail
OUT=${1:-runs/taskcore}
STREAM=${2:-all}
# The order is fixed before any result: the SST-2 stand-in first (the basis task), then one task of each
# other kind; movie-reviews (whole reviews, cut to 64 tokens) last.
TASKS=(rotten-tomatoes commonsense-relations hedge-sentences adjective-order rt-snippets movie-reviews)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
SL=(python -m sharelora.cli)
# Per task: 320 training rows, 2 epochs, batch 16 (40 steps), dev / test 200 rows, one lr (6e-3) for all.
COMMON=(--model minilm --rank 8 --lr 6e-3 --epochs 2 --batch-size 16 --max-train-examples 320 --max-length 64
        --max-eval-examples 200 --threads 1 --no-progress --resume)
joined=$(IFS=,; echo "${TASKS[*]}")
seed=${SEED:-0}
if [[ $STREAM == a || $STREAM == all ]]; then
  for task in "${TASKS[@]}"; do
    "${SL[@]}" train --dataset "$task" --method lora --seed "$seed" "${COMMON[@]}" \
      --output-dir "$OUT/separate-lora/$task-s$seed"
  done
  for core in matrix diagonal; do  # the separate LoRAs fitted into one shared A, B and a core per task
    c="$OUT/compressed-$core/s$seed"
    [ -f "$c/eval.json" ] && continue
    "${SL[@]}" compress "$c" $(for t in "${TASKS[@]}"; do echo "$t=$OUT/separate-lora/$t-s$seed"; done) \
      --rank 8 --share A --task-core "$core" --overwrite
    "${SL[@]}" eval "$c" --json "$c/eval.json.tmp" && mv "$c/eval.json.tmp" "$c/eval.json"
  done
  "${SL[@]}" multitask --tasks "$joined" --method sharea --task-share A --continual --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/continual-sharea/s$seed"
fi
if [[ $STREAM == b || $STREAM == all ]]; then
  for k in 1 3; do
    for core in matrix diagonal; do
      "${SL[@]}" multitask --tasks "$joined" --method sharea --task-share AB --task-core "$core" --continual \
        --basis-tasks "$k" --seed "$seed" "${COMMON[@]}" --output-dir "$OUT/core-$core-basis$k/s$seed"
    done
  done
fi
