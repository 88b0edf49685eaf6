"""The method vocabulary: every name that train, compare, multitask and bench accept, defined once.

A name is a preset of the method's own config object:

    full                 no adapter: every weight of the base model trains
    lora                 ShareLoraConfig(share="none")              (plain LoRA)
    sharea / shareb / shareab   ShareLoraConfig(share="A" / "B" / "AB")   (shared across layers per module type)
    sharea-qkv           ShareLoraConfig(share="A", scope="qkv", target_modules=[query, key, value])
    peft-vera            PEFT's VeraConfig   (frozen shared random A/B, trained scaling vectors)
    peft-vblora          PEFT's VBLoRAConfig (a trained vector bank shared by all layers)

A run's config (``TrainConfig``) fills in the rest: ``rank``, ``alpha``, ``dropout``, ``targets``
(names, a regex or "all-linear"), ``modules_to_save`` and ``method_options``: any other field of
the method's config (ShareLoRA: ``share``, ``scope``, ``share_block_size``, ``layers_to_transform``,
``dropout_mask``, ``fused_modules``, ...; PEFT: its own options, peft_methods.py). ``method_config``
is the object a run trains with, ``prepare_model`` applies it. Settings per entry of
``compare --methods`` ("lora@r=2,sharea@share_block_size=2") are parsed here too (``parse_methods``).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported where a model is built, so the vocabulary loads instantly
    from torch import nn

from .peft_methods import PEFT_DEFAULTS, peft_config, peft_parameter_summary, prepare_peft_model

# Names that transformers uses for a sequence-classification head, across architectures.
HEAD_NAMES = ("classifier", "score")


@dataclass(frozen=True)
class Method:
    """One name of the vocabulary: ``kind`` "full", "sharelora" or "peft", and the preset it stands for
    (ShareLoraConfig fields, or the PEFT method)."""

    name: str
    kind: str
    preset: dict[str, Any]
    description: str

    @property
    def peft(self) -> str | None:
        """"vera" / "vblora" for PEFT's methods, None for ours and full fine-tuning."""
        return self.preset.get("peft")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("full", "full", {}, "full fine-tuning (every weight)"),
    Method("lora", "sharelora", {"share": "none"}, "LoRA: an A and a B per layer and module"),
    Method("sharea", "sharelora", {"share": "A"}, "ShareA: one A per module type for all layers"),
    Method("shareb", "sharelora", {"share": "B"}, "ShareB: one B per module type for all layers"),
    Method("shareab", "sharelora", {"share": "AB"}, "ShareAB: one A and one B per module type"),
    # The paper's self-attention variant: one A for the query, key and value maps of all layers.
    Method("sharea-qkv", "sharelora", {"share": "A", "scope": "qkv", "target_modules": ["query", "key", "value"]},
           "one A for query, key and value of all layers"),
    Method("peft-vera", "peft", {"peft": "vera"}, "PEFT's VeRA (frozen shared random A, B; trained scales)"),
    Method("peft-vblora", "peft", {"peft": "vblora"}, "PEFT's VB-LoRA (a trained vector bank shared by all layers)"),
)}

# ShareLoraConfig fields a run sets through its own TrainConfig fields, or that belong to multi-task runs.
_OWN_FIELDS = {"rank", "alpha", "dropout", "target_modules", "modules_to_save", "base_model_name_or_path",
               "task_share", "task_group", "task_core", "heads", "router", "router_top_k"}

# What the adapters of several tasks in one model share (multi-task runs; SPEC.md, "Sharing across tasks"):
# none, A, B, or AB (one A and one B for every task, each task owning only a core of kind TASK_CORES).
TASK_SHARES = ("none", "A", "B", "AB")
TASK_CORES = ("none", "matrix", "diagonal")


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def sharelora_options() -> tuple[str, ...]:
    """The ShareLoraConfig fields a run sets through ``method_options`` (share, scope, share_block_size, ...)."""
    from sharelora import ShareLoraConfig

    return tuple(f.name for f in dataclasses.fields(ShareLoraConfig) if f.name not in _OWN_FIELDS)


def head_modules(model: nn.Module) -> list[str]:
    """Names of the classification head's modules in ``model`` (BERT/RoBERTa: "classifier")."""
    found = []
    for name in HEAD_NAMES:
        if any(path == name or path.endswith("." + name) for path, _ in model.named_modules()):
            found.append(name)
    return found


def saved_modules(cfg: Any, model: nn.Module) -> list[str]:
    """The run's ``modules_to_save``, or the model's classification head when it names none."""
    return list(cfg.modules_to_save if cfg.modules_to_save is not None else head_modules(model))


def targets(cfg: Any) -> list[str] | str:
    """``cfg.targets`` as ShareLoraConfig / PEFT take it: names, or one regex / "all-linear" string."""
    return cfg.targets if isinstance(cfg.targets, str) else list(cfg.targets)


