"""Causal language-model tasks: (prompt, target) pairs -> token ids whose prompt part is masked.

A causal-LM example is the concatenation ``prompt_ids + target_ids``; the labels equal the ids on
the target and ``IGNORE_INDEX`` (-100) on the prompt, so the loss is the negative log-likelihood
of the target given the prompt and the model is never trained to reproduce the prompt:

    input_ids  = [p_1 .. p_m, t_1 .. t_n]
    labels     = [-100 .. -100, t_1 .. t_n]
    loss       = - sum_j log P(t_j | p, t_<j) / (number of target tokens)      (token-level mean)

Prompt and target are tokenized separately and joined as ids, so the boundary between them is
exact whatever the tokenizer's merges would do across it.

Subclasses (``E2ETask`` in ``generation.py``, ``InstructionTask`` in ``instructions.py``) say how
an example becomes a prompt and a target (``format``) and what they measure beyond the loss
(``split_metrics``). They implement the task contract (``base.Task``) with ``step_weight`` = the
number of target tokens in a step, so a step's loss is the mean over its target tokens whatever
the micro-batching.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .base import ONE_PROCESS, Processes, Task, logits_of
from .common import select_examples

IGNORE_INDEX = -100


@dataclass
class LMSplit:
    """One split, tokenized: unpadded ids, labels (-100 on prompt tokens) and the source examples."""

    name: str
    input_ids: list[list[int]]
    labels: list[list[int]]
    examples: list[dict] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_tokens(self) -> int:
        return sum(len(ids) for ids in self.input_ids)

    def target_tokens(self, index: int) -> int:
        """Tokens of example ``index`` that carry a loss (position 0 never does: nothing predicts it)."""
        return sum(1 for t in self.labels[index][1:] if t != IGNORE_INDEX)


def join_prompt_target(prompt_ids: Sequence[int], target_ids: Sequence[int], max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of ``prompt + target`` cut to ``max_length`` tokens.

    When the pair is too long the target keeps at least half the budget (it is what is learned);
    the prompt loses tokens from its start, since its end (the cue right before the target) matters
    most, and the target loses tokens from its end.
    """
    prompt_ids, target_ids = list(prompt_ids), list(target_ids)
    if not target_ids:
        raise ValueError("the target is empty: an example needs at least one target token to learn from")
    if len(prompt_ids) + len(target_ids) > max_length:
        target_budget = max(max_length - len(prompt_ids), min(len(target_ids), max_length // 2))
        target_ids = target_ids[:target_budget]
        keep = max_length - len(target_ids)
        prompt_ids = prompt_ids[len(prompt_ids) - keep :] if keep > 0 else []
    ids = prompt_ids + target_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + target_ids
    return ids, labels


def pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, or its end-of-sequence id (GPT-2 and LLaMA have no pad token).

    Padding positions are masked out of attention and loss, so any id serves.
    """
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError("the tokenizer has neither a pad nor an end-of-sequence token; set tokenizer.pad_token")


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id rows left-padded with ``pad`` to the longest: generation's layout."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for j, row in enumerate(rows):
        if len(row):
            input_ids[j, width - len(row):] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[j, width - len(row):] = 1
    return input_ids, attention_mask


def shifted_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position NLL of the next token and the mask of positions that count.

    Args:
        logits: (batch, seq, vocab), position i predicts token i + 1.
        labels: (batch, seq) with IGNORE_INDEX where no loss is taken.
    Returns:
        (nll, mask), both (batch, seq - 1); nll is 0 where mask is False.
    """
    logits = logits[:, :-1, :].float()
    target = labels[:, 1:]
    mask = target.ne(IGNORE_INDEX)
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=IGNORE_INDEX,
                          reduction="none").view_as(target)
    return nll, mask


class CausalLMTask(Task):
    """Base of the generation tasks: encoding with prompt masking, padding, token-level loss.

    Args:
        data: a ``TaskData`` whose splits hold examples that ``format`` understands.
        tokenizer: a Hugging Face tokenizer of the causal LM.
        max_length: prompt + target are cut to this many tokens (see ``join_prompt_target``).
    """

    name = "causal-lm"  # the --task name
    task_type = "causal-lm"
    primary_metric = "loss"
    greater_is_better = False
    num_labels = None
    model_task = "causal-lm"  # what sources.load_model must build for this task

    def __init__(self, data: Any, tokenizer: Any, max_length: int = 128):
        if max_length < 8:
            raise ValueError(f"max_length={max_length} is too short for a prompt and a target; use e.g. 128")
        for split in ("train", "dev"):
            if not data.splits.get(split):
                have = sorted(k for k, v in data.splits.items() if v)
                raise ValueError(
                    f"dataset {data.name!r} has no {split!r} examples (splits with examples: {have}); "
                    "training needs 'train' and 'dev'"
                )
        self.data = data
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_token_id = pad_id(tokenizer)
        self.label_names: list[str] = []

    # --- subclasses -----------------------------------------------------------------------------
    def format(self, example: dict) -> tuple[list[int], list[int]]:
        """(prompt ids, target ids) of one example."""
        raise NotImplementedError

    def run_info(self) -> dict[str, Any]:
        """What a saved run must remember to rebuild this task (written to run_info.json)."""
        return {"task": self.name, "max_length": self.max_length}

    # --- data -> tensors ---------------------------------------------------------------------------
    def eos_ids(self) -> list[int]:
        eos = self.tokenizer.eos_token_id
        return [] if eos is None else [int(eos)]

    def encode(self, split: str, limit: int | None = None) -> LMSplit:
        """Tokenize split ``split`` (its first ``limit`` examples if given), without padding."""
        examples = select_examples(self.data, split, limit, self.splits)
        ids, labels = [], []
        for i, ex in enumerate(examples):
            try:
                prompt, target = self.format(ex)
            except KeyError as e:
                raise ValueError(
                    f"example {i} of split {split!r} of {self.data.name!r} lacks field {e} (fields: {sorted(ex)})"
                ) from None
            x, y = join_prompt_target(prompt, target, self.max_length)
            ids.append(x)
            labels.append(y)
        return LMSplit(split, ids, labels, list(examples))

    def collate(self, split: LMSplit, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Batch examples ``indices``: pad right to the longest; padding gets label -100 and mask 0."""
        rows = [split.input_ids[i] for i in indices]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(indices):
            n = len(split.input_ids[i])
            input_ids[j, :n] = torch.tensor(split.input_ids[i], dtype=torch.long)
            labels[j, :n] = torch.tensor(split.labels[i], dtype=torch.long)
            attention_mask[j, :n] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch without labels: the loss is computed here (prompt-masked), not inside the model."""
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    # --- loss and evaluation --------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """Next-token NLL over target tokens: their sum, or their mean (``reduction="mean"``)."""
        nll, mask = shifted_token_losses(logits, labels)
        total = nll.sum()
        if reduction == "sum":
            return total
        if reduction == "mean":
            return total / mask.sum().clamp(min=1)
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")

    def step_weight(self, split: LMSplit, indices: Sequence[int]) -> int:
        """Target tokens in examples ``indices``: the loop divides a step's summed loss by this."""
        return max(1, sum(split.target_tokens(i) for i in indices))

    @torch.no_grad()
    def example_losses(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                       device: str | torch.device = "cpu") -> dict[str, list]:
        """Teacher-forced per-example sums over target tokens: ``nll``, ``tokens``, ``correct``.

        ``correct`` counts target tokens that are the argmax of the model's next-token distribution.
        Examples are batched by length (little padding); the lists are in the split's order.
        """
        was_training = model.training
        model.eval()
        n = len(split)
        nll_sum, tokens, correct = [0.0] * n, [0] * n, [0] * n
        order = sorted(range(n), key=lambda i: len(split.input_ids[i]))
        for start in range(0, n, batch_size):
            indices = order[start : start + batch_size]
            batch = {k: v.to(device) for k, v in self.collate(split, indices).items()}
            logits = logits_of(model, self.model_inputs(batch))
            nll, mask = shifted_token_losses(logits, batch["labels"])
            hit = logits[:, :-1, :].argmax(-1).eq(batch["labels"][:, 1:]) & mask
            for j, i in enumerate(indices):
                nll_sum[i] = nll[j].sum().item()
                tokens[i] = int(mask[j].sum().item())
                correct[i] = int(hit[j].sum().item())
        model.train(was_training)
        return {"nll": nll_sum, "tokens": tokens, "correct": correct}

    @staticmethod
    def summarize_losses(losses: dict[str, list]) -> dict[str, float]:
        """``loss`` = mean NLL per target token (nats), its ``perplexity``, ``token_accuracy`` and
        ``sequence_loss`` = the mean over examples of each example's mean token NLL."""
        tokens = sum(losses["tokens"])
        loss = sum(losses["nll"]) / max(1, tokens)
        per_example = [s / t for s, t in zip(losses["nll"], losses["tokens"]) if t > 0]
        return {
            "loss": loss,
            "perplexity": math.exp(min(loss, 50.0)),
            "token_accuracy": sum(losses["correct"]) / max(1, tokens),
            "sequence_loss": sum(per_example) / max(1, len(per_example)),
            "target_tokens": tokens,
        }

    def loss_metrics(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                     device: str | torch.device = "cpu") -> dict[str, float]:
        """Teacher-forced metrics over the target tokens of ``split`` (see ``summarize_losses``)."""
        return self.summarize_losses(self.example_losses(model, split, batch_size, device))

    def evaluate(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                 device: str | torch.device = "cpu", processes: Processes = ONE_PROCESS) -> dict[str, Any]:
        """Metrics of ``model`` on ``split`` (``split_metrics``). Decoding does not split by rows, so
        with several ``processes`` each scores the whole split and rank 0's metrics are returned."""
        return processes.from_main(self.split_metrics(model, split, batch_size, device))

    def split_metrics(self, model: torch.nn.Module, split: LMSplit, batch_size: int = 16,
                      device: str | torch.device = "cpu") -> dict[str, Any]:
        """Metrics of ``model`` on ``split``; the base task reports the teacher-forced loss metrics."""
        return self.loss_metrics(model, split, batch_size, device)
