"""The parameter-budget study's LR choice, table and Pareto plot (docs/RESULTS_BUDGET.md).

    python docs/studies/budget_report.py choose runs/budget/<task>/probe*.json  # {method: lr}, from dev only
    python docs/studies/budget_report.py learns runs/budget/<task>/probe*.json  # exit 0: some run learned
    python docs/studies/budget_report.py report runs/budget OUT_PREFIX          # OUT_PREFIX.{json,md,png}
    python docs/studies/budget_report.py add runs/budget/<task> OUT_PREFIX      # one task into OUT_PREFIX.json
    python docs/studies/budget_report.py at-top PROBE_JSON...    # settings whose best dev LR is the grid's top: the next
    python docs/studies/budget_report.py extend BUDGET_JSON TASK SWEEP_JSON OUT_PREFIX PROBE_JSON...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def method_of(label: str) -> str:
    return label.split("@", 1)[0]


def choose(probe: Path) -> dict[str, float]:
    """Per method, the probe LR with the best dev metric (ties: the smaller LR). Reads dev only."""
    return choose_runs(json.loads(probe.read_text())["runs"])


def next_lr(lr: float) -> float:
    """The grid's next LR up: 2e-3 -> 6e-3 -> 2e-2 -> 6e-2 -> 2e-1 (about x3 a step)."""
    return float(f"{lr * 3:.1g}") if f"{lr:.0e}".startswith("2") else float(f"{lr * 10 / 3:.1g}")


def at_top(probes: list[Path]) -> dict[str, float]:
    """{probe setting label without its LR: the grid's next LR} of each method whose best dev LR is its largest probed."""
    runs = [r for p in probes for r in json.loads(p.read_text())["runs"]]
    best = choose_runs(runs)
    out = {}
    for r in runs:
        m = method_of(r["label"])
        top = max(q["config"]["lr"] for q in runs if method_of(q["label"]) == m)
        if best[m] == top and r["config"]["lr"] == top:
            out[r["label"].rsplit(",lr=", 1)[0]] = next_lr(top)
    return out


def choose_runs(runs: list[dict]) -> dict[str, float]:
    best: dict[str, tuple[float, float]] = {}
    for run in runs:
        metric, lr, m = run["dev"]["accuracy"], run["config"]["lr"], method_of(run["label"])
        if m not in best or metric > best[m][0] or (metric == best[m][0] and lr < best[m][1]):
            best[m] = (metric, lr)
    return {m: lr for m, (_, lr) in best.items()}


def extend(budget_json: Path, task: str, probes: list[Path], sweep: Path, prefix: Path) -> None:
    """Add extended-LR probes to a finished study: re-choose each method's LR on dev over every probe run, take
    the rows of methods whose LR changed from ``sweep`` (their settings re-run at the new LR), recompute the front."""
    out = json.loads(budget_json.read_text())
    entry = out["tasks"][task]
    extra = [r for p in probes for r in json.loads(p.read_text())["runs"]]
    seen = {(e["label"]) for e in entry["probe"]}
    entry["probe"] += [{"label": r["label"], "lr": r["config"]["lr"], "dev_accuracy": r["dev"]["accuracy"],
                        "dev_mcc": r["dev"]["mcc"], "extended": True} for r in extra if r["label"] not in seen]
    best: dict[str, tuple[float, float]] = {}
    for e in entry["probe"]:
        m = method_of(e["label"])
        if m not in best or e["dev_accuracy"] > best[m][0] or (e["dev_accuracy"] == best[m][0] and e["lr"] < best[m][1]):
            best[m] = (e["dev_accuracy"], e["lr"])
    lrs = {m: lr for m, (_, lr) in best.items()}
    changed = {m for m in lrs if lrs[m] != entry["lr"][m]}
    kept = [r for r in entry["rows"] if r["method"] not in changed]
    new = [r for r in rows(sweep, lrs) if r["method"] in changed]
    missing = changed - {r["method"] for r in new}
    if missing:
        raise SystemExit(f"the LR of {sorted(missing)} changed but {sweep} has no runs of them at the new LR")
    table = mark_front(sorted(kept + new, key=lambda r: r["adapter_parameters"]))
    entry.update(lr_before_extension=dict(entry["lr"]), lr=lrs, rows=table, lr_changed=sorted(changed))
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(task, table))
    plot(task, table, prefix.with_name(f"{prefix.name}-{task}.png"))


