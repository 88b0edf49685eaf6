"""Two small studies of the paper's robustness claims, for LoRA vs ShareLoRA on a causal LM.

``transfer_study`` (retention): train an adapter on task 1, then keep training the SAME adapter on
task 2, and measure task 1 before and after:

    loss0 = task-1 dev loss of the base model; loss1 = after task 1; loss2 = after task 2
    kept  = (loss0 - loss2) / (loss0 - loss1)     fraction of the task-1 improvement still there
    forgetting = loss2 - loss1                    (nats per target token; lower is better)

plus, for E2E as task 1, greedy BLEU on the dev MRs after each phase, and task 2's dev loss (so a
method that "keeps" task 1 by not learning task 2 is visible).

``overfit_study``: train on a small training set for several epochs; after every epoch record the
teacher-forced loss (dropout off) on that training set and on dev. The gap dev - train over
epochs is the overfitting curve.

Both train with the training engine's steps (``engine.fit``: AdamW, linear warmup/decay, clipping)
over the task objects of ``sharelora.tasks``, in memory: they do not checkpoint (each run takes minutes). Every number they write is
also in ``<output_dir>/<study>.json``.
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..tasks import Task
from .config import TrainConfig
from .compare import mean_std
from .engine import fit, seed_everything
from .evaluate import model_logits
from .logs import environment, peak_rss_mb
from .methods import parameter_summary, prepare_model
from .state import atomic_write_text


def _task(name: str, data: Any, tokenizer: Any, max_length: int):
    from ..tasks.build import TASK_PRESETS, build_task

    return build_task(name, data, tokenizer, max_length=max_length or TASK_PRESETS[name]["max_length"])


def _e2e_dev_all_references(data: Any) -> Any:
    """E2E dev with one row per (MR, reference), so the dev loss uses every reference."""
    import dataclasses

    rows = [{"mr": ex["mr"], "target": ref, "references": ex["references"]}
            for ex in data.splits["dev"] for ref in ex["references"]]
    return dataclasses.replace(data, splits={**data.splits, "dev": rows})


def train_steps(model: torch.nn.Module, task: Task, split: Any, *, steps: int, lr: float, batch_size: int, seed: int,
                warmup_ratio: float = 0.06, max_grad_norm: float = 1.0, start_epoch: int = 0,
                on_epoch_end=None) -> list[float]:
    """``steps`` of the training engine's steps on ``split`` (``engine.fit``: token-mean loss per step, no
    weight decay); returns the step losses. ``on_epoch_end(epoch)`` is called after each full pass."""
    def batch_loss(rows: list[int]) -> torch.Tensor:
        batch = task.collate(split, rows)
        return task.loss(model_logits(model, task.model_inputs(batch)), batch["labels"], reduction="sum")

    return fit(model, batch_loss, lambda rows: task.step_weight(split, rows), len(split), steps=steps, lr=lr,
               batch_size=batch_size, seed=seed, warmup_ratio=warmup_ratio, max_grad_norm=max_grad_norm,
               start_epoch=start_epoch, on_epoch_end=on_epoch_end)


def _adapted_model(model_name: str, method: str, rank: int, seed: int, cache_dir: str | None):
    from ..sources import load_model
    from .config import resolve_targets

    seed_everything(seed)
    bundle = load_model(model_name, task="causal-lm", cache_dir=cache_dir)
    cfg = resolve_targets(TrainConfig(model=model_name, method=method, rank=rank, targets=["auto"], task="e2e"),
                          bundle.model)
    return bundle, prepare_model(bundle.model, cfg.resolved()), cfg.resolved()


def _header(command: str | None, bundle: Any, **extra: Any) -> dict[str, Any]:
    env = environment()
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "model": bundle.name + ("" if bundle.pretrained else " (NOT PRETRAINED: random weights)"),
        "machine": f"{platform.machine()}, {env.get('cpu_count')} CPUs, torch threads {env.get('torch_threads')}",
        "environment": env,
        **extra,
    }


def _pm(values: list[float], fmt: str) -> str:
    mean, std = mean_std(values)
    return fmt.format(mean) + (f" ± {fmt.format(std)}" if len(values) > 1 else "")


def _each_run(out: Path, methods: list[str], seeds: list[int], model: str, rank: int, cache_dir: str | None,
              one: Callable[[str, int, Any, Any], dict[str, Any]]) -> tuple[list[dict[str, Any]], Any]:
    """(every (method, seed) run, the model bundle): read back from ``<out>/<method>-s<seed>.json``, or
    ``one(method, seed, bundle, adapted model)``'s numbers for a freshly adapted model, written there."""
    runs, bundle = [], None
    for method in methods:
        for seed in seeds:
            path = out / f"{method}-s{seed}.json"
            if path.is_file():
                runs.append(json.loads(path.read_text(encoding="utf-8")))
                continue
            t0 = time.perf_counter()
            bundle, net, cfg = _adapted_model(model, method, rank, seed, cache_dir)
            run = {"method": method, "seed": seed, "parameters": parameter_summary(net, cfg)["adapter"],
                   **one(method, seed, bundle, net), "time_s": time.perf_counter() - t0}
            atomic_write_text(path, json.dumps(run, indent=2) + "\n")
            runs.append(run)
    if bundle is None:
        from ..sources import load_model

        bundle = load_model(model, task="causal-lm", cache_dir=cache_dir)
    return runs, bundle


