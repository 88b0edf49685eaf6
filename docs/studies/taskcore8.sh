#!/usr/bin/env bash
# The many-task study of issue 25 on eight real tasks, three seeds (docs/RESULTS_MULTITASK.md, "The N-th task
# nearly free on eight tasks"). MiniLM, r = 8, query/value; a very small CPU budget per task.
#
#   bash docs/studies/taskcore8.sh OUT probe    # seed-0 separate LoRA on every candidate task (dev decides)
#   python docs/studies/taskcore8_select.py OUT # -> OUT/tasks.txt: the tasks of the study, chosen on dev only
#   bash docs/studies/taskcore8.sh OUT study    # every row of the table, in order of priority (below)
#   bash docs/studies/taskcore8.sh OUT more     # the follow-up (second session): core lr above 6e-2, a head-only
#                                               # check, two other core shapes at <= 2% (dev, seed 0) and growth
#
# A phase is a list of jobs; start the same phase twice (two workers, one core each) and they share the
# list: a job is claimed with mkdir (atomic), done jobs are skipped, a job waits for the jobs it needs.
# `touch OUT/.jobs/pause-PHASE` makes that phase's workers take no new job (they wait); remove it to go on.
# Rerunning resumes (`--resume`). Jobs are listed in order of priority, so a cut-short run has the reference rows.
set -uo pipefail
OUT=${1:?usage: taskcore8.sh OUT probe|study}
PHASE=${2:?usage: taskcore8.sh OUT probe|study|more}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
SL=(python -m sharelora.cli)
# The candidates, in the study's order, fixed before any run (docs/RESULTS_MULTITASK.md says why): the
# basis task first, then the first three (the joint basis of --basis-tasks 3) with 2, 3 and 8 labels.
CANDIDATES=(rotten-tomatoes commonsense-relations wordnet-noun-supersenses hedge-sentences debate-speakers
            wordnet-verb-supersenses rt-snippets rt-subjectivity convention-party adjective-order movie-reviews)
# Per task: 320 training rows, 2 epochs, batch 16 (40 steps), max length 64, dev / test 200 rows.
BUDGET=(--model minilm --epochs 2 --batch-size 16 --max-train-examples 320 --max-length 64
        --max-eval-examples 200 --threads 1 --no-progress --resume)
LORA_LR=6e-3      # the budget study's dev choice for LoRA and ShareA (docs/RESULTS_BUDGET.md)
# The task-core rows: LoRA's lr. Their basis tasks start as a task-shared ShareLoRA adapter (B = 0, core I) and
# train like one; on dev (seed 0) 6e-3 beat 2e-2 for the basis task (72.0 vs 53.0) and the core-only stage
# (61.5 vs 60.5) (docs/RESULTS_MULTITASK.md, "Diagnosed and fixed since"). One lr for every stage.
CORE_LR=${CORE_LR:-6e-3}
CORE_LRS=(2e-2 6e-2)  # the grid for the core-only stages (seed 0, dev), beside CORE_LR
VERA_RANK=256     # VeRA's shared random A (256 x 384) and B: 640 trained scales per module
VERA_LRS=(6e-2 2e-1)  # the VeRA LR grid, seed 0, chosen on the mean dev accuracy of the eight tasks (6e-2: the
                      # budget study's dev choice for VeRA r = 256 at 80 steps; 2e-1 for the shorter 40 steps here)
GROW=2            # --grow-basis: the basis branch's dev check used 2 (docs/RESULTS_MULTITASK.md, "Growing the basis")
SEEDS=(0 1 2)
JOBS=()  # "name|needs (space-separated names)|command"

job() { local name=$1 needs=$2; shift 2; JOBS+=("$name|$needs|$(printf '%q ' "$@")"); }

tasks() { grep -v '^#' "$OUT/tasks.txt"; }

if [[ $PHASE == probe ]]; then
  for t in "${CANDIDATES[@]}"; do
    job "lora-$t-s0" "" "${SL[@]}" train --dataset "$t" --method lora --rank 8 --lr $LORA_LR --seed 0 "${BUDGET[@]}" \
      --output-dir "$OUT/separate-lora/$t-s0"
  done
else
  [ -f "$OUT/tasks.txt" ] || { echo "no $OUT/tasks.txt: run the probe phase and taskcore8_select.py first" >&2; exit 2; }
  mapfile -t TASKS < <(tasks)
  joined=$(IFS=,; echo "${TASKS[*]}")
