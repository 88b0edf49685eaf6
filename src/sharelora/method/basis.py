"""A task-core group's basis: how well a task fits it (``basis_fit``) and conditioning it (``orthonormalize_basis``).

The second, at the end of this module: a reparametrization of a trained basis into orthogonal directions of
equal length that leaves every adapter's function as it was (each core absorbs the factors).

``basis_fit``: the share of a task's gradient a core can follow.

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


# --- orthonormalizing a trained basis ------------------------------------------------------------------------
def _qr(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M = Q R (reduced, float64) with R's diagonal >= 0, so the factors do not depend on the LAPACK build's signs."""
    Q, R = torch.linalg.qr(M, mode="reduced")
    s = torch.sign(torch.diagonal(R))
    s[s == 0] = 1.0
    return Q * s, R * s.unsqueeze(1)


@torch.no_grad()
def orthonormalize_basis(model, task_group: str = "default") -> dict:
    """Reparametrize task group ``task_group``'s basis to orthogonal directions of equal length, every
    adapter's function unchanged.

    Each shared A (k x d_in, read by the group's targets of one share key) is written A = L Q_A (LQ, from
    the QR of A^T; Q_A k x d_in with orthonormal rows, L lower triangular) and replaced by A' = c_A Q_A;
    each B (d_out x k) is written B = Q_B R_B (QR) and replaced by B' = c_B Q_B, with c = ||.||_F / sqrt(k)
    (every direction gets the tensor's RMS magnitude, so a core lr tuned before stays in range). Every
    matrix core C (k x k) of every loaded adapter of the group absorbs the factors of the B and the A its
    target reads,

        C' = (R_B / c_B) C (L / c_A),   so   s B' C' A' = s B C A   for every adapter and target.

    Signs are fixed (R's and L's diagonal >= 0). Computed in float64, written in each tensor's dtype.
    A grown basis (``grow_basis``) keeps its growth blocks as they are: only the original r directions
    are orthonormalized, and a core of width r + G absorbs the factors in its leading r rows / columns.

    Adapters of the group that are not loaded (saved elsewhere) keep cores for the old basis: load every
    task of the group first. An optimizer's moments of the changed tensors no longer fit them (call it
    between training runs, e.g. after the basis is trained). Returns {"task_group", "adapters", "A",
    "B", "cores", "conditioning": {"before", "after"}} (the largest sigma_1 / sigma_k of a B).
    Refused for diagonal cores (a diagonal cannot absorb a triangular factor), for a group without
    cores and for an untrained basis (a B == 0).
    """
    members = [n for n, c in model.sharelora_configs.items() if c.task_group == task_group and c.task_core != "none"]
    if not members:
        groups = sorted({c.task_group for c in model.sharelora_configs.values() if c.task_core != "none"})
        raise ShareLoraError(f"task group {task_group!r} has no task-core adapter (task_share='AB', task_core="
                             f"'matrix'); groups with task cores: {groups}")
    diagonal = [n for n in members if model.sharelora_configs[n].task_core != "matrix"]
    if diagonal:
        raise ShareLoraError(f"adapters {diagonal} of task group {task_group!r} have diagonal cores, which cannot "
                             "absorb the basis's triangular factors; orthonormalize a task_core='matrix' group")
    bank = model.sharelora_bank
    plans = [model.plans[n] for n in members]
    a_keys = sorted({t.a_key for p in plans for t in p.targets})
    b_keys = sorted({t.b_key for p in plans for t in p.targets})
    untrained = [k for k in b_keys + a_keys if bank[bank_name(k)].count_nonzero() == 0]
    if untrained:
        raise ShareLoraError(f"task group {task_group!r} has an untrained basis (a zero tensor, B == 0: {untrained[0]}): there "
                             "are no directions to orthonormalize; train the basis first (its owner's stage)")
    k = bank[bank_name(a_keys[0])].shape[0]
    if any(bank[bank_name(a)].shape[1] < k for a in a_keys) or any(bank[bank_name(b)].shape[0] < k for b in b_keys):
        raise ShareLoraError(f"task group {task_group!r}: rank {k} exceeds a module's d_in or d_out, so its basis "
                             "cannot have k orthonormal directions; use a smaller rank")
    left: dict[str, torch.Tensor] = {}  # A key -> L / c_A (k x k)
    right: dict[str, torch.Tensor] = {}  # B key -> R_B / c_B (k x k)
    cond_before, cond_after = [], []
    for key in a_keys:
        A = bank[bank_name(key)]
        Q, R = _qr(A.double().t())  # A^T = Q R  ->  A = R^T Q^T = L Q_A
        c = float(A.double().norm()) / k ** 0.5
        left[key] = R.t() / c
        A.copy_((c * Q.t()).to(A.dtype))
    for key in b_keys:
        B = bank[bank_name(key)]
        cond_before.append(_condition(B))
        Q, R = _qr(B.double())
        c = float(B.double().norm()) / k ** 0.5
        right[key] = R / c
        B.copy_((c * Q).to(B.dtype))
        cond_after.append(_condition(B))
    cores = 0
    for plan in plans:
        for t in plan.targets:
            C = bank[bank_name(t.c_key)]
            M = C.detach().to(torch.float64, copy=True)
            M[:k, :] = right[t.b_key] @ M[:k, :]  # growth blocks beyond the first k directions stay as they are
            M[:, :k] = M[:, :k] @ left[t.a_key]
            C.copy_(M.to(C.dtype))
            cores += 1
    return {"task_group": task_group, "adapters": members, "A": len(a_keys), "B": len(b_keys), "cores": cores,
            "conditioning": {"before": max(cond_before), "after": max(cond_after)}}


def _condition(M: torch.Tensor) -> float:
    """sigma_1 / sigma_k of M (inf when M is rank deficient)."""
    S = torch.linalg.svdvals(M.double())
    return float(S[0] / S[-1]) if S[-1] > 0 else float("inf")
