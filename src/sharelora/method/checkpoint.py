"""The adapter directory: ``adapter_config.json`` + ``adapter_model.safetensors``.

Each tensor of the sharing plan is stored once under its plan key (a shared A is one entry,
``...layer.*.attention.self.query.lora_A``), and trained modules under ``modules_to_save.<path>``.
Files are written to a temporary name in the same directory and renamed into place, so a crash
never leaves a half-written adapter where a good one was. Weights load with safetensors only.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from .config import CONFIG_NAME, ShareLoraConfig
from .errors import ShareLoraError

WEIGHTS_NAME = "adapter_model.safetensors"
MODULES_TO_SAVE_PREFIX = "modules_to_save."


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` as one safetensors file."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, safetensors_bytes(flat, metadata={"format": "pt", **(metadata or {})}))


def load_tensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing, truncated or corrupted file is a ShareLoraError."""
    path = Path(path)
    if not path.is_file():
        raise ShareLoraError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise ShareLoraError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); it is truncated or "
            f"corrupted: save the adapter again or restore the file"
        ) from e


def save_adapter(directory: str | Path, config: ShareLoraConfig, tensors: dict[str, torch.Tensor]) -> Path:
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ShareLoraError(f"{directory} exists and is not a directory; choose another output path")
    directory.mkdir(parents=True, exist_ok=True)
    # Weights first, config last: a directory whose config is present was completely written.
    save_tensors(directory / WEIGHTS_NAME, tensors, {"sharelora_format_version": "1"})
    atomic_write_text(directory / CONFIG_NAME, config.to_json_string())
    return directory


def load_adapter(directory: str | Path, device: str | torch.device = "cpu") -> tuple[ShareLoraConfig, dict[str, torch.Tensor]]:
    directory = Path(directory)
    if not directory.is_dir():
        raise ShareLoraError(f"adapter directory {directory} does not exist")
    if not (directory / WEIGHTS_NAME).is_file():
        other = sorted(p.name for p in directory.iterdir())
        hint = " (.bin pickles are not loaded for safety; convert to safetensors)" if any(
            n.endswith(".bin") for n in other) else ""
        raise ShareLoraError(f"{directory} has no {WEIGHTS_NAME}; it holds {other}{hint}")
    config = ShareLoraConfig.from_json_file(directory / CONFIG_NAME)
    return config, load_tensors(directory / WEIGHTS_NAME, device)


def read_json(path: str | Path) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise ShareLoraError(f"{path} does not exist") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShareLoraError(f"{path} is not valid JSON ({e}); the file is corrupted or truncated") from e
