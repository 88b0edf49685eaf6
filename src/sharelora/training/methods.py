"""Turn a loaded base model into the model a method trains.

``full`` fine-tunes every weight of the base model. Every other method wraps the base model with
``get_sharelora_model`` and trains only the adapter plus the classification head
(``modules_to_save``): ``lora`` shares nothing, ``sharea`` / ``shareb`` / ``shareab`` share A, B or
both across layers (per module type), ``sharea-qkv`` shares one A across query, key and value.
``peft-vera`` / ``peft-vblora`` are PEFT's VeRA and VB-LoRA on the same targets (peft_methods.py).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .config import METHODS, TrainConfig
from .peft_methods import peft_kind, peft_parameter_summary, prepare_peft_model, validate_method_options

# Names that transformers uses for a sequence-classification head, across architectures.
HEAD_NAMES = ("classifier", "score")


def head_modules(model: nn.Module) -> list[str]:
    """Names of the classification head's modules in ``model`` (BERT/RoBERTa: "classifier")."""
    found = []
    for name in HEAD_NAMES:
        if any(path == name or path.endswith("." + name) for path, _ in model.named_modules()):
            found.append(name)
    return found


def sharelora_config(cfg: TrainConfig, model: nn.Module) -> Any:
    """The ``ShareLoraConfig`` that method ``cfg.method`` applies to ``model``."""
    from sharelora import ShareLoraConfig

    overrides = dict(METHODS[cfg.method] or {})
    overrides.pop("target_modules", None)  # already folded into cfg.targets by TrainConfig.resolved
    modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else head_modules(model)
    return ShareLoraConfig(
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=list(cfg.targets),
        modules_to_save=list(modules_to_save),
        base_model_name_or_path=cfg.model,
        **overrides,
    )


def prepare_model(base_model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """The model to train: the base model itself (full) or a ``ShareLoraModel`` around it, with the
    run's memory options (``--bf16``, ``--gradient-checkpointing``; see memory.py) turned on."""
    validate_method_options(cfg)  # PEFT's settings (peft_methods.py); none for the other methods
    if cfg.is_full:
        for p in base_model.parameters():
            p.requires_grad_(True)
        model = base_model
    elif peft_kind(cfg.method) is not None:  # PEFT's VeRA / VB-LoRA (peft_methods.py)
        modules_to_save = cfg.modules_to_save if cfg.modules_to_save is not None else head_modules(base_model)
        model = prepare_peft_model(base_model, cfg, modules_to_save)
    else:
        from sharelora import get_sharelora_model

        model = get_sharelora_model(base_model, sharelora_config(cfg, base_model))
    if cfg.bf16 or cfg.gradient_checkpointing:
        from .memory import apply_memory_options

        apply_memory_options(model, cfg)
    return model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameters, each shared tensor counted once (as the optimizer sees it)."""
    params = list(model.parameters())  # nn.Module.parameters() yields a shared Parameter once
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


def parameter_summary(model: nn.Module, cfg: TrainConfig) -> dict[str, Any]:
    """Parameter counts for results.json.

    ``adapter`` counts the method's own weights without the classification head (the paper's
    and SPEC's convention); ``trainable`` counts everything the optimizer updates, head included.
    For full fine-tuning the adapter is the whole model.
    """
    if peft_kind(cfg.method) is not None:
        return peft_parameter_summary(model, cfg)
    counts = count_parameters(model)
    summary: dict[str, Any] = {"trainable": counts["trainable"], "total": counts["total"]}
    if cfg.is_full:
        summary["adapter"] = counts["trainable"]
        return summary
    report = model.parameter_report()
    summary["adapter"] = int(report["adapter_parameters"])
    summary["lora_equivalent"] = int(report["lora_equivalent_parameters"])
    summary["saving_vs_lora"] = float(report["saving_vs_lora"])
    summary["head"] = int(report["modules_to_save_parameters"])
    summary["report"] = report
    return summary