fi

# The jobs of the study, in order of priority (a worker takes the first job it can start), so that a run cut
# short by the deadline loses the least important rows: the separate LoRAs (the reference) and their
# compression for every seed; seed 0 of every task-core row; the core-only lr grid (seed 0, dev) and seeds 1-2
# of the matrix cores on task 1's basis at its choice; the same on the joint basis (seed 0); the VeRA grid
# (seed 0); separate ShareA seed 0; seeds 1-2 of the matrix cores on the joint basis; basis growth (seed 0);
# continual ShareA seeds 1-2; then seeds 1-2 of the diagonal task cores, VeRA, growth and separate ShareA.
lora_jobs() {
  local seed=$1 loras="" t core c
  for t in "${TASKS[@]}"; do
    job "lora-$t-s$seed" "" "${SL[@]}" train --dataset "$t" --method lora --rank 8 --lr $LORA_LR --seed "$seed" \
      "${BUDGET[@]}" --output-dir "$OUT/separate-lora/$t-s$seed"
    loras+=" lora-$t-s$seed"
  done
  for core in matrix diagonal; do  # the separate LoRAs fitted into one shared A, B and a core per task
    c="$OUT/compressed-$core/s$seed"
    job "compress-$core-s$seed" "$loras" bash -c "${SL[*]} compress $c $(for t in "${TASKS[@]}"; do
        printf '%s ' "$t=$OUT/separate-lora/$t-s$seed"; done) --rank 8 --share A --task-core $core --overwrite \
      && ${SL[*]} eval $c --json $c/eval.json.tmp && mv $c/eval.json.tmp $c/eval.json"
  done
  [[ $seed == 0 || ${2:-} == all ]] || return 0  # continual ShareA: seed 0 here, seeds 1-2 later
  job "continual-sharea-s$seed" "" "${SL[@]}" multitask --tasks "$joined" --method sharea --task-share A \
    --continual --rank 8 --lr $LORA_LR --seed "$seed" "${BUDGET[@]}" --output-dir "$OUT/continual-sharea/s$seed"
}
core_job() {  # core_job matrix|diagonal K SEED: continual task cores, the basis from the first K tasks
  job "core-$1-basis$2-s$3" "" "${SL[@]}" multitask --tasks "$joined" --method sharea --task-share AB \
    --task-core "$1" --continual --basis-tasks "$2" --rank 8 --lr "$CORE_LR" --seed "$3" "${BUDGET[@]}" \
    --output-dir "$OUT/core-$1-basis$2/s$3"
}
corelr_job() {  # corelr_job SEED LR|"" OUT_DIR [K]: the cores of the tasks after the basis of core-matrix-basisK/sSEED
  local k=${4:-1} lr=${2:-'$(cat '$OUT'/core-lr.txt)'} name later
  name=corelr$([[ $k == 1 ]] || echo "-basis$k")-lr$2-s$1
  local needs="core-matrix-basis$k-s$1"
  [[ -n $2 ]] || { name=${name/-lr-/-}; needs+=" corelr-choose"; }
  later=$(IFS=,; echo "${TASKS[*]:$k}")
  job "$name" "$needs" bash -c "${SL[*]} multitask --tasks $later --method sharea --task-share AB --task-core matrix \
    --continual --basis-from $OUT/core-matrix-basis$k/s$1 --rank 8 --lr $lr --seed $1 ${BUDGET[*]} --output-dir $3"
}
grow_job() {  # grow_job SEED: matrix cores on the basis of task 1, every later task adds GROW directions to it
  job "core-matrix-grow-s$1" "" "${SL[@]}" multitask --tasks "$joined" --method sharea --task-share AB \
    --task-core matrix --continual --basis-tasks 1 --grow-basis $GROW --rank 8 --lr "$CORE_LR" --seed "$1" \
    "${BUDGET[@]}" --output-dir "$OUT/core-matrix-grow/s$1"
}
vera_jobs() {  # vera_jobs SEED (seeds 1, 2 at the LR the grid chose)
  local t
  for t in "${TASKS[@]}"; do
    job "vera-$t-s$1" "vera-choose" bash -c "${SL[*]} train --dataset $t --method peft-vera --rank $VERA_RANK \
      --lr \$(cat $OUT/vera-lr.txt) --seed $1 ${BUDGET[*]} --output-dir $OUT/vera/$t-s$1"
  done
}
sharea_jobs() {  # separate ShareA per task, SEED
  local t
  for t in "${TASKS[@]}"; do
    job "sharea-$t-s$1" "" "${SL[@]}" train --dataset "$t" --method sharea --rank 8 --lr $LORA_LR --seed "$1" \
      "${BUDGET[@]}" --output-dir "$OUT/separate-sharea/$t-s$1"
  done
}
if [[ $PHASE == study ]]; then
  for seed in "${SEEDS[@]}"; do lora_jobs "$seed"; done
  for k in 1 3; do for core in matrix diagonal; do core_job $core $k 0; done; done
  # The core-only stages at a higher lr (one --lr serves every stage of a run, and the basis task needs LoRA's):
  # tasks 2-8 again on the frozen basis of the matrix row's run (--basis-from), lr chosen on dev (seed 0).
  lrjobs=""
  for lr in "${CORE_LRS[@]}"; do
    corelr_job 0 "$lr" "$OUT/core-matrix-basis1-corelr/lr$lr/s0"
    lrjobs+=" corelr-lr$lr-s0"
  done
  job "corelr-choose" "$lrjobs" python docs/studies/taskcore8_select.py "$OUT" --core-lr "$CORE_LR" "${CORE_LRS[@]}"
  for seed in 1 2; do core_job matrix 1 $seed; done
  for seed in 1 2; do corelr_job $seed "" "$OUT/core-matrix-basis1-corelr/s$seed"; done
  corelr_job 0 "" "$OUT/core-matrix-basis3-corelr/s0" 3  # the same lr on the joint basis of tasks 1-3
  grid=""  # the VeRA LR grid: seed 0, every task; the choice reads dev only; its seed-0 runs are the row's seed 0
  for lr in "${VERA_LRS[@]}"; do
    for t in "${TASKS[@]}"; do
      job "vera-lr$lr-$t-s0" "" "${SL[@]}" train --dataset "$t" --method peft-vera --rank $VERA_RANK --lr "$lr" \
        --seed 0 "${BUDGET[@]}" --output-dir "$OUT/vera-grid/lr$lr/$t-s0"
      grid+=" vera-lr$lr-$t-s0"
    done
  done
  job "vera-choose" "$grid" python docs/studies/taskcore8_select.py "$OUT" --vera-lr "${VERA_LRS[@]}"
  sharea_jobs 0
  for t in "${TASKS[@]}"; do  # is LoRA's lr (the budget study's, chosen on rotten-tomatoes) right here? seed 0, dev
    job "lora-lr2e-2-$t-s0" "" "${SL[@]}" train --dataset "$t" --method lora --rank 8 --lr 2e-2 --seed 0 "${BUDGET[@]}" \
      --output-dir "$OUT/separate-lora-lr2e-2/$t-s0"
  done
  for seed in 1 2; do core_job matrix 3 $seed; corelr_job $seed "" "$OUT/core-matrix-basis3-corelr/s$seed" 3; done
  grow_job 0
  for seed in 1 2; do lora_jobs "$seed" all; done  # continual ShareA seeds 1-2 (the rest of lora_jobs is done)
  for seed in 1 2; do for k in 1 3; do core_job diagonal $k $seed; done; done
  for seed in 1 2; do vera_jobs $seed; done
  for seed in 1 2; do grow_job $seed; done
  for seed in 1 2; do sharea_jobs $seed; done
