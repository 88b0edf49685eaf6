"""The task contract: everything the training engine and evaluation ask of a task.

A task turns a data set into batches, a model's logits into a loss and predictions, and a split
into metrics. The engine (``sharelora.training.engine``) calls only what ``Task`` declares:

    encode(split, limit)               -> a tokenized split (ids kept unpadded)
    collate(split, indices)            -> {"input_ids", "attention_mask", ..., "labels"}: one batch
    model_inputs(batch)                -> the keyword arguments of the model's forward (no labels)
    loss(logits, labels, "sum")        -> the summed loss of a batch
    step_weight(split, indices)        -> what a step's summed loss is divided by: its examples
                                          (classification) or target tokens (causal LM), so a step's
                                          loss is a mean whatever the micro-batching
    evaluate(model, split, ...)        -> metrics of a split (spread over ``processes`` if given)
    improves(value, best)              -> whether a dev metric beats the best so far
    run_info()                         -> what a saved run must record to rebuild the task

and reads ``name``, ``task_type``, ``model_task`` (what ``sources.load_model`` builds),
``primary_metric``, ``greater_is_better``, ``num_labels``, ``label_names`` and ``splits``.
``ClassificationTask`` (classification and regression), ``E2ETask`` and ``InstructionTask``
implement it; a multi-task run's ``TaskHead`` (one task's outputs of a shared classifier) too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar, Protocol

import torch
from torch import nn


class Processes(Protocol):
    """The processes an evaluation is spread over (``training.distributed.Processes`` is the run's)."""

    rank: int
    world: int

    def gather(self, items: list) -> list:
        """Every process's ``items``, concatenated in rank order."""

    def from_main(self, value: Any) -> Any:
        """Rank 0's ``value`` on every process."""


class OneProcess:
    """``Processes`` of a single process: gathering and broadcasting return what they are given."""

    rank, world = 0, 1

    def gather(self, items: list) -> list:
        return items

    def from_main(self, value: Any) -> Any:
        return value


ONE_PROCESS = OneProcess()


def logits_of(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Logits of a transformers model (``.logits``) or of a plain module returning a tensor."""
    out = model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


class Task(ABC):
    """What the training engine and evaluation call on a task (see the module docstring)."""

    name: ClassVar[str]  # the --task name
    model_task: ClassVar[str]  # what sources.load_model must build: "classification" | "causal-lm"
    greater_is_better: ClassVar[bool] = True
    task_type: str
    primary_metric: str
    num_labels: int | None
    label_names: list[str]
    data: Any

    @property
    def splits(self) -> list[str]:
        """The splits of the data set that hold examples, of train / dev / test."""
        return [name for name in ("train", "dev", "test") if self.data.splits.get(name)]

    @abstractmethod
    def encode(self, split: str, limit: int | None = None) -> Any:
        """Tokenize split ``split`` (its first ``limit`` examples if given), without padding."""

    @abstractmethod
    def collate(self, split: Any, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """One padded batch of examples ``indices`` of an encoded split, with its ``labels``."""

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The batch without labels: the loss is computed by the task, not inside the model."""
        return {k: v for k, v in batch.items() if k != "labels"}

    @abstractmethod
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The batch's loss, summed (``reduction="sum"``) or averaged."""

    def step_weight(self, split: Any, indices: Sequence[int]) -> float:
        """What a step's summed loss over examples ``indices`` is divided by: here their number."""
        return len(indices)

    @abstractmethod
    def evaluate(self, model: nn.Module, split: Any, batch_size: int = 64, device: str | torch.device = "cpu",
                 processes: Processes = ONE_PROCESS) -> dict[str, Any]:
        """Metrics of ``model`` on the encoded ``split`` (``examples``: how many were scored)."""

    def improves(self, value: float, best: float) -> bool:
        """Whether dev metric ``value`` beats ``best`` (higher accuracy / BLEU, lower loss)."""
        return value > best if self.greater_is_better else value < best

    def run_info(self) -> dict[str, Any]:
        """What a saved run must remember to rebuild this task (merged into run_info.json)."""
        return {}