def rows(compare_json: Path, lrs: dict[str, float]) -> list[dict]:
    """One row per method@setting of the sweep (the chosen LR's runs), mean +- std over seeds."""
    summary = json.loads(compare_json.read_text())
    groups: dict[str, list[dict]] = {}
    for run in summary["runs"]:
        if run["config"]["lr"] != lrs[method_of(run["label"])]:
            continue
        groups.setdefault(run["label"], []).append(run)
    out = []
    for label, runs in groups.items():
        test = [r["test"]["accuracy"] * 100 for r in runs]
        dev = [r["dev"]["accuracy"] * 100 for r in runs]
        mcc = [r["test"]["mcc"] for r in runs]
        out.append({
            "label": label.rsplit(",lr=", 1)[0], "method": method_of(label), "lr": lrs[method_of(label)],
            "seeds": sorted(r["config"]["seed"] for r in runs), "adapter_parameters": runs[0]["parameters"]["adapter"],
            "trainable_parameters": runs[0]["parameters"]["trainable"], "adapter_bytes": runs[0]["adapter_bytes"],
            "test_mean": statistics.mean(test), "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
            "dev_mean": statistics.mean(dev), "test_mcc_mean": statistics.mean(mcc),
            "test_per_seed": test, "train_time_s_mean": statistics.mean(r["train_time_s"] for r in runs),
            "peak_rss_mb_mean": statistics.mean(r["peak_rss_mb"] for r in runs),
        })
    return mark_front(sorted(out, key=lambda r: r["adapter_parameters"]))


def mark_front(table: list[dict]) -> list[dict]:
    """Mark the Pareto front of rows sorted by adapter parameters: no row with fewer (or as many) parameters has
    a higher test mean."""
    best = -1.0
    for r in table:
        r["pareto"] = r["test_mean"] > best
        best = max(best, r["test_mean"])
    return table


def markdown(task: str, table: list[dict]) -> str:
    lines = [f"### {task}", "", "| method@setting | LR | adapter params | file | test acc (mean ± std, 3 seeds) | "
             "per seed | dev acc | test MCC | Pareto |", "|---|---:|---:|---:|---:|---|---:|---:|:-:|"]
    for r in table:
        seeds = ", ".join(f"{t:.1f}" for t in r["test_per_seed"])
        lines.append(f"| {r['label']} | {r['lr']:g} | {r['adapter_parameters']:,} | {r['adapter_bytes'] / 1024:.0f} KiB | "
                     f"{r['test_mean']:.1f} ± {r['test_std']:.1f} | {seeds} | {r['dev_mean']:.1f} | "
                     f"{r['test_mcc_mean']:.3f} | {'★' if r['pareto'] else ''} |")
    return "\n".join(lines) + "\n"


def majority_accuracy(task: str, n: int) -> float:
    """Test accuracy (%) of always predicting the most frequent class of the first ``n`` test rows (what compare
    evaluates with --max-eval-examples n): the level a run that learned nothing sits at."""
    from sharelora.sources import load_dataset

    labels = [r["label"] for r in load_dataset(task).splits["test"][:n]]
    return 100 * max(labels.count(c) for c in set(labels)) / len(labels)


