"""The eight-task study's table, JSON of every seed and Pareto plot (docs/RESULTS_MULTITASK.md, issue 25).

    python docs/studies/taskcore8_report.py runs/taskcore8 docs/results/taskcore8   # -> .json, .md, .png

Reads the runs of docs/studies/taskcore8.sh. Parameters exclude the task heads (one per task in every
row). "added" is what one more task costs once the basis exists: a separate adapter's parameters, the
last task's own tensors in a continual run, the last task's tensors in a compressed adapter. Test
accuracy on the first 200 test rows of each task; mean +- sample std over the seeds that finished.
"Mean after the basis" averages the tasks after the row's basis (task 1, or tasks 1-3 with a joint
basis; separate rows: after task 1) and is compared with separate LoRA on the same tasks and seeds.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

SEEDS = (0, 1, 2)
EVAL_ROWS = 200
ROWS = [  # (key, what the table calls it, basis tasks, kind)
    ("separate-lora", "separate LoRA per task", 0, "separate"),
    ("separate-lora-lr2e-2", "separate LoRA per task at lr 2e-2 (a dev check of LoRA's lr)", 0, "separate"),
    ("separate-lora-lr1e-2", "separate LoRA per task at lr 1e-2 (a dev check of LoRA's lr, follow-up)", 0, "separate"),
    ("separate-sharea", "separate ShareA per task (A shared across layers)", 0, "separate"),
    ("vera", "PEFT VeRA per task (r = 256, LR chosen on dev)", 0, "separate"),
    ("continual-sharea", "continual ShareA (task-shared A from task 1)", 1, "multitask"),
    ("core-matrix-basis1", "continual task cores, matrix, A and B from task 1", 1, "multitask"),
    ("core-diagonal-basis1", "continual task cores, diagonal, A and B from task 1", 1, "multitask"),
    ("core-matrix-basis1-corelr", "continual task cores, matrix, A and B from task 1, core-only stages at the dev-chosen lr",
     1, "corelr"),
    ("core-matrix-basis3", "continual task cores, matrix, A and B from tasks 1-3 jointly", 3, "multitask"),
    ("core-matrix-basis3-corelr", "continual task cores, matrix, A and B from tasks 1-3 jointly, core-only stages at the "
     "dev-chosen lr", 3, "corelr"),
    ("core-diagonal-basis3", "continual task cores, diagonal, A and B from tasks 1-3 jointly", 3, "multitask"),
    ("core-matrix-grow", "continual task cores, matrix, basis from task 1, grown for later tasks", 1, "multitask"),
    ("core-matrix-grow-corelr", "continual task cores, matrix, basis from task 1, grown for later tasks, cores and "
     "heads at 6e-2 (--core-lr), grown directions at 6e-3", 1, "multitask"),
    ("core-matrix-grow-all-corelr", "the same with the grown directions at 6e-2 too (--core-lr before it left them at "
     "--lr; diverged)", 1, "multitask"),
    ("head-only", "head-only check: basis from task 1, later tasks' cores kept at 0 (--core-lr 0), heads at 6e-2",
     1, "corelr"),
    ("core-matrix-basis1-core2e-1-head6e-2", "continual task cores, matrix, basis from task 1, cores at 2e-1, heads at "
     "6e-2", 1, "corelr"),
    ("ortho-lr2e-2", "continual task cores, matrix, basis from task 1 orthonormalized, core-only stages at 2e-2", 1,
     "corelr"),
    ("ortho-lr6e-2", "continual task cores, matrix, basis from task 1 orthonormalized, core-only stages at 6e-2", 1,
     "corelr"),
    ("ortho-lr2e-1", "continual task cores, matrix, basis from task 1 orthonormalized, core-only stages at 2e-1", 1,
     "corelr"),
    ("core-matrix-r11", "continual task cores, matrix, rank 11, basis from task 1, core-only stages at 6e-2", 1,
     "multitask"),
    ("core-matrix-r11-lora", "the same with a per-layer A (--method lora; checked after the choice, lost on seed-0 dev)",
     1, "multitask"),
    ("core-matrix-r6-all", "continual task cores, matrix, rank 6 on all six linear maps, basis from task 1, core-only "
     "stages at 6e-2", 1, "multitask"),
    ("compressed-matrix", "separate LoRAs compressed into matrix cores (rank 8, no training)", 0, "compressed"),
    ("compressed-diagonal", "separate LoRAs compressed into diagonal cores (rank 8, no training)", 0, "compressed"),
]


# Rows on the frozen basis of core-matrix-basis1/sSEED (tasks 2-8 in a second run, OUT/KEY/sSEED).
GIVEN = ("head-only", "core-matrix-basis1-core2e-1-head6e-2", "ortho-lr2e-2", "ortho-lr6e-2", "ortho-lr2e-1")
OPTIONAL = {"core-matrix-r11-lora", "separate-lora-lr1e-2", "core-matrix-grow", "core-matrix-grow-all-corelr", "core-matrix-grow-corelr", "core-matrix-r11", "core-matrix-r6-all", *GIVEN}


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def separate_dir(root: Path, key: str, task: str, seed: int) -> Path:
    if key == "vera" and seed == 0:  # seed 0 of the chosen LR is a run of the grid
        lr = (root / "vera-lr.txt").read_text().strip()
        return root / "vera-grid" / f"lr{lr}" / f"{task}-s0"
    return root / key / f"{task}-s{seed}"


def one_seed(root: Path, key: str, kind: str, tasks: list[str], seed: int) -> dict | None:
    """{"test": {task: acc}, "dev_mean", "added", "total", "forgetting"} of one seed, or None if unfinished."""
    if kind == "separate":
        try:
            paths = {t: separate_dir(root, key, t, seed) / "results.json" for t in tasks}
        except FileNotFoundError:
            return None
        if not all(p.is_file() for p in paths.values()):
            return None
        res = {t: load(p) for t, p in paths.items()}
        return {"test": {t: r["test"]["accuracy"] for t, r in res.items()},
                "dev_mean": statistics.fmean(r["dev"]["accuracy"] for r in res.values()),
                "added": res[tasks[-1]]["parameters"]["adapter"],
                "total": sum(r["parameters"]["adapter"] for r in res.values()), "forgetting": None}
    if kind == "compressed":
        d = root / key / f"s{seed}"
        if not (d / "eval.json").is_file():
            return None
        ev = load(d / "eval.json")
        from safetensors import safe_open

        with safe_open(str(d / "adapter" / "adapter_model.safetensors"), "pt") as f:
            numel = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "modules_to_save" not in k}
        comp = load(d / "compression.json") if (d / "compression.json").is_file() else {}
        return {"test": {t: ev["tasks"][t]["accuracy"] for t in tasks}, "dev_mean": None,
                "added": sum(n for k, n in numel.items() if k.startswith(f"{tasks[-1]}/")),
                "total": sum(numel.values()), "forgetting": None, "compression": comp}
    if kind == "corelr":  # the basis tasks from the matrix row's run, the later tasks from the run on its basis
        k = 3 if "basis3" in key else 1
        if key in GIVEN:
            d = root / key / f"s{seed}"
        elif seed == 0 and k == 1:  # seed 0 on task 1's basis: the run of the lr grid that dev chose
            if not (root / "core-lr.txt").is_file():
                return None
            d = root / key / f"lr{(root / 'core-lr.txt').read_text().strip()}" / "s0"
        else:
            d = root / key / f"s{seed}"
        first = one_seed(root, "core-matrix-basis1" if key in GIVEN else key.replace("-corelr", ""), "multitask",
                         tasks, seed)
        later = one_seed(root, str(d.relative_to(root).parent), "multitask", tasks[k:], seed) if first else None
        if later is None:
            return None
        later["test"] = {**{t: first["test"][t] for t in tasks[:k]}, **later["test"]}
        later["total"] = first["total"]  # one basis, the basis tasks' cores and the later cores: the same tensors
        if key == "head-only":  # the later tasks' cores stay 0: they add nothing but their heads
            later["added"], later["total"] = 0, first["total"] - (len(tasks) - k) * first["added"]
        later["dev_mean"] = (sum(first["dev"][t] for t in tasks[:k]) + later["dev_mean"] * (len(tasks) - k)) / len(tasks)
        return later
    path = root / key / f"s{seed}" / "results.json"
    if not path.is_file():
        return None
    r = load(path)
    f = r["forgetting"]
    earlier = [v for n, v in f["per_task"].items() if n != tasks[-1]]
    return {"test": {t: r["tasks"][t]["test"][r["metric"]] for t in tasks}, "dev_mean": r["mean"]["dev"],
            "dev": {t: r["tasks"][t]["dev"][r["metric"]] for t in tasks},
            "added": r["parameters"]["added_per_task"], "total": r["parameters"]["adapter"],
            "forgetting": {"mean": f["mean_over_earlier_tasks"], "max_abs": max(abs(v) for v in earlier),
                           "matrix": f["matrix"]},
            "stages": r.get("stages"), "basis_fit": r.get("basis_fit"), "grow_basis": r.get("grow_basis")}


def ms(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not values:
        return ""
    m = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def majority(task: str) -> float:
    from sharelora.sources import load_dataset

    test = load_dataset(task).splits["test"][:EVAL_ROWS]
    return max(Counter(r["label"] for r in test).values()) / len(test)


def main(root: str, out: str) -> None:
    base = Path(root)
    tasks = (base / "tasks.txt").read_text().split()
    n = len(tasks)
    seeds = {key: {s: one_seed(base, key, kind, tasks, s) for s in SEEDS} for key, _, _, kind in ROWS}
    lora = seeds["separate-lora"]
    lora_added = next((r["added"] for r in lora.values() if r), 73_728)
    head = (["method", "seeds", "added per extra task (% of a LoRA)", f"adapter total, {n} tasks"] + tasks
            + [f"mean ({n})", "mean after the basis", "vs separate LoRA, same tasks", "forgetting mean / max abs",
               "mean dev"])
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|",
             "| majority class (test) | | | | " + " | ".join(f"{100 * majority(t):.1f}" for t in tasks)
             + " | | | | | |"]
    table: dict = {"tasks": tasks, "seeds": list(SEEDS), "eval_rows": EVAL_ROWS, "rows": {}}
    for key, label, k, kind in ROWS:
        done = {s: r for s, r in seeds[key].items() if r}
        if not done:
            if key not in OPTIONAL:
                lines.append(f"| {label} | 0 | not run in the budget |" + " |" * (len(head) - 3))
            continue
        after = tasks[max(k, 1):]
        means = [statistics.fmean(r["test"].values()) for r in done.values()]
        means_after = [statistics.fmean(r["test"][t] for t in after) for r in done.values()]
        deltas = [statistics.fmean(r["test"][t] - lora[s]["test"][t] for t in after)
                  for s, r in done.items() if lora.get(s)]
        added, total = done[min(done)]["added"], done[min(done)]["total"]
        fg = [r["forgetting"] for r in done.values() if r["forgetting"]]
        forget = ("n/a (separate)" if not fg else
                  f"{ms([f['mean'] for f in fg], digits=2)} / {100 * max(f['max_abs'] for f in fg):.2f}")
        dev = [r["dev_mean"] for r in done.values() if r["dev_mean"] is not None]
        cells = [label, str(len(done)), f"{added:,} ({100 * added / lora_added:.2f}%)", f"{total:,}"]
        cells += [ms([r["test"][t] for r in done.values()]) for t in tasks]
        delta = "" if key == "separate-lora" or not deltas else f"{100 * statistics.fmean(deltas):+.1f}" + (
            f" ± {100 * statistics.stdev(deltas):.1f}" if len(deltas) > 1 else "")
        cells += [ms(means), ms(means_after), delta, forget, ms(dev)]
        lines.append("| " + " | ".join(cells) + " |")
        table["rows"][key] = {"label": label, "basis_tasks": k, "kind": kind, "added_per_task": added,
                              "added_pct_of_lora": added / lora_added, "total": total,
                              "mean": statistics.fmean(means), "mean_std": statistics.stdev(means) if len(means) > 1 else None,
                              "mean_after_basis": statistics.fmean(means_after),
                              "delta_after_basis_vs_lora": statistics.fmean(deltas) if deltas else None,
                              "per_seed": {str(s): r for s, r in done.items()}}
    if (base / "core-lr.json").is_file():
        table["core_lr"] = load(base / "core-lr.json")
    if (base / "more-choice.json").is_file():
        table["more_choice"] = load(base / "more-choice.json")
        lines += ["", screen(base, tasks, table["more_choice"], lora.get(0))]
    if (base / "vera-lr.json").is_file():
        table["vera_lr"] = load(base / "vera-lr.json")
    if (base / "selection.json").is_file():
        table["task_selection"] = load(base / "selection.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(table, indent=1) + "\n"), (".md", "\n".join(lines) + "\n")):
        tmp = Path(out + suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out + suffix)
    plot(table, out + ".png")
    print("\n".join(lines))


def screen(base: Path, tasks: list[str], choice: dict, lora0: dict | None) -> str:
    """The follow-up's dev screen (seed 0): each candidate's mean dev and test over tasks 2-8, and its cost."""
    later = tasks[1:]
    out = ["| follow-up candidate (seed 0) | added per extra task | mean dev, tasks 2-8 | mean test, tasks 2-8 | "
           "vs separate LoRA seed 0 (test) | chosen |", "|---|---:|---:|---:|---:|---|"]
    for name, d in choice["runs"].items():
        r = load(base / d / "results.json")
        test = statistics.fmean(r["tasks"][t]["test"]["accuracy"] for t in later)
        delta = "" if lora0 is None else f"{100 * (test - statistics.fmean(lora0['test'][t] for t in later)):+.1f}"
        out.append(f"| {name} | {r['parameters']['added_per_task']:,} | "
                   f"{100 * choice['mean_dev_tasks_after_the_basis'][name]:.1f} | {100 * test:.1f} | {delta} | "
                   f"{'yes' if name == choice['chosen'] else ''} |")
    return "\n".join(out)


def plot(table: dict, path: str) -> None:
    """Mean test accuracy over the tasks vs parameters added per extra task (log x), one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    for key, row in table["rows"].items():
        means = [statistics.fmean(r["test"].values()) * 100 for r in row["per_seed"].values()]
        std = statistics.stdev(means) if len(means) > 1 else 0.0
        if row["added_per_task"] == 0:  # the head-only check adds no adapter parameter: a line, not a point
            ax.axhline(statistics.fmean(means), color="tab:purple", ls="-.", lw=0.8, label=f"{key} (adds 0)")
            continue
        marker = {"separate": "s", "multitask": "o", "corelr": "D", "compressed": "^"}[row["kind"]]
        ax.errorbar(row["added_per_task"], statistics.fmean(means), yerr=std, fmt=marker, capsize=3)
        ax.annotate(key, (row["added_per_task"], statistics.fmean(means)), textcoords="offset points",
                    xytext=(5, 4), fontsize=7)
    lora = table["rows"].get("separate-lora")
    if lora:  # the goal: at most 2% of a LoRA per task, within 1 point of separate LoRAs
        ax.axhline(lora["mean"] * 100, color="grey", ls="--", lw=0.8, label="separate LoRA mean")
        ax.axhline(lora["mean"] * 100 - 1, color="grey", ls=":", lw=0.8, label="1 point below it")
        ax.axvline(0.02 * lora["added_per_task"], color="tab:red", ls=":", lw=0.8, label="2% of a LoRA")
        ax.legend(loc="lower right", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("parameters added per extra task (heads apart, log scale)")
    ax.set_ylabel(f"mean test accuracy over {len(table['tasks'])} tasks (%)")
    ax.set_title("MiniLM q/v r=8: accuracy vs per-task cost (mean ± std over seeds)")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
