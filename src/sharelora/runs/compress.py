"""``compress_runs``: existing classification adapters -> one multi-task directory with a shared A.

    compress_runs("runs/compressed", {"rt": "runs/lora-rt", "vc": "runs/lora-vc"}, rank=16)

Each input is a ``sharelora train`` run (its run directory or adapter/; any adapter method but
HydraLoRA), a PEFT LoRA directory, or one task of a multi-task directory (``sharelora multitask``
or an earlier ``compress``) written ``DIR:TASK``: that task's adapter and its block of the head. The updates are fitted by ``method.compress`` (SPEC.md,
"Compression"): one A per module type shared by every task and layer, a B per task (and layer,
``share="A"``; or per module type, ``share="AB"``). With ``task_core="matrix"`` (or "diagonal") B is
shared by the tasks too and each task keeps a k x k core per module (``task_share="AB"``). Each task
keeps its own classification head.

The output directory is laid out as a ``sharelora multitask`` run: ``adapter/`` is a multi-task
adapter directory (the multi-adapter format plus a run_info.json naming each task's data set,
label count and outputs), written whole or not at all,
so ``sharelora eval OUT --adapter NAME`` scores a task on its own data and ``sharelora export-peft
OUT --adapter NAME DIR`` writes it as PEFT LoRA. Tasks with different label counts share one base
whose classifier has max_t n_t outputs; task t reads the first n_t (its head's other rows are zero).
``compression.json`` beside it holds the per-task, per-module update errors.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from ..training.engine import RunExistsError, save_with_run_info
from ..training.evaluate import RUN_INFO, read_run_info
from ..training.lock import output_dir_lock
from ..training.state import atomic_write_text
from .export import task_rows

REPORT = "compression.json"
NAME = re.compile(r"[A-Za-z0-9_-]+")


def _peft_source(d: Path, model: str | None) -> dict[str, Any]:
    """What a PEFT LoRA directory says of its base and head (it names no data set)."""
    from safetensors import safe_open

    from ..method.checkpoint import read_json

    cfg = read_json(d / "adapter_config.json")
    if str(cfg.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{d} is a PEFT {cfg.get('peft_type')} adapter; compress reads LoRA adapters "
                         "(PEFT LoRA or sharelora)")
    base = model or cfg.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{d}'s adapter_config.json names no base model; pass --model")
    weights = d / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{d} has no adapter_model.safetensors (PEFT's safetensors weights); resave it with "
                         "save_pretrained(safe_serialization=True)")
    with safe_open(str(weights), "pt") as f:  # the classifier's rows: the smallest first dim of the saved head
        heads = [f.get_slice(k).get_shape() for k in f.keys() if "lora_" not in k and k.endswith(".weight")]
    heads = [s for s in heads if len(s) == 2]
    if not cfg.get("modules_to_save") or not heads:
        raise ValueError(f"{d} saves no classification head (modules_to_save); compress combines classification "
                         "adapters, each with its head")
    return {"model": base, "num_labels": min(s[0] for s in heads), "dataset": None, "dataset_options": {},
            "label_names": None, "max_length": None, "eval_batch_size": None, "max_eval_examples": None,
            "adapter_dir": str(d), "kind": "peft", "label": str(d)}


def split_task(spec: str | Path) -> tuple[Path, str | None]:
    """``DIR`` or ``DIR:TASK`` (one task of a multi-task directory) -> (directory, task or None)."""
    text = str(spec)
    head, sep, task = text.rpartition(":")
    if sep and head and task and not Path(text).exists() and NAME.fullmatch(task):
        return Path(head), task
    return Path(text), None


def _multitask_source(d: Path, info: dict[str, Any], task: str | None, model: str | None) -> dict[str, Any]:
    """One task of a ``sharelora multitask`` / ``compress`` directory: its adapter and its block of the head."""
    tasks = info["tasks"]
    if task is None:
        raise ValueError(f"{d} is a multi-task directory; name one of its tasks as DIR:TASK (its tasks: "
                         f"{', '.join(tasks)})")
    if task not in tasks:
        raise ValueError(f"{d} has no task {task!r}; its tasks: {', '.join(tasks)}")
    if info.get("quantize") or info.get("bf16"):
        raise ValueError(f"{d} was trained on a bf16 / quantized base; compress reads adapters of a float32 base")
    if model is not None and model != info["model"]:
        raise ValueError(f"{d} was trained on {info['model']!r}, not --model {model!r}")
    t = tasks[task]
    return {**{k: info.get(k) for k in ("model", "max_length", "eval_batch_size", "max_eval_examples")},
            "num_labels": t["num_labels"], "dataset": t.get("dataset"),
            "dataset_options": t.get("dataset_options") or {}, "label_names": t.get("label_names"),
            "adapter_dir": info["adapter_dir"], "kind": "multitask", "adapter": t["adapter"],
            "source_labels": info["num_labels"], "logits": tuple(t["logits"]), "label": f"{info['adapter_dir']}:{task}"}


def _source(directory: str | Path, model: str | None) -> dict[str, Any]:
    d, task = split_task(directory)
    if not d.is_dir():
        raise ValueError(f"adapter directory {d} does not exist")
    if (d / "adapter_config.json").is_file() and not (d / RUN_INFO).is_file():
        return _peft_source(d, model)
    try:
        info = read_run_info(d)
    except FileNotFoundError:
        raise ValueError(f"{d} is neither a sharelora run (runs/<name> or its adapter/, with {RUN_INFO}) nor a PEFT "
                         "LoRA directory (adapter_config.json)") from None
    if info.get("tasks"):
        return _multitask_source(d, info, task, model)
    if task is not None:
        raise ValueError(f"{d}:{task} names a task, but {d} is a single-task run; pass {d}")
    method = str(info.get("method"))
    if method == "full" or method.startswith("peft-"):
        raise ValueError(f"{d} was trained with --method {method}; compress reads LoRA-type adapters "
                         "(lora, sharea, shareb, shareab or a PEFT LoRA directory)")
    if info.get("task_type", "classification") != "classification" or info.get("model_task",
                                                                               "classification") != "classification":
        raise ValueError(f"{d} is a {info.get('task_type')} run; compress combines classification adapters")
    if info.get("quantize") or info.get("bf16"):
        raise ValueError(f"{d} was trained on a bf16 / quantized base; compress reads adapters of a float32 base")
    if model is not None and model != info["model"]:
        raise ValueError(f"{d} was trained on {info['model']!r}, not --model {model!r}")
    return {**{k: info.get(k) for k in ("model", "num_labels", "dataset", "label_names", "max_length",
                                        "eval_batch_size", "max_eval_examples")},
            "dataset_options": info.get("dataset_options") or {}, "adapter_dir": info["adapter_dir"],
            "kind": "sharelora", "label": info["adapter_dir"]}


def _fit_heads(heads: dict[str, dict[str, torch.Tensor]], base: torch.nn.Module, task: str) -> dict:
    """Each head tensor padded with zero rows to the shared base's classifier (task t reads its first n_t)."""
    out = {}
    for path, state in heads.items():
        target = base.get_submodule(path).state_dict()
        fitted = {}
        for k, v in state.items():
            want = target[k].shape
            if v.shape != want:
                if v.ndim != len(want) or v.shape[1:] != want[1:] or v.shape[0] > want[0]:
                    raise ValueError(f"task {task!r}: its head {path}.{k} has shape {tuple(v.shape)}, which does not "
                                     f"fit the shared base's {tuple(want)}; were the adapters trained on one model?")
                v = torch.cat([v, v.new_zeros((want[0] - v.shape[0], *v.shape[1:]))])
            fitted[k] = v
        out[path] = fitted
    return out


