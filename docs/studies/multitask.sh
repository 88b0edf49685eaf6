#!/usr/bin/env bash
# The multi-task study (docs/RESULTS_MULTITASK.md): 4 tasks, MiniLM r=8 query/value, 3 seeds.
# Usage: bash docs/studies/multitask.sh [OUT_ROOT]   (default runs/multitask). Rerunning resumes.
set -euo pipefail
OUT=${1:-runs/multitask}
TASKS=(rotten-tomatoes vitaminc multiemo hyperbaton)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
# The same budget for every task of every method: 320 training rows per task, 2 epochs, batch 16
# (40 steps per task; a joint run takes the 4 tasks' 1,280 rows: 160 steps), dev / test 200 per task.
COMMON=(--model minilm --rank 8 --lr 6e-3 --epochs 2 --batch-size 16 --max-train-examples 320 --max-length 64
        --max-eval-examples 200 --threads 1 --no-progress --resume)
joined=$(IFS=,; echo "${TASKS[*]}")
for seed in ${SEEDS:-0 1 2}; do
  for method in lora sharea; do  # separate adapters, one run per task
    for task in "${TASKS[@]}"; do
      sharelora train --dataset "$task" --method "$method" --seed "$seed" "${COMMON[@]}" \
        --output-dir "$OUT/separate-$method/$task-s$seed"
    done
  done
  sharelora multitask --tasks "$joined" --method sharea --task-share A --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/joint-sharea/s$seed"
  sharelora multitask --tasks "$joined" --method shareab --task-share A --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/joint-shareab/s$seed"
  sharelora multitask --tasks "$joined" --method hydra --heads 4 --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/hydra4/s$seed"
  sharelora multitask --tasks "$joined" --method sharea --continual --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/continual-sharea/s$seed"
  sharelora multitask --tasks "$joined" --method lora --one-adapter --continual --seed "$seed" "${COMMON[@]}" \
    --output-dir "$OUT/sequential-lora/s$seed"
  # The separate LoRAs compressed into one shared A of rank k (each task keeps a B per layer and its head).
  for k in ${RANKS:-8 32}; do
    c="$OUT/compressed-k$k/s$seed"
    [ -f "$c/eval.json" ] && continue
    sharelora compress "$c" $(for t in "${TASKS[@]}"; do echo "$t=$OUT/separate-lora/$t-s$seed"; done) \
      --rank "$k" --overwrite
    sharelora eval "$c" --split dev --json "$c/eval-dev.json"
    sharelora eval "$c" --json "$c/eval.json.tmp" && mv "$c/eval.json.tmp" "$c/eval.json"
  done
done
