"""The methods the benchmark compares, each turned into a model + optimizer + training step.

    floor                 frozen base; one scalar multiplies the embeddings' output and is the only
                          trainable parameter, so backward crosses every layer but computes no weight
                          gradient: the physical limit of any adapter that touches layer 0
    sharelora-none/A/B/AB ShareLoRA with that ``share`` on the q,v targets (``none`` is plain LoRA);
                          q and v read the same x, so they draw one dropout mask and compute
                          dropout(x) [A_q; A_v]^T in one product (``dropout_mask="input"``, the default)
    sharelora-A-modulemask ShareA with ``dropout_mask="module"``: an independent mask and product per
                          module, as PEFT does (what the shared product is measured against)
    sharelora-qkv         ShareA with scope "qkv": one A for q, k and v of every layer (q,k,v targets);
                          the layer computes dropout(x) A^T once per attention block
    sharelora-qkv-unfused the same adapter with that reuse switched off (three products per block),
                          the reference the fused product is measured against
    peft-lora             Hugging Face PEFT LoRA, same rank, alpha, targets and dropout
    peft-lora-tiedA       PEFT LoRA whose lora_A modules are layer 0's in every layer, per module type
                          (how the paper's authors share A with PEFT)
    full                  full fine-tuning (every parameter trainable)

The ShareLoRA rows are presets of the method vocabulary (training/methods.py: lora, sharea, shareb,
shareab, sharea-qkv; ``PRESETS``) with the options named above. Every method trains with AdamW on its trainable parameters (each shared tensor once) and no task
head is trained, so the trainable count is exactly the adapter's.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..method import ShareLoraConfig, build_plan, get_sharelora_model
from ..training.engine import optimizer_step
from ..training.methods import preset_config
from ..training.optim import adamw
from .models import ModelSpec

SHARELORA = ("sharelora-none", "sharelora-A", "sharelora-A-modulemask", "sharelora-B", "sharelora-AB",
             "sharelora-qkv", "sharelora-qkv-unfused")
METHODS = ("floor", *SHARELORA, "peft-lora", "peft-lora-tiedA", "full")
# Methods that have an adapter to merge, whose inference latency is reported.
INFERENCE_METHODS = (*SHARELORA, "peft-lora", "peft-lora-tiedA")


@dataclass
class AdapterSettings:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    lr: float = 1e-4


@dataclass
class Prepared:
    """One method, ready to time: ``step(batch)`` is forward + backward + AdamW step."""

    name: str
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    expected_trainable: int
    save: Callable[[Path], Path | None] | None = None  # writes the adapter, returns its file
    merge: Callable[[], None] | None = None
    unmerge: Callable[[], None] | None = None
    notes: list[str] = field(default_factory=list)
    seen_inputs: list[str] = field(default_factory=list)  # fingerprints of the batches it stepped on

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def loss(self, batch: dict) -> torch.Tensor:
        return self.model(**batch).loss

    def step(self, batch: dict) -> None:
        """Forward, backward and the training engine's optimizer step (no clipping: the step alone is timed)."""
        self.loss(batch).backward()
        optimizer_step(self.optimizer)

    def optimizer_state_bytes(self) -> int:
        """Bytes of every tensor in the optimizer state (exp_avg, exp_avg_sq, step)."""
        total = 0
        for state in self.optimizer.state.values():
            for v in state.values():
                if torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total


def unique_params(model: nn.Module, trainable_only: bool = True) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in model.parameters():
        if (p.requires_grad or not trainable_only) and id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def frozen_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base``'s modules that shares its (frozen) parameters and buffers: no weight copy."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    model = copy.deepcopy(base, memo)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


