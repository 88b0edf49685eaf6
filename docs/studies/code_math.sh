#!/usr/bin/env bash
# HumanEval and GSM8K for SmolLM2-135M-Instruct and three instruction-tuned adapters (docs/RESULTS_CODE_MATH.md).
# Usage: bash docs/studies/code_math.sh [OUT_ROOT]   (default runs/code-math). Each step is skipped once its output
# exists. One torch thread per process; the study ran as two such queues side by side on the 2 cores.
set -euo pipefail
OUT=${1:-runs/code-math}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$OUT"
# The instruction-tuned adapters: section 2 of docs/RESULTS_GENERATION.md, seed 0 (30 steps of batch 8, lr 1e-3).
for m in lora sharea shareab; do
  [ -f "$OUT/$m-s0/results.json" ] || sharelora train --task instructions --method "$m" --max-steps 30 --lr 1e-3 \
    --seed 0 --threads 1 --output-dir "$OUT/$m-s0"
done
score() {  # score NAME MODEL_ARGS... -- EVAL_ARGS...
  local name=$1; shift
  [ -f "$OUT/$name.json" ] || sharelora eval "$@" --json "$OUT/$name.json"
}
# GSM8K: the first 200 test problems for the base, the first 100 for each adapter (compute; the base's first 100
# are the same problems), and the first 100 with the exemplars as chat turns. HumanEval: all 164, chat format for
# all four, completion format for the base.
for who in base lora sharea shareab; do
  if [ "$who" = base ]; then src=(--model smollm2); n=200; else src=("$OUT/$who-s0"); n=100; fi
  score "gsm8k-4shot-$who" --task gsm8k "${src[@]}" --few-shot 4 --max-examples "$n" --max-new-tokens 192
  score "humaneval-chat-$who" --task humaneval "${src[@]}" --prompt-format chat
  score "gsm8k-chat4shot-$who" --task gsm8k "${src[@]}" --few-shot 4 --prompt-format chat --max-examples 100 \
    --max-new-tokens 192
done
score humaneval-completion-base --task humaneval --model smollm2
python docs/studies/code_math_report.py "$OUT" docs/results/code-math
