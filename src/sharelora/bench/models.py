"""The models the benchmark times: built-in shapes (MiniLM, SmolLM2-135M), any transformers config.

For timing, weights do not matter, only shapes do, so every model can be built from its config
with random weights ("shape"). When ``sharelora.sources`` can load the real model ("real"), it
is used instead; the result records which one ran.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass, field

import torch
from torch import nn

TASKS = ("classification", "causal-lm")
WEIGHTS = ("auto", "real", "shape")

# q,v target names -> the q,k,v names of the same architecture (for the "qkv" sharing scope).
_QKV_OF = {
    ("query", "value"): ("query", "key", "value"),
    ("q_proj", "v_proj"): ("q_proj", "k_proj", "v_proj"),
    ("q", "v"): ("q", "k", "v"),
    ("q_lin", "v_lin"): ("q_lin", "k_lin", "v_lin"),
    ("c_attn.q", "c_attn.v"): ("c_attn.q", "c_attn.k", "c_attn.v"),
}


@dataclass
class ModelSpec:
    """What to build: a config (model type + fields), the task, the adapter targets, the batch.

    Attributes:
        name: "minilm", "smollm2", or a transformers model id / local directory.
        task: "classification" (sequence classification, 2 labels) or "causal-lm".
        model_type: transformers model type of the shape-only config ("bert", "llama", ...).
        config: config fields of the shape-only model.
        targets: the LoRA targets (q and v projections, as in the paper).
        qkv_targets: the q, k and v projections, for the "qkv" sharing scope.
        batch, seq: input shape (batch x tokens).
    """

    name: str
    task: str
    model_type: str | None
    config: dict = field(default_factory=dict)
    targets: tuple[str, ...] = ("query", "value")
    qkv_targets: tuple[str, ...] | None = None
    batch: int = 8
    seq: int = 64

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.qkv_targets is None:
            self.qkv_targets = _QKV_OF.get(tuple(self.targets))

    def to_dict(self) -> dict:
        return {"name": self.name, "task": self.task, "model_type": self.model_type, "config": dict(self.config),
                "targets": list(self.targets), "qkv_targets": list(self.qkv_targets or []) or None,
                "batch": self.batch, "seq": self.seq}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        d = dict(d)
        d["targets"] = tuple(d["targets"])
        d["qkv_targets"] = tuple(d["qkv_targets"]) if d.get("qkv_targets") else None
        return cls(**d)


# The defaults of issue 5: minilm at batch 32 x 64 tokens, smollm2 at batch 4 x 128 tokens.
BUILTIN = {
    "minilm": ModelSpec(
        name="minilm", task="classification", model_type="bert",
        config=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=30522, max_position_embeddings=512, num_labels=2),
        targets=("query", "value"), batch=32, seq=64),
    "smollm2": ModelSpec(
        name="smollm2", task="causal-lm", model_type="llama",
        config=dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                    intermediate_size=1536, vocab_size=49152, max_position_embeddings=2048,
                    tie_word_embeddings=True, rope_theta=100000.0, rms_norm_eps=1e-5),
        targets=("q_proj", "v_proj"), batch=4, seq=128),
}
# The name sharelora.sources knows each built-in model by, and the keywords it takes.
_SOURCE_ARGS = {"minilm": dict(task="classification", num_labels=2), "smollm2": dict(task="causal-lm")}


def resolve_spec(name: str, task: str | None = None, targets: list[str] | None = None,
                 batch: int | None = None, seq: int | None = None, overrides: dict | None = None) -> ModelSpec:
    """The ModelSpec of a built-in name, or of any transformers model id / directory (via AutoConfig)."""
    if name in BUILTIN:
        spec = copy.deepcopy(BUILTIN[name])
        if task and task != spec.task:
            raise ValueError(f"model {name!r} is benchmarked as {spec.task!r}, not {task!r}")
    else:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(name)
        if not task:
            archs = " ".join(getattr(cfg, "architectures", None) or [])
            task = "causal-lm" if "CausalLM" in archs or "LMHead" in archs else "classification"
        if not targets:
            raise ValueError(f"model {name!r} is not built in (built in: {sorted(BUILTIN)}); name its q and v "
                             "projections with --targets, e.g. --targets q_proj,v_proj")
        fields = cfg.to_diff_dict()
        for key in ("architectures", "model_type", "transformers_version", "_name_or_path"):
            fields.pop(key, None)
        spec = ModelSpec(name=name, task=task, model_type=cfg.model_type, config=fields)
        if task == "classification":
            spec.config["num_labels"] = 2
    if targets:
        spec.targets = tuple(targets)
        spec.qkv_targets = _QKV_OF.get(spec.targets)
    if batch:
        spec.batch = batch
    if seq:
        spec.seq = seq
    if overrides:
        spec.config.update(overrides)
    return spec


def build_config(spec: ModelSpec):
    from transformers import AutoConfig

    fields = dict(spec.config)
    return AutoConfig.for_model(spec.model_type, **fields)


def build_shape_model(spec: ModelSpec, seed: int = 0) -> nn.Module:
    """A random-init model with the spec's shapes (what timing needs)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(seed)
    cfg = build_config(spec)
    auto = AutoModelForCausalLM if spec.task == "causal-lm" else AutoModelForSequenceClassification
    model = auto.from_config(cfg)
    if spec.task == "classification" and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = 0
    return model


def build_real_model(spec: ModelSpec) -> nn.Module:
    """The real model with weights, from ``sharelora.sources`` (built-ins) or ``from_pretrained``."""
    if spec.name in _SOURCE_ARGS:
        from sharelora.sources import load_model  # owned by the sources package; may be absent

        return load_model(spec.name, **_SOURCE_ARGS[spec.name]).model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if spec.task == "causal-lm" else AutoModelForSequenceClassification
    kwargs = {"num_labels": 2} if spec.task == "classification" else {}
    return auto.from_pretrained(spec.name, **kwargs)


def build_base(spec: ModelSpec, weights: str = "auto") -> tuple[nn.Module, str, str | None]:
    """(model, "real" or "shape", why the real model was not used or None)."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    note = None
    if weights in ("auto", "real"):
        try:
            model = build_real_model(spec)
        except Exception as e:  # noqa: BLE001 - any failure means: fall back to shapes (auto) or report (real)
            if weights == "real":
                raise RuntimeError(f"the real model {spec.name!r} could not be loaded: {e}") from e
            note = f"real weights unavailable ({type(e).__name__}: {str(e)[:160]}); used a shape-only model"
        else:
            return model.float(), "real", None
    return build_shape_model(spec), "shape", note


def make_inputs(spec: ModelSpec, vocab_size: int, seed: int = 0, device: str | torch.device = "cpu") -> dict:
    """One fixed batch: token ids, attention mask, labels (class ids or the ids themselves)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab_size, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if spec.task == "classification":
        batch["labels"] = torch.randint(0, 2, (spec.batch,), generator=g)
    else:
        batch["labels"] = ids.clone()
    return {k: v.to(device) for k, v in batch.items()}


def fingerprint(batch: dict) -> str:
    """sha256 of the batch's tensors (names, shapes, values): equal inputs have equal fingerprints."""
    h = hashlib.sha256()
    for k in sorted(batch):
        t = batch[k].detach().cpu().contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]
