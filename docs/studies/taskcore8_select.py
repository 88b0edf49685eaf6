"""Choices of the eight-task study (docs/studies/taskcore8.sh) made on the dev split only, never on test.

    python docs/studies/taskcore8_select.py OUT                    # -> OUT/tasks.txt, OUT/selection.json
    python docs/studies/taskcore8_select.py OUT --vera-lr 6e-2 ... # -> OUT/vera-lr.txt, OUT/vera-lr.json
    python docs/studies/taskcore8_select.py OUT --core-lr 6e-3 2e-2 ... # -> OUT/core-lr.txt, OUT/core-lr.json
    python docs/studies/taskcore8_select.py OUT --more             # -> OUT/more-choice.txt, OUT/more-choice.json

Tasks: the candidates of taskcore8.sh in its fixed order; a candidate is "learned" when its seed-0
separate LoRA reaches a dev accuracy at least ``MARGIN`` (5 points) above the majority-class share of
the dev rows it is scored on (the first 200); the study takes the first ``N_TASKS`` (8) learned ones.
VeRA: the LR of the grid with the highest mean dev accuracy over the study's tasks (seed 0). Task cores: the
lr of the core-only stages with the highest mean dev accuracy over the tasks after the basis (seed 0).
The follow-up (``--more``): the same rule over the study's chosen row and the follow-up's candidates.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

CANDIDATES = ["rotten-tomatoes", "commonsense-relations", "wordnet-noun-supersenses", "hedge-sentences",
              "debate-speakers", "wordnet-verb-supersenses", "rt-snippets", "rt-subjectivity", "convention-party",
              "adjective-order", "movie-reviews"]
MARGIN = 0.05
N_TASKS = 8
EVAL_ROWS = 200  # --max-eval-examples of taskcore8.sh: the first 200 dev rows are scored


def dev_majority(task: str) -> float:
    from sharelora.sources import load_dataset

    dev = load_dataset(task).splits["dev"][:EVAL_ROWS]
    return max(Counter(r["label"] for r in dev).values()) / len(dev)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def select_tasks(out: Path) -> None:
    rows, chosen = [], []
    for t in CANDIDATES:
        res = json.loads((out / "separate-lora" / f"{t}-s0" / "results.json").read_text())
        acc, maj = res["dev"]["accuracy"], dev_majority(t)
        learned = acc >= maj + MARGIN
        if learned and len(chosen) < N_TASKS:
            chosen.append(t)
        rows.append({"task": t, "dev_accuracy": acc, "dev_majority": maj, "learned": learned,
                     "chosen": t in chosen})
        print(f"{t:26s} dev {100 * acc:5.1f}  majority {100 * maj:5.1f}  {'learned' if learned else 'not learned'}"
              f"{'  -> chosen' if t in chosen else ''}")
    atomic_write(out / "selection.json", json.dumps({"rule": f"seed-0 separate LoRA dev accuracy >= dev majority + "
                                                             f"{MARGIN:.2f}; first {N_TASKS} in the fixed order",
                                                     "candidates": rows}, indent=1) + "\n")
    atomic_write(out / "tasks.txt", "\n".join(chosen) + "\n")


def select_vera_lr(out: Path, lrs: list[str]) -> None:
    tasks = (out / "tasks.txt").read_text().split()
    means = {}
    for lr in lrs:
        accs = [json.loads((out / "vera-grid" / f"lr{lr}" / f"{t}-s0" / "results.json").read_text())["dev"]["accuracy"]
                for t in tasks]
        means[lr] = sum(accs) / len(accs)
        print(f"VeRA lr {lr}: mean dev {100 * means[lr]:.1f}")
    best = max(lrs, key=lambda lr: means[lr])
    atomic_write(out / "vera-lr.json", json.dumps({"mean_dev": means, "chosen": best}, indent=1) + "\n")
    atomic_write(out / "vera-lr.txt", best + "\n")


def select_core_lr(out: Path, base_lr: str, lrs: list[str]) -> None:
    """The lr of the core-only stages: the highest mean dev accuracy over tasks 2-8 (seed 0). ``base_lr``: the
    matrix row's own run (every stage at that lr); the others: tasks 2-8 on its frozen basis (``--basis-from``)."""
    tasks = (out / "tasks.txt").read_text().split()[1:]
    runs = {base_lr: out / "core-matrix-basis1" / "s0"} | {lr: out / "core-matrix-basis1-corelr" / f"lr{lr}" / "s0"
                                                             for lr in lrs}
    means = {}
    for lr, d in runs.items():
        res = json.loads((d / "results.json").read_text())
        means[lr] = sum(res["tasks"][t]["dev"]["accuracy"] for t in tasks) / len(tasks)
        print(f"core-only stages at lr {lr}: mean dev over tasks 2-{len(tasks) + 1} {100 * means[lr]:.1f}")
    best = max(means, key=lambda lr: means[lr])
    atomic_write(out / "core-lr.json", json.dumps({"mean_dev_tasks_after_the_basis": means, "chosen": best}, indent=1) + "\n")
    atomic_write(out / "core-lr.txt", best + "\n")


# The follow-up's candidates (taskcore8.sh, phase "more"), seed 0: name -> run directory whose results.json scores
# tasks 2-8 on dev. The head-only check is not a candidate (it measures the head alone).
MORE = {"core-matrix-basis1-corelr": "core-matrix-basis1-corelr/lr6e-2/s0",
        "corelr-lr2e-1": "core-matrix-basis1-corelr/lr2e-1/s0", "corelr-lr6e-1": "core-matrix-basis1-corelr/lr6e-1/s0",
        "core2e-1-head6e-2": "core-matrix-basis1-core2e-1-head6e-2/s0", "core-matrix-r11": "core-matrix-r11/s0",
        "core-matrix-r6-all": "core-matrix-r6-all/s0", "ortho-lr2e-2": "ortho-lr2e-2/s0",
        "ortho-lr6e-2": "ortho-lr6e-2/s0", "ortho-lr2e-1": "ortho-lr2e-1/s0",
        "core-diagonal-r122-lr6e-2": "core-diagonal-r122-lr6e-2/s0", "core-diagonal-r122-lr2e-1": "core-diagonal-r122-lr2e-1/s0"}


def select_more(out: Path) -> None:
    tasks = (out / "tasks.txt").read_text().split()[1:]
    means = {}
    for name, d in MORE.items():
        res = json.loads((out / d / "results.json").read_text())
        means[name] = sum(res["tasks"][t]["dev"]["accuracy"] for t in tasks) / len(tasks)
        print(f"{name:28s} mean dev over tasks 2-{len(tasks) + 1} {100 * means[name]:.1f}")
    best = max(means, key=lambda n: means[n])
    atomic_write(out / "more-choice.json", json.dumps({"mean_dev_tasks_after_the_basis": means, "runs": MORE,
                                                       "chosen": best}, indent=1) + "\n")
    atomic_write(out / "more-choice.txt", best + "\n")


if __name__ == "__main__":
    root = Path(sys.argv[1])
    if len(sys.argv) > 2 and sys.argv[2] == "--vera-lr":
        select_vera_lr(root, sys.argv[3:])
    elif len(sys.argv) > 2 and sys.argv[2] == "--more":
        select_more(root)
    elif len(sys.argv) > 3 and sys.argv[2] == "--core-lr":
        select_core_lr(root, sys.argv[3], sys.argv[4:])
    else:
        select_tasks(root)
