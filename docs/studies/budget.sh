#!/usr/bin/env bash
# The parameter-budget study (docs/RESULTS_BUDGET.md): an LR probe on dev, then the sweep, per task.
# Usage: bash docs/studies/budget.sh [OUT_ROOT]   (default runs/budget). Rerunning resumes.
# One torch thread per run (one core); run it beside another job, or with JOBS=2 (compare --jobs 2) on an idle machine.
# TASKS (default: the issue's rotten-tomatoes vitaminc; the study also ran TASKS=multiemo) and SWEEP_TASKS (default:
# TASKS) pick what is probed and swept.
set -euo pipefail
OUT=${1:-runs/budget}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
COMMON=(--model minilm --batch-size 16 --max-steps 80 --max-length 64 --max-eval-examples 400 --jobs "${JOBS:-1}")
# One setting per method for the probe; the same LR grid for every method.
PROBE_SETTINGS=("lora@r=4" "sharea@r=8" "shareb@r=8" "shareab@r=32" "peft-vera@r=256" "peft-vblora@r=4,vector_length=128")
# The LR grid, the same for every task and method.
PROBE_LRS="0.002 0.006 0.02"
# The sweep: each method over ~5k-300k trainable adapter parameters (MiniLM, query/value).
declare -A SWEEP=(
  [lora]="r=1 r=4 r=32"
  [sharea]="r=2 r=8 r=56"
  [shareb]="r=2 r=8 r=56"
  [shareab]="r=4 r=32 r=192"
  [peft-vera]="r=256 r=1024"
  [peft-vblora]="r=4,num_vectors=64,vector_length=128 r=4,vector_length=128"
)
TASKS=${TASKS:-rotten-tomatoes vitaminc}
for task in $TASKS; do  # per task: the probe, then the sweep
  dir="$OUT/$task"
  probe=()
  for s in "${PROBE_SETTINGS[@]}"; do for lr in $PROBE_LRS; do probe+=("$s,lr=$lr"); done; done
  if [ ! -f "$dir/probe.json" ]; then
    sharelora compare --dataset "$task" "${COMMON[@]}" --seeds 0, --output-dir "$dir" \
      --methods "$(IFS=,; echo "${probe[*]}")"
    cp "$dir/compare.json" "$dir/probe.json"; cp "$dir/compare.md" "$dir/probe.md"
  fi
  # Extend the grid upward (its next LR, at most twice) for every method whose best dev LR is its largest probed
  # (added after the first sweep: VeRA and VB-LoRA peaked at 2e-2, the top of the common grid).
  for ext in 1 2; do
    more=$(python docs/studies/budget_report.py at-top "$dir"/probe*.json | paste -sd, -)
    [ -z "$more" ] && break
    [ -f "$dir/probe-ext$ext.json" ] || {
      sharelora compare --dataset "$task" "${COMMON[@]}" --seeds 0, --output-dir "$dir" --methods "$more"
      cp "$dir/compare.json" "$dir/probe-ext$ext.json"; }
  done
  # The LR per method: the best dev accuracy over the probe runs (test is not read).
  python docs/studies/budget_report.py choose "$dir"/probe*.json > "$dir/lr.json"
  # The sweep runs even where no probe run learned (dev MCC <= 0.1): the table then measures that the budget buys
  # nothing on the task, for every method (2026-12-03: until then such a task was skipped).
  python docs/studies/budget_report.py learns "$dir"/probe*.json ||
    echo "== $task: no probe run left the majority class (dev MCC <= 0.1); sweeping anyway" >&2
  case " ${SWEEP_TASKS:-$TASKS} " in
    *" $task "*) ;;
    *) echo "== $task: sweep not requested (SWEEP_TASKS)" >&2; continue ;;
  esac
  methods=()
  for m in lora sharea shareb shareab peft-vera peft-vblora; do
    lr=$(python -c "import json; print(json.load(open('$dir/lr.json'))['$m'])")
    for s in ${SWEEP[$m]}; do methods+=("$m@$s,lr=$lr"); done
  done
  sharelora compare --dataset "$task" "${COMMON[@]}" --seeds 0,1,2 --output-dir "$dir" \
    --methods "$(IFS=,; echo "${methods[*]}")"
done
