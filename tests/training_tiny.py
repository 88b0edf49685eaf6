"""Tiny in-memory data and a tiny random BERT with a real tokenizer, for the training and CLI tests.

The task is learnable: a sentence containing a positive word is label 1, a negative word label 0,
mixed with neutral filler words.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

POSITIVE = ["good", "great", "fine", "lovely", "superb"]
NEGATIVE = ["bad", "awful", "poor", "dull", "boring"]
FILLER = ["the", "movie", "film", "was", "a", "plot", "actor", "story", "very", "quite", "and", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass
class TinyTaskData:
    """Same fields as sharelora.sources.TaskData."""

    name: str
    task_type: str
    splits: dict[str, list[dict]]
    label_names: list[str]
    text_fields: tuple[str, ...] = ("text",)
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TinyBundle:
    """Same fields as sharelora.sources.ModelBundle."""

    model: Any
    tokenizer: Any
    name: str = "tiny-bert"
    pretrained: bool = False
    info: dict[str, Any] = field(default_factory=dict)


def sentence(rng: random.Random, label: int) -> str:
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
    return " ".join(words)


def tiny_data(n_train=48, n_dev=16, n_test=16, seed=0, regression=False, pairs=False) -> TinyTaskData:
    rng = random.Random(seed)

    def make(n):
        out = []
        for i in range(n):
            label = i % 2
            ex = {"text": sentence(rng, label), "label": float(label) * 5.0 if regression else label}
            if pairs:
                ex["text_pair"] = " ".join(rng.choice(FILLER) for _ in range(4))
            out.append(ex)
        return out

    splits = {"train": make(n_train), "dev": make(n_dev), "test": make(n_test)}
    return TinyTaskData(
        name="tiny-sentiment", task_type="regression" if regression else "classification",
        splits=splits, label_names=[] if regression else ["negative", "positive"],
        text_fields=("text", "text_pair") if pairs else ("text",),
    )


def write_vocab(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "vocab.txt"
    path.write_text("\n".join(SPECIAL + POSITIVE + NEGATIVE + FILLER) + "\n", encoding="utf-8")
    return path


def tiny_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab_file=str(write_vocab(directory)), do_lower_case=True)


def tiny_bert(num_labels=2, layers=2, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=len(SPECIAL + POSITIVE + NEGATIVE + FILLER), hidden_size=32, num_hidden_layers=layers,
        num_attention_heads=4, intermediate_size=48, max_position_embeddings=64, num_labels=num_labels,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(cfg)


def tiny_bundle(tmp_path: Path, num_labels=2, seed=0) -> TinyBundle:
    return TinyBundle(tiny_bert(num_labels, seed=seed), tiny_tokenizer(tmp_path / "tok"))


def save_tiny_model_dir(directory: Path, num_labels=2) -> Path:
    """A local model directory (config, weights, tokenizer) that the CLI can load by path."""
    model = tiny_bert(num_labels)
    tok = tiny_tokenizer(directory)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def write_csv(path: Path, examples: list[dict], text="text", label="label") -> Path:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([text, label])
        for ex in examples:
            w.writerow([ex["text"], ex["label"]])
    return path


def self_killing_cli(module: str) -> str:
    """Python source for ``python -c SRC KILL_AT ARGS...``: runs ``sharelora ARGS`` and SIGKILLs its own process
    (under torchrun: rank 0's alone; torchrun then stops the others) just before the forward of micro-batch
    number KILL_AT, counted from 1 over the run: a kill -9 at an exact point. ``module``: the
    ``sharelora.training`` module whose ``model_logits`` the run calls ("loop" for train, "multitask")."""
    return rf"""
import os, signal, sys
from sharelora.training import {module} as trained
from sharelora.cli import main

kill_at, calls = int(sys.argv[1]), 0
forward = trained.model_logits

def counted(model, inputs):
    global calls
    calls += 1
    if calls == kill_at and os.environ.get("RANK", "0") == "0":
        os.kill(os.getpid(), signal.SIGKILL)
    return forward(model, inputs)

trained.model_logits = counted
sys.exit(main(sys.argv[2:]))
"""
