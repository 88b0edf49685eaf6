"""Evaluation: one pass over a split without gradients, and reloading a finished run's model."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tasks.base import ONE_PROCESS, Processes, Task
from ..tasks.base import logits_of as model_logits  # noqa: F401 (the logits of a forward, for the training loop)

RUN_INFO = "run_info.json"  # written beside the adapter: what base model and data it was trained on


def evaluate(model: nn.Module, task: Task, split: Any, batch_size: int = 64, device: str | torch.device = "cpu",
             processes: Processes = ONE_PROCESS) -> dict[str, Any]:
    """Metrics of ``model`` on the encoded ``split`` of ``task`` (``Task.evaluate``); ``examples``: how many
    were scored. ``processes``: the run's processes (``distributed.Processes``), which share the work."""
    return task.evaluate(model, split, batch_size, device, processes)


def read_run_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The run_info.json of a saved adapter (or of a run directory holding ``adapter/``)."""
    path = Path(adapter_dir)
    if (path / "adapter" / RUN_INFO).is_file():
        path = path / "adapter"
    info_path = path / RUN_INFO
    if not info_path.is_file():
        raise FileNotFoundError(
            f"{path} has no {RUN_INFO}; pass the adapter directory that `sharelora train` wrote "
            "(runs/<name>/adapter) or the run directory itself (runs/<name>)"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    info["adapter_dir"] = str(path)
    return info


def load_trained_model(adapter_dir: str | Path, cache_dir: str | None = None, device: str = "cpu") -> tuple[nn.Module, Any, dict]:
    """Rebuild a trained model from its adapter directory: (model, tokenizer, run info).

    For an adapter method this loads the base model named in run_info.json and attaches the
    adapter with ``ShareLoraModel.from_pretrained``; for full fine-tuning the directory is
    itself a complete model. The base model's new classification head is filled from the
    adapter (its ``modules_to_save``), so it is reported only if some of it stays random.
    A run trained with ``--bf16`` or ``--quantize`` is rebuilt the same way (bf16 / quantized
    base, bf16 autocast), so it computes what the run evaluated.
    """
    from ..sources import load_model
    from .memory import COMPUTE_DTYPES, autocast_bf16

    info = read_run_info(adapter_dir)
    path = info["adapter_dir"]
    task = info.get("model_task", "classification")  # "causal-lm" for the generation tasks
    num_labels = info["num_labels"] if task == "classification" else None
    if info["method"] == "full":
        bundle = load_model(path, task=task, num_labels=num_labels, cache_dir=cache_dir)
        model = bundle.model
    elif str(info["method"]).startswith("peft-"):  # PEFT's VeRA / VB-LoRA (peft_methods.py): PEFT loads its own
        import peft

        bundle = load_model(info["model"], task=task, num_labels=num_labels, cache_dir=cache_dir,
                            report_new_weights=False)
        model = peft.PeftModel.from_pretrained(bundle.model, path)
    else:
        from sharelora import ShareLoraModel
        from ..sources.models import new_weights_note

        memory = {}
        if info.get("bf16"):
            memory["dtype"] = torch.bfloat16
        if info.get("quantize"):
            memory["quantize"] = info["quantize"]
            if info.get("quantize_compute_dtype"):
                memory["quantize_compute_dtype"] = COMPUTE_DTYPES[info["quantize_compute_dtype"]]
        bundle = load_model(info["model"], task=task, num_labels=num_labels, cache_dir=cache_dir,
                            report_new_weights=False, **memory)
        model = ShareLoraModel.from_pretrained(bundle.model, path)
        still_random = [n for n in bundle.info.get("new_weights", [])
                        if not any(n.startswith(saved + ".") for saved in model.modules_to_save_names)]
        if still_random:
            print(f"sharelora: {info['model']}: {new_weights_note(bundle.model, still_random)}; the adapter {path} "
                  "does not hold them either, so they stay random", file=sys.stderr, flush=True)
    model.to(device).eval()
    if info.get("bf16"):
        autocast_bf16(model)
    return model, bundle.tokenizer, info
