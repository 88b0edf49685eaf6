"""Quantized base layers: bitsandbytes ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt`` (LLM.int8()).

A ``ShareLoraLayer`` wraps them as it wraps an ``nn.Linear`` (both are subclasses of it): the
frozen base computes ``W0 x`` from its quantized weights and the adapter adds
``(alpha/r) B A dropout(x)`` in its own dtype, so training (QLoRA) needs nothing from here. What
cannot be done on a quantized weight is writing ``B A`` into it: a 4-bit weight is a code per
element plus a scale per block of 64, an 8-bit one int8 rows with a scale per row, so a merge
would round ``W0 + B A`` back to those codes and the small update would drown in rounding. This
module dequantizes instead:

    dequantized_weight(layer)   W0 as the layer computes with it: (d_out, d_in), floating point
    to_float_linear(layer)      an nn.Linear holding that W0 (and the layer's bias)
    dequantize_modules(model)   every quantized linear map of a model replaced by its float one
    keep_trainable(model)       stop bitsandbytes' CPU inference repacking, which cuts autograd (below)

A merge into the float weights then gives exactly the adapted model's outputs (up to float
rounding), since ``dequantized_weight`` is what the quantized layer multiplies by.

bitsandbytes is an optional dependency (``pip install sharelora[quantize]``); it is imported only
when a quantized layer is met, and layers are recognised by class name so that models without
quantized layers never import it.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import ShareLoraError

_KINDS = {"Linear4bit": "4bit", "Linear8bitLt": "8bit"}


def quantization_of(module: nn.Module) -> str | None:
    """"4bit" for a bitsandbytes ``Linear4bit`` (and its NF4 / FP4 subclasses), "8bit" for a
    ``Linear8bitLt``, None for anything else."""
    for cls in type(module).__mro__:
        if cls.__module__.startswith("bitsandbytes") and cls.__name__ in _KINDS:
            return _KINDS[cls.__name__]
    return None


def keep_trainable(model: nn.Module) -> int:
    """Keep the 4-bit layers of ``model`` differentiable; returns how many were changed.

    bitsandbytes (0.49+) on a CPU with AVX512-BF16 repacks a ``Linear4bit`` 's weight, in place,
    the first time the layer runs in eval mode on an input without gradient, for a faster
    inference kernel, and from then on computes the layer outside autograd: no gradient reaches
    anything below it. A model evaluated during training (every dev evaluation) would then train
    on silently wrong (mostly zero) gradients, so a model with adapters turns the repacking off
    (eval on such a CPU is then as fast as training's forward, not faster) and unpacks a weight
    that was repacked already. It also avoids the repacking's failure on inputs narrower than
    64 features.
    """
    changed = 0
    for module in model.modules():
        if quantization_of(module) != "4bit":
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
        weight = module.weight
        state = getattr(weight, "quant_state", None)
        if getattr(state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
            changed += 1
    return changed


def _bnb():
    try:
        import bitsandbytes
    except ImportError as e:  # a quantized layer exists, so bitsandbytes was importable once
        raise ShareLoraError("dequantizing a bitsandbytes layer needs bitsandbytes: pip install "
                             "'sharelora[quantize]'") from e
    return bitsandbytes


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The weight ``module`` multiplies by, as a float (d_out, d_in) tensor on its device.

    4-bit: the block-wise codes times their scales, in the dtype the weight had before it was
    quantized. 8-bit: the int8 rows times their row scales / 127, in float32. A layer whose
    weight is not quantized yet (bitsandbytes quantizes when it moves to its device) gives its
    float weight.
    """
    kind = quantization_of(module)
    if kind is None:
        raise ShareLoraError(f"{type(module).__name__} is not a bitsandbytes Linear4bit / Linear8bitLt")
    weight = module.weight
    bnb = _bnb()
    if kind == "4bit":
        state = getattr(weight, "quant_state", None)
        if state is None:
            return weight.data
        if getattr(state, "packing_format_for_cpu", False):  # repacked for inference: see keep_trainable
            keep_trainable(module)
            state = weight.quant_state
        return bnb.functional.dequantize_4bit(weight.data, state)
    if weight.dtype != torch.int8:
        return weight.data
    scales = getattr(weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise ShareLoraError(f"{type(module).__name__} holds int8 weights without their row scales (SCB); "
                             "it cannot be dequantized. Run one forward pass first, or load the model again")
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales)


@torch.no_grad()
def to_float_linear(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Linear:
    """An ``nn.Linear`` (frozen) that computes what the quantized ``module`` computes, in ``dtype``
    (default: the dequantized weight's dtype)."""
    weight = dequantized_weight(module)
    dtype = dtype or weight.dtype
    bias = module.bias
    linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None, device=weight.device,
                       dtype=dtype)
    linear.weight.copy_(weight.reshape(module.out_features, module.in_features))
    if bias is not None:
        linear.bias.copy_(bias)
    linear.requires_grad_(False)
    hook = getattr(module, "_hf_hook", None)
    if hook is not None:  # accelerate's device-placement hook (device_map): the new module keeps it
        from accelerate.hooks import add_hook_to_module, remove_hook_from_module

        remove_hook_from_module(module)
        add_hook_to_module(linear, hook)
    return linear


def dequantize_modules(model: nn.Module, dtype: torch.dtype | None = None) -> list[str]:
    """Replace every bitsandbytes linear map inside ``model`` by ``to_float_linear``; their names.

    A transformers model also forgets that it was quantized (``hf_quantizer``, ``is_quantized``,
    ``is_loaded_in_4bit`` / ``_8bit``, ``config.quantization_config``), as its own
    ``dequantize()`` does, so that it saves and loads as the float model it now is.
    """
    names = [n for n, m in model.named_modules() if n and quantization_of(m) is not None]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, to_float_linear(parent.get_submodule(leaf), dtype))
    if names:
        forget_quantization(model)
    return names


def forget_quantization(model: nn.Module) -> None:
    """Clear the marks transformers puts on a model it loaded quantized."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    config = getattr(model, "config", None)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if config is not None and attr in vars(config):
            delattr(config, attr)
    for flag in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if flag in vars(model):
            setattr(model, flag, False)