class FloorModel(nn.Module):
    """The frozen base with one trainable scalar multiplying the input embeddings' output."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base_model = base
        self.scale = nn.Parameter(torch.ones((), device=next(base.parameters()).device))
        base.get_input_embeddings().register_forward_hook(self._scale)

    def _scale(self, module, args, output):
        return output * self.scale

    def forward(self, **kwargs):
        return self.base_model(**kwargs)


# The benchmark's ShareLoRA rows as the method vocabulary's presets (training/methods.py) and options on top.
PRESETS = {"sharelora-none": ("lora", {}), "sharelora-A": ("sharea", {}),
           "sharelora-A-modulemask": ("sharea", {"dropout_mask": "module"}), "sharelora-B": ("shareb", {}),
           "sharelora-AB": ("shareab", {}), "sharelora-qkv": ("sharea-qkv", {}), "sharelora-qkv-unfused": ("sharea-qkv", {})}


def _sharelora_config(name: str, spec: ModelSpec, s: AdapterSettings) -> ShareLoraConfig:
    preset, options = PRESETS[name]
    if name.startswith("sharelora-qkv") and not spec.qkv_targets:
        raise ValueError(f"no q,k,v target names known for targets {list(spec.targets)}; pass --qkv-targets")
    targets = spec.qkv_targets if name.startswith("sharelora-qkv") else spec.targets
    return preset_config(preset, rank=s.rank, alpha=s.alpha, dropout=s.dropout, target_modules=list(targets),
                         **options)


def _adamw(params, s: AdapterSettings) -> torch.optim.Optimizer:
    return adamw(params, lr=s.lr)  # the trainer's optimizer (fused where torch has it), for every method


def _prepare_sharelora(name, base, spec, s):
    model = get_sharelora_model(frozen_copy(base), _sharelora_config(name, spec, s))
    if name == "sharelora-qkv-unfused":
        for _, layer in model.sharelora_layers():
            layer.reuse_shared_input = False
    params = unique_params(model)

    def save(d: Path) -> Path:
        model.save_pretrained(d)
        return d / "adapter_model.safetensors"

    return Prepared(name, model, params, _adamw(params, s), model.plan.num_parameters(), save=save,
                    merge=model.merge, unmerge=model.unmerge)


def _peft_lora(base, spec, s):
    from peft import LoraConfig, get_peft_model

    if any("." in t for t in spec.targets):
        raise ValueError(f"PEFT LoRA cannot adapt slices of a fused module ({list(spec.targets)})")
    cfg = LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(spec.targets),
                     bias="none")
    with warnings.catch_warnings():
        # PEFT reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix, and noise here.
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(frozen_copy(base), cfg)


def tie_peft_lora_A(peft_model: nn.Module, adapter: str = "default") -> int:
    """Make every layer of a module type use the first layer's ``lora_A`` module; returns #tied modules.

    This is how the paper's authors share A with PEFT: assign one module to every layer. PEFT still
    saves one copy per layer, and the optimizer sees the tensor once (parameters() deduplicates).
    """
    from peft.tuners.lora import LoraLayer

    first: dict[str, nn.Module] = {}
    tied = 0
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            mtype = name.rsplit(".", 1)[-1]
            if mtype in first:
                module.lora_A[adapter] = first[mtype]
                tied += 1
            else:
                first[mtype] = module.lora_A[adapter]
    return tied


def _prepare_peft(name, base, spec, s):
    model = _peft_lora(base, spec, s)
    plan_cfg = ShareLoraConfig(rank=s.rank, share="none" if name == "peft-lora" else "A",
                               target_modules=list(spec.targets))
    expected = build_plan(base, plan_cfg).num_parameters()
    notes = []
    if name == "peft-lora-tiedA":
        notes.append(f"tied lora_A of {tie_peft_lora_A(model)} modules to their module type's first layer")
    params = unique_params(model)

    def save(d: Path) -> Path:
        model.save_pretrained(d)
        return d / "adapter_model.safetensors"

    return Prepared(name, model, params, _adamw(params, s), expected, save=save,
                    merge=model.base_model.merge_adapter, unmerge=model.base_model.unmerge_adapter, notes=notes)


def _prepare_floor(name, base, spec, s):
    model = FloorModel(frozen_copy(base))
    params = unique_params(model)
    return Prepared(name, model, params, _adamw(params, s), 1)


def _prepare_full(name, base, spec, s):
    model = copy.deepcopy(base)  # its own weights: the optimizer changes them
    for p in model.parameters():
        p.requires_grad_(True)
    params = unique_params(model)

    def save(d: Path) -> Path:
        from ..method.checkpoint import save_tensors

        path = d / "model.safetensors"
        seen, tensors = set(), {}
        for n, p in model.named_parameters():  # tied weights (shared embeddings) once
            if id(p) not in seen:
                seen.add(id(p))
                tensors[n] = p.detach().contiguous()
        save_tensors(path, tensors)  # as every file the project writes: atomic, with its sha256
        return path

    return Prepared(name, model, params, _adamw(params, s), sum(p.numel() for p in params), save=save)


_BUILDERS = {"floor": _prepare_floor, "peft-lora": _prepare_peft, "peft-lora-tiedA": _prepare_peft,
             "full": _prepare_full, **{m: _prepare_sharelora for m in SHARELORA}}


def prepare(name: str, base: nn.Module, spec: ModelSpec, settings: AdapterSettings) -> Prepared:
    """Build method ``name`` on (a copy of) ``base``; base's own modules are left as they are."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    prepared = _BUILDERS[name](name, base, spec, settings)
    prepared.model.train()
    return prepared
