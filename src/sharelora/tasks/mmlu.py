"""MMLU by the log-likelihood of the answer letter, 0-shot or k-shot (5 in the paper).

Each question is written in the format of the original MMLU evaluation:

    The following are multiple choice questions (with answers) about high school physics.

    <k solved examples of the same subject, from the few-shot pool ("dev" split), each as below
     followed by " <letter>" and a blank line>
    <question>
    A. <choice 0>
    B. <choice 1>
    C. <choice 2>
    D. <choice 3>
    Answer:

and the model's next-token distribution after "Answer:" is read at the tokens " A", " B", " C",
" D". The prediction is the most likely of the four letters. Reported, per subject and overall:

- ``accuracy``: per subject, then the macro average over subjects (MMLU's headline number) and
  the micro average over questions;
- ``answer_logprob``: mean log P(correct letter) under the full vocabulary, which moves even
  while a small model's accuracy sits at chance (25%);
- ``answer_logprob_norm``: mean log of the correct letter's probability renormalised over the
  four letters (log 0.25 = -1.386 is a model with no preference);
- ``letter_mass``: mean total probability on the four letters (does the model answer at all).

The k-shot prefix is the same for every question of a subject, so it is run once per subject and
its key/value cache is reused for each batch of questions (``use_prefix_cache``); the result is
the same as running every full prompt (a test checks this), at a fraction of the cost.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

LETTERS = ("A", "B", "C", "D")


def subject_title(subject: str) -> str:
    return subject.replace("_", " ").strip()


def answer_index(example: dict) -> int:
    """The correct choice as 0..3 from an int, a digit string or a letter."""
    a = example["answer"]
    if isinstance(a, str):
        s = a.strip().upper()
        if s in LETTERS:
            return LETTERS.index(s)
        if s.isdigit():
            a = int(s)
    if isinstance(a, int) and not isinstance(a, bool) and 0 <= a < len(LETTERS):
        return a
    raise ValueError(f"MMLU answer {example['answer']!r} is not one of 0-3 or A-D (question {example.get('question', '')[:60]!r})")


def format_question(example: dict, with_answer: bool = False) -> str:
    """One question block ending in "Answer:" (and " <letter>\\n\\n" for a solved example)."""
    choices = list(example["choices"])
    if len(choices) != len(LETTERS):
        raise ValueError(f"an MMLU question needs {len(LETTERS)} choices, got {len(choices)}: {choices}")
    lines = [example["question"].strip()] + [f"{L}. {str(c).strip()}" for L, c in zip(LETTERS, choices)]
    text = "\n".join(lines) + "\nAnswer:"
    if with_answer:
        text += f" {LETTERS[answer_index(example)]}\n\n"
    return text


def subject_prefix(subject: str, shots: Sequence[dict]) -> str:
    head = f"The following are multiple choice questions (with answers) about {subject_title(subject)}.\n\n"
    return head + "".join(format_question(s, with_answer=True) for s in shots)


def letter_token_ids(tokenizer: Any) -> list[int]:
    """Ids of " A" .. " D" (each must be a single token; "A" .. "D" are the fallback)."""
    for spelling in (" {}", "{}"):
        ids = [tokenizer(spelling.format(L), add_special_tokens=False)["input_ids"] for L in LETTERS]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == len(LETTERS):
            return [i[0] for i in ids]
    raise ValueError("the tokenizer splits the answer letters A-D into several tokens; MMLU scoring needs one token each")


@torch.no_grad()
def last_token_logprobs(model: torch.nn.Module, prefix: Sequence[int], suffixes: Sequence[Sequence[int]], *,
                        batch_size: int = 8, device: str | torch.device = "cpu",
                        use_prefix_cache: bool = True) -> torch.Tensor:
    """log P(next token | prefix + suffix_i) at the end of every suffix: a (n, vocab) float tensor.

    With ``use_prefix_cache`` the prefix is run once and its key/value cache is copied for each
    batch of suffixes (right-padded: the last real token of a row never sees its padding).
    """
    prefix = list(prefix)
    rows: list[torch.Tensor] = []
    cache = None
    if use_prefix_cache and prefix:
        out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
        cache = getattr(out, "past_key_values", None)
        if cache is None or not hasattr(cache, "batch_repeat_interleave"):
            cache = None  # the model keeps no usable cache: fall back to full prompts
    for start in range(0, len(suffixes), batch_size):
        chunk = [list(s) for s in suffixes[start : start + batch_size]]
        seqs = chunk if cache is not None else [prefix + s for s in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.zeros((len(seqs), width), dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, : len(s)] = 1
        kwargs: dict[str, Any] = {}
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(seqs))
            mask = torch.cat([torch.ones((len(seqs), len(prefix)), dtype=torch.long), mask], dim=1)
            kwargs["past_key_values"] = batch_cache
        out = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        logits = out.logits if hasattr(out, "logits") else out
        last = torch.tensor([len(s) - 1 for s in seqs], device=logits.device)
        picked = logits[torch.arange(len(seqs), device=logits.device), last].float()
        rows.append(torch.log_softmax(picked, dim=-1).cpu())
    return torch.cat(rows) if rows else torch.zeros((0, 0))


def select_questions(data: Any, *, split: str = "test", subjects: Sequence[str] | None = None,
                     max_per_subject: int | None = None) -> dict[str, list[dict]]:
    """Questions of ``split`` grouped by subject (sorted), optionally a subset of subjects / questions."""
    pool = data.splits.get(split) or []
    if not pool:
        raise ValueError(f"dataset {data.name!r} has no {split!r} questions")
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for q in pool:
        by_subject[q["subject"]].append(q)
    if subjects:
        unknown = sorted(set(subjects) - set(by_subject))
        if unknown:
            raise ValueError(f"unknown MMLU subject(s) {unknown}; known: {', '.join(sorted(by_subject))}")
        by_subject = {s: by_subject[s] for s in subjects}
    if max_per_subject is not None:
        if max_per_subject < 1:
            raise ValueError(f"max_per_subject must be >= 1, got {max_per_subject}")
        by_subject = {s: qs[:max_per_subject] for s, qs in by_subject.items()}
    return {s: by_subject[s] for s in sorted(by_subject)}


def evaluate_mmlu(model: torch.nn.Module, tokenizer: Any, data: Any, *, shots: int = 0, split: str = "test",
                  subjects: Sequence[str] | None = None, max_per_subject: int | None = None,
                  shot_split: str = "dev", batch_size: int = 8, device: str | torch.device = "cpu",
                  use_prefix_cache: bool = True, progress: bool = False) -> dict[str, Any]:
    """Score ``model`` on MMLU questions by the answer letter's log-likelihood.

    Args:
        data: a ``TaskData`` with ``{"question", "choices", "answer", "subject"}`` examples; its
            ``shot_split`` holds the few-shot pool (the first ``shots`` of the same subject are used).
        shots: solved examples before each question (0 or 5 in the paper).
        subjects, max_per_subject: evaluate a subset (CPU budgets); None means all.
    Returns:
        overall metrics (see the module docstring) and ``per_subject`` rows.
    """
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    questions = select_questions(data, split=split, subjects=subjects, max_per_subject=max_per_subject)
    shot_pool: dict[str, list[dict]] = defaultdict(list)
    if shots:
        for q in data.splits.get(shot_split) or []:
            shot_pool[q["subject"]].append(q)
    letters = letter_token_ids(tokenizer)
    was_training = model.training
    model.eval()
    per_subject: dict[str, dict[str, float]] = {}
    all_rows: list[tuple[bool, float, float, float]] = []
    from tqdm.auto import tqdm

    bar = tqdm(total=sum(len(qs) for qs in questions.values()), desc=f"mmlu {shots}-shot", disable=not progress)
    for subject, qs in questions.items():
        pool = shot_pool.get(subject, [])
        if len(pool) < shots:
            raise ValueError(f"subject {subject!r} has {len(pool)} few-shot example(s) in split {shot_split!r}, "
                             f"{shots} asked for; use fewer shots")
        prefix = list(tokenizer(subject_prefix(subject, pool[:shots]))["input_ids"])
        suffixes = [list(tokenizer(format_question(q), add_special_tokens=False)["input_ids"]) for q in qs]
        logprobs = last_token_logprobs(model, prefix, suffixes, batch_size=batch_size, device=device,
                                       use_prefix_cache=use_prefix_cache)
        rows = []
        for q, lp in zip(qs, logprobs):
            gold = answer_index(q)
            letter_lp = lp[letters]
            norm = torch.log_softmax(letter_lp, dim=-1)
            rows.append((int(letter_lp.argmax()) == gold, float(letter_lp[gold]), float(norm[gold]),
                         float(letter_lp.exp().sum())))
        per_subject[subject] = _summary(rows)
        all_rows.extend(rows)
        bar.update(len(qs))
    bar.close()
    model.train(was_training)
    overall = _summary(all_rows)
    return {
        "shots": shots,
        "questions": len(all_rows),
        "subjects": len(per_subject),
        "accuracy_macro": sum(r["accuracy"] for r in per_subject.values()) / max(1, len(per_subject)),
        "accuracy_micro": overall["accuracy"],
        "answer_logprob": overall["answer_logprob"],
        "answer_logprob_norm": overall["answer_logprob_norm"],
        "letter_mass": overall["letter_mass"],
        "chance_accuracy": 1 / len(LETTERS),
        "chance_logprob_norm": math.log(1 / len(LETTERS)),
        "per_subject": per_subject,
    }


def _summary(rows: Sequence[tuple[bool, float, float, float]]) -> dict[str, float]:
    n = max(1, len(rows))
    return {
        "n": len(rows),
        "accuracy": sum(r[0] for r in rows) / n,
        "answer_logprob": sum(r[1] for r in rows) / n,
        "answer_logprob_norm": sum(r[2] for r in rows) / n,
        "letter_mass": sum(r[3] for r in rows) / n,
    }
