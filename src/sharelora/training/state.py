"""Resume checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is ONE safetensors file, so it is replaced atomically (written to a temporary file
in the same directory, flushed, then ``os.replace``d): a run killed while writing leaves the
previous checkpoint intact, and a full disk is an error that leaves it intact too. The file
records the sha256 of its tensor data and every load checks it, so a corrupted checkpoint is an
error, not a resume from wrong weights (both from :mod:`sharelora.method.checkpoint`, the one
home of safe writes). Tensors are stored as safetensors (no pickle); the rest travels as JSON in
the file's metadata under the key ``"state"``:

    param.<name>                     trainable parameters (each shared tensor once)
    optim.<index>.<key>              AdamW state per parameter (step, exp_avg, exp_avg_sq)
    rng.torch / rng.cuda.<i>         torch's CPU and CUDA generator states (dropout)
    rng.rank<r>.torch / .cuda.<i>    the same for process r > 0 of a multi-process run
    metadata["state"]                step, best dev metric, loss window, optimizer hyperparameters,
                                     Python and NumPy generator states (``rng``; ``rng_ranks`` for
                                     processes 1, 2, ...), config, elapsed seconds

The data order needs no state: epoch e visits the training set in the permutation drawn from a
generator seeded with (seed, e), so position = the global step.

Several processes (see distributed.py): every one calls ``save_checkpoint`` / ``save_weights`` (an
FSDP shard is gathered into the whole tensor by all of them together) and only rank 0 writes
(``write``); the file holds whole tensors, as a single process writes them, so a run may resume with
another number of processes or with and without FSDP. Every process loads the same file and takes
its own generator states and, under FSDP, its own shard of each tensor.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..method.checkpoint import atomic_write_text  # noqa: F401 (re-exported: one home for atomic writes)
from ..method.checkpoint import read_safetensors, save_tensors
from .distributed import full_tensor, is_dtensor, like

STATE_KEY = "state"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in a fixed order; a shared Parameter appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# --- random number generators ----------------------------------------------------------------
def capture_rng(cuda_devices: list[int] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of every generator a training step may draw from: tensors and JSON parts.

    ``cuda_devices``: the GPUs whose generators to record (default: all; one process of several
    records its own GPU's alone, rather than opening a context on every other one).
    """
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()) if cuda_devices is None else cuda_devices:
            tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    py = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)],
    }
    return tensors, json_part


def restore_rng(tensors: dict[str, torch.Tensor], json_part: dict[str, Any], prefix: str = "rng") -> None:
    torch.set_rng_state(tensors[f"{prefix}.torch"])
    if torch.cuda.is_available():
        for key in (k for k in tensors if k.startswith(f"{prefix}.cuda.")):
            device = int(key.split(".")[-1])
            if device < torch.cuda.device_count():
                torch.cuda.set_rng_state(tensors[key], device)
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- the checkpoint ----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any], *,
                    rngs: list[tuple[dict[str, torch.Tensor], dict[str, Any]]] | None = None,
                    write: bool = True) -> None:
    """Write the resume checkpoint: parameters, optimizer, generators and ``state`` (JSON-able).

    ``rngs``: every process's ``capture_rng()``, in rank order (default: this process's alone).
    ``write``: whether this process writes the file (rank 0); the others only help gather shards.
    """
    params = trainable_parameters(model)
    tensors: dict[str, torch.Tensor] = {f"param.{n}": full_tensor(p) for n, p in params.items()}
    opt = optimizer.state_dict()
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            t = full_tensor(value) if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = t
    if not write:
        return
    rngs = rngs or [capture_rng()]
    for rank, (rng_tensors, _) in enumerate(rngs):
        prefix = "rng" if rank == 0 else f"rng.rank{rank}"
        tensors.update({prefix + k[len("rng"):]: v for k, v in rng_tensors.items()})
    meta = dict(state)
    meta["optimizer_param_groups"] = opt["param_groups"]
    meta["parameter_names"] = list(params)
    meta["rng"] = rngs[0][1]
    if len(rngs) > 1:
        meta["rng_ranks"] = [json_part for _, json_part in rngs[1:]]
    save_tensors(path, tensors, {STATE_KEY: json.dumps(meta)})


def read_state(path: Path) -> dict[str, Any]:
    """The JSON state of a checkpoint (step, stage, config, ...) without reading its tensors; ``load_checkpoint``
    checks the file's integrity when it restores it."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a damaged file: read it in full for the error that names it
        _, metadata = read_safetensors(path)
    if STATE_KEY not in metadata:
        raise ValueError(f"{path} is not a sharelora training checkpoint (no {STATE_KEY!r} metadata)")
    return json.loads(metadata[STATE_KEY])


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, rank: int = 0) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into ``model`` and ``optimizer``; return the state dict.

    ``rank``: whose generator states to restore. The returned dict's ``"rng_restored"`` is False
    when the checkpoint holds none for this rank (it was written by fewer processes).
    """
    tensors, metadata = read_safetensors(path)
    if STATE_KEY not in metadata:
        raise ValueError(f"{path} is not a sharelora training checkpoint (no {STATE_KEY!r} metadata)")
    meta = json.loads(metadata[STATE_KEY])
    params = trainable_parameters(model)
    if list(params) != meta["parameter_names"]:
        missing = sorted(set(meta["parameter_names"]) ^ set(params))[:5]
        raise ValueError(
            f"checkpoint {path} was written for different trainable parameters (e.g. {missing}); "
            "resume with the same method, targets and rank, or start a fresh output directory"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(like(tensors[f"param.{name}"], p))
    ordered = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's indices
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            p = ordered[int(index)]
            if is_dtensor(p) and value.shape == p.shape:  # a moment (exp_avg, ...) of a sharded parameter
                value = like(value, p)
            state.setdefault(int(index), {})[name] = value
    # In index order: the file's tensors come back in an order of their own in each process, and the next
    # save_checkpoint gathers each FSDP moment in the optimizer's state order, the same on every process.
    state = {i: dict(sorted(state[i].items())) for i in sorted(state)}
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    ranks = meta.get("rng_ranks", [])
    meta["rng_restored"] = rank <= len(ranks)
    if rank == 0:
        restore_rng(tensors, meta["rng"])
    elif meta["rng_restored"]:
        restore_rng(tensors, ranks[rank - 1], prefix=f"rng.rank{rank}")
    return meta


def save_weights(path: Path, model: nn.Module, *, write: bool = True) -> None:
    """Save the trainable parameters (the best checkpoint so far) atomically; ``write`` as in save_checkpoint."""
    tensors = {name: full_tensor(p) for name, p in trainable_parameters(model).items()}
    if write:
        save_tensors(path, tensors)


def load_weights(path: Path, model: nn.Module, *, frozen: bool = False) -> None:
    """Copy trainable parameters saved by ``save_weights`` back into ``model``; ``frozen``: parameters
    trainable when they were saved, whatever they are now (an earlier stage's)."""
    tensors, _ = read_safetensors(path)
    params = dict(model.named_parameters()) if frozen else trainable_parameters(model)
    if not set(tensors) <= set(params) or not (frozen or set(tensors) == set(params)):
        raise ValueError(f"{path} holds other parameters than the model trains; it belongs to another run")
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(like(t, params[name]))
