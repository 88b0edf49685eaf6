"""Compare methods on the same data: one training run per (method, seed), then a table.

Each run is an ordinary ``train`` run in ``<output_dir>/<method>-s<seed>``, so a comparison that
was interrupted continues where it stopped when started again (finished runs are read back,
unfinished ones resume from their checkpoint). By default every run executes in its own Python
process (spawned with ``multiprocessing``; its entry point is ``train_in_process``, a library
function, not the command line), so its peak memory is its own and not the maximum of everything
run before it.

Outputs in ``<output_dir>``: ``compare.md`` (the table), ``compare.json`` (every run's
numbers and the aggregates) and ``compare.png`` (test metric and parameter count per method).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .lock import output_dir_lock
from .methods import METHODS, MethodSpec, parse_methods
from .loop import train
from .state import atomic_write_text


def run_one(cfg: TrainConfig, isolate: bool = True, progress: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Train (or resume, or read back) one run; in a child process when ``isolate``.

    ``threads`` caps the child's intra-op threads (OMP/MKL): several single-threaded runs side
    by side use a small CPU better than one run whose threads wait on each other at every op.
    """
    out = Path(cfg.output_dir)
    if not isolate:
        return train(cfg, resume=True, progress=progress)
    child = multiprocessing.get_context("spawn").Process(target=train_in_process, args=(cfg.to_dict(), threads, progress),
                                                         name=f"compare {out.name}")
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"run {out} failed (exit code {child.exitcode}); see its output above, then rerun compare "
                           "to resume")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def train_in_process(values: dict[str, Any], threads: int | None = None, progress: bool = False) -> None:
    """A spawned process's work: train (or resume, or read back) the run of config ``values`` with ``threads``."""
    if threads is not None:
        import torch

        os.environ.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        torch.set_num_threads(threads)
    train(TrainConfig.from_dict(values), resume=True, progress=progress)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value; NaN for none), as every table reports seeds."""
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method, in the order first seen: counts, sizes, metric mean and std over seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for r in results:
        label = r.get("label", r["method"])
        rows.setdefault(label, {"method": label, "runs": []})["runs"].append(r)
    lora_params = None
    if "lora" in rows:
        lora_params = rows["lora"]["runs"][0]["parameters"]["adapter"]
    table = []
    for method, row in rows.items():
        runs = row["runs"]
        base_method = runs[0]["method"]
        metric = runs[0]["metric"]
        first = runs[0]["parameters"]
        dev = [r["dev"][metric] for r in runs]
        test = [r["test"][metric] for r in runs if r.get("test")]
        entry = {
            "method": method,
            "metric": metric,
            "seeds": [r["config"]["seed"] for r in runs],
            "adapter_params": first["adapter"],
            "trainable_params": first["trainable"],
            "base_method": base_method,
            "rank": None if base_method == "full" else runs[0]["config"]["rank"],
            "method_options": runs[0]["config"].get("method_options") or {},
            "lora_equivalent": first.get("lora_equivalent", lora_params),
            # Ours: of LoRA at the same rank and targets. Full fine-tuning and PEFT's methods have no
            # such LoRA (VeRA's r is not a LoRA rank): none.
            "fraction_of_lora": _fraction_of_lora(first, base_method, lora_params),
            "adapter_bytes": statistics.fmean(r["adapter_bytes"] for r in runs),
            "dev_values": dev,
            "test_values": test,
            "dev_mean": mean_std(dev)[0], "dev_std": mean_std(dev)[1],
            "test_mean": mean_std(test)[0], "test_std": mean_std(test)[1],
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs),
            "peak_rss_mb": statistics.fmean(r["peak_rss_mb"] for r in runs),
            "optimizer_state_mb": statistics.fmean(r["optimizer_state_mb"] for r in runs),
            "lr": runs[0]["config"]["lr"],
            "epochs": runs[0]["config"]["epochs"],
        }
        table.append(entry)
    return table


def _fraction_of_lora(parameters: dict[str, Any], method: str, lora_params: int | None) -> float | None:
    if method not in METHODS or METHODS[method].kind != "sharelora":
        return None
    reference = parameters.get("lora_equivalent") or lora_params
    return parameters["adapter"] / reference if reference else None


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (metrics in percent, mean ± sample std over seeds)."""
    metric = rows[0]["metric"] if rows else "accuracy"
    n = max((len(r["seeds"]) for r in rows), default=0)
    head = (
        f"| method | adapter params | % of LoRA | trainable (incl. head) | adapter file | "
        f"dev {metric} | test {metric} | train time | peak RSS | optimizer state |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    lines = []
    for r in rows:
        frac = f"{100 * r['fraction_of_lora']:.1f}%" if r["fraction_of_lora"] is not None else "–"
        lines.append(
            f"| {r['method']} | {r['adapter_params']:,} | {frac} | {r['trainable_params']:,} | "
            f"{_human_bytes(r['adapter_bytes'])} | {100 * r['dev_mean']:.2f} ± {100 * r['dev_std']:.2f} | "
            f"{100 * r['test_mean']:.2f} ± {100 * r['test_std']:.2f} | {r['train_time_s']:.0f} s | "
            f"{r['peak_rss_mb']:.0f} MB | {r['optimizer_state_mb']:.2f} MB |"
        )
    note = (
        f"\nMean ± sample standard deviation over {n} seed(s). Adapter params exclude the classification head; "
        "the best epoch is chosen on dev, test is evaluated once with it. Train time includes the dev evaluations.\n"
    )
    return head + "\n".join(lines) + "\n" + note


def plot_comparison(rows: list[dict[str, Any]], path: Path, values: list[list[float]], ylabel: str,
                    zoom: bool = False, size_label: str = "trained parameters (excl. head, log)") -> None:
    """Two panels: a metric per method (``values``: each row's seeds, as dots; mean ± std as bars; ``zoom``:
    the axis fitted to them) and each method's adapter size (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, names = list(range(len(rows))), [r["method"] for r in rows]
    fig, (ax_m, ax_p) = plt.subplots(1, 2, figsize=(11, 4))
    stats = [mean_std(v) for v in values]
    ax_m.bar(x, [m for m, _ in stats], yerr=[s for _, s in stats], color="tab:blue", alpha=0.55, capsize=4)
    for i, v in enumerate(values):
        ax_m.plot([i] * len(v), v, "k.", ms=6)
    flat = [v for vs in values for v in vs]
    if zoom and flat:
        span = max(flat) - min(flat)
        ax_m.set_ylim(min(flat) - max(2.0, span), max(flat) + max(1.0, span / 2))
    ax_m.set_title(f"{ylabel}: mean ± std, dots = seeds")
    ax_m.set_ylabel(ylabel)
    ax_m.grid(axis="y", alpha=0.3)
    ax_p.bar(x, [r["adapter_params"] for r in rows], color="tab:green", alpha=0.7)
    ax_p.set_yscale("log")
    ax_p.set_ylabel(size_label)
    ax_p.set_title("adapter size")
    for i, r in enumerate(rows):
        ax_p.text(i, r["adapter_params"], f"{r['adapter_params']:,}", ha="center", va="bottom", fontsize=8)
    for ax in (ax_m, ax_p):
        ax.set_xticks(x, names)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_and_report(label: str, cfg: TrainConfig, isolate: bool, progress: bool, threads: int | None = None,
                     scores: Callable[[TrainConfig], dict[str, Any]] | None = None) -> dict[str, Any]:
    """One run of a comparison (``run_one``) with its label and ``scores(cfg)``' extra results, announced."""
    print(f"== compare: {label} seed {cfg.seed} -> {cfg.output_dir}", flush=True)
    result = {**run_one(cfg, isolate=isolate, progress=progress, threads=threads), "label": label,
              **(scores(cfg) if scores else {})}
    metric = result["metric"]
    test = (result.get("test") or {}).get(metric, float("nan"))
    print(f"== {label} seed {cfg.seed}: dev {metric} {result['dev'][metric]:.4f} test {metric} {test:.4f} "
          f"({result['train_time_s']:.0f} s)", flush=True)
    return result


def write_comparison(out: Path, first: dict[str, Any], command: str | None, machine: str, title: str,
                     extra: dict[str, Any], lines: list[str], table: str, summary: dict[str, Any],
                     plot: Callable[[Path], None]) -> dict[str, Any]:
    """compare.json (``summary`` under a header of the first run's model, data and machine), compare.md
    (``title``, the header's facts, ``lines``, ``table``) and compare.png (``plot``); returns the summary."""
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "command": command,
        "model": first["model"], "dataset": first["dataset"], "examples": first["examples"],
        "machine": f"{platform.machine()}, {first['environment'].get('cpu_count')} CPUs, {machine}, "
                   f"device {first['device']}",
        "environment": first["environment"], **extra,
    }
    summary = {"header": header, **summary}
    atomic_write_text(out / "compare.json", json.dumps(summary, indent=2, default=str) + "\n")
    md = "\n".join([f"# {header['model']} on {header['dataset']}{title}", "", f"- command: `{command}`",
                    f"- date: {header['date']}", f"- machine: {header['machine']}", *lines, "", table])
    atomic_write_text(out / "compare.md", md)
    plot(out / "compare.png")
    return summary


