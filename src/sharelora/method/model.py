"""ShareLoraModel: a base model with ShareLoRA layers injected, and the verbs users expect."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import checkpoint
from .config import ShareLoraConfig
from .errors import ShareLoraError
from .layers import SharedDownProjection, ShareLoraLayer, bank_name
from .plan import SharingPlan, build_plan, init_tensor, same_input_set

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _matching_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    found = {}
    for n, m in model.named_modules():
        if n and any(n == s or n.endswith("." + s) for s in names):
            found[n] = m
    missing = [s for s in names if not any(n == s or n.endswith("." + s) for n in found)]
    if missing:
        children = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_children()})
        raise ShareLoraError(f"modules_to_save {missing} matched no module; top-level modules: {children}")
    # Keep outermost matches only: a matched module's submodules come with it.
    return {n: m for n, m in found.items() if not any(n.startswith(o + ".") for o in found if o != n)}


class ShareLoraModel(nn.Module):
    """A model whose target linear maps compute ``W0 x + (alpha/r) B A dropout(x)``.

    The A and B tensors live once each in ``sharelora_bank`` (an ``nn.ParameterDict``) and the
    injected ``ShareLoraLayer`` s read them by key, following ``plan``. Only the adapter tensors
    and ``modules_to_save`` are trainable. ``forward`` is the base model's forward, and unknown
    attributes are looked up on the base model (``model.config``, ``model.generate``, ...).
    """

    def __init__(self, base_model: nn.Module, config: ShareLoraConfig):
        super().__init__()
        if isinstance(base_model, ShareLoraModel) or any(isinstance(m, ShareLoraLayer) for m in base_model.modules()):
            raise ShareLoraError("the model already has ShareLoRA layers; call merge_and_unload() first or use the "
                                 "original base model")
        config.validate()
        self.sharelora_config = config
        self.plan: SharingPlan = build_plan(base_model, config)
        saved = _matching_modules(base_model, list(config.modules_to_save)) if config.modules_to_save else {}

        for p in base_model.parameters():
            p.requires_grad_(False)
        for m in saved.values():
            for p in m.parameters():
                p.requires_grad_(True)
        self.modules_to_save_names = sorted(saved)

        ref = next(base_model.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else torch.float32
        bank = nn.ParameterDict()
        for key, spec in self.plan.tensors.items():
            bank[bank_name(key)] = nn.Parameter(init_tensor(spec, config.init_lora_weights, dtype, device))

        for module_name, targets in self.plan.targets_by_module().items():
            layer = ShareLoraLayer(base_model.get_submodule(module_name), targets, bank,
                                   config.scaling, config.dropout)
            _set_submodule(base_model, module_name, layer)

        self.base_model = base_model
        self.sharelora_bank = bank
        self._share_down_projections()

    def _share_down_projections(self) -> None:
        """Sibling modules that read one input compute their down-projections in one product.

        Whole (unsliced) adapted modules under one parent that usually read the same tensor
        (``SAME_INPUT_LEAVES``: q/k/v, gate/up) or that read with the same A (scope "qkv") get one
        ``SharedDownProjection``, cleared before and after each forward of the parent (the block
        that calls them); see ``ShareLoraLayer``. ``dropout_mask`` (config) decides whether they
        also share the dropout mask while training ("input") or compute separately ("module").
        """
        groups: dict[tuple[str, object], list[ShareLoraLayer]] = {}
        for name, layer in self.sharelora_layers():
            layer.dropout_mask = self.sharelora_config.dropout_mask
            if layer.whole:
                parent, _, leaf = name.rpartition(".")
                kind = same_input_set(leaf)
                groups.setdefault((parent, layer.keys[0][0] if kind is None else kind), []).append(layer)
        self._shared_down_hooks = []
        for (parent_name, _), layers in groups.items():
            if len(layers) < 2:
                continue
            shared = SharedDownProjection(tuple(dict.fromkeys(l.keys[0][0] for l in layers)), self.sharelora_bank)
            for layer in layers:
                layer.shared_down = shared
            parent = self.base_model.get_submodule(parent_name)
            self._shared_down_hooks += [parent.register_forward_pre_hook(shared.clear),
                                        parent.register_forward_hook(shared.clear)]

    # --- plumbing -----------------------------------------------------------------------------
    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "sharelora_bank"):
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def sharelora_layers(self) -> Iterator[tuple[str, ShareLoraLayer]]:
        for name, m in self.base_model.named_modules():
            if isinstance(m, ShareLoraLayer):
                yield name, m

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Turn on the base model's activation (gradient) checkpointing, non-reentrant by default.

        With the reentrant variant the frozen embeddings' output must require grad, or no gradient
        would reach the adapters inside the checkpointed blocks; this is arranged here.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if kwargs["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    activation_checkpointing_enable = gradient_checkpointing_enable

    # --- counting -----------------------------------------------------------------------------
    def parameter_report(self) -> dict:
        """Adapter parameters (each shared tensor once), LoRA's count on the same targets, the saving."""
        adapter = self.plan.num_parameters()
        lora = self.plan.lora_equivalent()
        saved = sum(p.numel() for n in self.modules_to_save_names
                    for p in self.base_model.get_submodule(n).parameters())
        total = sum(p.numel() for p in self.parameters())
        return {
            "share": self.plan.share,
            "scope": self.plan.scope,
            "rank": self.plan.rank,
            "adapter_parameters": adapter,
            "lora_equivalent_parameters": lora,
            "saving_vs_lora": 1.0 - adapter / lora if lora else 0.0,
            "modules_to_save_parameters": saved,
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "all_parameters": total,
            "targets": len(self.plan.targets),
            "tensors": len(self.plan.tensors),
            "shared_tensors": sum(1 for s in self.plan.tensors.values() if s.shared),
            "groups": self.plan.groups(),
        }

    def print_trainable_parameters(self) -> None:
        r = self.parameter_report()
        pct = 100.0 * r["trainable_parameters"] / max(r["all_parameters"], 1)
        print(f"trainable params: {r['trainable_parameters']:,} || all params: {r['all_parameters']:,} "
              f"|| trainable%: {pct:.4f}")
        print(f"ShareLoRA share={r['share']} scope={r['scope']} r={r['rank']}: adapter params "
              f"{r['adapter_parameters']:,} vs LoRA {r['lora_equivalent_parameters']:,} "
              f"({100 * r['saving_vs_lora']:.1f}% fewer); modules_to_save params {r['modules_to_save_parameters']:,}")
        for g in r["groups"]:
            print(f"  {g['module_type']}: {g['targets']} targets {g['d_in']}->{g['d_out']}, "
                  f"{g['A_tensors']} A + {g['B_tensors']} B tensors, {g['parameters']:,} params "
                  f"(LoRA {g['lora_equivalent']:,})")

    # --- state --------------------------------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """{plan key: tensor} for every adapter tensor (once) and every modules_to_save tensor."""
        out = {key: self.sharelora_bank[bank_name(key)] for key in self.plan.tensors}
        for n in self.modules_to_save_names:
            for pn, p in self.base_model.get_submodule(n).state_dict().items():
                out[f"{checkpoint.MODULES_TO_SAVE_PREFIX}{n}.{pn}"] = p
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` into the adapter; keys and shapes must match exactly."""
        expected = {k: v.shape for k, v in self.adapter_state_dict().items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        wrong = [(k, tuple(tensors[k].shape), tuple(expected[k])) for k in expected
                 if k in tensors and tuple(tensors[k].shape) != tuple(expected[k])]
        if missing or unexpected or wrong:
            lines = []
            if missing:
                lines.append(f"missing {len(missing)} tensor(s), e.g. {missing[:3]}")
            if unexpected:
                lines.append(f"unexpected {len(unexpected)} tensor(s), e.g. {unexpected[:3]}")
            for k, got, want in wrong[:3]:
                lines.append(f"{k}: saved shape {got}, this model needs {want}")
            base = self.sharelora_config.base_model_name_or_path
            raise ShareLoraError(
                "the adapter does not fit this base model: " + "; ".join(lines)
                + f". Load it into the base model it was trained on{f' ({base})' if base else ''} "
                "with the same target_modules and share settings"
            )
        with torch.no_grad():
            for key in self.plan.tensors:
                p = self.sharelora_bank[bank_name(key)]
                p.copy_(tensors[key].to(device=p.device, dtype=p.dtype))
            for n in self.modules_to_save_names:
                prefix = f"{checkpoint.MODULES_TO_SAVE_PREFIX}{n}."
                sub = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                self.base_model.get_submodule(n).load_state_dict(sub, strict=True)

    def save_pretrained(self, save_directory: str | Path, **_ignored) -> Path:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each shared tensor once)."""
        cfg = self.sharelora_config
        if cfg.base_model_name_or_path is None:
            name = getattr(getattr(self.base_model, "config", None), "_name_or_path", None) or None
            cfg.base_model_name_or_path = name
        return checkpoint.save_adapter(save_directory, cfg, self.adapter_state_dict())

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_directory: str | Path,
                        is_trainable: bool = False) -> ShareLoraModel:
        """Inject the saved adapter into ``base_model`` (the same architecture it was trained on)."""
        if not isinstance(base_model, nn.Module):
            raise ShareLoraError(
                f"base_model must be a loaded torch model, got {type(base_model).__name__}; load it first, e.g. "
                "AutoModelForSequenceClassification.from_pretrained(name)"
            )
        config, tensors = checkpoint.load_adapter(adapter_directory)
        return cls.from_adapter_state_dict(base_model, config, tensors, is_trainable)

    @classmethod
    def from_adapter_state_dict(cls, base_model: nn.Module, config: ShareLoraConfig,
                                tensors: dict[str, torch.Tensor], is_trainable: bool = False) -> ShareLoraModel:
        """Inject ``config`` into ``base_model`` and load ``tensors``; frozen and in eval mode unless trainable."""
        model = cls(base_model, config)
        model.load_adapter_state_dict(tensors)
        if not is_trainable:
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
        return model

    # --- PEFT ---------------------------------------------------------------------------------
    def export_peft(self, save_directory: str | Path) -> Path:
        """Write a standard PEFT LoRA directory (per-layer lora_A / lora_B) with identical outputs."""
        from .peft_io import export_peft

        return export_peft(self, save_directory)

    @classmethod
    def from_peft(cls, base_model: nn.Module, peft_directory: str | Path, is_trainable: bool = False) -> ShareLoraModel:
        """Load a PEFT LoRA adapter as a ShareLoRA model with share="none" (exactly the same outputs)."""
        from .peft_io import load_peft

        return load_peft(cls, base_model, peft_directory, is_trainable)

    # --- merging ------------------------------------------------------------------------------
    def merge(self) -> None:
        """W_l += (alpha/r) B_l A_l in every adapted layer (in place; ``unmerge`` undoes it)."""
        for _, layer in self.sharelora_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.sharelora_layers():
            layer.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the update into the weights and return the plain base model (base speed)."""
        self.merge()
        return self.unload()

    def unload(self) -> nn.Module:
        """Put the original modules back (merged or not) and return the base model."""
        for handle in self._shared_down_hooks:
            handle.remove()
        self._shared_down_hooks = []
        for name, layer in list(self.sharelora_layers()):
            _set_submodule(self.base_model, name, layer.base_layer)
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes the base model's outputs (modules_to_save stay trained)."""
        layers = [layer for _, layer in self.sharelora_layers()]
        if any(layer.merged for layer in layers):
            raise ShareLoraError("cannot disable a merged adapter; call unmerge() first")
        previous = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, was in zip(layers, previous):
                layer.disabled = was


def get_sharelora_model(model: nn.Module, config: ShareLoraConfig) -> ShareLoraModel:
    """Add ShareLoRA adapters to ``model`` (in place) and return the wrapping ShareLoraModel."""
    return ShareLoraModel(model, config)
