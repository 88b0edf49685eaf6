"""The multi-task study's tables and plot (docs/RESULTS_MULTITASK.md) from the runs of multitask.sh.

    python docs/studies/multitask_report.py runs/multitask docs/results/multitask   # -> .json, .md, .png
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TASKS = ["rotten-tomatoes", "vitaminc", "multiemo", "hyperbaton"]
ROWS = [  # (key, what the table calls it)
    ("separate-lora", "separate LoRA per task"),
    ("separate-sharea", "separate ShareA per task"),
    ("joint-sharea", "multi-task ShareA, A shared by all tasks (joint)"),
    ("joint-shareab", "multi-task ShareAB, A shared by all tasks (joint)"),
    ("hydra4", "HydraLoRA, K = 4 heads (joint, no task id)"),
    ("continual-sharea", "continual ShareA, shared frozen after task 1"),
    ("sequential-lora", "sequential LoRA, one adapter through the tasks (baseline)"),
    ("compressed-k8", "compressed from the separate LoRAs (rank k = 8)"),
    ("compressed-k32", "compressed from the separate LoRAs (rank k = 32)"),
]


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def seeds_of(root: Path, key: str) -> list[dict]:
    """Per seed: {"tasks": {task: test metric}, "total": adapter params, "added": params per extra task, ...}."""
    out = []
    if key.startswith("separate-"):
        for seed in range(3):
            runs = {t: root / key / f"{t}-s{seed}" / "results.json" for t in TASKS}
            if not all(p.is_file() for p in runs.values()):
                continue
            res = {t: _load(p) for t, p in runs.items()}
            out.append({"seed": seed, "tasks": {t: r["test"][r["metric"]] for t, r in res.items()},
                        "mcc": {t: r["test"]["mcc"] for t, r in res.items()},
                        "total": sum(r["parameters"]["adapter"] for r in res.values()),
                        "added": res[TASKS[-1]]["parameters"]["adapter"],
                        "heads": sum(r["parameters"]["head"] for r in res.values()),
                        "train_time_s": sum(r["train_time_s"] for r in res.values())})
    elif key.startswith("compressed-"):
        for d in sorted((root / key).glob("s*")):
            if not (d / "eval.json").is_file():
                continue
            ev, rep = _load(d / "eval.json"), _load(d / "compression.json")
            shared = 2 * rep["rank"] * 384  # one A (k x 384) per module type, query and value
            out.append({"seed": int(d.name[1:]), "tasks": {t: ev["tasks"][t]["accuracy"] for t in TASKS},
                        "mcc": {t: ev["tasks"][t]["mcc"] for t in TASKS}, "total": rep["parameters"],
                        "added": (rep["parameters"] - shared) // len(TASKS),
                        "update_error": {t: rep["tasks"][t]["mean_error"] for t in TASKS},
                        "source_parameters": rep["source_parameters"]})
    else:
        for d in sorted((root / key).glob("s*")):
            if not (d / "results.json").is_file():
                continue
            r = _load(d / "results.json")
            m = r["metric"]
            entry = {"seed": int(d.name[1:]), "tasks": {t: r["tasks"][t]["test"][m] for t in TASKS},
                     "mcc": {t: r["tasks"][t]["test"]["mcc"] for t in TASKS}, "total": r["parameters"]["adapter"],
                     "added": r["parameters"]["added_per_task"], "heads": r["parameters"]["heads"],
                     "train_time_s": r["train_time_s"]}
            if "forgetting" in r:
                entry["forgetting"] = r["forgetting"]
            out.append(entry)
    return out


def _ms(values: list[float], scale: float = 100.0) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def build(root: Path) -> dict:
    rows = []
    for key, label in ROWS:
        seeds = seeds_of(root, key)
        if not seeds:
            continue
        means = [statistics.mean(s["tasks"].values()) for s in seeds]
        rows.append({"key": key, "label": label, "seeds": [s["seed"] for s in seeds], "per_seed": seeds,
                     "total": seeds[0]["total"], "added": seeds[0]["added"],
                     "task_mean": {t: statistics.mean(s["tasks"][t] for s in seeds) for t in TASKS},
                     "task_std": {t: statistics.stdev([s["tasks"][t] for s in seeds]) if len(seeds) > 1 else 0.0
                                  for t in TASKS},
                     "mean": statistics.mean(means), "mean_std": statistics.stdev(means) if len(means) > 1 else 0.0,
                     "means": means})
    return {"tasks": TASKS, "rows": rows}


def markdown(study: dict) -> str:
    head = " | ".join(f"{t} test acc" for t in TASKS)
    lines = [f"| method | seeds | total adapter params for the {len(TASKS)} tasks | params added per extra task | "
             f"{head} | mean |", "|---|---|---:|---:|" + "---:|" * len(TASKS) + "---:|"]
    for r in study["rows"]:
        cells = " | ".join(_ms([s["tasks"][t] for s in r["per_seed"]]) for t in TASKS)
        lines.append(f"| {r['label']} | {len(r['seeds'])} | {r['total']:,} | {r['added']:,} | {cells} | "
                     f"{_ms(r['means'])} |")
    return "\n".join(lines) + "\n"


def forgetting_markdown(study: dict) -> str:
    """Each task's test accuracy after each stage (mean over seeds), continual ShareA vs sequential LoRA."""
    out = []
    for key in ("continual-sharea", "sequential-lora"):
        row = next((r for r in study["rows"] if r["key"] == key), None)
        if row is None:
            continue
        mats = [s["forgetting"]["matrix"] for s in row["per_seed"]]
        lines = [f"**{row['label']}** (test accuracy, mean over {len(mats)} seeds; rows: after stage k)", "",
                 "| after stage | " + " | ".join(TASKS) + " |", "|---|" + "---:|" * len(TASKS)]
        for k in range(len(TASKS)):
            cells = []
            for j in range(len(TASKS)):
                vals = [m[k][j] for m in mats if m[k][j] is not None]
                cells.append(f"{100 * statistics.mean(vals):.1f}" if vals else "")
            lines.append(f"| {k + 1} ({TASKS[k]}) | " + " | ".join(cells) + " |")
        per = {t: [s["forgetting"]["per_task"][t] for s in row["per_seed"]] for t in TASKS[:-1]}
        lines.append(f"| forgetting (stage t - last) | " + " | ".join(_ms(per[t]) for t in TASKS[:-1]) + " | |")
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for r in study["rows"]:
        ax.errorbar([r["total"]], [100 * r["mean"]], yerr=[100 * r["mean_std"]], marker="o", capsize=3,
                    label=r["label"], linestyle="none")
    ax.set_xscale("log")
    ax.set_xlabel(f"total adapter parameters for the {len(TASKS)} tasks (heads excluded, log)")
    ax.set_ylabel("mean test accuracy over the tasks (%), mean ± std over seeds")
    ax.set_title("MiniLM, r = 8, query/value: 4 tasks in one model or several")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    root, prefix = Path(sys.argv[1]), Path(sys.argv[2])
    study = build(root)
    prefix.with_suffix(".json").write_text(json.dumps(study, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(study) + "\n" + forgetting_markdown(study))
    plot(study, prefix.with_name(prefix.name + ".png"))
    print(markdown(study))
    print(forgetting_markdown(study))
