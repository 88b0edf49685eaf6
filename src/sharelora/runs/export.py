"""A multi-task run's tasks as standard PEFT LoRA directories (`sharelora export-peft RUN --adapter NAME`)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..training.evaluate import read_run_info
from .evaluate import chosen_tasks


def task_rows(tensors: dict[str, torch.Tensor], outputs: int, logits: tuple[int, int]) -> dict[str, torch.Tensor]:
    """Head tensors cut to one task's rows ``logits`` of a multi-task classifier with ``outputs`` outputs.

    Every tensor whose first dimension is the classifier's width (its output layer's weight and
    bias) keeps rows start..end; the others are the task's as they are.
    """
    start, end = logits
    return {k: v[start:end].clone() if v.ndim >= 1 and v.shape[0] == outputs else v for k, v in tensors.items()}


def export_tasks_peft(adapter_dir: str | Path, out_dir: str | Path, names: list[str] | None = None,
                      cache_dir: str | None = None) -> dict[str, Path]:
    """Write tasks of a multi-task adapter directory as standard PEFT LoRA directories: {task: directory}.

    One task is written at ``out_dir``; several (``names`` None = all) in ``out_dir/<task>/``. Each
    head keeps only the task's own outputs, so the PEFT adapter loads into the base model built with
    the task's number of labels. HydraLoRA adapters cannot be exported (their update depends on x).
    """
    from ..method.checkpoint import read_safetensors, save_tensors
    from ..method.peft_io import PEFT_PREFIX, PEFT_WEIGHTS
    from ..training.evaluate import load_trained_model

    info = read_run_info(adapter_dir)
    chosen = chosen_tasks(info, names)
    model, _, info = load_trained_model(adapter_dir, cache_dir=cache_dir)
    out = Path(out_dir)
    written = {}
    for n in chosen:
        t = info["tasks"][n]
        target = out if len(chosen) == 1 else out / n
        model.export_peft(target, adapter_name=t["adapter"])
        start, end = t["logits"]
        if (start, end) != (0, info["num_labels"]):  # the head's rows of this task alone
            heads = [f"{PEFT_PREFIX}{p}." for p in model.saved_module_names(t["adapter"])]
            tensors, meta = read_safetensors(target / PEFT_WEIGHTS)
            head = task_rows({k: v for k, v in tensors.items() if any(k.startswith(h) for h in heads)},
                             info["num_labels"], (start, end))
            save_tensors(target / PEFT_WEIGHTS, {**tensors, **head}, meta)
        written[n] = target
    return written