def _write(out: Path, study: str, lines: list[str], header: dict[str, Any], runs: list[dict[str, Any]]) -> dict:
    """``<study>.md`` (the table) and ``<study>.json`` (the header and every run); returns the latter's dict."""
    atomic_write_text(out / f"{study}.md", "\n".join(lines) + "\n")
    summary = {"header": header, "runs": runs}
    atomic_write_text(out / f"{study}.json", json.dumps(summary, indent=2, default=str) + "\n")
    return summary


def transfer_study(*, methods: list[str], seeds: list[int], first: str = "e2e", second: str = "instructions",
                   first_steps: int = 60, second_steps: int = 60, eval_examples: int = 40, model: str = "smollm2",
                   rank: int = 8, lr: float = 5e-4, batch_size: int = 8, output_dir: str | Path,
                   cache_dir: str | None = None, command: str | None = None,
                   datasets: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train on ``first``, continue on ``second``; report task-1 retention per method (see module doc).

    ``datasets`` maps task name -> TaskData to use instead of the presets' datasets (tests).
    """
    from ..sources import load_dataset
    from ..tasks.build import TASK_PRESETS

    if first == second:
        raise ValueError("transfer needs two different tasks, e.g. --first e2e --second instructions")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = dict(datasets or {})
    for t in (first, second):
        if t not in datasets:
            datasets[t] = load_dataset(TASK_PRESETS[t]["dataset"], cache_dir=cache_dir,
                                       **TASK_PRESETS[t].get("dataset_options", {}))
    if "e2e" in datasets:
        datasets["e2e"] = _e2e_dev_all_references(datasets["e2e"])

    def one(method: str, seed: int, bundle: Any, net: Any) -> dict[str, Any]:
        tasks = {t: _task(t, datasets[t], bundle.tokenizer, TASK_PRESETS[t]["max_length"]) for t in (first, second)}
        train_split = {t: tasks[t].encode("train") for t in tasks}
        dev_split = {t: tasks[t].encode("dev", eval_examples) for t in tasks}

        def measure(tag: str) -> dict[str, float]:
            row = {f"{t}_loss": tasks[t].loss_metrics(net, dev_split[t], 16)["loss"] for t in tasks}
            if "e2e" in tasks:
                from ..tasks.generation import generation_metrics, group_by_mr

                groups = group_by_mr(datasets["e2e"].splits["dev"])  # every dev MR, not just eval_examples rows
                preds = tasks["e2e"].decode(net, [g["mr"] for g in groups], num_beams=1)
                row["e2e_bleu"] = generation_metrics(preds, [g["references"] for g in groups])["bleu"]
            print(f"   {method} s{seed} {tag}: " + ", ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
            return row

        with net.disable_adapter():
            before = measure("base model")
        train_steps(net, tasks[first], train_split[first], steps=first_steps, lr=lr, batch_size=batch_size, seed=seed)
        after_first = measure(f"after {first}")
        train_steps(net, tasks[second], train_split[second], steps=second_steps, lr=lr, batch_size=batch_size,
                    seed=seed)
        after_second = measure(f"after {second}")
        key = f"{first}_loss"
        gain = before[key] - after_first[key]
        return {"before": before, "after_first": after_first, "after_second": after_second,
                "forgetting": after_second[key] - after_first[key],
                "kept": (before[key] - after_second[key]) / gain if gain > 0 else float("nan"),
                "second_gain": after_first[f"{second}_loss"] - after_second[f"{second}_loss"],
                "peak_rss_mb": peak_rss_mb()}

    runs, bundle = _each_run(out, methods, seeds, model, rank, cache_dir, one)
    header = _header(command, bundle, first=first, second=second, first_steps=first_steps, second_steps=second_steps,
                     eval_examples=eval_examples, rank=rank, lr=lr, batch_size=batch_size)
    lines = [f"# Transfer: {first} ({first_steps} steps) then {second} ({second_steps} steps) on {header['model']}", "",
             f"- command: `{command}`", f"- date: {header['date']}", f"- machine: {header['machine']}",
             f"- dev examples per task: {eval_examples}; batch {batch_size}, lr {lr}, rank {rank}", "",
             f"| method | adapter params | {first} dev loss: base | after {first} | after {second} | kept | "
             f"forgetting | {second} dev loss: after {first} | after {second} |"
             + (" e2e dev BLEU after e2e | after both |" if first == "e2e" else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if first == "e2e" else "")]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        k1, k2 = f"{first}_loss", f"{second}_loss"
        cells = [method, f"{rs[0]['parameters']:,}", _pm([r["before"][k1] for r in rs], "{:.4f}"),
                 _pm([r["after_first"][k1] for r in rs], "{:.4f}"), _pm([r["after_second"][k1] for r in rs], "{:.4f}"),
                 _pm([r["kept"] for r in rs], "{:.3f}"), _pm([r["forgetting"] for r in rs], "{:+.4f}"),
                 _pm([r["after_first"][k2] for r in rs], "{:.4f}"), _pm([r["after_second"][k2] for r in rs], "{:.4f}")]
        if first == "e2e":
            cells += [_pm([r["after_first"]["e2e_bleu"] for r in rs], "{:.2f}"),
                      _pm([r["after_second"]["e2e_bleu"] for r in rs], "{:.2f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Seeds: {seeds} (mean ± sample std where more than one). Losses: nats per target token, "
              "teacher-forced, dropout off. kept = (base - after both) / (base - after task 1)."]
    return _write(out, "transfer", lines, header, runs)


def overfit_study(*, methods: list[str], seeds: list[int], task: str = "e2e", train_examples: int = 48,
                  epochs: int = 8, eval_examples: int = 60, model: str = "smollm2", rank: int = 8, lr: float = 5e-4,
                  batch_size: int = 8, output_dir: str | Path, cache_dir: str | None = None,
                  command: str | None = None, data: Any = None) -> dict[str, Any]:
    """Train and dev loss after every epoch on a small training set, per method (see module doc).

    ``data`` is a TaskData to use instead of the preset's dataset (tests).
    """
    from ..sources import load_dataset
    from ..tasks.build import TASK_PRESETS

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if data is None:
        data = load_dataset(TASK_PRESETS[task]["dataset"], cache_dir=cache_dir,
                            **TASK_PRESETS[task].get("dataset_options", {}))
    if task == "e2e":
        data = _e2e_dev_all_references(data)

    def one(method: str, seed: int, bundle: Any, net: Any) -> dict[str, Any]:
        t = _task(task, data, bundle.tokenizer, TASK_PRESETS[task]["max_length"])
        train_split = t.encode("train", train_examples)
        dev_split = t.encode("dev", eval_examples)
        curve = []

        def record(epoch: int) -> None:
            row = {"epoch": epoch, "train_loss": t.loss_metrics(net, train_split, 16)["loss"],
                   "dev_loss": t.loss_metrics(net, dev_split, 16)["loss"]}
            curve.append(row)
            print(f"   {method} s{seed} epoch {epoch}: train {row['train_loss']:.4f} dev {row['dev_loss']:.4f}",
                  flush=True)

        record(0)
        steps = epochs * math.ceil(len(train_split) / batch_size)
        train_steps(net, t, train_split, steps=steps, lr=lr, batch_size=batch_size, seed=seed, on_epoch_end=record)
        best = min(curve, key=lambda r: r["dev_loss"])
        return {"curve": curve, "best_epoch": best["epoch"], "best_dev_loss": best["dev_loss"],
                "final_gap": curve[-1]["dev_loss"] - curve[-1]["train_loss"],
                "final_dev_minus_best": curve[-1]["dev_loss"] - best["dev_loss"]}

    runs, bundle = _each_run(out, methods, seeds, model, rank, cache_dir, one)
    header = _header(command, bundle, task=task, train_examples=train_examples, epochs=epochs,
                     eval_examples=eval_examples, rank=rank, lr=lr, batch_size=batch_size)
    lines = [f"# Overfitting: {task}, {train_examples} training examples, {epochs} epochs, on {header['model']}", "",
             f"- command: `{command}`", f"- date: {header['date']}", f"- machine: {header['machine']}",
             f"- batch {batch_size}, lr {lr}, rank {rank}, dev examples {eval_examples}", "",
             "| method | adapter params | best dev loss | best epoch | final train loss | final dev loss | "
             "final gap (dev - train) | final dev - best dev |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        lines.append("| " + " | ".join([
            method, f"{rs[0]['parameters']:,}", _pm([r["best_dev_loss"] for r in rs], "{:.4f}"),
            _pm([r["best_epoch"] for r in rs], "{:.1f}"), _pm([r["curve"][-1]["train_loss"] for r in rs], "{:.4f}"),
            _pm([r["curve"][-1]["dev_loss"] for r in rs], "{:.4f}"), _pm([r["final_gap"] for r in rs], "{:.4f}"),
            _pm([r["final_dev_minus_best"] for r in rs], "{:+.4f}")]) + " |")
    lines += ["", f"Seeds: {seeds}. Losses: nats per target token, teacher-forced, dropout off, after each epoch "
              "(epoch 0 = the base model). Curves: overfit.png."]
    _plot_overfit(runs, methods, out / "overfit.png", f"{task}: {train_examples} examples")
    return _write(out, "overfit", lines, header, runs)


def _plot_overfit(runs: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = dict(zip(methods, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for r in runs:
        ep = [c["epoch"] for c in r["curve"]]
        c = colors.get(r["method"], "k")
        ax.plot(ep, [x["train_loss"] for x in r["curve"]], "--", color=c, alpha=0.8,
                label=f"{r['method']} train" if r["seed"] == runs[0]["seed"] else None)
        ax.plot(ep, [x["dev_loss"] for x in r["curve"]], "-o", color=c, ms=3,
                label=f"{r['method']} dev" if r["seed"] == runs[0]["seed"] else None)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats / target token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
