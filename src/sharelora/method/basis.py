"""How well a task fits its group's basis (task cores): the share of its gradient a core can follow.

A task-core adapter changes an adapted module's weight only by ``s B C A``: within the column span
of the basis B (d_out x k) and the row span of A (k x d_in). ``basis_fit`` measures how much of the
task's own steepest-descent direction lies in that space. For each adapted module (base weight W0,
d_out x d_in) let G = dL/dW0 at the current point (with a new task's core at zero, the base model's
gradient on the task's rows) and Q_B, Q_A orthonormal bases of span(B) and of span(A^T). A core can
follow the projection P_B G P_A = Q_B (Q_B^T G Q_A) Q_A^T, and

    fit = sum_m ||Q_B^T G_m Q_A||_F^2 / sum_m ||G_m||_F^2          (per module type too)

is the fraction of the gradient's energy it captures (1: the basis spans every direction the task
wants to move in; the first-order loss decrease available to a core, relative to full fine-tuning,
under the same step length). ``chance`` is what random subspaces of the same dimensions would give,
sum_m (k_B k_A / (d_out d_in)) ||G_m||^2 / sum_m ||G_m||^2: a basis that fits a task well is many
times above it. The cost is one forward and backward of ``loss_fn`` with gradients for the adapted
base weights only (nothing is accumulated into ``.grad``; the model is left as it was found).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import torch

from .errors import ShareLoraError
from .layers import bank_name


def _span(M: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of M's column space, (rows, rank(M)); a zero matrix spans nothing."""
    U, S, _ = torch.linalg.svd(M.double(), full_matrices=False)
    if S.numel() == 0 or S[0] == 0:
        return U[:, :0]
    return U[:, S > S[0] * 1e-9]


def basis_fit(model, adapter_name: str, loss_fn: Callable[[], torch.Tensor],
              include_own_growth: bool = True, layers: list[int] | None = None) -> dict:
    """The share of adapter ``adapter_name``'s task gradient that its basis spans (see the module docstring).

    ``loss_fn()`` returns the task's loss on a few of its rows through the model (the adapter is made
    the active one and the model put in eval mode while it runs). ``include_own_growth=False`` leaves
    out the directions the adapter added itself (``grow_basis``): how well the task fitted the basis
    it found. ``layers``: only the targets of these layer indices (None: all). Returns {"fit",
    "chance", "directions" (k), "modules": {module type: fit}, "gradient_norm"}; fit is None when
    the gradient is zero.
    """
    if adapter_name not in getattr(model, "plans", {}):
        raise ShareLoraError(f"no adapter named {adapter_name!r}; loaded adapters: {model.adapter_names}")
    cfg = model.sharelora_configs[adapter_name]
    if cfg.task_core == "none":
        raise ShareLoraError(f"adapter {adapter_name!r} has no task core: basis_fit measures a task_share='AB' "
                             "adapter's fit to its group's shared A and B")
    hosts = [(n, layer) for n, layer in model.sharelora_layers() if adapter_name in layer.slots]
    quantized = [n for n, layer in hosts if layer.quantized]
    if quantized:
        raise ShareLoraError(f"{quantized[0]} has a quantized base weight, which has no gradient; measure the fit "
                             "on a float base model")
    grown = set(model.plans[adapter_name].grown_tensors()) if not include_own_growth else set()
    weights = list({id(layer.base_layer.weight): layer.base_layer.weight for _, layer in hosts}.values())
    was_training, active, train_shared = model.training, list(model.active_adapters), model._train_shared
    flags = [w.requires_grad for w in weights]
    try:
        model.set_adapter(adapter_name)
        model.eval()
        for w in weights:
            w.requires_grad_(True)
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_fn(), weights, allow_unused=True)
    finally:
        for w, f in zip(weights, flags):
            w.requires_grad_(f)
        model.set_adapter(active, train_shared=train_shared)
        model.train(was_training)
    by_weight = {id(w): g for w, g in zip(weights, grads)}
    bank = model.sharelora_bank
    captured: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    chance = 0.0
    directions = None
    with torch.no_grad():
        for _, layer in hosts:
            G = by_weight[id(layer.base_layer.weight)]
            if G is None:
                continue
            G = (G.t() if layer.transposed else G).double()  # (d_out_total, d_in)
            for t in layer.slots[adapter_name].targets:
                if layers is not None and t.layer not in layers:
                    continue
                blocks = [(ga, gb) for ga, gb in t.grow_keys if ga not in grown]
                A = torch.cat([bank[bank_name(t.a_key)]] + [bank[bank_name(ga)] for ga, _ in blocks])
                B = torch.cat([bank[bank_name(t.b_key)]] + [bank[bank_name(gb)] for _, gb in blocks], dim=1)
                directions = A.shape[0]
                Qa, Qb = _span(A.t()), _span(B)
                Gt = G[t.out_start : t.out_start + t.d_out]
                energy = float(Gt.square().sum())
                captured[t.module_type] += float((Qb.t() @ Gt @ Qa).square().sum())
                total[t.module_type] += energy
                chance += energy * Qa.shape[1] * Qb.shape[1] / (t.d_in * t.d_out)
    everything = sum(total.values())
    return {
        "fit": sum(captured.values()) / everything if everything > 0 else None,
        "chance": chance / everything if everything > 0 else None,
        "directions": directions,
        "modules": {m: captured[m] / total[m] if total[m] > 0 else None for m in total},
        "gradient_norm": everything ** 0.5,
    }
