"""The many-task study's table (docs/RESULTS_MULTITASK.md, issue 25) from the runs of taskcore.sh.

    python docs/studies/taskcore_report.py runs/taskcore docs/results/taskcore   # -> .json and .md

Parameters exclude the task heads (one per task in every row). "added" is what one more task costs once
the basis exists: a separate LoRA's adapter, the last task's own tensors in a multi-task run.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TASKS = ["rotten-tomatoes", "commonsense-relations", "hedge-sentences", "adjective-order", "rt-snippets",
         "movie-reviews"]
ROWS = [  # (directory, what the table calls it, number of basis tasks)
    ("separate-lora", "separate LoRA per task (lr 6e-3)", 0),
    ("continual-sharea", "continual ShareA, task-shared A frozen after task 1 (lr 6e-3)", 1),
    ("core-matrix-basis1", "continual task cores, matrix, A and B from task 1 (lr 6e-3)", 1),
    ("core-matrix-basis1-lr2e-2", "continual task cores, matrix, A and B from task 1 (lr 2e-2)", 1),
    ("core-diagonal-basis1-lr2e-2", "continual task cores, diagonal, A and B from task 1 (lr 2e-2)", 1),
    ("core-matrix-basis3-lr2e-2", "continual task cores, matrix, A and B from tasks 1-3 jointly (lr 2e-2)", 3),
    ("core-diagonal-basis3-lr2e-2", "continual task cores, diagonal, A and B from tasks 1-3 jointly (lr 2e-2)", 3),
    ("compressed-matrix", "the separate LoRAs compressed into matrix cores (rank 8, no training)", 0),
    ("compressed-diagonal", "the separate LoRAs compressed into diagonal cores (rank 8, no training)", 0),
]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def row(root: Path, key: str, seed: int = 0) -> dict | None:
    if key == "separate-lora":
        paths = {t: root / key / f"{t}-s{seed}" / "results.json" for t in TASKS}
        if not all(p.is_file() for p in paths.values()):
            return None
        res = {t: load(p) for t, p in paths.items()}
        added = res[TASKS[-1]]["parameters"]["adapter"]
        return {"tasks": {t: r["test"][r["metric"]] for t, r in res.items()}, "added": added,
                "dev_mean": sum(r["dev"][r["metric"]] for r in res.values()) / len(res),
                "total": sum(r["parameters"]["adapter"] for r in res.values()), "forgetting": None,
                "majority": {t: majority(r) for t, r in res.items()}}
    if key.startswith("compressed-"):
        path = root / key / f"s{seed}" / "eval.json"
        if not path.is_file():
            return None
        ev = load(path)
        tasks = ev.get("tasks", ev)
        from safetensors import safe_open

        with safe_open(str(root / key / f"s{seed}" / "adapter" / "adapter_model.safetensors"), "pt") as f:
            sizes = {k: f.get_slice(k).get_shape() for k in f.keys() if "modules_to_save" not in k}
        numel = {k: math.prod(shape) for k, shape in sizes.items()}
        added = sum(n for k, n in numel.items() if k.startswith(f"{TASKS[-1]}/"))
        return {"tasks": {t: tasks[t]["accuracy"] for t in TASKS}, "added": added, "total": sum(numel.values()),
                "forgetting": None}
    path = root / key / f"s{seed}" / "results.json"
    if not path.is_file():
        return None
    r = load(path)
    p = r["parameters"]
    f = r["forgetting"]
    earlier = [v for n, v in f["per_task"].items() if n != TASKS[-1]]
    return {"tasks": {t: r["tasks"][t]["test"][r["metric"]] for t in TASKS}, "added": p["added_per_task"],
            "dev_mean": r["mean"]["dev"],
            "total": p["adapter"], "forgetting": {"mean": f["mean_over_earlier_tasks"],
                                                   "max_abs": max(abs(v) for v in earlier)}}


def majority(r: dict) -> float:
    counts = r["data_info"]["label_counts"]["test"]
    return max(counts.values()) / sum(counts.values())


def main(root: str, out: str) -> None:
    base = Path(root)
    rows = {key: row(base, key) for key, _, _ in ROWS}
    lora = rows["separate-lora"]
    lora_added = lora["added"] if lora else 73_728
    lines = ["| method | added per extra task (% of a LoRA) | adapter total, 6 tasks | "
             + " | ".join(TASKS) + " | mean (6) | mean after the basis (vs separate LoRA, same tasks) | forgetting (mean / max abs) | mean dev |",
             "|---" * (len(TASKS) + 7) + "|"]
    if lora and lora.get("majority"):
        lines.append("| majority class (test) | | | " + " | ".join(f"{100 * lora['majority'][t]:.1f}" for t in TASKS)
                     + " | | | | |")
    table = {}
    for key, label, k in ROWS:
        r = rows[key]
        if r is None:
            lines.append(f"| {label} | not finished in the budget |" + " |" * (len(TASKS) + 5))
            continue
        accs = [r["tasks"][t] for t in TASKS]
        after = accs[max(k, 1):]  # tasks that come after the basis (separate: tasks 2..6, as the others)
        mean, mean_after = sum(accs) / len(accs), sum(after) / len(after)
        ref = [lora["tasks"][t] for t in TASKS[max(k, 1):]] if lora else None
        delta = f" ({100 * (mean_after - sum(ref) / len(ref)):+.1f})" if ref and key != "separate-lora" else ""
        added = r["added"]
        pct = f"{added:,} ({100 * added / lora_added:.2f}%)" if added is not None else "n/a"
        total = f"{r['total']:,}" if r["total"] is not None else "n/a"
        fg = r["forgetting"]
        forget = "n/a (separate)" if fg is None else f"{100 * fg['mean']:.2f} / {100 * fg['max_abs']:.2f}"
        lines.append(f"| {label} | {pct} | {total} | " + " | ".join(f"{100 * a:.1f}" for a in accs)
                     + f" | {100 * mean:.1f} | {100 * mean_after:.1f}{delta} | {forget} | "
                     + (f"{100 * r['dev_mean']:.1f} |" if r.get("dev_mean") is not None else "|"))
        table[key] = {**r, "label": label, "basis_tasks": k, "mean": mean, "mean_after_basis": mean_after}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(table, indent=1) + "\n")
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(*sys.argv[1:3])
