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
"""

from __future__ import annotations

import copy
import re
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import ShareLoraConfig
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


def _check_options(rank: int, share: str, across_layers: bool, basis: str) -> None:
    if share not in ("A", "AB"):
        raise ShareLoraError(f"share must be 'A' or 'AB', got {share!r}")
    if share == "AB" and not across_layers:
        raise ShareLoraError("share='AB' shares each task's B across layers, so it needs across_layers=True")
    if basis not in BASES:
        raise ShareLoraError(f"basis must be one of {BASES}, got {basis!r}")
    if not isinstance(rank, int) or rank < 1:
        raise ShareLoraError(f"rank must be a positive integer, got {rank!r}")


def compress_adapters(base_model: nn.Module, adapters: dict[str, str | Path], rank: int, share: str = "A",
                      across_layers: bool = True, basis: str = "update", alpha: float | None = None):
    """Fit one shared A per share group and per-task B's; return (multi-adapter model, report).

    Args:
        base_model: the base the adapters were trained on (it becomes the returned model's base).
        adapters: {task name: adapter directory} (PEFT LoRA or sharelora).
        rank: k, the shared A's rank (the compressed adapters' rank).
        share: "A" (a B per task and layer) or "AB" (a B per task and module type; needs across_layers).
        across_layers: one shared A per module type for all layers (True) or per module (False).
        basis: "update" or "A", see the module docstring.
        alpha: the compressed adapters' alpha (default: rank, so scaling is 1; B absorbs the rest).

    The report holds, per task and module, the relative update error
    ``||B_t' A_s - D_t||_F / ||D_t||_F`` (0 for a module the task leaves unchanged), its mean and
    max per task, and the parameter counts before and after.
    """
    if not adapters:
        raise ShareLoraError("compress_adapters needs at least one {name: directory}")
    _check_options(rank, share, across_layers, basis)
    read = {name: adapter_updates(base_model, d) for name, d in adapters.items()}
    return compress_updates(base_model, read, rank, share=share, across_layers=across_layers, basis=basis,
                            alpha=alpha)


def compress_updates(base_model: nn.Module, read: dict, rank: int, share: str = "A", across_layers: bool = True,
                     basis: str = "update", alpha: float | None = None):
    """``compress_adapters`` on updates already read: {task: ``adapter_updates(...)``}.

    For adapters whose bases differ in their heads (e.g. classifiers with different label counts),
    read each with its own base and give heads whose tensors fit ``base_model``'s modules.
    """
    from .model import ShareLoraModel

    if not read:
        raise ShareLoraError("compress_updates needs at least one {name: adapter_updates(...)}")
    _check_options(rank, share, across_layers, basis)
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
