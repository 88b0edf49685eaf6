"""TrainConfig: every value that decides a training run, as one flat dataclass (also a YAML / JSON file).

The defaults are the paper's GLUE recipe for RoBERTa (LoRA on query and value, r = 8,
alpha = 16, dropout 0.1, AdamW with linear warmup and decay) scaled down so that
``sharelora train`` (MiniLM on Rotten Tomatoes) finishes in a few minutes on two CPU cores:
maximum length 64, batch 32, 2 epochs (200 steps) and a learning rate of 2e-3 for adapters.

A config is data: ``read_config_file`` reads the fields of a YAML or JSON file (``--config``), and
every run writes its resolved config as ``<output_dir>/config.yaml`` (``write_config``), so
``sharelora train --config runs/X/config.yaml`` is the same run again.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .methods import METHODS, method, validate_method_options

# Learning rates when none is given: adapters train few, freshly initialised weights and take a
# large rate; full fine-tuning moves every pretrained weight and needs a small one. The LoRA paper
# uses 4e-4 to 5e-4 on RoBERTa-base over 30-80 epochs; our CPU recipe has 2 epochs, and on the
# Rotten Tomatoes dev split (never test) 5e-4 learned too slowly (ShareA dev 0.7575 after
# 2 of 3 epochs) while 2e-3 reached LoRA dev 0.78, so adapters default to 2e-3 (docs/RESULTS.md).
DEFAULT_LR = {"full": 3e-5, "adapter": 2e-3}


def short_name(name_or_path: str) -> str:
    """A file-name-safe short form of a model or dataset name ("hub:glue/sst2" -> "sst2")."""
    s = name_or_path.rstrip("/").replace("\\", "/").split("/")[-1].split(":")[-1]
    s = re.sub(r"\.(csv|jsonl?|tsv)$", "", s)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s) or "x"


@dataclass
class TrainConfig:
    """One training run. ``resolved()`` fills the values that depend on others (lr, output dir)."""

    model: str = "minilm"
    dataset: str = "rotten-tomatoes"
    method: str = "sharea"
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    # Names (suffix match), or one string: a regex (full match on the module path) or "all-linear".
    targets: list[str] | str = field(default_factory=lambda: ["query", "value"])
    modules_to_save: list[str] | None = None  # None: the classification head, found by name
    lr: float | None = None  # None: DEFAULT_LR for the method
    weight_decay: float = 0.01
    epochs: int = 2
    max_steps: int | None = None  # stop after this many optimizer steps (None: epochs decide)
    batch_size: int = 32  # examples per optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step (batch_size must divide by it)
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 64
    seed: int = 0
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    eval_batch_size: int = 64
    log_every: int = 10  # optimizer steps per JSONL "train" record
    checkpoint_every: int = 50  # optimizer steps between resume checkpoints (also at each epoch end)
    output_dir: str | None = None  # None: runs/<name>
    cache_dir: str | None = None
    device: str = "auto"  # "auto": cuda if available, else cpu
    dataset_options: dict[str, Any] = field(default_factory=dict)
    # "auto": from the dataset's task type; "e2e" / "instructions" train a causal LM (sharelora.tasks.build)
    task: str = "auto"
    task_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"num_beams": 4} for e2e
    # Memory options (training/memory.py): bf16 base weights + bf16 autocast; activation checkpointing;
    # a bitsandbytes-quantized base ("4bit" NF4 | "8bit" LLM.int8()) and the dtype its 4-bit matmuls run in
    # (None: bfloat16 with bf16, else float32; filled in by resolved()).
    bf16: bool = False
    gradient_checkpointing: bool = False
    quantize: str | None = None
    quantize_compute_dtype: str | None = None
    # Under a launcher (torchrun / accelerate launch): shard the model with FSDP2 instead of DDP
    # (training/distributed.py). The math is the same, so a run may resume with or without it.
    fsdp: bool = False
    # The method's other settings (methods.py): ShareLoraConfig fields for ShareLoRA methods (share, scope,
    # share_block_size, layers_to_transform, dropout_mask, ...), PEFT's options for its methods (num_vectors,
    # ...); empty: the method's preset and defaults.
    method_options: dict[str, Any] = field(default_factory=dict)
    # Experiment trackers that get log.jsonl's records and this config (training/trackers.py):
    # any of "tensorboard", "wandb", "mlflow"; empty: none.
    report_to: list[str] = field(default_factory=list)

    @property
    def is_full(self) -> bool:
        return method(self.method).kind == "full"

    @property
    def memory_suffix(self) -> str:
        """The run name's suffix of the options that change the numbers (-nf4 / -int8, -bf16; '' without them),
        so such a run does not land in the fp32 run's directory."""
        quantized = f"-{'nf4' if self.quantize == '4bit' else 'int8'}" if self.quantize else ""
        return quantized + ("-bf16" if self.bf16 else "")

    @property
    def name(self) -> str:
        """A short run name: model, dataset, method, rank and seed."""

        rank = "" if self.is_full else f"-r{self.rank}"
        options = "".join(f"-{k}{'.'.join(map(str, v)) if isinstance(v, list) else v}"
                          for k, v in sorted(self.method_options.items()))
        return (f"{short_name(self.model)}-{short_name(self.dataset)}-{self.method}{rank}{options}-s{self.seed}"
                f"{self.memory_suffix}")

    def validate(self) -> None:
        """Raise ValueError naming the bad value and a good one."""
        method(self.method)  # a known name
        positive_ints = {
            "rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size,
            "grad_accum": self.grad_accum, "max_length": self.max_length,
            "eval_batch_size": self.eval_batch_size, "log_every": self.log_every,
            "checkpoint_every": self.checkpoint_every,
        }
        for key, value in positive_ints.items():
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key in ("max_steps", "max_train_examples", "max_eval_examples"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer or unset, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size {self.batch_size} does not divide into grad_accum {self.grad_accum} micro-batches; "
                f"use a batch size that is a multiple of {self.grad_accum}"
            )
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha!r} (the paper uses 16 with r = 8)")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r} (e.g. 2e-3 for adapters, 3e-5 for full fine-tuning)")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio!r}")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")
        from ..tasks.build import TASKS

        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.targets and not self.is_full:
            raise ValueError("targets is empty; name the modules to adapt, e.g. query,value")
        self._validate_memory()
        validate_method_options(self)
        self._check_extras()

    def _check_extras(self) -> None:
        """The packages the run's options need, before anything is loaded (one line naming the extra)."""
        from ..extras import require
        from .trackers import check_installed, parse_report_to

        check_installed(parse_report_to(self.report_to))
        if METHODS[self.method].kind == "peft":
            require("peft", f"--method {self.method} (PEFT's implementation)")
        if self.quantize is not None:
            require("quantize", f"--quantize {self.quantize}")

    def _validate_memory(self) -> None:
        from .memory import COMPUTE_DTYPES, QUANTIZE

        for key in ("bf16", "gradient_checkpointing"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if self.quantize is not None and self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)} (or unset), got {self.quantize!r}")
        if self.quantize is not None and self.is_full:
            raise ValueError(f"--quantize {self.quantize} freezes the base in quantized form, so full fine-tuning "
                             "cannot train it; use an adapter method (e.g. --method sharea) or drop --quantize")
        if self.quantize_compute_dtype is not None:
            if self.quantize_compute_dtype not in COMPUTE_DTYPES:
                raise ValueError(f"quantize_compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, "
                                 f"got {self.quantize_compute_dtype!r}")
            if self.quantize != "4bit":
                raise ValueError("--quantize-compute-dtype sets the dtype of the 4-bit layers' matmuls; it needs "
                                 "--quantize 4bit (8-bit layers compute as bitsandbytes' LLM.int8() does, in fp16)")

    def resolved(self) -> TrainConfig:
        """A copy with the method's overrides applied and the defaults that depend on others filled in."""
        from .trackers import parse_report_to

        self.validate()
        cfg = dataclasses.replace(self, targets=self.targets if isinstance(self.targets, str) else list(self.targets),
                                  dataset_options=dict(self.dataset_options), task_options=dict(self.task_options),
                                  method_options=dict(self.method_options),
                                  report_to=parse_report_to(self.report_to))
        preset = METHODS[cfg.method].preset
        if "target_modules" in preset:
            cfg.targets = list(preset["target_modules"])
        if cfg.lr is None:
            cfg.lr = DEFAULT_LR["full" if cfg.is_full else "adapter"]
        if cfg.quantize == "4bit" and cfg.quantize_compute_dtype is None:
            cfg.quantize_compute_dtype = "bfloat16" if cfg.bf16 else "float32"
        if cfg.output_dir is None:
            cfg.output_dir = f"runs/{cfg.name}"
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """The config in a YAML or JSON file (a run directory's config.yaml, say), ``overrides`` on top."""
        values = read_config_file(path)
        check_fields(cls, values, f"config file {path}")
        return cls.from_dict({**values, **overrides})

    # Fields that may differ between an interrupted run and its resumption. Gradient checkpointing
    # recomputes the same activations (with the same dropout masks), so a run that ran out of
    # memory may resume with it.
    RESUME_FREE = ("output_dir", "cache_dir", "device", "checkpoint_every", "eval_batch_size", "fsdp",
                   "gradient_checkpointing", "report_to")
    # Fields added after checkpoints were first written, with the value those checkpoints ran with:
    # left out of the key at that value, so such a checkpoint still resumes.
    ADDED_LATER = {"bf16": False, "quantize": None, "quantize_compute_dtype": None, "method_options": {}}

    def resume_key(self) -> dict[str, Any]:
        """The part of the config that must match for a resumed run to equal an uninterrupted one."""
        return {k: v for k, v in self.to_dict().items()
                if k not in self.RESUME_FREE and not (k in self.ADDED_LATER and v == self.ADDED_LATER[k])}


