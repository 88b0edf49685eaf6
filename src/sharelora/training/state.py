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
    metadata["state"]                step, best dev metric, loss window, optimizer hyperparameters,
                                     Python and NumPy generator states, config, elapsed seconds

The data order needs no state: epoch e visits the training set in the permutation drawn from a
generator seeded with (seed, e), so position = the global step.
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

STATE_KEY = "state"


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in a fixed order; a shared Parameter appears once."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file so that ``path`` is either the old file or the complete new one.

    The file records the sha256 of its data; a full disk raises a ShareLoraError (an OSError too)
    naming ``path``, and the previous file stays as it was.
    """
    save_tensors(path, tensors, metadata)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; a corrupted or truncated file is a ShareLoraError."""
    return read_safetensors(path)


# --- random number generators ----------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The states of every generator a training step may draw from: tensors and JSON parts."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    json_part = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached_gauss)],
    }
    return tensors, json_part


def restore_rng(tensors: dict[str, torch.Tensor], json_part: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.split(".")[-1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = json_part["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = json_part["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


# --- the checkpoint ----------------------------------------------------------------------------
def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Write the resume checkpoint: parameters, optimizer, generators and ``state`` (JSON-able)."""
    params = trainable_parameters(model)
    tensors: dict[str, torch.Tensor] = {f"param.{n}": p for n, p in params.items()}
    opt = optimizer.state_dict()
    for index, per_param in opt["state"].items():
        for key, value in per_param.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"optim.{index}.{key}"] = t
    rng_tensors, rng_json = capture_rng()
    tensors.update(rng_tensors)
    meta = dict(state)
    meta["optimizer_param_groups"] = opt["param_groups"]
    meta["parameter_names"] = list(params)
    meta["rng"] = rng_json
    atomic_save_tensors(tensors, path, metadata={STATE_KEY: json.dumps(meta)})


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore what ``save_checkpoint`` wrote into ``model`` and ``optimizer``; return the state dict."""
    tensors, metadata = load_tensors(path)
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
            p.copy_(tensors[f"param.{name}"].to(p.device, p.dtype))
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer_param_groups"]})
    restore_rng(tensors, meta["rng"])
    return meta


def save_weights(path: Path, model: nn.Module) -> None:
    """Save the trainable parameters (the best checkpoint so far) atomically."""
    atomic_save_tensors(trainable_parameters(model), path)


def load_weights(path: Path, model: nn.Module) -> None:
    """Copy trainable parameters saved by ``save_weights`` back into ``model``."""
    tensors, _ = load_tensors(path)
    params = trainable_parameters(model)
    if set(tensors) != set(params):
        raise ValueError(f"{path} holds other parameters than the model trains; it belongs to another run")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
