"""Export to, and import from, a standard Hugging Face PEFT LoRA directory.

A ShareLoRA adapter is a standard LoRA with no loss: layer l's update is B_l A_l whichever of
the two is shared, so export writes A and B per layer under PEFT's keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, which PEFT, vLLM and LoRAX load.

A fused module with adapted slices (GPT-2 ``c_attn.q`` and ``c_attn.v``) becomes one PEFT
adapter on the whole module with rank (distinct A's x r): A stacks the slices' A matrices, B is
block diagonal over the slices' output columns, and lora_alpha is raised by the same factor so
that PEFT's scaling lora_alpha / rank stays alpha / r.

Task type. ``task_type`` is the PEFT task whose ``AutoPeftModelFor<task>`` builds this model's
class (its transformers auto class maps the model's type to it): SEQ_CLS, TOKEN_CLS,
QUESTION_ANS, SEQ_2_SEQ_LM or CAUSAL_LM. Any other model (``BertModel``, a plain torch module)
gets ``task_type: null`` and PEFT's ``auto_mapping`` (its class and module), as PEFT writes it.

Heads. Loading a SEQ_CLS or TOKEN_CLS adapter, PEFT adds ``classifier`` and ``score`` to
``modules_to_save`` (QUESTION_ANS: ``qa_outputs``; ``PeftModelFor<task>``): every module whose
path ends with one of those names, or with a name the config lists, is replaced by the module
stored in the adapter file, is never given a LoRA inside it, and must have all its weights in
the file. The export therefore writes what PEFT will read, as PEFT's own ``save_pretrained`` of
such a model does: ``modules_to_save`` lists every module PEFT will wrap (outermost paths), and
the file holds each one's weights as this adapter computes with it: the copy it trained, or the
base model's module with any of the adapter's LoRA updates inside it merged in (W0 + s B A).
So PEFT computes the exact function even when the head was not trained: an encoder's
classification head is drawn afresh each time its base model is loaded, and a head PEFT wraps
but finds no weights for is an error (KeyError ``base_model.model.classifier.dense.weight``).
Writing ``task_type: null`` instead would avoid the wrapping, but then PEFT would compute with
whatever head the user's base model happens to have, and the config would no longer name the
task its Auto class loads. Heads of task types PEFT does not wrap (``lm_head`` of CAUSAL_LM)
are written only when the adapter trains them, so a causal LM's export holds LoRA tensors only.

Import (``read_peft``) applies the same rule: a saved tensor belongs to the outermost module
whose path ends with a listed or task head name (``classifier.dense.weight`` is part of
``classifier``), else to its parent module. Modules of different ranks or alphas (an export with
``rank_pattern``) import at the largest rank: A and B are padded with zeros and B carries the
module's scaling relative to the common one, which adds exact zeros to the update.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from . import checkpoint
from .config import ShareLoraConfig
from .errors import ShareLoraError
from .plan import plain_modules

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"

# PEFT task type -> transformers' names of the classes its AutoPeftModelFor<task> can build.
_TASK_CLASSES = (
    ("SEQ_CLS", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    ("TOKEN_CLS", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
    ("QUESTION_ANS", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES"),
    ("SEQ_2_SEQ_LM", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES"),
    ("CAUSAL_LM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
)
# For classes transformers' auto mappings do not know (remote code, subclasses): by name.
_TASK_SUFFIXES = (
    ("ForSequenceClassification", "SEQ_CLS"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForCausalLM", "CAUSAL_LM"), ("LMHeadModel", "CAUSAL_LM"),
)
# The names PEFT adds to modules_to_save when it builds the PeftModelFor<task> (classifier_module_names,
# qa_module_names in peft/peft_model.py); it wraps every module whose path ends with one of them.
PEFT_TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
                   "QUESTION_ANS": ("qa_outputs",)}


def _task_type(model: nn.Module) -> str | None:
    """The PEFT task type whose AutoPeftModel class builds ``type(model)``, or None."""
    cls_name = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    modeling_auto = None
    if model_type is not None:
        try:
            from transformers.models.auto import modeling_auto
        except ImportError:
            pass
    if modeling_auto is not None:
        for task, mapping in _TASK_CLASSES:
            names = getattr(modeling_auto, mapping, {}).get(model_type, ())
            if cls_name in ((names,) if isinstance(names, str) else tuple(names)):
                return task
    for suffix, task in _TASK_SUFFIXES:
        if cls_name.endswith(suffix):
            return task
    return None


def _outermost(paths) -> list[str]:
    paths = set(paths)
    return sorted(p for p in paths if not any(p.startswith(o + ".") for o in paths if o != p))


def _inside(path: str, roots) -> bool:
    return any(path == r or path.startswith(r + ".") for r in roots)


def _peft_wrapped(base: nn.Module, modules_to_save: list[str], task_type: str | None) -> list[str]:
    """Paths of the modules PEFT loads from the file for this config: it wraps every module whose
    path ends with a modules_to_save or task head name (a plain string suffix, as its
    ``_set_trainable`` matches); outermost paths only, as a wrapped module's submodules come with it."""
    names = list(modules_to_save) + list(PEFT_TASK_HEADS.get(task_type, ()))
    return _outermost(n for n, _ in plain_modules(base) if n and any(n.endswith(s) for s in names))


