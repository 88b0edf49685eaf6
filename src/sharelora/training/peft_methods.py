"""PEFT's VeRA and VB-LoRA as baselines (``peft-vera``, ``peft-vblora`` in methods.py).

``peft-vera`` and ``peft-vblora`` wrap the base model with PEFT's own implementation
(``peft.get_peft_model``) on the same target modules as ours, the classification head trained in
full through ``modules_to_save`` (as ours), with PEFT's documented defaults for every setting not
given (peft 0.21: VeRA r = 256, d_initial = 0.1, dropout 0, projection_prng_key 0, projections
saved; VB-LoRA r = 4, num_vectors = 256, vector_length = 256, topk = 2, dropout 0).

What each trains, for targets t with d_in(t) -> d_out(t):

    VeRA:    W x + diag(lambda_b) B diag(lambda_d) A x, A (r, d_in) and B (d_out, r) frozen random,
             shared by all layers; trained per target lambda_d (r) and lambda_b (d_out):
             adapter params = sum_t (r + d_out(t))
    VB-LoRA: A and B assembled from a bank of num_vectors vectors of length L (shared by all layers),
             each length-L piece a top-k softmax mix of the bank by trained logits: per target
             logits_A (r, d_in / L, num_vectors) and logits_B (d_out / L, r, num_vectors):
             adapter params = num_vectors * L + sum_t r * num_vectors * (d_in(t) + d_out(t)) / L

Their options (``method_options``, or ``peft-vblora@num_vectors=64`` in ``compare --methods``) are
checked with the rest of the vocabulary in methods.py.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built, so the vocabulary loads instantly
    from torch import nn

# PEFT option -> documented default. r is TrainConfig.rank; dropout maps to vera_dropout / vblora_dropout.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "vera": {"r": 256, "d_initial": 0.1, "dropout": 0.0, "projection_prng_key": 0},
    "vblora": {"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2, "dropout": 0.0},
}


def _linear_shapes(model: nn.Module, targets: list[str] | str) -> dict[str, tuple[int, int]]:
    def chosen(name: str) -> bool:
        if isinstance(targets, str):  # PEFT's rule: "all-linear", or a regex that matches the whole path
            return targets == "all-linear" or re.fullmatch(targets, name) is not None
        return any(name == t or name.endswith("." + t) for t in targets)

    from torch import nn

    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and chosen(name):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def peft_config(kind: str, cfg: Any, model: nn.Module, modules_to_save: list[str]) -> Any:
    """PEFT's VeraConfig (``kind`` "vera") / VBLoRAConfig ("vblora") for run ``cfg`` (rank cfg.rank, its
    method_options, PEFT's defaults for the rest)."""
    import peft

    options = {**PEFT_DEFAULTS[kind], **cfg.method_options}
    options.pop("r")
    dropout = options.pop("dropout")
    task_type = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() and not modules_to_save else "SEQ_CLS"
    targets = cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)
    common = dict(r=cfg.rank, target_modules=targets, modules_to_save=list(modules_to_save) or None,
                  task_type=task_type)
    if kind == "vera":
        return peft.VeraConfig(vera_dropout=dropout, **common, **options)
    length = options["vector_length"]
    shapes = _linear_shapes(model, targets)
    bad = sorted({d for io in shapes.values() for d in io if d % length})
    if bad:
        sizes = sorted({d for io in shapes.values() for d in io})
        fits = [v for v in range(min(sizes), 0, -1) if all(d % v == 0 for d in sizes) and v <= 256][:3]
        raise ValueError(f"peft-vblora: vector_length {length} does not divide the targets' feature sizes {bad} "
                         f"(VB-LoRA cuts every row of A and B into pieces of that length); pass one that divides "
                         f"{sizes}, e.g. peft-vblora@vector_length={fits[0] if fits else 1}")
    return peft.VBLoRAConfig(vblora_dropout=dropout, **common, **options)


def prepare_peft_model(base_model: nn.Module, config: Any) -> nn.Module:
    """``peft.get_peft_model`` with the method's config (``peft_config``): only the adapter and the head train."""
    import peft

    return peft.get_peft_model(base_model, config)


def head_parameters(model: nn.Module) -> int:
    """Trainable parameters of PEFT's ``modules_to_save`` copies (the head), each tensor once."""
    from peft.utils.other import ModulesToSaveWrapper

    seen: dict[int, int] = {}
    for module in model.modules():
        if isinstance(module, ModulesToSaveWrapper):
            for p in module.modules_to_save.parameters():
                if p.requires_grad:
                    seen[id(p)] = p.numel()
    return sum(seen.values())


def peft_parameter_summary(model: nn.Module, kind: str, rank: int, method_options: dict[str, Any]) -> dict[str, Any]:
    """results.json's counts for a PEFT method, as for ours: ``adapter`` excludes the head,
    ``trainable`` is what the optimizer updates (head included), ``total`` every parameter once
    (PEFT keeps the original head beside its trained copy; frozen buffers such as VeRA's shared
    projections are not parameters and count in neither; they are in the adapter file)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    head = head_parameters(model)
    options = {**PEFT_DEFAULTS[kind], **method_options, "r": rank}
    return {
        "trainable": trainable, "total": sum(p.numel() for p in params), "adapter": trainable - head,
        "head": head, "lora_equivalent": None, "saving_vs_lora": None,
        "report": {"peft_type": kind, "peft_version": _peft_version(), "options": options},
    }


def _peft_version() -> str:
    import peft

    return peft.__version__
