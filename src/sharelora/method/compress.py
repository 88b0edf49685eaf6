"""Compress existing LoRA adapters into one multi-task adapter with a shared A (SHARE / EigenLoRAx).

Every input adapter (a PEFT LoRA directory or a sharelora directory) is read as per-module updates
``D_t = scaling_t B_t A_t`` (d_out x d_in) of task t. For each share group (a module type when
``across_layers``, else one module) the shared down-projection ``A_s`` (k x d_in, orthonormal rows)
spans the top-k right singular vectors of the stacked updates, and each task's new
``B_t' = D_t A_s^T`` (d_out x k) is the least-squares best B for that A (SPEC.md, "Compression").

Which stack is decomposed (``basis``):
    "update" (default): the stacked updates ``[D_1; ...; D_N]``, computed without forming them as
        ``[R_1 A_1; ...; R_N A_N]`` with ``B_t = Q_t R_t`` (QR), which has the same right singular
        vectors and values. This is the A that minimises the summed squared update error, i.e.
        SPEC's stack of A's weighted by B.
    "A": SPEC's plain stack of the A matrices ``[A_1; ...; A_N]`` (ignores how much each row of A
        is used by its B).
Both are exact when k covers the stack's rank (at most the sum of the tasks' ranks).

``share="AB"`` also shares each task's B across the layers of a module type (ShareAB with the A
shared by all tasks): ``B_t' = mean_l D_{t,l} A_s^T``, the least-squares B common to the layers.

Task cores (``task_core="matrix"`` / ``"diagonal"``): A *and* B are shared by every task, and each
task keeps a core per module, ``D_{t,m} ~ B_g C_{t,m} A_g`` (the model of ``task_share="AB"``). The
basis is the truncated SVD of the stacked updates on both sides (the higher-order SVD of the
stack of updates, a Tucker-2 decomposition): A_g (k x d_in, orthonormal rows) the top-k right
singular vectors of the row stack ``[D_1; D_2; ...]``, B_g (d_out x k, orthonormal columns) the
top-k left singular vectors of the column stack ``[D_1, D_2, ...]``, over the group's modules and
all tasks. With orthonormal A and B the least-squares core is the projection
``C = B^T D A^T`` (diagonal: ``c = diag(B^T D A^T)``, the least-squares diagonal for that basis),
and the summed squared error is ``sum ||D||^2 - sum ||B^T D A^T||^2``. Alternating sweeps then
refine the basis (higher-order orthogonal iteration: A the top-k right singular vectors of
``[B^T D_1; B^T D_2; ...]``, B the top-k left singular vectors of ``[D_1 A^T, D_2 A^T, ...]``), each
of which can only lower that error, until it stops falling. The fit is exact when k covers the
ranks of both stacks. Groups: A per module type (``across_layers``), B per module type with
``share="AB"`` or per module with ``share="A"``; both per module without ``across_layers``.
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import TASK_CORES, ShareLoraConfig
from .errors import ShareLoraError
from .layers import bank_name
from .plan import _module_type

BASES = ("update", "A")


def _is_peft_dir(d: Path) -> bool:
    cfg = d / "adapter_config.json"
    return cfg.is_file() and "peft_type" in checkpoint.read_json(cfg)


def adapter_updates(base_model: nn.Module, directory: str | Path, adapter_name: str | None = None):
    """({module path: (A (k, d_in), B (d_out, k), scaling)}, {modules_to_save path: state dict}) of one adapter.

    ``directory`` is a PEFT LoRA directory or a sharelora one (for a multi-adapter directory,
    ``adapter_name`` picks the adapter). Fused slices become one whole-module pair, as in the
    PEFT export. The base model is not modified.
    """
    from .model import ShareLoraModel

    d = Path(directory)
    if not d.is_dir():
        raise ShareLoraError(f"adapter directory {d} does not exist")
    probe = copy.deepcopy(base_model)
    if _is_peft_dir(d):
        model = ShareLoraModel.from_peft(probe, d)
        name = model.adapter_names[0]
    else:
        multi = checkpoint.is_multi_adapter(d)
        model = ShareLoraModel.from_pretrained(probe, d, adapter_name=adapter_name if multi else None)
        name = adapter_name if multi and adapter_name else model.adapter_names[0]
    cfg = model.sharelora_configs[name]
    if cfg.router:
        raise ShareLoraError(f"{d}: adapter {name!r} routes B heads per token (HydraLoRA); its update depends on the "
                             "input and cannot be compressed into a fixed low-rank basis")
    updates = {}
    with torch.no_grad():
        for module_name, layer in model.sharelora_layers():
            slot = layer.slots.get(name)
            if slot is None:
                continue
            A, B = slot.down_and_up(model.sharelora_bank)
            updates[module_name] = (A.detach().double().clone(), B.detach().double().clone(), slot.scaling)
    heads = {}
    for path in model.saved_module_names(name):
        module = model.base_model.get_submodule(path).modules_to_save[name]
        heads[path] = {k: v.detach().clone() for k, v in module.state_dict().items()}
    return updates, heads


def _basis(blocks: list[torch.Tensor], k: int, what: str) -> torch.Tensor:
    """The top-k right singular vectors of the stacked blocks, (k, d_in), orthonormal rows."""
    M = torch.cat(blocks, dim=0)
    if k > M.shape[1]:
        raise ShareLoraError(f"rank={k} exceeds d_in={M.shape[1]} of {what}; choose rank <= {M.shape[1]}")
    _, _, Vh = torch.linalg.svd(M, full_matrices=True)
    return Vh[:k].contiguous()


def _check_options(rank: int, share: str, across_layers: bool, basis: str, task_core: str = "none") -> None:
    if share not in ("A", "AB"):
        raise ShareLoraError(f"share must be 'A' or 'AB', got {share!r}")
    if share == "AB" and not across_layers:
        raise ShareLoraError("share='AB' shares each task's B across layers, so it needs across_layers=True")
    if basis not in BASES:
        raise ShareLoraError(f"basis must be one of {BASES}, got {basis!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ShareLoraError(f"rank must be a positive integer, got {rank!r}")
    if task_core not in TASK_CORES:
        raise ShareLoraError(f"task_core must be one of {TASK_CORES}, got {task_core!r}")
    if task_core != "none" and basis != "update":
        raise ShareLoraError(f"task_core={task_core!r} fits A and B to the stacked updates; basis={basis!r} (the plain "
                             "stack of A's) has no B side: use basis='update'")


def compress_adapters(base_model: nn.Module, adapters: dict[str, str | Path], rank: int, share: str = "A",
                      across_layers: bool = True, basis: str = "update", alpha: float | None = None,
                      task_core: str = "none"):
    """Fit one shared A per share group and per-task B's; return (multi-adapter model, report).

    Args:
        base_model: the base the adapters were trained on (it becomes the returned model's base).
        adapters: {task name: adapter directory} (PEFT LoRA or sharelora).
        rank: k, the shared A's rank (the compressed adapters' rank).
        share: "A" (a B per task and layer) or "AB" (a B per task and module type; needs across_layers).
        across_layers: one shared A per module type for all layers (True) or per module (False).
        basis: "update" or "A", see the module docstring.
        alpha: the compressed adapters' alpha (default: rank, so scaling is 1; B absorbs the rest).
        task_core: "none" (a B per task), or "matrix" / "diagonal": A and B shared by all tasks and a
            k x k (or k) core per task and module (see the module docstring).

    The report holds, per task and module, the relative update error
    ``||B_t' A_s - D_t||_F / ||D_t||_F`` (with cores ``||B C_t A - D_t|| / ||D_t||``; 0 for a module
    the task leaves unchanged), its mean and max per task, and the parameter counts before and after.
    """
    if not adapters:
        raise ShareLoraError("compress_adapters needs at least one {name: directory}")
    _check_options(rank, share, across_layers, basis, task_core)
    read = {name: adapter_updates(base_model, d) for name, d in adapters.items()}
    return compress_updates(base_model, read, rank, share=share, across_layers=across_layers, basis=basis,
                            alpha=alpha, task_core=task_core)


def compress_updates(base_model: nn.Module, read: dict, rank: int, share: str = "A", across_layers: bool = True,
                     basis: str = "update", alpha: float | None = None, task_core: str = "none"):
    """``compress_adapters`` on updates already read: {task: ``adapter_updates(...)``}.

    For adapters whose bases differ in their heads (e.g. classifiers with different label counts),
    read each with its own base and give heads whose tensors fit ``base_model``'s modules.
    """
    if not read:
        raise ShareLoraError("compress_updates needs at least one {name: adapter_updates(...)}")
    _check_options(rank, share, across_layers, basis, task_core)
    if task_core != "none":
        return _compress_to_cores(base_model, read, rank, share, across_layers, alpha, task_core)
    from .model import ShareLoraModel

    modules = sorted({m for upd, _ in read.values() for m in upd})
    group_of = {m: (_module_type(m) if across_layers else m) for m in modules}
    members: dict[str, list[str]] = defaultdict(list)
    for m in modules:
        members[group_of[m]].append(m)

    shared_A: dict[str, torch.Tensor] = {}
    for g, mods in members.items():
        blocks = []
        for name, (upd, _) in read.items():
            for m in mods:
                if m not in upd:
                    continue
                A, B, s = upd[m]
                if basis == "update":
                    _, R = torch.linalg.qr(B * s)
                    blocks.append(R @ A)
                else:
                    blocks.append(A)
        shared_A[g] = _basis(blocks, rank, g)

    # The compressed model: every task reads its group's A (task_share="A").
    target = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    configs = {}
    for name, (_, heads) in read.items():
        roots = sorted(heads)
        configs[name] = ShareLoraConfig(
            rank=rank, alpha=float(alpha if alpha is not None else rank), share=share if across_layers else "none",
            task_share="A", target_modules=target, modules_to_save=roots, fused_modules={},
        )
    names = list(configs)
    model = ShareLoraModel(base_model, configs[names[0]], names[0])
    for n in names[1:]:
        model.add_adapter(n, configs[n])

    report = {"rank": rank, "share": share, "across_layers": across_layers, "basis": basis, "tasks": {}}
    with torch.no_grad():
        for name, (upd, heads) in read.items():
            scaling = configs[name].scaling
            plan = model.plans[name]
            by_module = {t.module_name: t for t in plan.targets}
            errors = {}
            new_B: dict[str, list[torch.Tensor]] = defaultdict(list)
            for m in modules:
                A_s = shared_A[group_of[m]]
                D = upd[m][1] * upd[m][2] @ upd[m][0] if m in upd else None
                Bp = (D @ A_s.T) / scaling if D is not None else torch.zeros(
                    by_module[m].d_out, rank, dtype=torch.float64)
                new_B[by_module[m].b_key].append(Bp)
            for b_key, Bs in new_B.items():  # share="AB": one B for the layers of a module type (the mean)
                model.sharelora_bank[bank_name(b_key)].copy_(torch.stack(Bs).mean(0))
            for m in modules:
                t = by_module[m]
                A_s = shared_A[group_of[m]]
                model.sharelora_bank[bank_name(t.a_key)].copy_(A_s)
                if m not in upd:
                    errors[m] = 0.0
                    continue
                A, B, s = upd[m]
                D = (B * s) @ A
                got = (model.sharelora_bank[bank_name(t.b_key)].double() * scaling) @ A_s
                norm = torch.linalg.matrix_norm(D).item()
                errors[m] = torch.linalg.matrix_norm(got - D).item() / norm if norm > 0 else 0.0
            for path, state in heads.items():
                model.base_model.get_submodule(path).modules_to_save[name].load_state_dict(state)
            report["tasks"][name] = {"modules": errors, "mean_error": sum(errors.values()) / len(errors),
                                     "max_error": max(errors.values())}
    r = model.parameter_report()
    report["parameters"] = r["adapter_parameters"]
    report["source_parameters"] = sum(
        sum(A.numel() + B.numel() for A, B, _ in upd.values()) for upd, _ in read.values())
    model.set_adapter(names[0])
    return model, report


# --- task cores: A and B shared by every task, a core per task and module -------------------------------
def _top(M: torch.Tensor, k: int, side: str, what: str) -> torch.Tensor:
    """The top-k singular vectors of M: right ones as rows (k, cols) or left ones as columns (rows, k)."""
    dim = M.shape[1] if side == "right" else M.shape[0]
    if k > dim:
        raise ShareLoraError(f"rank={k} exceeds {'d_in' if side == 'right' else 'd_out'}={dim} of {what}; a basis "
                             f"of task cores needs rank <= min(d_in, d_out): choose rank <= {dim}")
    U, _, Vh = torch.linalg.svd(M, full_matrices=True)
    return Vh[:k].contiguous() if side == "right" else U[:, :k].contiguous()


def _compress_to_cores(base_model: nn.Module, read: dict, rank: int, share: str, across_layers: bool,
                       alpha: float | None, task_core: str, sweeps: int = 50, tol: float = 1e-12):
    """The task-core compression of the module docstring: (multi-adapter model, report)."""
    from .model import ShareLoraModel

    modules = sorted({m for upd, _ in read.values() for m in upd})
    group_a = {m: (_module_type(m) if across_layers else m) for m in modules}
    group_b = {m: (_module_type(m) if across_layers and share == "AB" else m) for m in modules}
    # Each update as factors D = P Q with P = scaling B (d_out, k_t), Q = A (k_t, d_in): never formed in the fit.
    items = [(name, m, B * s, A) for name, (upd, _) in read.items() for m, (A, B, s) in upd.items()]

    def stacked(groups: dict[str, str], block) -> dict[str, torch.Tensor]:
        blocks: dict[str, list[torch.Tensor]] = defaultdict(list)
        for name, m, P, Q in items:
            blocks[groups[m]].append(block(name, m, P, Q))
        return blocks

    # HOSVD start. Row stack [D_1; D_2; ...] has the right singular vectors of [R_i Q_i] (P_i = O_i R_i, QR);
    # column stack [D_1, D_2, ...] the left singular vectors of [P_i R'_i^T] (Q_i^T = O'_i R'_i).
    rows = stacked(group_a, lambda n, m, P, Q: torch.linalg.qr(P)[1] @ Q)
    A = {g: _top(torch.cat(b, 0), rank, "right", g) for g, b in rows.items()}
    cols = stacked(group_b, lambda n, m, P, Q: P @ torch.linalg.qr(Q.T)[1].T)
    B = {g: _top(torch.cat(b, 1), rank, "left", g) for g, b in cols.items()}
    total = sum(torch.linalg.matrix_norm(torch.linalg.qr(P)[1] @ Q).item() ** 2 for _, _, P, Q in items)

    def captured() -> float:  # sum ||B^T D A^T||^2: the error is total - captured
        return sum(torch.linalg.matrix_norm((B[group_b[m]].T @ P) @ (Q @ A[group_a[m]].T)).item() ** 2
                   for _, m, P, Q in items)

    history = [max(total - captured(), 0.0)]
    for _ in range(sweeps):  # higher-order orthogonal iteration: each half-step lowers the error
        rows = stacked(group_a, lambda n, m, P, Q: (B[group_b[m]].T @ P) @ Q)
        A = {g: _top(torch.cat(b, 0), rank, "right", g) for g, b in rows.items()}
        cols = stacked(group_b, lambda n, m, P, Q: P @ (Q @ A[group_a[m]].T))
        B = {g: _top(torch.cat(b, 1), rank, "left", g) for g, b in cols.items()}
        history.append(max(total - captured(), 0.0))
        if history[-2] - history[-1] <= tol * max(total, 1e-300):
            break

    target = "^(" + "|".join(re.escape(m) for m in modules) + ")$"
    configs = {name: ShareLoraConfig(rank=rank, alpha=float(alpha if alpha is not None else rank),
                                     share=share if across_layers else "none", task_share="AB", task_core=task_core,
                                     target_modules=target, modules_to_save=sorted(heads), fused_modules={})
               for name, (_, heads) in read.items()}
    names = list(configs)
    model = ShareLoraModel(base_model, configs[names[0]], names[0])
    for n in names[1:]:
        model.add_adapter(n, configs[n])

    report = {"rank": rank, "share": share, "across_layers": across_layers, "basis": "update",
              "task_core": task_core, "sweeps": len(history) - 1,
              "relative_error_total": (history[-1] / total) ** 0.5 if total > 0 else 0.0,
              "relative_error_hosvd": (history[0] / total) ** 0.5 if total > 0 else 0.0, "tasks": {}}
    bank = model.sharelora_bank
    with torch.no_grad():
        for m in modules:
            t = next(t for t in model.plans[names[0]].targets if t.module_name == m)
            bank[bank_name(t.a_key)].copy_(A[group_a[m]])
            bank[bank_name(t.b_key)].copy_(B[group_b[m]])
        for name, (upd, heads) in read.items():
            scaling = configs[name].scaling
            errors = {}
            for t in model.plans[name].targets:
                m = t.module_name
                Am, Bm = A[group_a[m]], B[group_b[m]]
                if m not in upd:
                    core = torch.zeros(rank, rank, dtype=torch.float64)
                else:
                    a, b, s = upd[m]
                    core = (Bm.T @ (b * s)) @ (a @ Am.T)  # the least-squares core B^T D A^T
                if task_core == "diagonal":
                    core = torch.diagonal(core).clone()
                bank[bank_name(t.c_key)].copy_(core / scaling)
                if m not in upd:
                    errors[m] = 0.0
                    continue
                D = (b * s) @ a
                got = Bm @ (core if core.dim() == 2 else torch.diag(core)) @ Am
                norm = torch.linalg.matrix_norm(D).item()
                errors[m] = torch.linalg.matrix_norm(got - D).item() / norm if norm > 0 else 0.0
            for path, state in heads.items():
                model.base_model.get_submodule(path).modules_to_save[name].load_state_dict(state)
            report["tasks"][name] = {"modules": errors, "mean_error": sum(errors.values()) / len(errors),
                                     "max_error": max(errors.values())}
    r = model.parameter_report()
    report["parameters"] = r["adapter_parameters"]
    report["shared_parameters"] = r["task_shared_parameters"]
    report["parameters_per_task"] = r["adapters"][names[0]]["own_parameters"]
    report["source_parameters"] = sum(
        sum(A_.numel() + B_.numel() for A_, B_, _ in upd.values()) for upd, _ in read.values())
    model.set_adapter(names[0])
    return model, report
