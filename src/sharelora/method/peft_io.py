"""Export to, and import from, a standard Hugging Face PEFT LoRA directory.

A ShareLoRA adapter is a standard LoRA with no loss: layer l's update is B_l A_l whichever of
the two is shared, so export writes A and B per layer under PEFT's keys
``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight``, which PEFT, vLLM and LoRAX load.

A fused module with adapted slices (GPT-2 ``c_attn.q`` and ``c_attn.v``) becomes one PEFT
adapter on the whole module with rank (slices x r): A stacks the slices' A matrices, B is block
diagonal over the slices' output columns, and lora_alpha is raised by the same factor so that
PEFT's scaling lora_alpha / rank stays alpha / r.
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
from .plan import linear_shape

PEFT_PREFIX = "base_model.model."
PEFT_WEIGHTS = "adapter_model.safetensors"


def _task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "CAUSAL_LM"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    if name.endswith("ForQuestionAnswering"):
        return "QUESTION_ANS"
    return None


def _target_spec(base: nn.Module, module_names: list[str]) -> list[str] | str:
    """PEFT target_modules: leaf names where they select exactly our modules, else an exact regex."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names})
    selected = {n for n, m in base.named_modules() if linear_shape(m) and n.rsplit(".", 1)[-1] in leaves}
    if selected == set(module_names):
        return leaves
    return "^(" + "|".join(re.escape(n) for n in sorted(module_names)) + ")$"


def export_peft(model, save_directory: str | Path) -> Path:
    """Write ``model`` (a ShareLoraModel) as a PEFT LoRA adapter directory."""
    cfg: ShareLoraConfig = model.sharelora_config
    r, alpha = cfg.rank, float(cfg.alpha)
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    fan_in_fan_out = False
    for module_name, layer in model.sharelora_layers():
        fan_in_fan_out |= layer.transposed
        state = model.sharelora_bank
        As, Bs = [], []
        d_out_total = layer.base_layer.weight.shape[1 if layer.transposed else 0]
        for t, (a_key, b_key) in zip(layer.targets, layer.keys):
            As.append(state[a_key].detach())
            B = state[b_key].detach()
            if not layer.whole:  # place the slice's rows in the fused module's output, zeros elsewhere
                full = B.new_zeros(d_out_total, r)
                full[t.out_start:t.out_start + t.d_out] = B
                B = full
            Bs.append(B)
        A = torch.cat(As, dim=0)  # (k r, d_in)
        B = torch.cat(Bs, dim=1)  # (d_out, k r): block structure over the slices
        tensors[f"{PEFT_PREFIX}{module_name}.lora_A.weight"] = A
        tensors[f"{PEFT_PREFIX}{module_name}.lora_B.weight"] = B
        ranks[module_name] = A.shape[0]
    for n in model.modules_to_save_names:
        for pn, p in model.base_model.get_submodule(n).state_dict().items():
            tensors[f"{PEFT_PREFIX}{n}.{pn}"] = p

    common = max(set(ranks.values()), key=list(ranks.values()).count)
    rank_pattern = {n: k for n, k in ranks.items() if k != common}
    alpha_pattern = {n: alpha * k / r for n, k in rank_pattern.items()}
    base = model.base_model
    peft_config = {
        "peft_type": "LORA",
        "task_type": _task_type(base),
        "base_model_name_or_path": cfg.base_model_name_or_path
        or getattr(getattr(base, "config", None), "_name_or_path", None) or None,
        "r": common,
        "lora_alpha": alpha * common / r,
        "lora_dropout": cfg.dropout,
        "target_modules": _target_spec(base, sorted(ranks)),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "modules_to_save": list(model.modules_to_save_names) or None,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.save_tensors(out / PEFT_WEIGHTS, tensors)
    checkpoint.atomic_write_text(out / "adapter_config.json", json.dumps(peft_config, indent=2) + "\n")
    return out


def load_peft(cls, base_model: nn.Module, peft_directory: str | Path, is_trainable: bool = False):
    """Build a share="none" ShareLoraModel that computes exactly what the PEFT LoRA adapter computes."""
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
    ranks = {m: tensors[f"{m}.lora_A"].shape[0] for m in modules}
    r = int(pc["r"])
    alphas = {}
    for m in modules:
        alpha = _pattern_value(pc.get("alpha_pattern") or {}, m, pc["lora_alpha"])
        if ranks[m] != _pattern_value(pc.get("rank_pattern") or {}, m, r):
            raise ShareLoraError(f"{m}: lora_A has rank {ranks[m]} but the config says otherwise")
        alphas[m] = float(alpha) / ranks[m]
    if len(set(ranks.values())) > 1 or len(set(alphas.values())) > 1:
        raise ShareLoraError(
            f"PEFT adapter in {d} has per-module ranks or alphas ({sorted(set(ranks.values()))}); ShareLoRA "
            "imports adapters with one rank and one alpha"
        )
    rank = ranks[modules[0]]
    saved = sorted({k[: k.rfind(".")] for k in tensors if ".lora_" not in k})
    saved_roots = [s for s in saved if not any(s.startswith(o + ".") for o in saved if o != s)]
    config = ShareLoraConfig(
        rank=rank, alpha=alphas[modules[0]] * rank, dropout=float(pc.get("lora_dropout", 0.0)), share="none",
        target_modules="^(" + "|".join(re.escape(m) for m in modules) + ")$",
        modules_to_save=saved_roots, base_model_name_or_path=pc.get("base_model_name_or_path"),
    )
    ours = {f"{m}.lora_{x}": tensors[f"{m}.lora_{x}"] for m in modules for x in "AB"}
    for k, v in tensors.items():
        if ".lora_" not in k:
            ours[f"{checkpoint.MODULES_TO_SAVE_PREFIX}{k}"] = v
    return cls.from_adapter_state_dict(base_model, config, ours, is_trainable)


def _pattern_value(pattern: dict, module: str, default):
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
