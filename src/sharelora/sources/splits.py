"""Deterministic seeded splits and split fingerprints.

Order is decided by ``sha256(f"{seed}:{key}")`` of each item's *content* key, never by
:mod:`random` or by file order, so a split is the same on every machine, Python version and
operating system, and does not change if the source file's rows are reordered. The fingerprint
of a split is a hash of its canonical JSON; the registry records it for the default recipe.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from typing import Any, Callable, Hashable, Iterable, Sequence, TypeVar

T = TypeVar("T")


def order_key(seed: int, key: str) -> str:
    """The sort key of one item under ``seed``."""
    return hashlib.sha256(f"{seed}:{key}".encode("utf-8")).hexdigest()


def seeded_order(items: Iterable[T], seed: int, key: Callable[[T], str]) -> list[T]:
    """``items`` sorted by :func:`order_key` of ``key(item)`` (a stable, seeded shuffle)."""
    return sorted(items, key=lambda it: order_key(seed, key(it)))


def fingerprint(splits: dict[str, list[dict]]) -> str:
    """16 hex digits identifying the exact content and order of every split."""
    canon = json.dumps(splits, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def allocate(total: int, weights: dict[Hashable, int]) -> dict[Hashable, int]:
    """Split ``total`` over classes in proportion to ``weights`` (largest remainder, exact sum)."""
    n = sum(weights.values())
    if n == 0:
        return {k: 0 for k in weights}
    exact = {k: total * w / n for k, w in weights.items()}
    out = {k: int(v) for k, v in exact.items()}
    rest = total - sum(out.values())
    for k in sorted(weights, key=lambda k: (-(exact[k] - out[k]), str(k)))[:rest]:
        out[k] += 1
    return out


def stratified_split(rows: Sequence[T], *, label: Callable[[T], Hashable], key: Callable[[T], str],
                     sizes: dict[str, int | None], seed: int) -> dict[str, list[T]]:
    """Split ``rows`` so every split keeps the label proportions of the whole.

    ``sizes`` maps split name -> size, filled in the given order; a size of ``None`` (at most
    one, usually ``"train"``) takes everything left. Each split is returned in seeded order.
    """
    by_label: dict[Hashable, list[T]] = defaultdict(list)
    for r in rows:
        by_label[label(r)].append(r)
    pools = {lab: seeded_order(rs, seed, key) for lab, rs in by_label.items()}
    counts = {lab: len(rs) for lab, rs in by_label.items()}
    fixed = {s: n for s, n in sizes.items() if n is not None}
    _check_sizes(fixed, len(rows), sizes)
    out: dict[str, list[T]] = {}
    taken = {lab: 0 for lab in pools}
    for split, n in sizes.items():
        if n is None:
            continue
        for lab, k in allocate(n, counts).items():
            out.setdefault(split, []).extend(pools[lab][taken[lab]:taken[lab] + k])
            taken[lab] += k
    for split, n in sizes.items():
        if n is None:
            out[split] = [r for lab in pools for r in pools[lab][taken[lab]:]]
    return {s: seeded_order(out.get(s, []), seed + 1, key) for s in sizes}


def group_split(rows: Sequence[T], *, group: Callable[[T], str], key: Callable[[T], str],
                sizes: dict[str, int | None], seed: int) -> dict[str, list[T]]:
    """Split ``rows`` so that no group (e.g. one meaning representation) is in two splits.

    Groups are taken in seeded order and poured into the splits in the order of ``sizes``; a
    split with an int size is cut to exactly that many rows, and the rest of the group at the cut
    is dropped (not moved on), which is what keeps the splits disjoint. ``None`` takes all the
    remaining groups.
    """
    groups: dict[str, list[T]] = defaultdict(list)
    for r in rows:
        groups[group(r)].append(r)
    order = seeded_order(groups, seed, key=lambda g: g)
    fixed = {s: n for s, n in sizes.items() if n is not None}
    _check_sizes(fixed, len(rows), sizes)
    out: dict[str, list[T]] = {s: [] for s in sizes}
    gi = 0
    for split, n in sizes.items():
        if n is None:
            for g in order[gi:]:
                out[split].extend(groups[g])
            gi = len(order)
            continue
        while len(out[split]) < n and gi < len(order):
            members = seeded_order(groups[order[gi]], seed, key)
            out[split].extend(members[:n - len(out[split])])
            gi += 1
    return {s: seeded_order(rs, seed + 1, key) for s, rs in out.items()}


def count_by(rows: Iterable[dict], field: str) -> dict[str, int]:
    """``{value: count}`` of one field, sorted by value (for ``TaskData.info``)."""
    c: dict[Any, int] = defaultdict(int)
    for r in rows:
        c[r[field]] += 1
    return {str(k): c[k] for k in sorted(c)}


def _check_sizes(fixed: dict[str, int], total: int, sizes: dict) -> None:
    from .errors import SourceError

    if sum(1 for n in sizes.values() if n is None) > 1:
        raise SourceError(f"split sizes {sizes}: at most one split may take 'the rest' (None)")
    if any(n < 0 for n in fixed.values()):
        raise SourceError(f"split sizes {sizes} must not be negative")
    if sum(fixed.values()) > total:
        raise SourceError(f"split sizes {fixed} add up to {sum(fixed.values())}, more than the "
                          f"{total} examples available; ask for smaller splits")
