"""PEFT's VeRA and VB-LoRA as baselines, and per-method settings for ``compare --methods``.

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

Method settings (``method@key=value,key=value``, e.g. ``lora@r=2``, ``peft-vblora@r=4,num_vectors=64,
vector_length=128,lr=0.004``) are parsed by :func:`parse_methods` into :class:`MethodSpec`s; each
spec turns a base TrainConfig into its run's config (:meth:`MethodSpec.apply`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

from .config import METHODS

# PEFT option -> (type, check, documented default). r is TrainConfig.rank; dropout maps to
# vera_dropout / vblora_dropout.
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "vera": {"r": 256, "d_initial": 0.1, "dropout": 0.0, "projection_prng_key": 0},
    "vblora": {"r": 4, "num_vectors": 256, "vector_length": 256, "topk": 2, "dropout": 0.0},
}
_INT_KEYS = {"r", "num_vectors", "vector_length", "topk", "projection_prng_key", "seed"}

# Keys each method accepts in ``method@key=value``.
OURS_KEYS = ("r", "alpha", "dropout", "lr")
_EXAMPLE = "lora@r=2,sharea@r=16,peft-vera@r=1024,peft-vblora@r=4,num_vectors=64,vector_length=128"


def peft_kind(method: str) -> str | None:
    """"vera" / "vblora" for a PEFT method, None for ours and full fine-tuning."""
    return (METHODS.get(method) or {}).get("peft")


def method_keys(method: str) -> tuple[str, ...]:
    if METHODS.get(method, 0) is None:
        return ("lr",)
    kind = peft_kind(method)
    if kind is not None:
        return tuple(PEFT_DEFAULTS[kind]) + ("lr",)
    return OURS_KEYS


def _value(method: str, key: str, text: str) -> Any:
    fix = f"e.g. {method}@{key}=" + {"lr": "0.002", "dropout": "0.1", "alpha": "16", "d_initial": "0.1"}.get(key, "8")
    try:
        value: Any = int(text) if key in _INT_KEYS else float(text)
    except ValueError:
        kind = "an integer" if key in _INT_KEYS else "a number"
        raise ValueError(f"{method}@{key}={text}: {key} must be {kind}; {fix}") from None
    if key == "dropout":
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{method}@dropout={text}: dropout must be in [0, 1); {fix}")
    elif key == "projection_prng_key":
        if value < 0:
            raise ValueError(f"{method}@{key}={text}: must be >= 0; {fix}")
    elif not value > 0:
        raise ValueError(f"{method}@{key}={text}: {key} must be > 0; {fix}")
    return value


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``--methods``: a method and its settings (in the order given)."""

    method: str
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """How tables name it: ``lora`` or ``lora@r=2`` / ``peft-vblora@r=4,num_vectors=64``."""
        if not self.settings:
            return self.method
        return self.method + "@" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                            for k, v in self.settings)

    @property
    def dirname(self) -> str:
        """A file-name-safe form of the label (``lora-r2``), for the run's directory."""
        parts = [self.method] + [f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in self.settings]
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", "-".join(parts))

    def apply(self, base: Any, full_lr: float | None = None) -> Any:
        """The TrainConfig of this spec's runs: ``base`` with the settings on top.

        Ours: r, alpha, dropout, lr set TrainConfig.rank / alpha / dropout / lr. PEFT methods: r sets
        the rank (their own default when not given, not ``base.rank``, which is LoRA's), lr the
        learning rate, everything else goes to ``method_options`` (PEFT's defaults for the rest).
        Full fine-tuning takes ``full_lr`` unless lr is given.
        """
        s = dict(self.settings)
        values: dict[str, Any] = {"method": self.method, "targets": list(base.targets),
                                  "dataset_options": dict(base.dataset_options), "method_options": {}}
        values["lr"] = s.pop("lr", full_lr if METHODS[self.method] is None else base.lr)
        kind = peft_kind(self.method)
        if kind is not None:
            values["rank"] = s.pop("r", PEFT_DEFAULTS[kind]["r"])
            values["method_options"] = s
        else:
            for key, field in (("r", "rank"), ("alpha", "alpha"), ("dropout", "dropout")):
                if key in s:
                    values[field] = s.pop(key)
        return dataclasses.replace(base, **values)


def parse_methods(items: str | list[str]) -> list[MethodSpec]:
    """``--methods`` as specs: "lora@r=2,lora@r=8,peft-vblora@r=4,num_vectors=64" (or its comma split).

    An item ``key=value`` without ``@`` continues the settings of the entry before it. Raises
    ValueError naming the bad entry and the fix: unknown method, unknown key, bad value, a key
    given twice, the same entry twice (both would write the same run directories).
    """
    tokens = [t.strip() for item in ([items] if isinstance(items, str) else items) for t in item.split(",") if t.strip()]
    entries: list[tuple[str, list[tuple[str, str]]]] = []
    for token in tokens:
        name, at, rest = token.partition("@")
        if not at and "=" in token:
            if not entries or (not entries[-1][1]):
                raise ValueError(f"--methods: setting {token!r} follows no method@setting; write it after one, "
                                 f"e.g. peft-vblora@r=4,{token}")
            key, _, value = token.partition("=")
            entries[-1][1].append((key.strip(), value.strip()))
            continue
        if at and not rest.strip():
            raise ValueError(f"--methods: {token!r} has nothing after '@'; write e.g. {name}@r=8 or just {name}")
        settings = []
        if at:
            key, eq, value = rest.partition("=")
            if not eq:
                raise ValueError(f"--methods: {token!r}: expected {name}@KEY=VALUE, e.g. {name}@r=8")
            settings.append((key.strip(), value.strip()))
        entries.append((name.strip(), settings))
    if not entries:
        raise ValueError(f"--methods is empty; name at least one method, e.g. {_EXAMPLE}")
    specs, seen = [], set()
    for name, settings in entries:
        if name not in METHODS:
            raise ValueError(f"--methods: unknown method(s) {name}; choose from {', '.join(METHODS)} "
                             f"(settings as method@key=value, e.g. {_EXAMPLE})")
        keys = method_keys(name)
        parsed: list[tuple[str, Any]] = []
        for key, value in settings:
            if key not in keys:
                raise ValueError(f"--methods: {name} has no setting {key!r}; its settings are {', '.join(keys)}")
            if any(k == key for k, _ in parsed):
                raise ValueError(f"--methods: {name}@... sets {key} twice; give it once")
            parsed.append((key, _value(name, key, value)))
        spec = MethodSpec(name, tuple(parsed))
        if spec.label in seen:
            raise ValueError(f"--methods lists {spec.label} twice; drop one (they would be the same runs)")
        seen.add(spec.label)
        specs.append(spec)
    return specs


