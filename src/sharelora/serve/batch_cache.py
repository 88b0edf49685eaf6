"""The KV cache of the running batch: the model's own transformers cache, and what joining and leaving do to it.

The scheduler decodes rows of different lengths in one forward. transformers computes the
attention masks and keeps the keys and values (``DynamicCache``: one ``DynamicLayer`` per
full-attention layer, one ``DynamicSlidingWindowLayer`` per sliding-window layer, as the model's
config declares them); the scheduler only adds rows to that cache and takes rows out of it. This
module is the one place that knows the layout.

Layout. Columns are token slots shared by every row: the batch has C columns and ``mask`` (B, C)
marks each row's real tokens, which are contiguous and end at the last column (left padding).
Layer l holds keys and values of shape (B, kv_heads, S_l, head_dim):

* full attention: S_l = C, every column;
* sliding window of W tokens: S_l = min(C, W - 1), the last columns (what the next query can still
  see besides itself), and the layer counts C columns seen (``cumulative_length``): transformers
  derives from that count which columns of ``mask`` its keys are (``get_mask_sizes``) and where the
  next query stands (``get_seq_length``).

Because each row's tokens are contiguous and right-aligned, a distance between columns is a
distance between the row's tokens: the causal mask and the window (``kv > q - W``) that
transformers computes on columns are the ones the row gets alone in ``model.generate``, and the
position ids (the scheduler passes each row's own) give the same rotary phases.

The scheduler's operations, and nothing else:

* ``BatchCache.of(cache, mask)``: the state a forward returned (references to its tensors, no copy);
* ``BatchCache.join(parts)``: the rows of several states together. C is the widest part's; each
  layer's tensors are left-padded with zeros to that layer's widest part (so S_l = C for full
  layers and min(C, W - 1) for sliding ones) and the masks to C; the padding is masked out;
* ``select(rows)``: keep some rows and cut the leading columns none of them uses (C' columns
  left); each layer keeps its last min(S_l, C') columns;
* ``to_cache()``: a transformers ``DynamicCache`` in this state, built by
  ``DynamicCache(ddp_cache_data=[(keys, values[, window])])`` (transformers' own way to rebuild a
  cache from its tensors) with each sliding layer's count of columns set to C.

``unsupported_attention(config)`` says which layer types this layout cannot hold (chunked
attention, whose chunks start at absolute positions; linear-attention / state-space layers, which
keep a state instead of columns; layers sharing another layer's cache): the server refuses those
models by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BATCHED_LAYER_TYPES = ("full_attention", "sliding_attention")


def layer_types(config) -> list[str]:
    """The attention type of each decoder layer, as transformers' own cache classes read the config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs
    except ImportError:  # transformers 4.x: the config's list, or what `sliding_window` implies
        types = getattr(text, "layer_types", None)
        if types:
            return list(types)
        n = int(getattr(text, "num_hidden_layers", 0) or 0)
        return ["sliding_attention" if getattr(text, "sliding_window", None) else "full_attention"] * n
    return list(get_layer_types_and_kwargs(text)[0])


def unsupported_attention(config) -> str | None:
    """Why the server cannot batch a model of ``config`` (naming the feature), or None when it can."""
    types = layer_types(config)
    other = sorted(set(types) - set(BATCHED_LAYER_TYPES))
    if other:
        return (f"has {other} layers; the server batches models whose layers use {list(BATCHED_LAYER_TYPES)} "
                "(chunked attention restarts at absolute positions, linear-attention and state-space layers keep "
                "a state rather than keys and values, and 'dummy' layers read another layer's cache: none of "
                "them fits a batch whose rows join and leave); export the adapter to PEFT and serve it with vLLM")
    if "sliding_attention" in types:
        from transformers import __version__

        if int(__version__.split(".")[0]) < 5:
            return (f"has sliding-window attention layers, which the server batches with transformers >= 5 "
                    f"(its DynamicSlidingWindowLayer); transformers {__version__} is installed: upgrade it")
    return None


def _pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    if n <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_zeros(shape), t], dim=dim)


@dataclass
class BatchCache:
    """The running rows' keys and values per layer, the layers' windows and the (B, C) mask (see the module docstring)."""

    keys: list[torch.Tensor]  # per layer, (B, kv_heads, S_l, head_dim)
    values: list[torch.Tensor]
    windows: list[int | None]  # per layer: None for full attention, W for a sliding window of W tokens
    mask: torch.Tensor  # (B, C), 1 at each row's real tokens

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def of(cls, cache, mask: torch.Tensor) -> BatchCache:
        """The state of a transformers cache that a forward returned for rows with ``mask``."""
        layers = getattr(cache, "layers", None)
        if layers is None:  # transformers < 4.56: lists of tensors, full attention only
            return cls(list(cache.key_cache), list(cache.value_cache), [None] * len(cache.key_cache), mask)
        windows = [int(layer.sliding_window) if getattr(layer, "is_sliding", False) else None for layer in layers]
        for layer, w in zip(layers, windows):
            seen = layer.get_seq_length()
            if seen != mask.shape[1]:  # every layer must have seen every column of the mask
                raise RuntimeError(f"a {type(layer).__name__} has seen {seen} columns, the batch mask has "
                                   f"{mask.shape[1]}; the cache does not have the layout the scheduler keeps")
        return cls([layer.keys for layer in layers], [layer.values for layer in layers], windows, mask)

    @classmethod
    def join(cls, parts: list[BatchCache]) -> BatchCache:
        """The rows of ``parts`` in one batch, each part left-padded (per layer, and its mask)."""
        windows = parts[0].windows
        if any(p.windows != windows for p in parts):
            raise ValueError("cannot join caches of different layer layouts")
        width = max(p.width for p in parts)
        keys, values = [], []
        for i in range(len(windows)):
            stored = max(p.keys[i].shape[2] for p in parts)
            keys.append(torch.cat([_pad_left(p.keys[i], stored - p.keys[i].shape[2], 2) for p in parts]))
            values.append(torch.cat([_pad_left(p.values[i], stored - p.values[i].shape[2], 2) for p in parts]))
        mask = torch.cat([_pad_left(p.mask, width - p.width, 1) for p in parts])
        return cls(keys, values, list(windows), mask)

    def select(self, rows: list[int]) -> BatchCache:
        """Keep ``rows`` and cut the leading columns none of them uses."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask.index_select(0, idx)
        used = mask.any(0).nonzero()
        first = int(used[0]) if used.numel() else mask.shape[1]
        mask = mask[:, first:]

        def keep(t: torch.Tensor) -> torch.Tensor:
            t = t.index_select(0, idx.to(t.device))
            return t[:, :, max(0, t.shape[2] - mask.shape[1]):]

        return BatchCache([keep(k) for k in self.keys], [keep(v) for v in self.values], list(self.windows), mask)

    def to_cache(self):
        """A transformers ``DynamicCache`` holding this state, for the next forward."""
        from transformers import DynamicCache

        if hasattr(DynamicCache, "from_legacy_cache") and all(w is None for w in self.windows):  # transformers 4.x
            return DynamicCache.from_legacy_cache(tuple(zip(self.keys, self.values)))
        data = [(k, v) if w is None else (k, v, torch.tensor(w)) for k, v, w in zip(self.keys, self.values, self.windows)]
        cache = DynamicCache(ddp_cache_data=data)
        for layer, w in zip(cache.layers, self.windows):
            if w is not None:
                layer.cumulative_length = self.width  # it has seen every column, though it keeps the last W - 1
        return cache
