"""Sequence classification and regression: TaskData -> token batches -> logits -> metrics.

The task owns everything between the data source and the training loop:

- ``encode``: tokenize one split once (truncated to ``max_length``, not padded);
- ``collate``: pad a list of examples to the longest one in the batch (dynamic padding keeps CPU
  steps short: most Rotten Tomatoes sentences are far below 64 tokens);
- ``loss``: cross-entropy over ``num_labels`` classes, or mean squared error for regression
  (``num_labels == 1``, labels are floats, as STS-B);
- ``predict`` and ``metrics``: logits -> class ids or scores -> accuracy / F1 / MCC or
  Pearson / Spearman.

Examples are dicts ``{"text": str, "label": int}``, optionally with ``"text_pair"`` (sentence
pairs such as claim / evidence); a regression label is a float.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import ONE_PROCESS, Processes, Task, logits_of
from .common import select_examples
from .metrics import PRIMARY_METRIC, classification_metrics, regression_metrics

TASK_TYPES = ("classification", "regression")


@dataclass
class EncodedSplit:
    """One split, tokenized: unpadded token ids per example and the labels.

    ``token_type_ids`` is None for tokenizers that do not produce segment ids (RoBERTa, GPT-2).
    """

    name: str
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[Any]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)


def label_space(data: Any) -> tuple[list[str], int]:
    """(label names, number of model outputs) of a TaskData: one output for regression.

    A classification TaskData without label names gets names "0".."k-1" from its training labels.
    """
    if getattr(data, "task_type", "classification") == "regression":
        return list(getattr(data, "label_names", None) or []), 1
    names = list(getattr(data, "label_names", None) or [])
    if not names:
        seen = sorted({int(ex["label"]) for ex in data.splits.get("train", []) if "label" in ex})
        names = [str(i) for i in range(max(seen) + 1)] if seen else []
    if len(names) < 2:
        raise ValueError(f"dataset {data.name!r} has {len(names)} label(s) {names}; classification needs at least 2")
    return names, len(names)


class ClassificationTask(Task):
    """Sequence classification (or regression) over a ``TaskData`` with a given tokenizer.

    Args:
        data: a ``TaskData`` (``sharelora.sources``): ``task_type``, ``splits`` with "train",
            "dev" and usually "test", and ``label_names``.
        tokenizer: a Hugging Face tokenizer; it must have a pad token.
        max_length: examples are truncated to this many tokens (pairs: longest first).
    """

    name = "classification"
    model_task = "classification"

    def __init__(self, data: Any, tokenizer: Any, max_length: int = 64):
        task_type = getattr(data, "task_type", "classification")
        if task_type not in TASK_TYPES:
            raise ValueError(
                f"dataset {data.name!r} has task type {task_type!r}; the classification task handles {TASK_TYPES}"
            )
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too short to hold a sentence; use e.g. 64 or 128")
        for split in ("train", "dev"):
            if not data.splits.get(split):
                have = sorted(k for k, v in data.splits.items() if v)
                raise ValueError(
                    f"dataset {data.name!r} has no {split!r} examples (splits with examples: {have}); "
                    "training needs 'train' and 'dev' (dev selects the best checkpoint)"
                )
        if tokenizer.pad_token_id is None:
            raise ValueError(
                "the tokenizer has no pad token; set one before training (e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.task_type = task_type
        self.label_names, self.num_labels = label_space(data)
        self.primary_metric = PRIMARY_METRIC[task_type]

    # --- data -> tensors ---------------------------------------------------------------------
    def _label(self, example: dict, index: int, split: str) -> int | float:
        if "label" not in example:
            raise ValueError(
                f"example {index} of split {split!r} has no 'label' (fields: {sorted(example)}); "
                "for a local file, name the label column with --label-column"
            )
        value = example["label"]
        if self.task_type == "regression":
            return float(value)
        if isinstance(value, bool) or not isinstance(value, int) and not (
            isinstance(value, float) and value.is_integer()
        ):
            raise ValueError(
                f"example {index} of split {split!r} has label {value!r}; classification labels must be class ids "
                f"0..{self.num_labels - 1} ({self.label_names})"
            )
        value = int(value)
        if not 0 <= value < self.num_labels:
            raise ValueError(
                f"example {index} of split {split!r} has label {value}, outside 0..{self.num_labels - 1} "
                f"for label names {self.label_names}"
            )
        return value

    def encode(self, split: str, limit: int | None = None) -> EncodedSplit:
        """Tokenize split ``split`` (its first ``limit`` examples if given), without padding."""
        examples = select_examples(self.data, split, limit, self.splits)
        for i, ex in enumerate(examples):
            if not isinstance(ex.get("text"), str):
                raise ValueError(
                    f"example {i} of split {split!r} has no text string (fields: {sorted(ex)}); "
                    "for a local file, name the text column with --text-column"
                )
        labels = [self._label(ex, i, split) for i, ex in enumerate(examples)]
        texts = [ex["text"] for ex in examples]
        has_pair = any("text_pair" in ex for ex in examples)
        pairs = [ex.get("text_pair") or "" for ex in examples] if has_pair else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length)
        token_types = enc.get("token_type_ids")
        return EncodedSplit(split, list(enc["input_ids"]), list(token_types) if token_types is not None else None, labels)

    def collate(self, split: EncodedSplit, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Batch examples ``indices`` of ``split``: pad right to the longest, build the attention mask."""
        rows = [split.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
            attention_mask[j, : len(r)] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        if split.token_type_ids is not None:
            token_type_ids = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(indices):
                t = split.token_type_ids[i]
                token_type_ids[j, : len(t)] = torch.tensor(t, dtype=torch.long)
            batch["token_type_ids"] = token_type_ids
        label_dtype = torch.float32 if self.task_type == "regression" else torch.long
        batch["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=label_dtype)
        return batch

    # --- logits -> loss, predictions, metrics ---------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Cross-entropy over classes, or mean squared error of the single regression output."""
        if self.task_type == "regression":
            return F.mse_loss(logits.view(-1).float(), labels.float(), reduction=reduction)
        return F.cross_entropy(logits.float(), labels, reduction=reduction)

    def predict(self, logits: torch.Tensor) -> list:
        """Class ids (argmax) or regression scores, as Python numbers."""
        if self.task_type == "regression":
            return logits.view(-1).float().tolist()
        return logits.argmax(dim=-1).tolist()

    def metrics(self, predictions: Sequence, labels: Sequence) -> dict[str, float]:
        if self.task_type == "regression":
            return regression_metrics(predictions, labels)
        return classification_metrics(predictions, labels, self.num_labels)

    def evaluate(self, model: nn.Module, split: EncodedSplit, batch_size: int = 64,
                 device: str | torch.device = "cpu", processes: Processes = ONE_PROCESS) -> dict[str, float]:
        return score_split(self, model, split, batch_size, device, processes)


@torch.no_grad()
def score_split(task: Any, model: nn.Module, split: EncodedSplit, batch_size: int = 64,
                device: str | torch.device = "cpu", processes: Processes = ONE_PROCESS) -> dict[str, float]:
    """Metrics and mean loss of ``model`` on ``split`` through ``task``'s batches, loss, predictions and metrics.

    Examples are batched in order of length so batches carry little padding; the metrics do not
    depend on the order. The model's train/eval mode is restored afterwards. With several
    ``processes``, process r scores every r-th example of the length order (so all get similar
    lengths); predictions, labels and losses are gathered and every process computes the same
    metrics on the whole split, each example counted once (checked). Every process runs the same
    number of batches (one with no examples left repeats an example and drops its result), since
    a sharded model's forward needs all of them.
    """
    world, rank = processes.world, processes.rank
    was_training = model.training
    model.eval()
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    positions = list(range(rank, len(order), world))  # this process's places in the length order
    batches = math.ceil(math.ceil(len(order) / world) / batch_size)  # rank 0's count: the most
    scored, batch_losses = [], []
    for b in range(batches):
        mine = positions[b * batch_size : (b + 1) * batch_size]
        indices = [order[q] for q in mine] or order[:1]
        batch = {k: v.to(device) for k, v in task.collate(split, indices).items()}
        logits = logits_of(model, task.model_inputs(batch))
        if not mine:  # only there so that every process runs every forward
            continue
        batch_losses.append(task.loss(logits, batch["labels"], reduction="sum").item())
        scored.extend(zip(mine, task.predict(logits)))
    model.train(was_training)
    if world > 1:
        scored = sorted(processes.gather(scored))
        batch_losses = processes.gather(batch_losses)
        if [q for q, _ in scored] != list(range(len(order))):
            raise RuntimeError(f"evaluation gathered {len(scored)} predictions for {len(order)} examples "
                               "(some scored twice or not at all)")
    predictions = [p for _, p in scored]
    labels = [split.labels[order[q]] for q, _ in scored]
    metrics = task.metrics(predictions, labels)
    metrics["loss"] = sum(batch_losses) / max(1, len(labels))
    metrics["examples"] = len(labels)
    return metrics