def compare(
    base: TrainConfig,
    methods: list[str | MethodSpec] | str,
    seeds: list[int],
    output_dir: str | Path,
    *,
    full_lr: float | None = None,
    isolate: bool = True,
    progress: bool = False,
    jobs: int = 1,
    threads: int | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Train every method with every seed on the same data and write the table, plot and JSON.

    ``methods``: names or settings ("lora", "lora@r=2", "peft-vblora@r=4,num_vectors=64"; see
    methods.parse_methods) or MethodSpecs; each is a row, its runs in
    ``<output_dir>/<method>[-<key><value>...]-s<seed>``. ``base.lr`` (if set) is the adapters' learning
    rate and ``full_lr`` full fine-tuning's (a spec's ``lr=`` wins); unset ones take the method defaults. Everything else in ``base`` is shared by all runs. ``jobs``
    runs that many trainings side by side, each with ``threads`` threads (default: cpu_count / jobs;
    with one job, what the environment gives).
    """
    if not methods or not seeds:
        raise ValueError("compare needs at least one method and one seed")
    if isinstance(methods, str):
        methods = [methods]
    specs = [m if isinstance(m, MethodSpec) else None for m in methods]
    if any(s is None for s in specs):
        specs = parse_methods([m if isinstance(m, str) else m.label for m in methods])
    labels = [s.label for s in specs]
    out = Path(output_dir)
    with output_dir_lock(out):  # a second comparison into out refuses at once; each run locks its own directory
        # Seed-major order: if the comparison is stopped early, every method has the same seeds done.
        configs = []
        for seed in seeds:
            for spec in specs:
                cfg = spec.apply(base, full_lr=full_lr)
                configs.append((spec.label, dataclasses.replace(cfg, seed=seed, output_dir=str(out / f"{spec.dirname}-s{seed}"))))
        if jobs > 1 and not isolate:
            raise ValueError("jobs > 1 needs isolated runs (one process each); drop --in-process or use --jobs 1")
        if threads is not None and not isolate:
            raise ValueError("threads sets each isolated run's thread count; drop --in-process or --threads")
        if threads is None and jobs > 1:
            threads = max(1, (os.cpu_count() or 1) // jobs)

        def one(item: tuple[str, TrainConfig]) -> dict[str, Any]:
            return train_and_report(*item, isolate=isolate, progress=progress and jobs == 1, threads=threads)

        if jobs > 1:
            with ThreadPoolExecutor(max_workers=jobs) as pool:
                results = list(pool.map(one, configs))
        else:
            results = [one(cfg) for cfg in configs]
        # Table rows in the order the methods were asked for.
        results.sort(key=lambda r: (labels.index(r["label"]), r["config"]["seed"]))
        rows = aggregate(results)
        first = results[0]
        runs = [{k: r[k] for k in ("name", "label", "method", "config", "parameters", "adapter_bytes", "dev", "test",
                                   "train_time_s", "peak_rss_mb", "optimizer_state_mb", "best_epoch")} for r in results]
        values = [[100 * v for v in r["test_values"]] for r in rows]
        return write_comparison(
            out, first, command, f"{jobs} run(s) at a time with {first['environment'].get('torch_threads')} torch "
            "thread(s) each", "", {}, [f"- examples: {first['examples']}"], markdown_table(rows),
            {"rows": rows, "runs": runs},
            lambda path: plot_comparison(rows, path, values, f"test {rows[0]['metric']} (%)", zoom=True))