def _one(values: list, what: str, notes: list[str]):
    """The value all tasks agree on; else the largest (noted)."""
    known = [v for v in values if v is not None]
    if not known:
        return None
    if len(set(known)) > 1:
        notes.append(f"the adapters were trained with different {what} {sorted(set(known))}; the compressed "
                     f"directory uses {max(known)} for every task")
    return max(known)


def compress_runs(out_dir: str | Path, adapters: dict[str, str | Path], rank: int, share: str = "A",
                  across_layers: bool = True, basis: str = "update", model: str | None = None,
                  cache_dir: str | None = None, overwrite: bool = False, task_core: str = "none") -> dict[str, Any]:
    """Compress classification adapters into one multi-task directory; return the report (also compression.json).

    Args:
        out_dir: the directory to write (refused if it exists, unless ``overwrite``).
        adapters: {task name: run directory, adapter/ directory or PEFT LoRA directory}.
        rank, share, across_layers, basis, task_core: as ``sharelora.compress_adapters``.
        model: the base model (needed for a PEFT directory that names none; must match the runs').
    """
    from ..method.compress import _check_options, adapter_updates, compress_updates
    from ..sources import load_model

    if not adapters:
        raise ValueError("name at least one adapter: NAME=DIR")
    for name in adapters:
        if not NAME.fullmatch(name):
            raise ValueError(f"task name {name!r}: use letters, digits, '-' or '_' (NAME=DIR)")
    _check_options(rank, share, across_layers, basis, task_core)
    out = Path(out_dir)
    sources = {name: _source(d, model) for name, d in adapters.items()}
    models = sorted({s["model"] for s in sources.values()})
    if len(models) > 1:
        raise ValueError(f"the adapters were trained on different models {models}; compress adapters of one base")
    base_name = models[0]
    with output_dir_lock(out):
        if (out / "adapter").exists() or (out / REPORT).exists():
            if not overwrite:
                raise RunExistsError(f"{out} holds a compressed adapter; choose another directory or pass "
                                      "--overwrite")
        read = {}
        for name, s in sources.items():
            base = load_model(base_name, task="classification", num_labels=s.get("source_labels", s["num_labels"]),
                              cache_dir=cache_dir, report_new_weights=False).model
            updates, heads = adapter_updates(base, s["adapter_dir"], adapter_name=s.get("adapter"))
            if "logits" in s:  # one task of a multi-task head: its own rows
                heads = {path: task_rows(state, s["source_labels"], s["logits"]) for path, state in heads.items()}
            read[name] = (updates, heads)
            del base
        n_max = max(s["num_labels"] for s in sources.values())
        torch.manual_seed(0)
        shared_base = load_model(base_name, task="classification", num_labels=n_max, cache_dir=cache_dir,
                                 report_new_weights=False).model
        read = {n: (upd, _fit_heads(heads, shared_base, n)) for n, (upd, heads) in read.items()}
        compressed, report = compress_updates(shared_base, read, rank, share=share, across_layers=across_layers,
                                              basis=basis, task_core=task_core)
        notes: list[str] = []
        info = {
            "model": base_name, "method": "compressed", "multitask": True, "layout": "per-task",
            "task_type": "classification", "model_task": "classification", "num_labels": n_max,
            "max_length": _one([s["max_length"] for s in sources.values()], "max_length", notes) or 128,
            "eval_batch_size": _one([s["eval_batch_size"] for s in sources.values()], "eval_batch_size", notes),
            "max_eval_examples": _one([s["max_eval_examples"] for s in sources.values()], "max_eval_examples", notes),
            "tasks": {n: {"dataset": s["dataset"], "dataset_options": s["dataset_options"], "adapter": n,
                          "logits": [0, s["num_labels"]], "num_labels": s["num_labels"],
                          "label_names": s["label_names"]} for n, s in sources.items()},
            "compression": {"rank": rank, "share": share, "across_layers": across_layers, "basis": basis,
                            "task_core": task_core,
                            "sources": {n: s["label"] for n, s in sources.items()}},
        }
        report.update(sources={n: s["label"] for n, s in sources.items()}, notes=notes)
        save_with_run_info(compressed, out / "adapter", info)
        atomic_write_text(out / REPORT, json.dumps(report, indent=2, sort_keys=True) + "\n")
    return report
