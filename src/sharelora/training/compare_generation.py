"""Compare methods on a generation task (E2E or instructions): runs, MMLU, a table and a plot.

Each (method, seed) is an ordinary ``train`` run in ``<output_dir>/<method>-s<seed>`` (resumed or
read back when it exists, as ``compare`` does for classification). Instruction runs can also be
scored on an MMLU subset after training (``mmlu``: the trained adapter, plus the base model
once as a reference row); those scores are cached in ``mmlu-<shots>shot.json`` beside each run.

Outputs: ``compare.md`` (table), ``compare.json`` (every run and the aggregates), ``compare.png``.
Scores stay on their natural scales: BLEU / ROUGE-L / chrF 0-100, losses in nats per target
token, MMLU accuracy in percent.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from .compare import _human_bytes, mean_std, plot_comparison, train_and_report, write_comparison
from .config import TrainConfig
from .methods import METHODS
from .lock import output_dir_lock
from .state import atomic_write_text

# (key in a run's flattened metrics, column title, format); the first is the task's headline.
COLUMNS = {
    "e2e": [("test.bleu", "test BLEU", "{:.2f}"), ("test.rougeL", "test ROUGE-L", "{:.2f}"),
            ("test.chrf", "test chrF", "{:.2f}"), ("dev.bleu", "dev BLEU (greedy)", "{:.2f}"),
            ("test.loss", "test loss", "{:.3f}")],
    "instructions": [("test.loss", "held-out loss", "{:.4f}"), ("test.perplexity", "held-out ppl", "{:.2f}"),
                     ("test.token_accuracy", "token acc", "{:.4f}"), ("dev.loss", "dev loss", "{:.4f}")],
}
MMLU_COLUMNS = [("mmlu.accuracy_macro", "MMLU acc (macro, %)", "{:.2f}", 100.0),
                ("mmlu.answer_logprob_norm", "MMLU log p(answer) among A-D", "{:.4f}", 1.0)]


def _get(record: dict[str, Any], dotted: str) -> float | None:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) else None


def mmlu_for(run_dir: Path | None, model_name: str, out: Path, options: dict[str, Any], cache_dir: str | None,
             device: str) -> dict[str, Any]:
    """MMLU scores of the adapter in ``run_dir`` (cached in its ``mmlu-<k>shot.json``), or with ``run_dir`` None
    of the base model ``model_name`` (cached in ``<out>/base-mmlu-<k>shot.json``)."""
    name = f"mmlu-{options.get('shots', 0)}shot.json"
    path = run_dir / name if run_dir else out / f"base-{name}"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from ..sources import load_dataset, load_model
    from ..tasks.mmlu import evaluate_mmlu
    from .evaluate import load_trained_model

    if run_dir:
        model, tokenizer, _ = load_trained_model(run_dir / "adapter", cache_dir=cache_dir, device=device)
    else:
        bundle = load_model(model_name, task="causal-lm", cache_dir=cache_dir)
        model, tokenizer = bundle.model.to(device), bundle.tokenizer
    result = evaluate_mmlu(model, tokenizer, load_dataset("mmlu", cache_dir=cache_dir), device=device, **options)
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    return result


def aggregate(task: str, results: list[dict[str, Any]], with_mmlu: bool) -> list[dict[str, Any]]:
    """One row per method: parameter counts, sizes, every column's mean and std over seeds."""
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r["method"], []).append(r)
    lora = by_method.get("lora", [{}])[0].get("parameters", {}).get("adapter")
    rows = []
    columns = COLUMNS[task] + ([(k, t, f) for k, t, f, _ in MMLU_COLUMNS] if with_mmlu else [])
    for method, runs in by_method.items():
        p = runs[0]["parameters"]
        row: dict[str, Any] = {
            "method": method, "seeds": [r["config"]["seed"] for r in runs],
            "adapter_params": p["adapter"], "fraction_of_lora": p["adapter"] / lora if lora else None,
            "adapter_bytes": runs[0]["adapter_bytes"],
            "train_time_s": statistics.fmean(r["train_time_s"] for r in runs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "optimizer_state_mb": runs[0]["optimizer_state_mb"],
            "steps": runs[0]["steps"], "values": {},
        }
        for key, _, _ in columns:
            vals = [v for v in (_get(r, key) for r in runs) if v is not None]
            row["values"][key] = {"mean": mean_std(vals)[0], "std": mean_std(vals)[1], "all": vals}
        rows.append(row)
    return rows


def markdown_table(task: str, rows: list[dict[str, Any]], with_mmlu: bool, base_mmlu: dict | None = None) -> str:
    columns = COLUMNS[task] + ([(k, t, f) for k, t, f, _ in MMLU_COLUMNS] if with_mmlu else [])
    scale = {k: s for k, _, _, s in MMLU_COLUMNS}
    head = ["method", "adapter params", "% of LoRA", "adapter file"] + [t for _, t, _ in columns] + \
        ["train time", "peak RSS"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for r in rows:
        frac = f"{100 * r['fraction_of_lora']:.1f}%" if r["fraction_of_lora"] is not None else "–"
        cells = [r["method"], f"{r['adapter_params']:,}", frac, _human_bytes(r["adapter_bytes"])]
        for key, _, fmt in columns:
            v = r["values"][key]
            s = scale.get(key, 1.0)
            cells.append("–" if not v["all"] else
                         f"{fmt.format(s * v['mean'])} ± {fmt.format(s * v['std'])}" if len(v["all"]) > 1
                         else fmt.format(s * v["mean"]))
        cells += [f"{r['train_time_s']:.0f} s", f"{r['peak_rss_mb']:.0f} MB"]
        lines.append("| " + " | ".join(cells) + " |")
    if with_mmlu and base_mmlu is not None:
        cells = ["base model (no adapter)", "0", "–", "–"] + ["–"] * len(COLUMNS[task]) + [
            f"{100 * base_mmlu['accuracy_macro']:.2f}", f"{base_mmlu['answer_logprob_norm']:.4f}", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    n = max((len(r["seeds"]) for r in rows), default=0)
    return "\n".join(lines) + (f"\n\nMean ± sample standard deviation over {n} seed(s) (one value: a single seed). "
                               "Adapter params count the method's own weights; train time includes the dev evaluations.\n")


def compare_generation(base: TrainConfig, methods: list[str], seeds: list[int], output_dir: str | Path, *,
                       mmlu: dict[str, Any] | None = None, isolate: bool = True, progress: bool = False,
                       command: str | None = None) -> dict[str, Any]:
    """Train every method with every seed on ``base``'s generation task; write table, plot and JSON.

    Args:
        base: the shared run settings; ``base.task`` must be "e2e" or "instructions".
        mmlu: options of ``evaluate_mmlu`` (shots, subjects, max_per_subject, batch_size) to score
            each trained instruction adapter and the base model on MMLU; None to skip.
    """
    from ..tasks.build import LM_TASKS

    if base.task not in LM_TASKS:
        raise ValueError(f"compare_generation runs the generation tasks {LM_TASKS}, not {base.task!r}")
    unknown = [m for m in methods if m not in METHODS or m == "full"]
    if unknown:
        raise ValueError(f"method(s) {unknown} cannot be compared here; choose adapters from "
                         f"{', '.join(m for m in METHODS if m != 'full')}")
    out = Path(output_dir)
    with output_dir_lock(out):  # a second comparison into out refuses at once; each run locks its own directory
        from .engine import pick_device

        device = str(pick_device(base.device))
        results = []
        for method in methods:
            for seed in seeds:
                cfg = dataclasses.replace(base, method=method, seed=seed, output_dir=str(out / f"{method}-s{seed}"),
                                          targets=list(base.targets), dataset_options=dict(base.dataset_options),
                                          task_options=dict(base.task_options))
                results.append(train_and_report(method, cfg, isolate, progress, scores=None if mmlu is None else (
                    lambda c: {"mmlu": mmlu_for(Path(c.output_dir), base.model, out, mmlu, base.cache_dir, device)})))
        base_mmlu = mmlu_for(None, base.model, out, mmlu, base.cache_dir, device) if mmlu is not None else None
        rows = aggregate(base.task, results, mmlu is not None)
        first = results[0]
        extra = {"model": first["model"] + (" (NOT PRETRAINED: random weights)" if first.get("pretrained") is False
                                            else ""), "task": base.task, "steps": first["steps"], "mmlu": mmlu or None}
        lines = [f"- examples: {first['examples']}, optimizer steps per run: {first['steps']}"]
        runs = [{k: r.get(k) for k in ("name", "method", "config", "dev", "test", "train_time_s", "peak_rss_mb",
                                       "best_epoch", "mmlu", "parameters")} for r in results]
        key, title, _ = COLUMNS[base.task][0]
        return write_comparison(
            out, first, command, f"torch threads {first['environment'].get('torch_threads')}", f" ({base.task})", extra,
            lines + ([f"- MMLU: {mmlu}"] if mmlu else []), markdown_table(base.task, rows, mmlu is not None, base_mmlu),
            {"rows": rows, "base_mmlu": base_mmlu, "runs": runs},
            lambda path: plot_comparison(rows, path, [r["values"][key]["all"] for r in rows], title,
                                         size_label="trained parameters (log)"))
