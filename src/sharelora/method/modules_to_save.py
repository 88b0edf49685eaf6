"""Modules trained in full with an adapter (``modules_to_save``: classifier heads), one copy per adapter.

``ModulesToSave`` takes the place of such a module (``classifier``, ``score``) in the base model:
it keeps the original, frozen, for rows without an adapter (``"__base__"``), and one trainable
copy per adapter that names the module in its ``modules_to_save``, so every task keeps its own
head. Without routing the first active adapter that has a copy runs; with ``adapter_names``
each row goes through its adapter's copy (or the original). While ``disabled`` (inside
``ShareLoraModel.disable_adapter()``) every call runs the original, as PEFT's
``ModulesToSaveWrapper`` does: "no adapter" is the base model, head included.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .errors import ShareLoraError


class ModulesToSave(nn.Module):
    """The original module plus one copy per adapter (``modules_to_save[name]``)."""

    is_sharelora_wrapper = True  # lets the plan see the original module through the wrapper

    def __init__(self, original_module: nn.Module, routing=None):
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: tuple[str, ...] = ()
        self.disabled = False  # True: every call runs the original (ShareLoraModel.disable_adapter)
        self._routing = [routing]
        for p in original_module.parameters():
            p.requires_grad_(False)

    def add(self, adapter_name: str) -> nn.Module:
        """A trainable copy of the original for ``adapter_name``."""
        module = copy.deepcopy(self.original_module)
        for p in module.parameters():
            p.requires_grad_(True)
        self.modules_to_save[adapter_name] = module
        return module

    def set_active(self, adapter_names) -> None:
        self.active = tuple(a for a in adapter_names if a in self.modules_to_save)

    def current(self) -> nn.Module:
        """The module that serves an unrouted call: the first active adapter's copy, else the original."""
        return self.modules_to_save[self.active[0]] if self.active else self.original_module

    def module_for(self, adapter_name: str) -> nn.Module:
        return self.modules_to_save[adapter_name] if adapter_name in self.modules_to_save else self.original_module

    def forward(self, *args, **kwargs):
        if self.disabled:
            return self.original_module(*args, **kwargs)
        routing = self._routing[0]
        if routing is None or not routing.active:
            return self.current()(*args, **kwargs)
        if routing.uniform is not None:
            return self.module_for(routing.uniform)(*args, **kwargs)
        if not args or not isinstance(args[0], torch.Tensor) or kwargs:
            raise ShareLoraError("a modules_to_save module called with adapter_names must take one tensor whose "
                                 "first dimension is the batch")
        x = args[0]
        rows = routing.rows_by_adapter(x.shape[0], x.device)
        out = None
        for name, idx in rows.items():
            if idx.numel() == 0:
                continue
            part = self.module_for(name)(x.index_select(0, idx), *args[1:])
            if not isinstance(part, torch.Tensor):
                raise ShareLoraError(f"modules_to_save module returned {type(part).__name__}; routing rows by "
                                     "adapter_names needs a module that returns one tensor")
            if out is None:
                out = part.new_zeros((x.shape[0], *part.shape[1:]))
            out = out.index_copy(0, idx, part)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(self.current(), name)