fi

# The follow-up, after the study above (its rows are done): every choice on dev, seed 0, over tasks 2-8.
#  1. The core-lr grid went on above its top value (6e-2): 2e-1, 6e-1 (same corelr_job as the grid).
#  2. With --core-lr / --head-lr (one run): cores at 2e-1 with heads at 6e-2; and the head-only check
#     (--core-lr 0: every later task's cores stay 0, its head alone trains at 6e-2) on the same basis.
#  3. Two other shapes of the per-task cost at <= 2% of a LoRA, one command each (basis stage at LoRA's lr,
#     core-only stages at 6e-2): rank 11 on query/value (12 x 11^2 = 1,452 per task, 1.97%), and rank 6 on all
#     six linear maps of each layer (36 x 6^2 = 1,296, 1.76%; the LoRA reference stays query/value).
#  4. The basis of task 1 orthonormalized (--orthonormalize-basis: the same function, equal-length orthogonal
#     directions), core-only stages at 2e-2, 6e-2 and 2e-1.
#  4b. Diagonal cores on a wide basis: rank 122 (12 x 122 = 1,464 per task, 1.99%), core-only stages at 6e-2
#     and 2e-1 (VeRA's grid here; a VeRA-like per-direction scale on a basis trained by task 1).
#  5. "more-choose" picks the best of 1-4b and the study's 6e-2 row on mean dev (OUT/more-choice.json); seeds 1-2
#     of the choice (a job per candidate, which does nothing unless its candidate was chosen); seeds 0-2 of the
#     head-only check and of growth with cores and heads at 6e-2 (its grown directions at --lr: the first seed-0
#     run, with them at 6e-2 too, diverged; it is kept as core-matrix-grow-all-corelr/s0); LoRA at lr 1e-2 (seed 0, dev), between the reference's 6e-3
#     and 2e-2 (which diverged): is the reference under-trained?
if [[ $PHASE == more ]]; then
  MORE_LR=6e-2  # the study's dev choice for the core-only stages (OUT/core-lr.txt)
  for lr in 2e-1 6e-1; do corelr_job 0 "$lr" "$OUT/core-matrix-basis1-corelr/lr$lr/s0"; done
  later=$(IFS=,; echo "${TASKS[*]:1}")
  ALL_LINEAR='.*\.layer\.[0-9]+\..*(query|key|value|dense)'
  cand() {  # cand NAME SEED: the command of candidate NAME for SEED (tasks 2-8 on a given basis, or all eight)
    local given=(multitask --tasks "$later" --method sharea --task-share AB --task-core matrix --continual
                 --basis-from "$OUT/core-matrix-basis1/s$2" --rank 8 --lr 6e-3 --seed "$2" "${BUDGET[@]}")
    local shape=(multitask --tasks "$joined" --method sharea --task-share AB --task-core matrix --continual
                 --lr $LORA_LR --core-lr $MORE_LR --seed "$2" "${BUDGET[@]}")
    case $1 in
      core2e-1-head6e-2) CMD=("${SL[@]}" "${given[@]}" --core-lr 2e-1 --head-lr 6e-2);;
      head-only) CMD=("${SL[@]}" "${given[@]}" --core-lr 0 --head-lr $MORE_LR);;
      ortho-lr*) CMD=("${SL[@]}" "${given[@]}" --orthonormalize-basis --core-lr "${1#ortho-lr}");;
      core-matrix-r11) CMD=("${SL[@]}" "${shape[@]}" --rank 11);;
      core-matrix-r6-all) CMD=("${SL[@]}" "${shape[@]}" --rank 6 --targets "$ALL_LINEAR");;
      core-diagonal-r122-lr*) CMD=("${SL[@]}" multitask --tasks "$joined" --method sharea --task-share AB
        --task-core diagonal --continual --rank 122 --lr $LORA_LR --core-lr "${1#core-diagonal-r122-lr}" --seed "$2"
        "${BUDGET[@]}");;
      core-matrix-r11-lora) CMD=("${SL[@]}" multitask --tasks "$joined" --method lora --task-share AB --task-core matrix
        --continual --lr $LORA_LR --core-lr $MORE_LR --rank 11 --seed "$2" "${BUDGET[@]}");;
      core-matrix-grow-corelr) CMD=("${SL[@]}" "${shape[@]}" --rank 8 --grow-basis $GROW);;
    esac
    CMD+=(--output-dir "$OUT/${1/#core2e-1/core-matrix-basis1-core2e-1}/s$2")
  }
  CANDS=(core2e-1-head6e-2 core-matrix-r11 core-matrix-r6-all ortho-lr2e-2 ortho-lr6e-2 ortho-lr2e-1
         core-diagonal-r122-lr6e-2 core-diagonal-r122-lr2e-1)
  for c in head-only "${CANDS[@]}"; do cand "$c" 0; job "$c-s0" "" "${CMD[@]}"; done
  needs="corelr-lr2e-1-s0 corelr-lr6e-1-s0"
  for c in "${CANDS[@]}"; do needs+=" $c-s0"; done
  job more-choose "$needs" python docs/studies/taskcore8_select.py "$OUT" --more
  for seed in 1 2; do
    for c in "${CANDS[@]}"; do  # only the chosen candidate runs (the others' jobs end at once)
      cand "$c" $seed
      job "more-$c-s$seed" "more-choose" bash -c "[ \"\$(cat $OUT/more-choice.txt)\" = $c ] || exit 0; $(printf '%q ' "${CMD[@]}")"
    done
  done
  for seed in 1 2; do cand head-only $seed; job "head-only-s$seed" "" "${CMD[@]}"; done
  for seed in 0 1 2; do cand core-matrix-grow-corelr $seed; job "core-matrix-grow-corelr-s$seed" "" "${CMD[@]}"; done
  # 6. After the choice (rank 11): the same with a per-layer A (--method lora: every layer its own A and B, shared
  #    by the tasks; the cores and their count unchanged). Seeds 1-2 ran beside seed 0, but only count if seed 0's
  #    mean dev over tasks 2-8 beats the rank-11 row's (66.7).
  for seed in 0 1 2; do cand core-matrix-r11-lora $seed; job "core-matrix-r11-lora-s$seed" "more-choose" "${CMD[@]}"; done
  # 7. After the rank-11 choice: does a better-trained basis help its later tasks? Task 1 trains the rank-11 basis
  #    alone (a one-time cost, outside the per-task budget of tasks 2-8) for 4 epochs of its 320 rows, or for 2
  #    epochs of 1,280 rows; tasks 2-8 then train their cores on it (--basis-from) exactly as in the rank-11 row.
  #    Seed 0, dev decides against the rank-11 row (66.7).
  for b in "epochs4|--epochs 4 --max-train-examples 320" "rows1280|--epochs 2 --max-train-examples 1280"; do
    IFS='|' read -r tag opts <<<"$b"
    job "basis-r11-$tag-s0" "more-choose" bash -c "${SL[*]} multitask --tasks ${TASKS[0]} --method sharea --task-share AB \
      --task-core matrix --continual --rank 11 --lr $LORA_LR --seed 0 ${BUDGET[*]} $opts --output-dir $OUT/basis-r11-$tag/basis/s0"
    job "core-matrix-r11-$tag-s0" "basis-r11-$tag-s0" "${SL[@]}" multitask --tasks "$later" --method sharea --task-share AB \
      --task-core matrix --continual --basis-from "$OUT/basis-r11-$tag/basis/s0" --rank 11 --lr $LORA_LR --core-lr $MORE_LR \
      --seed 0 "${BUDGET[@]}" --output-dir "$OUT/basis-r11-$tag/s0"
  done
  for t in "${TASKS[@]}"; do
    job "lora-lr1e-2-$t-s0" "" "${SL[@]}" train --dataset "$t" --method lora --rank 8 --lr 1e-2 --seed 0 "${BUDGET[@]}" \
      --output-dir "$OUT/separate-lora-lr1e-2/$t-s0"
  done