# --- PEFT models ----------------------------------------------------------------------------------
def validate_method_options(cfg: Any) -> None:
    """method_options hold only the method's own keys (PEFT methods) with good values."""
    if not isinstance(cfg.method_options, dict):
        raise ValueError(f"method_options must be a mapping of setting -> value, got {cfg.method_options!r}")
    kind = peft_kind(cfg.method)
    if kind is None:
        if cfg.method_options:
            raise ValueError(f"method {cfg.method} takes no method_options ({sorted(cfg.method_options)}); "
                             "set its rank / alpha / dropout with --rank / --alpha / --dropout")
        return
    allowed = set(PEFT_DEFAULTS[kind]) - {"r"}
    unknown = sorted(set(cfg.method_options) - allowed)
    if unknown:
        raise ValueError(f"{cfg.method} has no option(s) {unknown}; its options are {', '.join(sorted(allowed))} "
                         "(the rank is --rank / @r=)")
    for key, value in cfg.method_options.items():
        _value(cfg.method, key, str(value))
    options = {**PEFT_DEFAULTS[kind], **cfg.method_options}
    if kind == "vblora" and options["topk"] > options["num_vectors"]:
        raise ValueError(f"peft-vblora: topk {options['topk']} exceeds num_vectors {options['num_vectors']}; "
                         "use topk <= num_vectors (PEFT's default topk is 2)")
    if cfg.quantize or cfg.fsdp:
        raise ValueError(f"{cfg.method} runs PEFT's implementation, which this project trains on a plain base "
                         "in one process or under DDP only; drop --quantize / --fsdp or use a ShareLoRA method")


def _linear_shapes(model: nn.Module, targets: list[str]) -> dict[str, tuple[int, int]]:
    shapes = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            shapes[name] = (module.in_features, module.out_features)
    return shapes


def peft_config(cfg: Any, model: nn.Module, modules_to_save: list[str]) -> Any:
    """PEFT's VeraConfig / VBLoRAConfig for ``cfg`` (rank cfg.rank, PEFT defaults for the rest)."""
    import peft

    kind = peft_kind(cfg.method)
    options = {**PEFT_DEFAULTS[kind], **cfg.method_options}
    options.pop("r")
    dropout = options.pop("dropout")
    task_type = "CAUSAL_LM" if getattr(model, "can_generate", lambda: False)() and not modules_to_save else "SEQ_CLS"
    common = dict(r=cfg.rank, target_modules=list(cfg.targets), modules_to_save=list(modules_to_save) or None,
                  task_type=task_type)
    if kind == "vera":
        return peft.VeraConfig(vera_dropout=dropout, **common, **options)
    length = options["vector_length"]
    shapes = _linear_shapes(model, list(cfg.targets))
    bad = sorted({d for io in shapes.values() for d in io if d % length})
    if bad:
        sizes = sorted({d for io in shapes.values() for d in io})
        fits = [v for v in range(min(sizes), 0, -1) if all(d % v == 0 for d in sizes) and v <= 256][:3]
        raise ValueError(f"peft-vblora: vector_length {length} does not divide the targets' feature sizes {bad} "
                         f"(VB-LoRA cuts every row of A and B into pieces of that length); pass one that divides "
                         f"{sizes}, e.g. peft-vblora@vector_length={fits[0] if fits else 1}")
    return peft.VBLoRAConfig(vblora_dropout=dropout, **common, **options)


def prepare_peft_model(base_model: nn.Module, cfg: Any, modules_to_save: list[str]) -> nn.Module:
    """``peft.get_peft_model`` with the method's config: only the adapter and the head train."""
    import peft

    return peft.get_peft_model(base_model, peft_config(cfg, base_model, modules_to_save))


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


def peft_parameter_summary(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """results.json's counts for a PEFT method, as for ours: ``adapter`` excludes the head,
    ``trainable`` is what the optimizer updates (head included), ``total`` every parameter once
    (PEFT keeps the original head beside its trained copy; frozen buffers such as VeRA's shared
    projections are not parameters and count in neither; they are in the adapter file)."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    head = head_parameters(model)
    kind = peft_kind(cfg.method)
    options = {**PEFT_DEFAULTS[kind], **cfg.method_options, "r": cfg.rank}
    return {
        "trainable": trainable, "total": sum(p.numel() for p in params), "adapter": trainable - head,
        "head": head, "lora_equivalent": None, "saving_vs_lora": None,
        "report": {"peft_type": kind, "peft_version": _peft_version(), "options": options},
    }


def _peft_version() -> str:
    import peft

    return peft.__version__