def plot(task: str, table: list[dict], path: Path, majority: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method in dict.fromkeys(r["method"] for r in table):
        pts = [r for r in table if r["method"] == method]
        ax.errorbar([r["adapter_parameters"] for r in pts], [r["test_mean"] for r in pts],
                    yerr=[r["test_std"] for r in pts], marker="o", capsize=3, label=method, linestyle="-", alpha=0.85)
    front = [r for r in table if r["pareto"]]
    ax.step([r["adapter_parameters"] for r in front], [r["test_mean"] for r in front], where="post", color="black",
            linewidth=1.0, linestyle="--", label="Pareto front (means)")
    if majority is not None:
        ax.axhline(majority, color="grey", linestyle=":", linewidth=1.2, label=f"majority class ({majority:.1f}%)")
    ax.set_xscale("log")
    ax.set_xlabel("trainable adapter parameters (head excluded, log)")
    ax.set_ylabel("test accuracy (%), mean ± std over 3 seeds")
    ax.set_title(f"MiniLM on {task}, query/value: accuracy vs parameter budget")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def task_entry(task_dir: Path, prefix: Path) -> dict:
    """One task's study entry (its LRs, probe and, if swept, the table); writes the task's plot."""
    lrs = json.loads((task_dir / "lr.json").read_text())
    probe = json.loads((task_dir / "probe.json").read_text())
    probes = sorted(task_dir.glob("probe*.json"))
    entry = {"lr": lrs, "probe": [{"label": r["label"], "lr": r["config"]["lr"], "dev_accuracy": r["dev"]["accuracy"],
                                   "dev_mcc": r["dev"]["mcc"]} for p in probes for r in json.loads(p.read_text())["runs"]],
             "header": probe["header"]}
    summary = json.loads((task_dir / "compare.json").read_text()) if (task_dir / "compare.json").is_file() else None
    if summary is not None and summary["header"] != probe["header"]:  # compare.json is the sweep's, not the probe's
        table = rows(task_dir / "compare.json", lrs)
        majority = majority_accuracy(summary["header"]["dataset"], summary["header"]["examples"]["test"])
        entry.update(rows=table, sweep_header=summary["header"], majority_test_accuracy=majority)
        plot(task_dir.name, table, prefix.with_name(f"{prefix.name}-{task_dir.name}.png"), majority)
    return entry


def write(out: dict, prefix: Path) -> None:
    prefix.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    prefix.with_suffix(".md").write_text("\n".join(markdown(t, e["rows"]) for t, e in out["tasks"].items() if "rows" in e))


def report(root: Path, prefix: Path) -> None:
    """The whole study from ``root`` (one directory per task)."""
    write({"tasks": {d.name: task_entry(d, prefix) for d in sorted(root.iterdir()) if (d / "lr.json").is_file()}},
          prefix)


def add(task_dir: Path, prefix: Path) -> None:
    """Replace (or add) one task of a committed study, keeping the other tasks' entries as they are."""
    out = json.loads(prefix.with_suffix(".json").read_text()) if prefix.with_suffix(".json").is_file() else {"tasks": {}}
    out["tasks"][task_dir.name] = task_entry(task_dir, prefix)
    write(out, prefix)


if __name__ == "__main__":
    if sys.argv[1] == "choose":  # over one or more probe files
        print(json.dumps(choose_runs([r for a in sys.argv[2:] for r in json.loads(Path(a).read_text())["runs"]])))
    elif sys.argv[1] == "learns":  # exit 0 if some probe run's dev MCC > 0.1
        sys.exit(0 if any(r["dev"]["mcc"] > 0.1 for a in sys.argv[2:] for r in json.loads(Path(a).read_text())["runs"])
                 else 1)
    elif sys.argv[1] == "report":
        report(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "add":  # add TASK_DIR OUT_PREFIX: one task into an existing OUT_PREFIX.json
        add(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1] == "at-top":  # SETTING=NEXT_LR per line, for methods whose best dev LR is their largest
        for label, lr in at_top([Path(a) for a in sys.argv[2:]]).items():
            print(f"{label},lr={lr:g}")
    elif sys.argv[1] == "extend":  # extend BUDGET_JSON TASK SWEEP_JSON OUT_PREFIX PROBE_JSON...
        extend(Path(sys.argv[2]), sys.argv[3], [Path(a) for a in sys.argv[6:]], Path(sys.argv[4]), Path(sys.argv[5]))
    else:
        sys.exit(__doc__)