fi

if [[ -n ${DRY:-} ]]; then printf '%s\n' "${JOBS[@]}"; exit 0; fi  # DRY=1: list the jobs, run nothing

# The worker: passes over the list until every job is done or none can start (failed or waiting on a failure).
STATE="$OUT/.jobs"
mkdir -p "$STATE"
while :; do
  if [ -f "$STATE/pause-$PHASE" ]; then sleep 20; continue; fi
  ran=0 pending=0
  for j in "${JOBS[@]}"; do
    IFS='|' read -r name needs cmd <<<"$j"
    [ -f "$STATE/$name.done" ] && continue
    [ -f "$STATE/$name.failed" ] && continue
    pending=1
    ready=1
    for n in $needs; do [ -f "$STATE/$n.done" ] || ready=0; done
    [ $ready = 1 ] || continue
    [ -f "$STATE/pause-$PHASE" ] && break  # touch OUT/.jobs/pause-PHASE: the worker takes no new job
    mkdir "$STATE/$name.lock" 2>/dev/null || continue
    echo "$(date -u +%H:%M:%S) start $name" >>"$STATE/log"
    if eval "nice -n 2 $cmd" >"$STATE/$name.out" 2>&1; then
      touch "$STATE/$name.done"; echo "$(date -u +%H:%M:%S) done $name" >>"$STATE/log"
    else
      touch "$STATE/$name.failed"; echo "$(date -u +%H:%M:%S) FAILED $name" >>"$STATE/log"
    fi
    rmdir "$STATE/$name.lock"
    ran=1
  done
  [ $pending = 0 ] && break
  if [ $ran = 0 ]; then
    # nothing could start: jobs held by the other worker or waiting for them; stop when nothing is in flight
    ls "$STATE"/*.lock >/dev/null 2>&1 || break
    sleep 20
  fi
done
echo "$(date -u +%H:%M:%S) worker of $PHASE finished" >>"$STATE/log"
