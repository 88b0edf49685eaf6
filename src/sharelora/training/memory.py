"""Memory options of a run: ``--bf16``, ``--gradient-checkpointing``, ``--quantize 4bit|8bit``.

    --bf16                    the frozen base weights are stored in bfloat16 (half of fp32) and the
                              forward runs under bf16 autocast; what trains (the adapter, a head in
                              modules_to_save) keeps fp32 master weights, the optimizer updates fp32
                              values and the logits come back as fp32 for the loss. Full fine-tuning
                              keeps every (trainable) weight in fp32 and only autocasts.
    --gradient-checkpointing  activation checkpointing of the transformer blocks (non-reentrant):
                              a block's activations are recomputed in backward instead of kept;
                              exact, slower by about one more forward.
    --quantize 4bit           the base's linear maps as bitsandbytes NF4 with double quantization
                              (QLoRA), heads (lm_head, classifier, score) kept in float; their matmuls
                              run in --quantize-compute-dtype (default bfloat16 with --bf16, else
                              float32).
    --quantize 8bit           LLM.int8() (int8 weights with per-row scales; bitsandbytes computes in
                              fp16 and rounds the activations to int8 as well).

The options are TrainConfig fields, so they are saved with the run, checked on ``--resume`` and
recorded in the adapter's run_info.json. With all of them off nothing here runs: the model is
loaded and trained exactly as before.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

QUANTIZE = ("4bit", "8bit")
COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def base_dtype(cfg: Any) -> torch.dtype:
    """The dtype the base model is loaded in: bf16 for a frozen base with --bf16, else fp32."""
    return torch.bfloat16 if cfg.bf16 and not cfg.is_full else torch.float32


def load_options(cfg: Any) -> dict[str, Any]:
    """Keyword arguments of ``sources.load_model`` for this run's memory options ({} when all are off)."""
    options: dict[str, Any] = {}
    if cfg.bf16 and not cfg.is_full:
        options["dtype"] = torch.bfloat16
    if cfg.quantize is not None:
        options["quantize"] = cfg.quantize
        if cfg.quantize_compute_dtype is not None:
            options["quantize_compute_dtype"] = COMPUTE_DTYPES[cfg.quantize_compute_dtype]
    return options


def run_info(cfg: Any) -> dict[str, Any]:
    """What run_info.json records of the memory options (so eval / merge load the base as it was trained)."""
    return {"bf16": cfg.bf16, "quantize": cfg.quantize, "quantize_compute_dtype": cfg.quantize_compute_dtype}


def apply_memory_options(model: nn.Module, cfg: Any) -> nn.Module:
    """Turn on the run's memory options on the model to train (after ``prepare_model``); returns it."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.bf16:
        with torch.no_grad():  # fp32 master weights for whatever trains (a modules_to_save head loaded in bf16)
            for p in model.parameters():
                if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
                    p.data = p.data.float()
        autocast_bf16(model)
    return model


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing, non-reentrant (no input needs requires_grad for the adapters' gradients)."""
    base = model.get_base_model() if hasattr(model, "sharelora_bank") else model  # a ShareLoraModel: its base
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"--gradient-checkpointing: {type(base).__name__} is not a transformers model that "
                         "supports activation checkpointing; train it without the option")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "use_cache", False):
        config.use_cache = False  # a KV cache is of no use in training and conflicts with recomputation


def autocast_bf16(model: nn.Module) -> None:
    """Run ``model.forward`` (and ``generate``) under bf16 autocast, returning fp32 floating outputs.

    As accelerate's ``mixed_precision="bf16"`` does it: the wrapped methods are set on the
    instance, so the model keeps its class and its state dict.
    """
    from accelerate.utils import convert_outputs_to_fp32

    device_type = next(model.parameters()).device.type
    for name in ("forward", "generate"):
        method = getattr(model, name, None)
        if method is None:
            continue
        wrapped = _autocast(method, device_type)
        setattr(model, name, convert_outputs_to_fp32(wrapped) if name == "forward" else wrapped)


def _autocast(method, device_type: str):
    @functools.wraps(method)
    def run(*args, **kwargs):
        # The device is read at call time: the model may move after it is wrapped (.to(device)).
        with torch.autocast(device_type=_current_device(method, device_type), dtype=torch.bfloat16):
            return method(*args, **kwargs)

    return run


def _current_device(method, default: str) -> str:
    owner = getattr(method, "__self__", None)
    if isinstance(owner, nn.Module):
        p = next(owner.parameters(), None)
        if p is not None:
            return p.device.type
    return default
