"""The optimizer every sharelora training path uses: AdamW, with torch's fused kernel when it applies."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def adamw(params: Iterable, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW(params, **kwargs)``, fused (one kernel for all tensors) where torch supports it.

    An adapter has many small tensors (SmolLM2 ShareA: 62), so the per-tensor loop of the default
    implementation costs more than the arithmetic (1 thread: 2.1 ms a step for those 62, fused
    0.5 ms). The fused kernel computes the same update; torch accepts it for floating-point
    parameters on CPU (torch >= 2.4) and CUDA, and anything else gets the default implementation.
    """
    params = list(params)
    if "fused" not in kwargs and "foreach" not in kwargs:
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # a device or dtype without the fused kernel
            pass
    return torch.optim.AdamW(params, **kwargs)
