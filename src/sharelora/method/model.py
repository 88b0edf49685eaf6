"""ShareLoraModel: a base model with ShareLoRA adapters injected, and the verbs users expect.

A model holds one or more named adapters (PEFT's multi-adapter interface: ``add_adapter``,
``set_adapter``, ``delete_adapter``, ``adapter_names=`` for mixed batches). Each adapter has its
own config and sharing plan; adapters that set ``task_share`` read their task group's shared A
(or B, or both with ``task_core``: then each adapter owns only an r x r core per target), created
by the first of them and reused by the others, so the plan of every adapter names exactly the
tensors it reads and each tensor exists once in ``sharelora_bank``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import types
from collections import defaultdict
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from . import checkpoint
from .config import ShareLoraConfig
from .errors import ShareLoraError
from .layers import SharedDownProjection, ShareLoraLayer, bank_name, clear_live
from .modules_to_save import ModulesToSave
from .quantized import keep_trainable
from .plan import (BASE_ADAPTER, DEFAULT_ADAPTER, SharingPlan, build_plan, check_adapter_name, check_task_group,
                   identity_core, init_tensor, plain_modules, same_input_set)
from .routing import Routing

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


def _matching_modules(model: nn.Module, names: list[str]) -> list[str]:
    """Paths of the modules ``modules_to_save`` names (outermost matches only)."""
    found = [n for n, _ in plain_modules(model) if n and any(n == s or n.endswith("." + s) for s in names)]
    missing = [s for s in names if not any(n == s or n.endswith("." + s) for n in found)]
    if missing:
        children = sorted({n.rsplit(".", 1)[-1] for n, _ in model.named_children()})
        raise ShareLoraError(f"modules_to_save {missing} matched no module; top-level modules: {children}")
    # Keep outermost matches only: a matched module's submodules come with it.
    return sorted(n for n in found if not any(n.startswith(o + ".") for o in found if o != n))


class ShareLoraModel(nn.Module):
    """A model whose target linear maps compute ``W0 x + (alpha/r) B A dropout(x)``.

    The A and B tensors live once each in ``sharelora_bank`` (an ``nn.ParameterDict``) and the
    injected ``ShareLoraLayer`` s read them by key, following each adapter's plan. Only the
    active adapters' tensors and ``modules_to_save`` are trainable. ``forward`` is the base
    model's forward (plus ``adapter_names=``), and unknown attributes are looked up on the base
    model (``model.config``, ...).

    Around a transformers model, and with peft installed, the instance is also a ``peft.PeftModel``
    (``peft_surface.py``): transformers' ``Trainer`` and TRL recognise adapter models only by that
    class, and then checkpoint the adapter alone (``save_pretrained``), resume with ``load_adapter``
    and accept a quantized base. None of PEFT's own machinery runs on it. (With bitsandbytes
    installed and a float base, only if peft is imported already: creating the model never
    imports peft, and so bitsandbytes, on its own; see peft_surface.py.)
    """

    # transformers reads this to tell an adapter model from a bare (e.g. quantized) base model.
    _hf_peft_config_loaded = True

    def __new__(cls, base_model: nn.Module | None = None, *args, **kwargs):
        if base_model is not None:  # None: copy / pickle re-creating an instance of its class
            from .peft_surface import trainer_facing_class

            cls = trainer_facing_class(cls, base_model)
        return super().__new__(cls)

    def __init__(self, base_model: nn.Module, config: ShareLoraConfig, adapter_name: str = DEFAULT_ADAPTER):
        nn.Module.__init__(self)  # not super(): next in line may be peft.PeftModel, whose __init__ builds a tuner
        if isinstance(base_model, ShareLoraModel) or any(isinstance(m, ShareLoraLayer) for m in base_model.modules()):
            raise ShareLoraError("the model already has ShareLoRA layers; call merge_and_unload() first or use the "
                                 "original base model")
        for p in base_model.parameters():
            p.requires_grad_(False)
        keep_trainable(base_model)  # a bitsandbytes 4-bit base stays differentiable after an eval (quantized.py)
        self.base_model = base_model
        self.sharelora_bank = nn.ParameterDict()
        self.sharelora_configs: dict[str, ShareLoraConfig] = {}
        self.plans: dict[str, SharingPlan] = {}
        self._active_adapters: list[str] = []
        self.routing = Routing()
        self._train_shared: bool | None = None
        self._basis_owner: dict[str, str | None] = {}  # task group -> the task-core adapter that trains its basis
        self._trainable = True
        self._shared_down_hooks: list = []
        self._shared_downs: dict[str, list[SharedDownProjection]] = {}  # parent path -> those holding a product
        self.add_adapter(adapter_name, config)
        self.set_adapter(adapter_name)

    # --- adapters -----------------------------------------------------------------------------
    @property
    def adapter_names(self) -> list[str]:
        """Every loaded adapter, in the order they were added."""
        return list(self.sharelora_configs)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapters' names (PEFT's ``active_adapters``); ``set_adapter`` changes them."""
        return self._active_adapters

    @active_adapters.setter
    def active_adapters(self, names: list[str]) -> None:
        self._active_adapters = list(names)

    @property
    def peft_config(self) -> dict[str, ShareLoraConfig]:
        """{adapter name: config}, under PEFT's name for it (trainers read ``peft_config[name]``)."""
        return dict(self.sharelora_configs)

    @property
    def active_adapter(self) -> str | list[str]:
        """The active adapter's name (a list when several are active), as PEFT names it."""
        return self.active_adapters[0] if len(self.active_adapters) == 1 else list(self.active_adapters)

    def _view_adapter(self) -> str:
        return self.active_adapters[0] if self.active_adapters else next(iter(self.sharelora_configs))

    @property
    def sharelora_config(self) -> ShareLoraConfig:
        """The (first) active adapter's config."""
        return self.sharelora_configs[self._view_adapter()]

    @property
    def plan(self) -> SharingPlan:
        """The (first) active adapter's sharing plan."""
        return self.plans[self._view_adapter()]

    def _wrappers(self) -> dict[str, ModulesToSave]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, ModulesToSave)}

    def saved_module_names(self, adapter_name: str) -> list[str]:
        """Paths of the modules_to_save copies that ``adapter_name`` trains."""
        return sorted(n for n, w in self._wrappers().items() if adapter_name in w.modules_to_save)

    @property
    def modules_to_save_names(self) -> list[str]:
        """Paths of the (first) active adapter's modules_to_save."""
        return self.saved_module_names(self._view_adapter())

    def add_adapter(self, adapter_name: str, config: ShareLoraConfig) -> None:
        """Add an adapter (inactive and frozen until ``set_adapter``); task-shared tensors are reused."""
        check_adapter_name(adapter_name)
        if adapter_name in self.sharelora_configs:
            raise ShareLoraError(f"adapter {adapter_name!r} already exists; delete_adapter({adapter_name!r}) first "
                                 "or choose another name")
        if not isinstance(config, ShareLoraConfig):
            raise ShareLoraError(f"config must be a ShareLoraConfig, got {type(config).__name__}")
        config.validate()
        if config.task_core != "none" and config.basis_growth is None:  # read every growth block the group has
            config = dataclasses.replace(config, basis_growth=self._group_growth(config.task_group))
        base = self.base_model
        plan = build_plan(base, config, adapter_name)
        check_task_group(adapter_name, config, plan,
                         {n: (self.sharelora_configs[n], self.plans[n]) for n in self.sharelora_configs})
        saved = _matching_modules(base, list(config.modules_to_save)) if config.modules_to_save else []
        adapted = {t.module_name for t in plan.targets}
        clash = [n for n in saved if n in adapted or any(m.startswith(n + ".") for m in adapted)]
        if clash:
            raise ShareLoraError(f"modules_to_save {clash} also holds target modules of adapter {adapter_name!r}; "
                                 "a module is either trained in full (modules_to_save) or adapted, not both")

        ref = next(base.parameters(), None)
        device = ref.device if ref is not None else torch.device("cpu")
        dtype = _DTYPES[config.adapter_dtype] if config.adapter_dtype else torch.float32
        # a task-shared tensor its group already has is reused; the adapter that creates the basis trains it
        creates_basis = any(spec.task_shared and spec.grown_by is None and bank_name(key) not in self.sharelora_bank
                            for key, spec in plan.tensors.items())
        for key, spec in plan.tensors.items():
            if bank_name(key) not in self.sharelora_bank:
                self.sharelora_bank[bank_name(key)] = nn.Parameter(
                    init_tensor(spec, config.init_lora_weights, dtype, device, config.task_core, config.basis_init,
                                trains_basis=creates_basis), requires_grad=False)
        if creates_basis and config.task_core != "none":
            self._basis_owner[config.task_group] = adapter_name
        if config.grow_basis and config.basis_init == "lora":
            self._start_growth(adapter_name, plan, config)
        for module_name, targets in plan.targets_by_module().items():
            module = base.get_submodule(module_name)
            if isinstance(module, ShareLoraLayer):
                module.add_slot(adapter_name, targets, config.scaling, config.dropout, config.heads,
                                config.router_top_k)
            else:
                layer = ShareLoraLayer(module, targets, self.sharelora_bank, config.scaling, config.dropout,
                                       adapter_name, config.heads, config.router_top_k, routing=self.routing)
                _set_submodule(base, module_name, layer)
            base.get_submodule(module_name).slots[adapter_name].dropout_mask = config.dropout_mask
        for path in saved:
            module = base.get_submodule(path)
            if not isinstance(module, ModulesToSave):
                module = ModulesToSave(module, self.routing)
                _set_submodule(base, path, module)
            module.add(adapter_name)
        self.sharelora_configs[adapter_name] = config
        self.plans[adapter_name] = plan
        self._share_down_projections([adapter_name])
        self._activate(self.active_adapters)

    def set_adapter(self, adapter_name: str | list[str], train_shared: bool | None = None) -> None:
        """Make ``adapter_name`` (or a list of names, whose updates add up) the active adapter(s).

        The active adapters' own tensors and modules_to_save train, every other adapter is frozen.
        ``train_shared=False`` also freezes the task-shared tensors the active adapters read
        (continual learning: a new task trains only its own tensors, so every earlier adapter's
        outputs stay bit-identical); ``True`` trains them. The default (None) trains them too,
        except for task-core adapters (``task_share="AB"``): their group's basis A, B trains only
        while the adapter that created it (``basis_owner``, the group's first) is active, so a
        later task trains its cores and head alone. With ``basis_init="lora"`` an untrained basis
        has B = 0, so an adapter with a zero core that should train it needs an identity core first
        (``init_cores(names, trains_basis=True)``; the owner has one). A model loaded with
        ``is_trainable=False`` stays frozen.
        """
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if not names:
            raise ShareLoraError("set_adapter needs at least one adapter name")
        unknown = [n for n in names if n not in self.sharelora_configs]
        if unknown:
            raise ShareLoraError(f"no adapter named {unknown}; loaded adapters: {self.adapter_names}")
        self._train_shared = None if train_shared is None else bool(train_shared)
        self._activate(list(dict.fromkeys(names)))

    @torch.no_grad()
    def init_cores(self, adapter_names: list[str], trains_basis: bool) -> None:
        """Set the cores of task-core adapters ``adapter_names`` to where training starts.

        ``trains_basis=True``: the adapters train their group's basis (jointly, e.g. the first k
        tasks of a continual run), which must be untrained, B = 0 (``basis_init="lora"``): each
        core becomes the identity (ones for diagonal cores), so each adapter is the ShareLoRA
        adapter B A, still exactly the base model. Without it the basis would get no gradient
        (B = 0 and C = 0). ``False``: the cores become zero, so the adapters compute the base model
        on any basis (e.g. after a given basis was loaded). Refused for a trained basis (B != 0)
        with ``True``: the adapters would start at B A, not at the base model.
        """
        unknown = [n for n in adapter_names if n not in self.sharelora_configs]
        if unknown:
            raise ShareLoraError(f"no adapter named {unknown}; loaded adapters: {self.adapter_names}")
        plain = [n for n in adapter_names if self.sharelora_configs[n].task_core == "none"]
        if plain:
            raise ShareLoraError(f"adapters {plain} have no task cores (task_core='none'); init_cores sets the cores "
                                 "of task_share='AB' adapters")
        for name in adapter_names:
            plan = self.plans[name]
            if trains_basis:
                trained = [k for k, spec in plan.shared_tensors().items()
                           if spec.role == "B" and self.sharelora_bank[bank_name(k)].count_nonzero() > 0]
                if trained:
                    raise ShareLoraError(
                        f"adapter {name!r}: its group's basis is not untrained (B != 0, e.g. {trained[0]}; "
                        f"basis_init={self.sharelora_configs[name].basis_init!r}), so an identity core would start it at "
                        "B A instead of the base model; train its core from zero (init_cores(names, trains_basis=False)) "
                        "or give the joint tasks a new task_group")
            for key, spec in plan.own_tensors().items():
                if spec.role == "C":
                    core = self.sharelora_bank[bank_name(key)]
                    identity_core(core) if trains_basis else core.zero_()
            cfg = self.sharelora_configs[name]
            if not trains_basis and cfg.grow_basis and cfg.basis_init == "lora":
                self._start_growth(name, plan, cfg)

    def _group_growth(self, task_group: str) -> list[list]:
        """[[adapter, g], ...]: the basis growth blocks of ``task_group``, in the order they were added."""
        blocks: dict[str, int] = {}
        for name, cfg in self.sharelora_configs.items():
            if cfg.task_group == task_group and cfg.task_core != "none":
                for owner, g in (cfg.basis_growth or []) + ([[name, cfg.grow_basis]] if cfg.grow_basis else []):
                    blocks.setdefault(owner, g)
        return [[owner, g] for owner, g in blocks.items()]

    @torch.no_grad()
    def _start_growth(self, name: str, plan: SharingPlan, cfg: ShareLoraConfig) -> None:
        """A growing adapter's start: its own block of every core the identity, if its new B's are still 0
        (then B_g I A_g = 0: the adapter computes the base model and its new directions train as a LoRA)."""
        grown_B = [k for k, s in plan.grown_tensors().items() if s.role == "B"]
        if any(self.sharelora_bank[bank_name(k)].count_nonzero() > 0 for k in grown_B):
            return
        start = cfg.rank + sum(g for _, g in cfg.basis_growth or [])
        block = slice(start, start + cfg.grow_basis)
        for key, spec in plan.own_tensors().items():
            if spec.role == "C":
                core = self.sharelora_bank[bank_name(key)]
                if core.dim() == 1:
                    core[block] = 1.0
                else:
                    core[block, block] = torch.eye(cfg.grow_basis, dtype=core.dtype, device=core.device)

    def basis_owner(self, task_group: str) -> str | None:
        """The task-core adapter whose activation trains ``task_group``'s shared A and B by default.

        The group's first adapter (the one whose ``add_adapter`` created the basis, or, loading a
        directory, the group's first adapter in it when that one is loaded); None when it was
        deleted or not loaded: then the basis trains only with ``set_adapter(..., train_shared=True)``.
        """
        return self._basis_owner.get(task_group)

    def orthonormalize_basis(self, group: str = "default") -> dict:
        """Make task group ``group``'s trained basis orthonormal (equal-length directions), every adapter's
        outputs unchanged: A = L Q_A -> c_A Q_A, B = Q_B R_B -> c_B Q_B, each matrix core C -> (R_B / c_B) C
        (L / c_A). See ``basis.orthonormalize_basis`` (what is refused, what it returns)."""
        from .basis import orthonormalize_basis

        if any(layer.merged for _, layer in self.sharelora_layers()):  # unmerge would subtract a recomputed delta
            raise ShareLoraError("the model has merged adapters; call unmerge() before orthonormalize_basis")
        return orthonormalize_basis(self, group)

    def _trains_shared(self, name: str, active: list[str]) -> bool:
        if self._train_shared is not None:
            return self._train_shared
        cfg = self.sharelora_configs[name]
        return cfg.task_core == "none" or self._basis_owner.get(cfg.task_group) in active

    def _activate(self, names: list[str]) -> None:
        self.active_adapters = names
        for _, layer in self.sharelora_layers():
            layer.set_active(names)
        for wrapper in self._wrappers().values():
            wrapper.set_active(names)
        trainable: set[str] = set()
        if self._trainable:
            for n in names:
                plan = self.plans[n]
                trainable |= {bank_name(k) for k in plan.added_tensors()}  # its own and the basis blocks it grew
                if self._trains_shared(n, names):
                    trainable |= {bank_name(k) for k in plan.shared_tensors()}
        for key, p in self.sharelora_bank._parameters.items():  # its own dict: ParameterDict.items() is ~5x slower
            if p.requires_grad != (key in trainable):  # flip only what changes (hundreds of adapters, many tensors)
                p.requires_grad_(key in trainable)
        for wrapper in self._wrappers().values():
            for n, module in wrapper.modules_to_save.items():
                for p in module.parameters():
                    p.requires_grad_(self._trainable and n in names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter, its own tensors and heads, and shared tensors no other adapter reads."""
        if adapter_name not in self.sharelora_configs:
            raise ShareLoraError(f"no adapter named {adapter_name!r}; loaded adapters: {self.adapter_names}")
        if len(self.sharelora_configs) == 1:
            raise ShareLoraError(f"{adapter_name!r} is the model's only adapter; use unload() to get the base model")
        plan = self.plans.pop(adapter_name)
        cfg = self.sharelora_configs.pop(adapter_name)
        if self._basis_owner.get(cfg.task_group) == adapter_name:
            self._basis_owner[cfg.task_group] = None  # the basis stays, frozen unless train_shared=True
        for name, layer in list(self.sharelora_layers()):
            layer.remove_slot(adapter_name)
            if not layer.slots:
                _set_submodule(self.base_model, name, layer.base_layer)
        for path, wrapper in self._wrappers().items():
            if adapter_name in wrapper.modules_to_save:
                del wrapper.modules_to_save[adapter_name]
            if not len(wrapper.modules_to_save):
                _set_submodule(self.base_model, path, wrapper.original_module)
        still_read = {k for p in self.plans.values() for k in p.tensors}
        for key in plan.tensors:
            if key not in still_read:
                del self.sharelora_bank[bank_name(key)]
        self._share_down_projections()
        remaining = [n for n in self.active_adapters if n != adapter_name] or [self.adapter_names[0]]
        self._activate(remaining)

    def _share_down_projections(self, adapters: list[str] | None = None) -> None:
        """Sibling modules that read one input compute their down-projections in one product.

        Per adapter: whole (unsliced) adapted modules under one parent that usually read the same
        tensor (``SAME_INPUT_LEAVES``: q/k/v, gate/up) or that read with the same A (scope "qkv")
        get one ``SharedDownProjection``, cleared before and after each forward of the parent (the
        block that calls them); see ``ShareLoraLayer``. ``dropout_mask`` (config) decides whether
        they also share the dropout mask while training ("input") or compute separately ("module").
        ``adapters``: only these (just added) adapters; None rebuilds every adapter's (after a delete).
        """
        if adapters is None:
            for handle in self._shared_down_hooks:
                handle.remove()
            self._shared_down_hooks = []
            self._shared_downs = {}
        layers = list(self.sharelora_layers())
        for adapter in self.sharelora_configs if adapters is None else adapters:
            groups: dict[tuple[str, object], list] = {}
            for name, layer in layers:
                slot = layer.slots.get(adapter)
                if slot is None:
                    continue
                slot.shared_down = None
                if slot.whole and slot.heads == 1 and not slot.grown:  # a grown basis: its own x [A; A_g]^T
                    parent, _, leaf = name.rpartition(".")
                    kind = same_input_set(leaf)
                    groups.setdefault((parent, slot.keys[0][0] if kind is None else kind), []).append(slot)
            for (parent_name, _), slots in groups.items():
                if len(slots) < 2:
                    continue
                if parent_name not in self._shared_downs:  # one pair of hooks per parent, for every adapter
                    self._shared_downs[parent_name] = []
                    parent = self.base_model.get_submodule(parent_name)
                    clear = functools.partial(clear_live, self._shared_downs[parent_name])
                    self._shared_down_hooks += [parent.register_forward_pre_hook(clear),
                                                parent.register_forward_hook(clear)]
                shared = SharedDownProjection(tuple(dict.fromkeys(s.keys[0][0] for s in slots)), self.sharelora_bank,
                                              self._shared_downs[parent_name])
                for slot in slots:
                    slot.shared_down = shared

    # --- plumbing -----------------------------------------------------------------------------
    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's forward; ``adapter_names`` (one per row, "__base__" = none) routes rows."""
        self.routing.set(adapter_names, self.sharelora_configs)
        return self.base_model(*args, **kwargs)

    def generate(self, *args, adapter_names: list[str] | None = None, **kwargs):
        """The base model's ``generate``; ``adapter_names`` gives each prompt its adapter."""
        self.routing.set(adapter_names, self.sharelora_configs)
        try:
            return self.base_model.generate(*args, **kwargs)
        finally:
            self.routing.clear()

    def __setattr__(self, name: str, value) -> None:
        # TRL's SFTTrainer replaces a transformers model's forward with a fused-LM-head forward that
        # reads ``self.base_model`` as the backbone (it unwraps PEFT models first, ours it cannot
        # recognise). Here ``base_model`` is the whole transformers model, so that replacement is
        # rebound to the wrapped model, which our forward calls. It is recognised by its own
        # ``fused_lm_head`` parameter; wrappers of our forward (accelerate's autocast) stay here.
        if name == "forward" and getattr(value, "__self__", None) is self and "base_model" in self._modules \
                and "fused_lm_head" in inspect.signature(value.__func__, follow_wrapped=False).parameters:
            base = self._modules["base_model"]
            object.__setattr__(base, "forward", types.MethodType(value.__func__, base))
            return
        super().__setattr__(name, value)

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

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None,
                                      activation_checkpointing_kwargs: dict | None = None, **options) -> None:
        """Turn on the base model's activation (gradient) checkpointing, non-reentrant by default.

        Takes the kwargs under either name (transformers 5 calls ``activation_checkpointing_enable(
        activation_checkpointing_kwargs=...)``, earlier versions and PEFT users the other). With the
        reentrant variant the frozen embeddings' output must require grad, or no gradient would
        reach the adapters inside the checkpointed blocks; this is arranged here. Other options
        (transformers' ``every_n_layers``, ``offload``) go to the base model's method.
        """
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {}),
                  **(activation_checkpointing_kwargs or {})}
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **options)
        if kwargs["use_reentrant"] and hasattr(base, "enable_input_require_grads"):
            base.enable_input_require_grads()

    activation_checkpointing_enable = gradient_checkpointing_enable

    # --- counting -----------------------------------------------------------------------------
    def _saved_parameters(self, adapter_name: str) -> int:
        wrappers = self._wrappers()
        return sum(p.numel() for n in self.saved_module_names(adapter_name)
                   for p in wrappers[n].modules_to_save[adapter_name].parameters())

    def parameter_report(self) -> dict:
        """Adapter parameters (each tensor once), LoRA's count on the same targets, the saving.

        With several adapters, ``adapter_parameters`` counts the whole model (a task-shared tensor
        once), ``adapters`` has each adapter's own and shared counts, and
        ``separate_lora_parameters`` is what one plain LoRA per adapter would train. A task-core
        adapter's ``own_parameters`` are its cores (L r^2 or L r per module type), what one more
        task of its group adds (heads apart, in ``modules_to_save_parameters``); an adapter that
        grew the basis (``grow_basis``) adds its new directions too (``grown_parameters``, also in
        ``task_shared_parameters``: they are stored with the group, which later tasks read).
        """
        plan = self.plan
        adapter = sum(p.numel() for p in self.sharelora_bank.values())
        lora = sum(p.lora_equivalent() for p in self.plans.values())
        shared_keys = {k for p in self.plans.values() for k in p.shared_tensors()}
        per_adapter = {}
        for name, p in self.plans.items():
            cfg = self.sharelora_configs[name]
            grown = p.grown_tensors()
            per_adapter[name] = {
                "share": cfg.share, "task_share": cfg.task_share, "task_group": cfg.task_group, "rank": cfg.rank,
                "heads": cfg.heads, "task_core": cfg.task_core,
                "own_parameters": sum(s.numel for s in p.added_tensors().values()),
                "shared_parameters": sum(s.numel for k, s in p.shared_tensors().items() if k not in grown),
                "grown_parameters": sum(s.numel for s in grown.values()),
                "modules_to_save_parameters": self._saved_parameters(name),
                "lora_equivalent_parameters": p.lora_equivalent(),
            }
        return {
            "share": plan.share,
            "scope": plan.scope,
            "rank": plan.rank,
            "adapter_parameters": adapter,
            "lora_equivalent_parameters": lora,
            "saving_vs_lora": 1.0 - adapter / lora if lora else 0.0,
            "modules_to_save_parameters": sum(v["modules_to_save_parameters"] for v in per_adapter.values()),
            "trainable_parameters": sum(p.numel() for p in self.parameters() if p.requires_grad),
            "all_parameters": sum(p.numel() for p in self.parameters()),
            "targets": len(plan.targets),
            "tensors": len(self.sharelora_bank),
            "shared_tensors": sum(1 for s in plan.tensors.values() if s.shared or s.task_shared),
            "groups": plan.groups(),
            "adapters": per_adapter,
            "active_adapters": list(self.active_adapters),
            "task_shared_parameters": sum(self.sharelora_bank[bank_name(k)].numel() for k in shared_keys),
            "separate_lora_parameters": lora,
            "separate_adapters_parameters": sum(p.num_parameters() for p in self.plans.values()),
        }

    def print_trainable_parameters(self) -> None:
        r = self.parameter_report()
        pct = 100.0 * r["trainable_parameters"] / max(r["all_parameters"], 1)
        print(f"trainable params: {r['trainable_parameters']:,} || all params: {r['all_parameters']:,} "
              f"|| trainable%: {pct:.4f}")
        if len(r["adapters"]) > 1:
            print(f"{len(r['adapters'])} adapters: {r['adapter_parameters']:,} adapter params in all (task-shared "
                  f"{r['task_shared_parameters']:,}) vs {r['separate_lora_parameters']:,} for separate LoRAs")
            for name, a in r["adapters"].items():
                core = f" task_core={a['task_core']}" if a["task_core"] != "none" else ""
                print(f"  {name}: share={a['share']} task_share={a['task_share']}{core} r={a['rank']}: own "
                      f"{a['own_parameters']:,} + shared {a['shared_parameters']:,}, modules_to_save "
                      f"{a['modules_to_save_parameters']:,}")
            return
        print(f"ShareLoRA share={r['share']} scope={r['scope']} r={r['rank']}: adapter params "
              f"{r['adapter_parameters']:,} vs LoRA {r['lora_equivalent_parameters']:,} "
              f"({100 * r['saving_vs_lora']:.1f}% fewer); modules_to_save params {r['modules_to_save_parameters']:,}")
        for g in r["groups"]:
            print(f"  {g['module_type']}: {g['targets']} targets {g['d_in']}->{g['d_out']}, "
                  f"{g['A_tensors']} A + {g['B_tensors']} B" + (f" + {g['C_tensors']} C" if g["C_tensors"] else "")
                  + f" tensors, {g['parameters']:,} params "
                  f"(LoRA {g['lora_equivalent']:,})")

    # --- state --------------------------------------------------------------------------------
    def adapter_state_dict(self, adapter_name: str | None = None) -> dict[str, torch.Tensor]:
        """{local key: tensor} of one adapter (the active one by default): every tensor it reads
        (each once) and its modules_to_save tensors, as a single-adapter file stores them."""
        name = adapter_name or self._view_adapter()
        if name not in self.plans:
            raise ShareLoraError(f"no adapter named {name!r}; loaded adapters: {self.adapter_names}")
        out = {spec.local_key: self.sharelora_bank[bank_name(key)] for key, spec in self.plans[name].tensors.items()}
        wrappers = self._wrappers()
        for n in self.saved_module_names(name):
            for pn, p in wrappers[n].modules_to_save[name].state_dict().items():
                out[f"{checkpoint.MODULES_TO_SAVE_PREFIX}{n}.{pn}"] = p
        return out

    def load_adapter_state_dict(self, tensors: dict[str, torch.Tensor], adapter_name: str | None = None) -> None:
        """Copy ``tensors`` (local keys, see ``adapter_state_dict``) into one adapter; keys and shapes must match."""
        name = adapter_name or self._view_adapter()
        current = self.adapter_state_dict(name)
        self._check_fit({k: v.shape for k, v in current.items()}, tensors, self.sharelora_configs[name])
        with torch.no_grad():
            for k, p in current.items():
                p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))

    def _check_fit(self, expected: dict[str, torch.Size], tensors: dict[str, torch.Tensor],
                   config: ShareLoraConfig) -> None:
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
            base = config.base_model_name_or_path
            raise ShareLoraError(
                "the adapter does not fit this base model: " + "; ".join(lines)
                + f". Load it into the base model it was trained on{f' ({base})' if base else ''} "
                "with the same target_modules and share settings"
            )

    def multi_adapter_state_dict(self, adapter_names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """{file key: tensor} of several adapters, each tensor once: ``<adapter>/<local key>`` for an
        adapter's own tensors and heads, ``@<task group>/<local key>`` for task-shared ones."""
        out: dict[str, torch.Tensor] = {}
        for name in adapter_names or self.adapter_names:
            for key, spec in self.plans[name].tensors.items():
                file_key = key if spec.task_shared else f"{name}/{spec.local_key}"
                out[file_key] = self.sharelora_bank[bank_name(key)]
            wrappers = self._wrappers()
            for n in self.saved_module_names(name):
                for pn, p in wrappers[n].modules_to_save[name].state_dict().items():
                    out[f"{name}/{checkpoint.MODULES_TO_SAVE_PREFIX}{n}.{pn}"] = p
        return out

    def load_multi_adapter_state_dict(self, tensors: dict[str, torch.Tensor],
                                      adapter_names: list[str] | None = None) -> None:
        current = self.multi_adapter_state_dict(adapter_names)
        self._check_fit({k: v.shape for k, v in current.items()}, tensors, self.sharelora_config)
        with torch.no_grad():
            for k, p in current.items():
                p.copy_(tensors[k].to(device=p.device, dtype=p.dtype))

    def save_pretrained(self, save_directory: str | Path, selected_adapters: list[str] | None = None,
                        is_main_process: bool = True, state_dict: dict[str, torch.Tensor] | None = None,
                        **_ignored) -> Path | None:
        """Write the adapters: ``adapter_config.json`` + ``adapter_model.safetensors``, each tensor once.

        A model whose only (selected) adapter is ``default`` writes the single-adapter format;
        several adapters (or one with another name) write the multi-adapter format of
        ``checkpoint.save_adapters`` (one file, a task-shared tensor once for all tasks).

        As PEFT's (transformers' ``Trainer`` calls it so): ``is_main_process=False`` writes nothing
        (returns None), and a ``state_dict`` of this model (``Trainer`` passes the gathered one
        under FSDP / DeepSpeed, where the parameters themselves are shards) supplies the values of
        the adapter's tensors, found by parameter name; other keyword arguments are ignored.
        """
        if not is_main_process:
            return None
        names = list(selected_adapters) if selected_adapters else self.adapter_names
        unknown = [n for n in names if n not in self.sharelora_configs]
        if unknown:
            raise ShareLoraError(f"no adapter named {unknown}; loaded adapters: {self.adapter_names}")
        for n in names:
            cfg = self.sharelora_configs[n]
            if cfg.base_model_name_or_path is None:
                cfg.base_model_name_or_path = getattr(getattr(self.base_model, "config", None), "_name_or_path",
                                                      None) or None
        if names == [DEFAULT_ADAPTER]:
            return checkpoint.save_adapter(save_directory, self.sharelora_configs[DEFAULT_ADAPTER],
                                           self._values_from(self.adapter_state_dict(DEFAULT_ADAPTER), state_dict))
        active = [n for n in self.active_adapters if n in names] or names[:1]
        return checkpoint.save_adapters(save_directory, {n: self.sharelora_configs[n] for n in names},
                                        self._values_from(self.multi_adapter_state_dict(names), state_dict), active)

    def _values_from(self, tensors: dict[str, torch.Tensor],
                     state_dict: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """``tensors`` with each value replaced by the entry of ``state_dict`` under its parameter name."""
        if state_dict is None:
            return tensors
        by_id = {id(p): n for n, p in self.named_parameters(remove_duplicate=False)}
        by_id.update({id(b): n for n, b in self.named_buffers(remove_duplicate=False)})
        return {k: state_dict.get(by_id.get(id(v)), v) for k, v in tensors.items()}

    @classmethod
    def from_pretrained(cls, base_model: nn.Module, adapter_directory: str | Path,
                        adapter_name: str | list[str] | None = None, is_trainable: bool = False) -> ShareLoraModel:
        """Inject the saved adapter(s) into ``base_model`` (the architecture they were trained on).

        A multi-adapter directory loads every adapter, or only ``adapter_name`` (a name or a list),
        reading only the tensors those adapters need. A single-adapter directory loads as
        ``adapter_name`` (default ``"default"``).
        """
        if not isinstance(base_model, nn.Module):
            raise ShareLoraError(
                f"base_model must be a loaded torch model, got {type(base_model).__name__}; load it first, e.g. "
                "AutoModelForSequenceClassification.from_pretrained(name)"
            )
        if not checkpoint.is_multi_adapter(adapter_directory):
            if adapter_name is not None and not isinstance(adapter_name, str):
                raise ShareLoraError(f"{adapter_directory} holds one adapter; adapter_name must be one name")
            config, tensors = checkpoint.load_adapter(adapter_directory)
            return cls.from_adapter_state_dict(base_model, config, tensors, is_trainable,
                                               adapter_name or DEFAULT_ADAPTER)
        names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
        configs, tensors, active = checkpoint.load_adapters(adapter_directory, names)
        order = list(configs)
        model = cls(base_model, configs[order[0]], order[0])
        for n in order[1:]:
            model.add_adapter(n, configs[n])
        model._owners_from(adapter_directory, set(model._basis_owner))
        model.load_multi_adapter_state_dict(tensors, order)
        model.set_adapter([n for n in active if n in configs] or order[:1])
        if not is_trainable:
            model._freeze()
        return model

    def load_adapter(self, adapter_directory: str | Path, adapter_name: str | list[str] | None = None,
                     is_trainable: bool | None = None, **_ignored) -> list[str]:
        """Load adapter(s) saved in a directory into this model (PEFT's ``load_adapter``); their names.

        A new name adds the adapter (inactive, as ``add_adapter``); the name of an adapter the model
        has reloads its tensors in place (how transformers' ``Trainer`` resumes from a checkpoint
        and loads the best one), which its saved config must match. ``is_trainable=False``
        freezes the model (``from_pretrained``'s default); None or True leave trainability as it
        is. Other keyword arguments of PEFT's are ignored.
        """
        if not checkpoint.is_multi_adapter(adapter_directory):
            if not isinstance(adapter_name, str):
                raise ShareLoraError(f"{adapter_directory} holds one adapter: name it with adapter_name='...'")
            config, tensors = checkpoint.load_adapter(adapter_directory)
            if adapter_name in self.sharelora_configs:
                self._check_same_config(adapter_name, config, adapter_directory)
            else:
                self.add_adapter(adapter_name, config)
            self.load_adapter_state_dict(tensors, adapter_name)
            loaded = [adapter_name]
        else:
            names = [adapter_name] if isinstance(adapter_name, str) else adapter_name
            configs, tensors, _ = checkpoint.load_adapters(adapter_directory, names)
            had = set(self._basis_owner)
            for n, cfg in configs.items():
                if n in self.sharelora_configs:
                    self._check_same_config(n, cfg, adapter_directory)
                else:
                    self.add_adapter(n, cfg)
            self._owners_from(adapter_directory, set(self._basis_owner) - had)
            self.load_multi_adapter_state_dict(tensors, list(configs))
            self._activate(self.active_adapters)
            loaded = list(configs)
        if is_trainable is False:
            self._freeze()
        return loaded

    def _owners_from(self, directory, groups: set[str]) -> None:
        """The basis owner of each task-core group in ``groups`` (whose basis this load created): the
        group's first adapter in the directory, if it was loaded; else None (nobody trains the basis
        by default, so training a later task loaded alone leaves the basis, and so the tasks left in
        the file, as they are)."""
        if not groups:
            return
        saved = checkpoint.saved_configs(directory)
        for group in groups:
            first = next((n for n, c in saved.items() if c.task_group == group and c.task_core != "none"), None)
            self._basis_owner[group] = first if first in self.sharelora_configs else None

    def _check_same_config(self, name: str, saved: ShareLoraConfig, directory) -> None:
        # The fields that only name things may differ; every other one decides what the tensors compute.
        ignore = {"base_model_name_or_path", "format_version", "basis_init"}  # basis_init: only how tensors start
        mine, theirs = self.sharelora_configs[name].to_dict(), saved.to_dict()
        differ = sorted(k for k in set(mine) | set(theirs) if k not in ignore and mine.get(k) != theirs.get(k))
        if differ:
            raise ShareLoraError(
                f"{directory} holds adapter {name!r} with other settings than this model's {name!r}: "
                + ", ".join(f"{k} {theirs.get(k)!r} (here {mine.get(k)!r})" for k in differ[:4])
                + f"; load it under another name (load_adapter(dir, 'other')) or delete_adapter({name!r}) first"
            )

    @classmethod
    def from_adapter_state_dict(cls, base_model: nn.Module, config: ShareLoraConfig,
                                tensors: dict[str, torch.Tensor], is_trainable: bool = False,
                                adapter_name: str = DEFAULT_ADAPTER) -> ShareLoraModel:
        """Inject ``config`` into ``base_model`` and load ``tensors``; frozen and in eval mode unless trainable."""
        model = cls(base_model, config, adapter_name)
        model.load_adapter_state_dict(tensors, adapter_name)
        if not is_trainable:
            model._freeze()
        return model

    def _freeze(self) -> None:
        self._trainable = False
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    # --- PEFT ---------------------------------------------------------------------------------
    def export_peft(self, save_directory: str | Path, adapter_name: str | list[str] | None = None) -> Path:
        """Write a standard PEFT LoRA directory (per-layer lora_A / lora_B) with identical outputs.

        One adapter (``adapter_name``, default: the only or the active one) is written at the
        directory's root; a list of names writes each to ``<directory>/<name>/``, which PEFT's
        ``PeftModel.from_pretrained`` / ``load_adapter(..., adapter_name=name)`` read.
        """
        from .peft_io import export_peft

        if isinstance(adapter_name, (list, tuple)):
            out = Path(save_directory)
            for n in adapter_name:
                export_peft(self, out / n, n)
            return out
        return export_peft(self, save_directory, adapter_name or self._view_adapter())

    @classmethod
    def from_peft(cls, base_model: nn.Module, peft_directory: str | Path | dict, is_trainable: bool = False,
                  adapter_name: str = DEFAULT_ADAPTER) -> ShareLoraModel:
        """Load PEFT LoRA adapter(s) as share="none" adapters (exactly the same outputs).

        ``peft_directory`` is one directory, or ``{adapter name: directory}`` for several.
        """
        from .peft_io import load_peft, read_peft

        if not isinstance(peft_directory, dict):
            return load_peft(cls, base_model, peft_directory, is_trainable, adapter_name)
        if not peft_directory:
            raise ShareLoraError("from_peft got an empty {name: directory} mapping")
        items = list(peft_directory.items())
        model = load_peft(cls, base_model, items[0][1], True, items[0][0])
        for name, d in items[1:]:
            config, tensors = read_peft(d)
            model.add_adapter(name, config)
            model.load_adapter_state_dict(tensors, name)
        model.set_adapter(items[0][0])
        if not is_trainable:
            model._freeze()
        return model

    # --- merging ------------------------------------------------------------------------------
    def merge(self) -> None:
        """W_l += (alpha/r) B_l A_l for the active adapters in every adapted layer (``unmerge`` undoes it).

        A quantized base (bitsandbytes 4-bit / 8-bit) is refused before any layer changes: see
        ``merge_and_unload(dequantize=True)``.
        """
        quantized = [(n, layer.quantized) for n, layer in self.sharelora_layers() if layer.quantized]
        if quantized:
            kinds = sorted({k for _, k in quantized})
            raise ShareLoraError(
                f"{len(quantized)} adapted layer(s) compute with {'/'.join(kinds)} bitsandbytes weights (e.g. "
                f"{quantized[0][0]}): W0 + B A would be rounded to the quantized codes again and the update lost in "
                "the rounding. Call merge_and_unload(dequantize=True) for a float model with this model's outputs "
                "(dtype=torch.bfloat16 halves it), or load the base in float / bf16 and merge the adapter there"
            )
        for _, layer in self.sharelora_layers():
            layer.merge()

    def unmerge(self) -> None:
        for _, layer in self.sharelora_layers():
            layer.unmerge()

    def merge_and_unload(self, dequantize: bool = False, dtype: torch.dtype | None = None) -> nn.Module:
        """Merge the active adapters into the weights and return the plain base model (base speed).

        ``dequantize=True`` first replaces every bitsandbytes quantized linear map of the base
        (adapted or not) by the float ``nn.Linear`` it computes, in ``dtype`` (default: the dtype
        of the base's other weights, e.g. its embeddings), so the merge is exact: the returned
        float model computes this model's outputs (up to float rounding; the quantization error
        stays as it was, in W0). A transformers model then forgets its quantization config and
        saves as a float model. Without it, a quantized base is refused (``merge``).
        """
        if dequantize:
            self.dequantize(dtype)
        self.merge()
        return self.unload()

    def dequantize(self, dtype: torch.dtype | None = None) -> ShareLoraModel:
        """Replace the base model's bitsandbytes layers by float ``nn.Linear`` s (see ``merge_and_unload``)."""
        from .quantized import dequantize_modules, forget_quantization, quantization_of

        if dtype is None:
            floats = [p.dtype for m in self.base_model.modules() if quantization_of(m) is None
                      for p in m.parameters(recurse=False) if p.is_floating_point()]
            dtype = floats[0] if floats else torch.float32
        for _, layer in self.sharelora_layers():
            layer.dequantize_base(dtype)
        dequantize_modules(self.base_model, dtype)  # the layers no adapter targets
        forget_quantization(self.base_model)  # transformers' marks of a quantized model
        return self

    def unload(self) -> nn.Module:
        """Put the original modules back (merged or not) and return the base model.

        A modules_to_save module is replaced by the active adapter's trained copy (as PEFT does).
        """
        for handle in self._shared_down_hooks:
            handle.remove()
        self._shared_down_hooks = []
        self._shared_downs = {}
        for name, layer in list(self.sharelora_layers()):
            _set_submodule(self.base_model, name, layer.base_layer)
        for path, wrapper in self._wrappers().items():
            _set_submodule(self.base_model, path, wrapper.current())
        self.routing.clear()
        return self.base_model

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes the base model's outputs, as PEFT's ``disable_adapter``.

        No low-rank update runs and every ``modules_to_save`` module (a task head) is its original,
        frozen version, not an adapter's trained copy: the same outputs as ``adapter_names`` of
        ``"__base__"`` and as the base model before ``get_sharelora_model``. ``adapter_names``
        given inside the block are ignored, as PEFT ignores them there.
        """
        layers = [layer for _, layer in self.sharelora_layers()]
        if any(layer.merged for layer in layers):
            raise ShareLoraError("cannot disable a merged adapter; call unmerge() first")
        switches = layers + list(self._wrappers().values())
        previous = [m.disabled for m in switches]
        for m in switches:
            m.disabled = True
        try:
            yield
        finally:
            for m, was in zip(switches, previous):
                m.disabled = was


def get_sharelora_model(model: nn.Module, config: ShareLoraConfig, adapter_name: str = DEFAULT_ADAPTER) -> ShareLoraModel:
    """Add a ShareLoRA adapter to ``model`` (in place) and return the wrapping ShareLoraModel."""
    return ShareLoraModel(model, config, adapter_name)


def __getattr__(name: str):
    # ``ShareLoraPeftModel`` by name (pickle looks classes up so): made on first use, as peft is optional.
    if name == "ShareLoraPeftModel":
        from .peft_surface import peft_facing

        return peft_facing(ShareLoraModel)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
