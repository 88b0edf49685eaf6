"""Evaluation: one pass over a split without gradients, and reloading a finished run's model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tasks import ClassificationTask, EncodedSplit

RUN_INFO = "run_info.json"  # written beside the adapter: what base model and data it was trained on
EVAL_BATCH_SIZE = 64  # eval's batch size when neither the command nor run_info.json gives one


def model_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a transformers model (``.logits``) or of a plain module returning a tensor."""
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def evaluate(
    model: nn.Module, task: ClassificationTask, split: EncodedSplit, batch_size: int = 64, device: str | torch.device = "cpu",
    processes: Any = None,
) -> dict[str, float]:
    """Metrics and mean loss of ``model`` on ``split``; ``examples``: how many were scored.

    Examples are batched in order of length so batches carry little padding; the metrics do not
    depend on the order. The model's train/eval mode is restored afterwards.

    ``processes`` (the run's ``Accelerator``) with several processes: process r scores every r-th
    example of the length order (so all get similar lengths), the predictions, labels and losses
    of all are gathered and every process computes the same metrics on the whole split, each
    example counted once (checked). Every process runs the same number of batches (one with no
    examples left repeats an example and drops its result), since a sharded model's forward needs
    all of them. A task that evaluates itself (generation) is run whole by every process, and
    rank 0's metrics are returned everywhere.
    """
    world = getattr(processes, "num_processes", 1)
    if hasattr(task, "evaluate"):  # generation tasks decode and score in their own way
        metrics = task.evaluate(model, split, batch_size, device)
        if world > 1:
            from .distributed import from_main

            metrics = from_main(processes, metrics)
        return metrics
    was_training = model.training
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    rank = processes.process_index if world > 1 else 0
    positions = list(range(rank, len(order), world))  # this process's places in the length order
    batches = math.ceil(math.ceil(len(order) / world) / batch_size)  # rank 0's count: the most
    scored, batch_losses = [], []
    for b in range(batches):
        mine = positions[b * batch_size : (b + 1) * batch_size]
        indices = [order[q] for q in mine] or order[:1]
        batch = {k: v.to(device) for k, v in task.collate(split, indices).items()}
        logits = model_logits(model, task.model_inputs(batch))
        if not mine:  # only there so that every process runs every forward
            continue
        batch_losses.append(task.loss(logits, batch["labels"], reduction="sum").item())
        scored.extend(zip(mine, task.predict(logits)))
    model.train(was_training)
    if world > 1:
        from .distributed import gather_list

        scored = sorted(gather_list(processes, scored))
        batch_losses = gather_list(processes, batch_losses)
        if [q for q, _ in scored] != list(range(len(order))):
            raise RuntimeError(f"evaluation gathered {len(scored)} predictions for {len(order)} examples "
                               "(some scored twice or not at all)")
    predictions = [p for _, p in scored]
    labels = [split.labels[order[q]] for q, _ in scored]
    metrics = task.metrics(predictions, labels)
    metrics["loss"] = sum(batch_losses) / max(1, len(labels))
    metrics["examples"] = len(labels)
    return metrics


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


def eval_settings(info: dict[str, Any], split: str, batch_size: int | None = None, max_examples: int | None = None,
                  own_data: bool = True) -> tuple[int, int | None]:
    """Batch size and example cap for re-scoring a run on ``split``: (batch_size, max_examples).

    Values given (not None) win; otherwise the run's own, from run_info.json: its
    ``eval_batch_size``, and on its own data set's (``own_data``) dev / test its
    ``max_eval_examples``, so the scores equal those the run logged. A run_info.json written
    before these were recorded gives 64 and all examples.
    """
    if batch_size is None:
        batch_size = info.get("eval_batch_size") or EVAL_BATCH_SIZE
    if max_examples is None and own_data and split in ("dev", "test"):
        max_examples = info.get("max_eval_examples")
    return batch_size, max_examples


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
