"""ShareLoraLayer: a frozen linear map plus a low-rank update whose A and B may be shared."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .plan import Target


def bank_name(key: str) -> str:
    """Name of a tensor key inside an ``nn.ParameterDict`` (parameter names cannot contain '.')."""
    return key.replace(".", "/")


class ShareLoraLayer(nn.Module):
    """``h = W0 x + (alpha / r) * B A dropout(x)`` for one module, with A and B read by key.

    Args:
        base_layer: the frozen ``nn.Linear`` (W0: d_out x d_in) or GPT-2 ``Conv1D``
            (W0 stored as d_in x d_out).
        targets: the plan's targets hosted by this module: one covering all outputs, or one per
            adapted slice of a fused module (``c_attn.q`` adds to output columns [0, d)).
        bank: the model's ``ParameterDict`` of adapter tensors. A: (r, d_in), B: (d_out, r).
            Shared tensors live there once; the layer only looks them up, so a parameter
            listing, an optimizer and a checkpoint see each shared tensor once, and autograd
            sums its gradient over every layer that reads it.
        scaling: alpha / r.
        dropout: dropout probability on the adapter input.
    """

    def __init__(self, base_layer: nn.Module, targets: list[Target], bank: nn.ParameterDict,
                 scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.transposed = not isinstance(base_layer, nn.Linear)  # Conv1D keeps W as (d_in, d_out)
        self.targets = tuple(targets)
        self.keys = tuple((bank_name(t.a_key), bank_name(t.b_key)) for t in targets)
        self.whole = len(targets) == 1 and targets[0].slice_name is None
        self.scaling = scaling
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # A plain list keeps the bank out of this module's parameters: the bank belongs to the
        # ShareLoraModel, which registers it once.
        self._bank = [bank]
        self.merged = False
        self.disabled = False
        if not self.whole:
            self._d_out_total = base_layer.weight.shape[1 if self.transposed else 0]

    @property
    def weight(self) -> torch.Tensor:  # so code that reads module.weight keeps working
        return self.base_layer.weight

    @property
    def bias(self):
        return self.base_layer.bias

    def _update(self, x: torch.Tensor) -> torch.Tensor:
        bank = self._bank[0]
        x = self.lora_dropout(x)
        if self.whole:
            a_key, b_key = self.keys[0]
            A, B = bank[a_key], bank[b_key]
            if x.dtype != A.dtype:
                x = x.to(A.dtype)
            # Scale the (…, r) intermediate, not the (…, d_out) result: r << d_out.
            return F.linear(F.linear(x, A) * self.scaling, B)
        pieces, pos = [], 0
        for t, (a_key, b_key) in zip(self.targets, self.keys):
            A, B = bank[a_key], bank[b_key]
            xa = x if x.dtype == A.dtype else x.to(A.dtype)
            if t.out_start > pos:
                pieces.append(x.new_zeros(*x.shape[:-1], t.out_start - pos, dtype=A.dtype))
            pieces.append(F.linear(F.linear(xa, A) * self.scaling, B))
            pos = t.out_start + t.d_out
        if pos < self._d_out_total:
            pieces.append(x.new_zeros(*x.shape[:-1], self._d_out_total - pos, dtype=pieces[-1].dtype))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disabled:
            return result
        return result + self._update(x).to(result.dtype)

    # --- merging ------------------------------------------------------------------------------
    def delta_weight(self, target: Target) -> torch.Tensor:
        """scaling * B A for one target, shape (d_out, d_in)."""
        a_key, b_key = self.keys[self.targets.index(target)]
        bank = self._bank[0]
        return (bank[b_key].float() @ bank[a_key].float()) * self.scaling

    @torch.no_grad()
    def _apply_delta(self, sign: float) -> None:
        w = self.base_layer.weight
        for t in self.targets:
            d = self.delta_weight(t).to(w.device)
            rows = slice(t.out_start, t.out_start + t.d_out)
            if self.transposed:
                w[:, rows] += (sign * d.T).to(w.dtype)
            else:
                w[rows, :] += (sign * d).to(w.dtype)

    def merge(self) -> None:
        """W0 += scaling * B A, after which the layer costs what the base layer costs."""
        if not self.merged:
            self._apply_delta(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._apply_delta(-1.0)
            self.merged = False

    def extra_repr(self) -> str:
        parts = [f"{t.slice_name or 'all'}: A={t.a_key}, B={t.b_key}" for t in self.targets]
        return f"scaling={self.scaling:g}, " + "; ".join(parts)