def preset_config(name: str, **fields: Any) -> Any:
    """The ShareLoraConfig of ShareLoRA method ``name``: its preset with ``fields`` on top (the bench's and
    every run's way to build one)."""
    from sharelora import ShareLoraConfig

    m = method(name)
    if m.kind != "sharelora":
        raise ValueError(f"{name} is not a ShareLoRA method; ShareLoRA's are "
                         f"{', '.join(n for n, x in METHODS.items() if x.kind == 'sharelora')}")
    return ShareLoraConfig(**{**m.preset, **fields})


def sharelora_config(cfg: Any, model: nn.Module | None) -> Any:
    """The ``ShareLoraConfig`` that run ``cfg`` (a TrainConfig of a ShareLoRA method) applies to ``model``:
    its preset, rank / alpha / dropout / targets / modules_to_save and ``method_options`` on top."""
    return preset_config(cfg.method, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets(cfg),
                         modules_to_save=saved_modules(cfg, model) if model is not None else [],
                         base_model_name_or_path=cfg.model, **cfg.method_options)


def task_config(cfg: Any, model: nn.Module | None) -> Any:
    """The ``ShareLoraConfig`` of every task adapter of multi-task run ``cfg`` (per-task layout): its method's
    (``sharelora_config``) with the run's ``task_share`` and ``task_core`` on top.

    ``task_share="AB"`` with ``task_core="matrix"`` (or ``"diagonal"``): every task reads the same A and B
    and owns an r x r core C (or an r-vector c) per adapted module, h = W0 x + (alpha / r) B C A x.
    """
    core = getattr(cfg, "task_core", "none")
    if cfg.task_share == "AB" and core == "none":
        raise ValueError("task_share AB gives every task the same A and B, so each task needs a core of its own: "
                         "add --task-core matrix (r x r per module) or --task-core diagonal (r per module)")
    if core != "none" and cfg.task_share != "AB":
        raise ValueError(f"--task-core {core} is a task's own part between a task-shared A and B; it needs "
                         f"--task-share AB (got {cfg.task_share})")
    return dataclasses.replace(sharelora_config(cfg, model), task_share=cfg.task_share, task_core=core)


def method_config(cfg: Any, model: nn.Module) -> Any:
    """The method's own config object for run ``cfg`` on ``model``: a ShareLoraConfig, PEFT's config, or
    None for full fine-tuning."""
    m = method(cfg.method)
    if m.kind == "full":
        return None
    if m.kind == "peft":
        return peft_config(m.peft, cfg, model, saved_modules(cfg, model))
    return sharelora_config(cfg, model)


def validate_method_options(cfg: Any) -> None:
    """``cfg.method_options`` hold only fields of the method's own config, with good values."""
    options, m = cfg.method_options, method(cfg.method)
    if not isinstance(options, dict):
        raise ValueError(f"method_options must be a mapping of setting -> value, got {options!r}")
    if m.kind == "full":
        if options:
            raise ValueError(f"full fine-tuning takes no method_options ({sorted(options)}); it has no adapter")
        return
    if m.kind == "sharelora":
        allowed = sharelora_options()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ValueError(f"{cfg.method} has no option(s) {unknown}; its options are {', '.join(allowed)} "
                             "(rank, alpha, dropout, targets and modules_to_save have flags of their own)")
        layers = options.get("layers_to_transform")
        if layers is not None and (not isinstance(layers, list) or not all(isinstance(i, int) and i >= 0
                                                                           for i in layers)):
            raise ValueError(f"layers_to_transform must be a list of layer indices (e.g. [0, 1, 2]), got {layers!r}")
        try:
            sharelora_config(cfg, None)  # ShareLoraConfig checks its own values
        except ValueError as e:
            raise ValueError(f"{cfg.method}: {e}") from None
        return
    allowed_peft = set(PEFT_DEFAULTS[m.peft]) - {"r"}
    unknown = sorted(set(options) - allowed_peft)
    if unknown:
        raise ValueError(f"{cfg.method} has no option(s) {unknown}; its options are {', '.join(sorted(allowed_peft))} "
                         "(the rank is --rank / @r=)")
    for key, value in options.items():
        setting_value(cfg.method, key, str(value))
    merged = {**PEFT_DEFAULTS[m.peft], **options}
    if m.peft == "vblora" and merged["topk"] > merged["num_vectors"]:
        raise ValueError(f"peft-vblora: topk {merged['topk']} exceeds num_vectors {merged['num_vectors']}; "
                         "use topk <= num_vectors (PEFT's default topk is 2)")
    if cfg.quantize or cfg.fsdp:
        raise ValueError(f"{cfg.method} runs PEFT's implementation, which this project trains on a plain base "
                         "in one process or under DDP only; drop --quantize / --fsdp or use a ShareLoRA method")