def _peft_excludes(path: str, modules_to_save: list[str]) -> bool:
    """PEFT gives no LoRA to a module in or under a modules_to_save name (its check_target_module_exists)."""
    return any(re.match(rf"(^|.*\.){m}($|\..*)", path) for m in modules_to_save)


def _target_spec(base: nn.Module, module_names: list[str], modules_to_save: list[str]) -> list[str] | str:
    """PEFT target_modules: leaf names where they select exactly our modules, else an exact regex.

    PEFT adapts every module (of any type) whose path ends with ``.<name>``, except those it
    excludes as modules_to_save (``modules_to_save`` here: the list PEFT will hold at load)."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    selected = {n for n, _ in plain_modules(base)
                if n and n.rsplit(".", 1)[-1] in leaves and not _peft_excludes(n, modules_to_save)}
    if selected == set(module_names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(module_names)) + ")$"


def _update_in_weight_layout(layer, adapter_name: str) -> torch.Tensor:
    """scaling * B A of one adapter on one ShareLoraLayer, laid out like its base weight."""
    w = layer.base_layer.weight
    out = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
    for t in layer.slots[adapter_name].targets:
        d = layer.delta_weight(t, adapter_name).to(w.device)
        rows = slice(t.out_start, t.out_start + t.d_out)
        if layer.transposed:  # Conv1D stores (d_in, d_out)
            out[:, rows] += d.T
        else:
            out[rows] += d
    return out


def _effective_state(module: nn.Module, adapter_name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """``module.state_dict()`` of the plain module ``adapter_name`` computes with.

    A modules_to_save wrapper stands for the adapter's copy (else the original); an injected
    layer for its base layer with this adapter's update merged in and any other adapter's merged
    update taken out, so the weights are W0 + s B A of this adapter alone.
    """
    if getattr(module, "is_sharelora_wrapper", False):
        return _effective_state(module.module_for(adapter_name), adapter_name, prefix)
    if getattr(module, "is_sharelora_layer", False):
        out = {prefix + k: v for k, v in module.base_layer.state_dict().items()}
        w = module.base_layer.weight.detach().float()
        for other in module.merged_adapters:
            if other != adapter_name:
                w = w - _update_in_weight_layout(module, other)
        if adapter_name in module.slots and adapter_name not in module.merged_adapters:
            w = w + _update_in_weight_layout(module, adapter_name)
        out[prefix + "weight"] = w.to(module.base_layer.weight.dtype)
        return out
    if not any(getattr(m, "is_sharelora_layer", False) or getattr(m, "is_sharelora_wrapper", False)
               for m in module.modules()):
        return module.state_dict(prefix=prefix)
    out = {prefix + k: p.detach() for k, p in module._parameters.items() if p is not None}
    out.update({prefix + k: b.detach() for k, b in module._buffers.items()
                if b is not None and k not in module._non_persistent_buffers_set})
    for name, child in module._modules.items():
        if child is not None:
            out.update(_effective_state(child, adapter_name, f"{prefix}{name}."))
    return out


@torch.no_grad()
def export_peft(model, save_directory: str | Path, adapter_name: str | None = None) -> Path:
    """Write one adapter of ``model`` (a ShareLoraModel; default: the active one) as a PEFT LoRA directory."""
    name = adapter_name or model._view_adapter()
    if name not in model.sharelora_configs:
        raise ShareLoraError(f"no adapter named {name!r}; loaded adapters: {model.adapter_names}")
    cfg: ShareLoraConfig = model.sharelora_configs[name]
    if cfg.router:
        raise ShareLoraError(f"adapter {name!r} routes {cfg.heads} B heads per token (HydraLoRA): its update depends "
                             "on the input, which a PEFT LoRA cannot express; save it with save_pretrained instead")
    base = model.base_model
    task_type = _task_type(base)
    wrapped = _peft_wrapped(base, model.saved_module_names(name), task_type)
    peft_modules_to_save = wrapped + list(PEFT_TASK_HEADS.get(task_type, ()))  # what PEFT holds once loaded

    r, alpha = cfg.rank, float(cfg.alpha)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for module_name, layer in model.sharelora_layers():
        slot = layer.slots.get(name)
        if slot is None or _inside(module_name, wrapped):  # a wrapped head carries its update merged
            continue
        fan_in_fan_out |= layer.transposed
        A, B = slot.down_and_up(model.sharelora_bank)  # A (k r, d_in), B (d_out, k r): block structure
        # A copy each: a shared A or B is one tensor in the bank, but a file tensor per layer here.
        tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = A.detach().clone()
        tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = B.detach().clone()
        ranks[module_name] = A.shape[0]
    if not ranks:
        raise ShareLoraError(
            f"every module adapter {name!r} adapts lies inside {wrapped}, which PEFT loads as modules_to_save "
            f"(task_type {task_type}); a PEFT LoRA needs an adapted module outside them. Target modules outside "
            "the head, or merge_and_unload() and save the model"
        )
    for n in wrapped:
        for pn, p in _effective_state(base.get_submodule(n), name).items():
            tensors[f"{PEFT_PREFIX}{n}.{pn}"] = p.detach().clone()  # tied weights: one file tensor each

    common = max(set(ranks.values()), key=list(ranks.values()).count)
    rank_pattern = {n: k for n, k in ranks.items() if k != common}
    alpha_pattern = {n: alpha * k / r for n, k in rank_pattern.items()}
    peft_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": cfg.base_model_name_or_path
        or getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "r": common,
        "lora_alpha": alpha * common / r,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_spec(base, sorted(ranks), peft_modules_to_save),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": wrapped or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    if task_type is None:  # as PEFT's save_pretrained: lets AutoPeftModel find the base class
        peft_config["auto_mapping"] = {"base_model_class": type(base).__name__,
                                       "parent_library": type(base).__module__}
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(out / PEFT_WEIGHTS, tensors)
    checkpoint.atomic_write_text(out / "adapter_config.json", json.dumps(peft_config, indent=2) + "\n")
    return out


def load_peft(cls, base_model: nn.Module, peft_directory: str | Path, is_trainable: bool = False,
              adapter_name: str = "default"):
    """Build a share="none" ShareLoraModel that computes exactly what the PEFT LoRA adapter computes."""
    config, tensors = read_peft(peft_directory)
    return cls.from_adapter_state_dict(base_model, config, tensors, is_trainable, adapter_name)


def _saved_root(key: str, names: list[str]) -> str:
    """The module a saved (non-LoRA) tensor belongs to: the outermost path prefix ending with one of
    ``names`` (PEFT's modules_to_save rule), else the tensor's parent module."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        prefix = ".".join(parts[:i])
        if any(prefix.endswith(n) for n in names):
            return prefix
    return ".".join(parts[:-1])


def read_peft(peft_directory: str | Path) -> tuple[ShareLoraConfig, dict[str, torch.Tensor]]:
    """(share="none" config, tensors under our local keys) of a PEFT LoRA adapter directory."""
    d = Path(peft_directory)
    pc = checkpoint.read_json(d / "adapter_config.json")
    if pc.get("peft_type") != "LORA":
        raise ShareLoraError(f"{d} holds a {pc.get('peft_type')!r} PEFT adapter; only LORA adapters can be imported")
    unsupported = [k for k in ("use_dora", "use_rslora") if pc.get(k)]
    if pc.get("bias", "none") != "none":
        unsupported.append(f"bias={pc['bias']!r}")
    if unsupported:
        raise ShareLoraError(f"PEFT adapter in {d} uses {unsupported}, which ShareLoRA does not implement")
    if not (d / PEFT_WEIGHTS).is_file():
        raise ShareLoraError(f"{d} has no {PEFT_WEIGHTS}; re-save the PEFT adapter with safe_serialization=True")
    raw = checkpoint.load_tensors(d / PEFT_WEIGHTS)
    tensors = {(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in raw.items()}
    tensors = {re.sub(r"\.(lora_[AB])\.default\.weight$|\.(lora_[AB])\.weight$",
                      lambda m: "." + (m.group(1) or m.group(2)), k): v for k, v in tensors.items()}
    modules = sorted(k[: -len(".lora_A")] for k in tensors if k.endswith(".lora_A"))
    if not modules:
        raise ShareLoraError(f"{d}/{PEFT_WEIGHTS} has no lora_A tensors; is it a LoRA adapter?")
    _check_lora_pairs(d, tensors, modules)
    r = _peft_rank(d, "'r'", pc.get("r", _MISSING))
    alpha = _peft_alpha(d, "'lora_alpha'", pc.get("lora_alpha", _MISSING))
    patterns = {k: pc.get(k) or {} for k in ("rank_pattern", "alpha_pattern")}
    for k, pattern in patterns.items():
        if not isinstance(pattern, dict):
            raise ShareLoraError(f"{d}/adapter_config.json: {k!r} must be a JSON object of module pattern -> value")
    ranks = {m: tensors[f"{m}.lora_A"].shape[0] for m in modules}
    scalings = {}
    for m in modules:
        want = _peft_rank(d, f"rank_pattern[{m!r}]", _pattern_value(patterns["rank_pattern"], m, r))
        if ranks[m] != want:
            raise ShareLoraError(f"{m}: lora_A has rank {ranks[m]} but the config says {want}")
        scalings[m] = _peft_alpha(d, f"alpha_pattern[{m!r}]",
                                  _pattern_value(patterns["alpha_pattern"], m, alpha)) / ranks[m]

    # One rank and one scaling for all: the largest rank, and the most common scaling.
    rank = max(ranks.values())
    scaling = max(set(scalings.values()), key=list(scalings.values()).count)
    ours: dict[str, torch.Tensor] = {}
    for m in modules:
        A, B = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
        if scalings[m] != scaling:
            B = B * (scalings[m] / scaling)
        pad = rank - ranks[m]
        if pad:  # zero rows of A and columns of B add exact zeros to the update
            A = torch.cat([A, A.new_zeros(pad, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], pad)], dim=1)
        ours[f"{m}.lora_A"], ours[f"{m}.lora_B"] = A, B

    names = list(pc.get("modules_to_save") or []) + list(PEFT_TASK_HEADS.get(pc.get("task_type"), ()))
    saved_keys = [k for k in tensors if ".lora_" not in k]
    roots = _outermost(_saved_root(k, names) for k in saved_keys)
    if "" in roots:
        raise ShareLoraError(f"{d}/{PEFT_WEIGHTS} holds {[k for k in saved_keys if '.' not in k]}, which belong "
                             "to no module; ShareLoRA imports LoRA tensors and modules_to_save modules")
    config = ShareLoraConfig(
        rank=rank, alpha=scaling * rank, dropout=float(pc.get("lora_dropout", 0.0)), share="none",
        target_modules="^(" + "|".join(re.escape(m) for m in modules) + ")$",
        modules_to_save=roots, base_model_name_or_path=pc.get("base_model_name_or_path"),
    )
    for k in saved_keys:
        ours[f"{checkpoint.MODULES_TO_SAVE_PREFIX}{k}"] = tensors[k]
    return config, ours


_MISSING = object()


def _peft_rank(d: Path, key: str, value) -> int:
    if value is _MISSING:
        raise ShareLoraError(f"{d}/adapter_config.json has no 'r' (the LoRA rank), which PEFT always writes; "
                             "re-save the adapter with PEFT, or add \"r\": <the rows of lora_A>")
    if type(value) is not int or value < 1:
        raise ShareLoraError(f"{d}/adapter_config.json: {key} must be a positive integer (the LoRA rank), "
                             f"got {str(value)[:40]!r}")
    return value


def _peft_alpha(d: Path, key: str, value) -> float:
    if value is _MISSING:
        raise ShareLoraError(f"{d}/adapter_config.json has no 'lora_alpha' (the update is scaled by lora_alpha / r), "
                             "which PEFT always writes; re-save the adapter with PEFT, or add \"lora_alpha\": <value>")
    if type(value) not in (int, float) or value != value or abs(value) == float("inf"):
        raise ShareLoraError(f"{d}/adapter_config.json: {key} must be a finite number, got {str(value)[:40]!r}")
    return float(value)


def _check_lora_pairs(d: Path, tensors: dict[str, torch.Tensor], modules: list[str]) -> None:
    """Every adapted module has a floating-point A (rank, d_in) and B (d_out, rank) with rank >= 1."""
    orphans = sorted(k[: -len(".lora_B")] for k in tensors if k.endswith(".lora_B") and k[: -len(".lora_B")]
                     not in modules)
    missing = [m for m in modules if f"{m}.lora_B" not in tensors]
    if missing or orphans:
        raise ShareLoraError(f"{d}/{PEFT_WEIGHTS} is incomplete: " + "; ".join(
            ([f"no lora_B for {missing[:3]}" + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")]
             if missing else []) + ([f"no lora_A for {orphans[:3]}"] if orphans else []))
            + "; every adapted module needs both tensors: re-save the adapter")
    for m in modules:
        A, B = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
        if A.dim() != 2 or B.dim() != 2 or not A.is_floating_point() or not B.is_floating_point():
            raise ShareLoraError(f"{d}/{PEFT_WEIGHTS}: {m}: lora_A and lora_B must be 2-D floating-point tensors, "
                                 f"got {A.dtype} {tuple(A.shape)} and {B.dtype} {tuple(B.shape)}")
        if A.shape[0] < 1 or B.shape[1] != A.shape[0]:
            raise ShareLoraError(f"{d}/{PEFT_WEIGHTS}: {m}: lora_A is {tuple(A.shape)} and lora_B {tuple(B.shape)}; "
                                 "they must be (rank, in_features) and (out_features, rank) with rank >= 1")


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise ShareLoraError(f"the rank / alpha pattern {str(key)[:60]!r} is not a regular expression ({e})") from None
        if hit:
            return value
    return default