CONFIG_FILE = "config.yaml"  # in a run directory: the run's resolved config


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping of field -> value in a YAML or JSON file (JSON: a ``.json`` name); errors name the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; pass a YAML or JSON file of the run's fields "
                                f"(a run directory's {CONFIG_FILE} is one)")
    text = path.read_text(encoding="utf-8")
    kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
    try:
        values = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"config file {path} is not valid {kind} ({e})") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of field: value, got a {type(values).__name__}")
    return values


def check_fields(cls: type, values: dict[str, Any], where: str, extra: tuple[str, ...] = ()) -> None:
    """Raise ValueError naming the keys of ``values`` that are neither fields of ``cls`` nor in ``extra``."""
    known = {f.name for f in dataclasses.fields(cls)} | set(extra)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where} has unknown fields {unknown}; known fields: {sorted(known)}")


def write_config(cfg: TrainConfig, path: str | Path) -> None:
    """``cfg`` as YAML at ``path`` (atomically): ``TrainConfig.from_file(path)`` gives ``cfg`` back."""
    import yaml

    from ..method.checkpoint import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def resolve_targets(cfg: TrainConfig, model: Any) -> TrainConfig:
    """``cfg`` with ``targets=["auto"]`` replaced by the query/value projections of ``model`` (``default_targets``)."""
    from ..tasks.build import default_targets

    if list(cfg.targets) == ["auto"]:
        return dataclasses.replace(cfg, targets=default_targets(model))
    return cfg


def task_config(task: str, **overrides: Any) -> TrainConfig:
    """A ``TrainConfig`` for ``task`` from its preset (``tasks.build.TASK_PRESETS``), with ``overrides`` on top.

    >>> cfg = task_config("e2e", method="sharea", seed=1)      # smollm2 on E2E, ShareA on q_proj/v_proj
    >>> cfg = task_config("instructions", dataset="my-instructions.jsonl")   # a local file of instruction rows
    """
    from ..tasks.build import TASKS, preset_values

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TrainConfig.from_dict({"task": task, **preset_values(task, overrides)})