def prepare_model(base_model: nn.Module, cfg: Any) -> nn.Module:
    """The model to train: the base model itself (full) or the method's adapter around it (its
    ``method_config``), with the run's memory options (``--bf16``, ``--gradient-checkpointing``;
    see memory.py) turned on."""
    validate_method_options(cfg)
    config = method_config(cfg, base_model)
    kind = method(cfg.method).kind
    if kind == "full":
        for p in base_model.parameters():
            p.requires_grad_(True)
        model = base_model
    elif kind == "peft":
        model = prepare_peft_model(base_model, config)
    else:
        from sharelora import get_sharelora_model

        model = get_sharelora_model(base_model, config)
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


def parameter_summary(model: nn.Module, cfg: Any) -> dict[str, Any]:
    """Parameter counts for results.json.

    ``adapter`` counts the method's own weights without the classification head (the paper's
    and SPEC's convention); ``trainable`` counts everything the optimizer updates, head included.
    For full fine-tuning the adapter is the whole model.
    """
    m = method(cfg.method)
    if m.kind == "peft":
        return peft_parameter_summary(model, m.peft, cfg.rank, cfg.method_options)
    counts = count_parameters(model)
    summary: dict[str, Any] = {"trainable": counts["trainable"], "total": counts["total"]}
    if m.kind == "full":
        summary["adapter"] = counts["trainable"]
        return summary
    report = model.parameter_report()
    summary["adapter"] = int(report["adapter_parameters"])
    summary["lora_equivalent"] = int(report["lora_equivalent_parameters"])
    summary["saving_vs_lora"] = float(report["saving_vs_lora"])
    summary["head"] = int(report["modules_to_save_parameters"])
    summary["report"] = report
    return summary


# --- settings per entry of compare --methods ----------------------------------------------------------
# Keys of ShareLoRA methods in ``method@key=value`` (r, alpha, dropout: rank, alpha, dropout; the others
# are method_options), their types, and an example value for the error messages.
OURS_KEYS = ("r", "alpha", "dropout", "lr", "share", "scope", "share_block_size", "dropout_mask")
_INT_KEYS = {"r", "num_vectors", "vector_length", "topk", "projection_prng_key", "seed", "share_block_size"}
_TEXT_KEYS = {"share", "scope", "dropout_mask"}
_EXAMPLE = "lora@r=2,sharea@r=16,peft-vera@r=1024,peft-vblora@r=4,num_vectors=64,vector_length=128"


def method_keys(name: str) -> tuple[str, ...]:
    m = method(name)
    if m.kind == "full":
        return ("lr",)
    if m.kind == "peft":
        return tuple(PEFT_DEFAULTS[m.peft]) + ("lr",)
    return OURS_KEYS


def setting_value(name: str, key: str, text: str) -> Any:
    """The value of setting ``key`` of method ``name`` written as ``text``, checked (ValueError naming the fix)."""
    if key in _TEXT_KEYS:
        return text
    fix = f"e.g. {name}@{key}=" + {"lr": "0.002", "dropout": "0.1", "alpha": "16", "d_initial": "0.1"}.get(key, "8")
    try:
        value: Any = int(text) if key in _INT_KEYS else float(text)
    except ValueError:
        kind = "an integer" if key in _INT_KEYS else "a number"
        raise ValueError(f"{name}@{key}={text}: {key} must be {kind}; {fix}") from None
    if key == "dropout":
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}@dropout={text}: dropout must be in [0, 1); {fix}")
    elif key == "projection_prng_key":
        if value < 0:
            raise ValueError(f"{name}@{key}={text}: must be >= 0; {fix}")
    elif not value > 0:
        raise ValueError(f"{name}@{key}={text}: {key} must be > 0; {fix}")
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

        Ours: r, alpha, dropout, lr set TrainConfig.rank / alpha / dropout / lr, the other keys
        ``method_options`` (over ``base``'s). PEFT methods: r sets the rank (their own default when not given, not
        ``base.rank``, which is LoRA's), lr the learning rate, everything else goes to
        ``method_options`` (PEFT's defaults for the rest). Full fine-tuning takes ``full_lr``
        unless lr is given.
        """
        s, m = dict(self.settings), method(self.method)
        values: dict[str, Any] = {"method": self.method, "targets": targets(base),
                                  "dataset_options": dict(base.dataset_options), "method_options": {}}
        values["lr"] = s.pop("lr", full_lr if m.kind == "full" else base.lr)
        if m.kind == "peft":
            values["rank"] = s.pop("r", PEFT_DEFAULTS[m.peft]["r"])
        else:
            for key, field in (("r", "rank"), ("alpha", "alpha"), ("dropout", "dropout")):
                if key in s:
                    values[field] = s.pop(key)
        # base's method options (--share-block-size, ...) are ShareLoRA's: they apply to every ShareLoRA entry
        values["method_options"] = {**base.method_options, **s} if m.kind == "sharelora" else s
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
            parsed.append((key, setting_value(name, key, value)))
        spec = MethodSpec(name, tuple(parsed))
        if spec.label in seen:
            raise ValueError(f"--methods lists {spec.label} twice; drop one (they would be the same runs)")
        seen.add(spec.label)
        specs.append(spec)
    return specs
