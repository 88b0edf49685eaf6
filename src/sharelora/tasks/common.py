"""Pieces every task shares."""

from __future__ import annotations


def select_examples(data, split: str, limit: int | None, available) -> list[dict]:
    """The examples of ``split`` in TaskData ``data`` (its first ``limit`` if given), or a clear error."""
    examples = data.splits.get(split)
    if not examples:
        raise ValueError(f"dataset {data.name!r} has no {split!r} split; it has {available}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of examples, got {limit}")
        examples = examples[:limit]
    return examples
