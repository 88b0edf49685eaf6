"""Which adapter each row of a batch uses: ``model(**batch, adapter_names=[...])``.

One ``Routing`` object belongs to a ``ShareLoraModel``; every ShareLoRA layer and every
modules_to_save wrapper of the model reads it. ``ShareLoraModel.forward`` / ``generate`` set it
from ``adapter_names`` (one name per row, ``"__base__"`` for a row without adapter) before the
base model runs. It stays set until the next call, so activation checkpointing, which re-runs a
block's forward during backward, routes the rows the same way.

A module sees the batch's rows as the first dimension of its input. Generation with beams (or
``num_return_sequences``) repeats each row k times in place, so an input with k times as many
rows routes row i to ``adapter_names[i // k]``.
"""

from __future__ import annotations

import torch

from .errors import ShareLoraError
from .plan import BASE_ADAPTER


class Routing:
    """The per-row adapter names of the current call (None: no routing, the active adapters)."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.names: tuple[str, ...] | None = None
        self.unique: tuple[str, ...] = ()
        self._index: dict[str, int] = {}
        self._ids: list[int] = []
        self._cache: dict = {}

    @property
    def active(self) -> bool:
        return self.names is not None

    @property
    def uniform(self) -> str | None:
        """The one adapter every row uses, if they all use the same (a plain single-adapter call)."""
        return self.unique[0] if len(self.unique) == 1 else None

    def set(self, adapter_names, known: set[str] | list[str]) -> None:
        """Route by ``adapter_names`` (a list of str, one per row) or clear with None."""
        if adapter_names is None:
            self.clear()
            return
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise ShareLoraError("adapter_names must be a list with one adapter name (str) per row of the batch, "
                                 f"or '{BASE_ADAPTER}' for no adapter; got {adapter_names!r}")
        names = tuple(adapter_names)
        if not names:
            raise ShareLoraError("adapter_names is empty; give one adapter name per row of the batch")
        unknown = sorted(set(names) - set(known) - {BASE_ADAPTER})
        if unknown:
            raise ShareLoraError(f"adapter_names has unknown adapters {unknown}; loaded adapters: {sorted(known)} "
                                 f"(and '{BASE_ADAPTER}' for no adapter)")
        self.clear()
        self.names = names
        self._index = {n: i for i, n in enumerate(dict.fromkeys(names))}  # a dict: N distinct names cost O(N), not O(N^2)
        self.unique = tuple(self._index)
        self._ids = [self._index[n] for n in names]

    def row_ids(self, rows: int, device: torch.device) -> torch.Tensor:
        """(rows,) int64: the index into ``unique`` of each row of an input with ``rows`` rows."""
        key = ("ids", rows, device)
        if key not in self._cache:
            b = len(self._ids)
            if rows % b:
                raise ShareLoraError(
                    f"adapter_names has {b} entries but a layer received {rows} rows; pass one adapter name per "
                    "row of the batch (inputs must keep the batch as their first dimension)"
                )
            ids = torch.tensor(self._ids, dtype=torch.long, device=device)
            self._cache[key] = ids.repeat_interleave(rows // b) if rows != b else ids
        return self._cache[key]

    def rows_by_adapter(self, rows: int, device: torch.device) -> dict[str, torch.Tensor]:
        """{adapter name: (n,) int64 row indices} for an input with ``rows`` rows, in row order."""
        key = ("rows", rows, device)
        if key not in self._cache:
            ids = self.row_ids(rows, device)
            self._cache[key] = {n: (ids == i).nonzero().flatten() for i, n in enumerate(self.unique)}
        return self._cache[key]

    def layout(self, names: tuple[str, ...], rows: int, device: torch.device,
               scales: tuple[float, ...] | None = None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """(idx, local, scale) of the rows that use one of ``names``, for an input with ``rows`` rows.

        ``idx`` (n,) int64: those rows in order, None when it is every row; ``local`` (n,) int64:
        each such row's position in ``names``; ``scale`` (n, 1, 1) float32: ``scales[local]``,
        None when ``scales`` is None or all equal. Computed once per call and reused by every layer.
        """
        key = ("layout", names, rows, device, scales)
        if key not in self._cache:
            ids = self.row_ids(rows, device)
            lookup = torch.full((len(self.unique),), -1, dtype=torch.long)
            lookup[[self._index[name] for name in names]] = torch.arange(len(names))
            per_row = lookup.to(device).index_select(0, ids)
            idx = (per_row >= 0).nonzero().flatten()
            every_row = idx.numel() == rows
            local = per_row if every_row else per_row.index_select(0, idx)
            scale = None
            if scales is not None and len(set(scales)) > 1:
                scale = torch.tensor(scales, dtype=torch.float32, device=device).index_select(0, local).view(-1, 1, 1)
            self._cache[key] = (None if every_row else idx, local, scale)
        return self._cache[key]
