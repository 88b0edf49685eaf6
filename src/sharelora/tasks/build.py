"""Which task a run trains, and the default settings of the generation tasks.

``--task`` names the task; ``auto`` takes it from the dataset's task type:

    classification / regression  -> "classification"  (ClassificationTask, a sequence-classification head)
    generation                   -> "e2e"             (E2ETask, a causal LM)
    instruction                  -> "instructions"    (InstructionTask, a causal LM)
    multiple-choice (MMLU)       -> an evaluation set only: ``sharelora eval --task mmlu``

The generation tasks start from ``TASK_PRESETS`` (model, data, targets, sizes) instead of the
classification defaults of ``TrainConfig``; anything given explicitly overrides them. A preset's
dataset options (natural-instructions' ``subtasks``) go with its dataset only: ``--dataset
mine.jsonl`` reads a local file as the task's rows instead (``dataset_options``). The
presets are sized so that one default run takes under 30 minutes on 2 CPU cores (E2E:
SmolLM2-135M, 2 epochs over 745 references = 188 steps of 8; instructions: 80 steps of 8 over
16 short subtasks);
raise ``--epochs`` / ``--max-steps`` / ``--max-train-examples`` to scale up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .base import Task

TASKS = ("auto", "classification", "e2e", "instructions")
LM_TASKS = ("e2e", "instructions")
TASK_OF_DATA_TYPE = {"classification": "classification", "regression": "classification",
                     "generation": "e2e", "instruction": "instructions"}
DATA_TYPE_OF_TASK = {"e2e": "generation", "instructions": "instruction"}

# The 16 natural-instructions subtasks with the shortest prompts under SmolLM2's chat template
# (146-268 tokens on average; the longest subtasks average 500-900): winogrande, QASC, MultiRC,
# MC-TACO, CosmosQA, essential terms, paraphrasing and science questions. 80 train / 10 dev /
# 10 test examples each. Pass --data-option subtasks=... (or none) to choose others.
SHORT_SUBTASKS = (33, 36, 51, 39, 50, 20, 21, 41, 22, 11, 9, 10, 40, 44, 45, 47)

_LM_COMMON: dict[str, Any] = {
    "model": "smollm2",
    "targets": ["auto"],  # q_proj,v_proj on LLaMA; c_attn.q,c_attn.v on GPT-2 (see default_targets)
    "rank": 8,
    "alpha": 16.0,
    "dropout": 0.1,
    "lr": 5e-4,
    "weight_decay": 0.0,
    "batch_size": 8,
    "eval_batch_size": 16,
    "log_every": 5,
    "checkpoint_every": 25,
}
TASK_PRESETS: dict[str, dict[str, Any]] = {
    "e2e": {**_LM_COMMON, "dataset": "e2e", "epochs": 2, "max_length": 96},
    "instructions": {
        **_LM_COMMON, "dataset": "natural-instructions", "epochs": 1, "max_steps": 80, "max_length": 256,
        "max_eval_examples": 96, "dataset_options": {"subtasks": list(SHORT_SUBTASKS)},
    },
}

# Attention projections adapted by default, per architecture (the paper: query and value).
_TARGETS_BY_MODULE = (("q_proj", ["q_proj", "v_proj"]), ("c_attn", ["c_attn.q", "c_attn.v"]),
                      ("query", ["query", "value"]))


def default_targets(model: nn.Module) -> list[str]:
    """Query and value projections of ``model``: LLaMA q_proj/v_proj, GPT-2's fused c_attn slices, BERT query/value."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for marker, targets in _TARGETS_BY_MODULE:
        if marker in leaves:
            return list(targets)
    raise ValueError(f"cannot tell the query/value projections of {type(model).__name__}; name them with --targets")


def task_name(task: str, data: Any) -> str:
    """The task a run trains: ``task`` or, for "auto", the one the dataset's type implies."""
    name = task or "auto"
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    data_type = getattr(data, "task_type", "classification")
    if name == "auto":
        if data_type == "multiple-choice":
            raise ValueError(f"dataset {data.name!r} is multiple-choice (MMLU): it is an evaluation set; "
                             "run `sharelora eval --task mmlu` instead of training on it")
        if data_type not in TASK_OF_DATA_TYPE:
            raise ValueError(f"dataset {data.name!r} has task type {data_type!r}; no task trains on it")
        return TASK_OF_DATA_TYPE[data_type]
    if TASK_OF_DATA_TYPE.get(data_type) != name:
        raise ValueError(f"task {name!r} cannot train on dataset {data.name!r} of type {data_type!r}; "
                         f"use --task auto or a {name} dataset")
    return name


def model_task(task: str) -> str:
    """What ``sources.load_model`` must build for ``task``: a causal LM or a classifier."""
    return "causal-lm" if task in LM_TASKS else "classification"


def build_task(task: str, data: Any, tokenizer: Any, *, max_length: int, options: dict[str, Any] | None = None,
               output_dir: str | Path | None = None, samples_name: str | None = None) -> Task:
    """The task ``task`` ("auto": from the data set's type, see ``task_name``) on ``data``.

    ``options`` go to the task's constructor (E2E: ``num_beams``, ``dev_num_beams``,
    ``max_new_tokens``, ``max_dev_mrs``, ``length_penalty``, ``no_repeat_ngram_size``,
    ``generation_batch_size``; instructions: ``use_chat_template``). E2E samples are written into
    ``output_dir`` as ``samples_name`` (default ``samples-{split}.jsonl``).
    """
    name = task_name(task, data)
    options = dict(options or {})
    if name == "classification":
        from .classification import ClassificationTask

        if options:
            raise ValueError(f"task options {sorted(options)} do not apply to classification")
        return ClassificationTask(data, tokenizer, max_length=max_length)
    if name == "e2e":
        from .generation import E2ETask

        files = {"samples_name": samples_name} if samples_name else {}
        return E2ETask(data, tokenizer, max_length=max_length, samples_dir=output_dir, **files,
                       **_checked(E2ETask, options))
    from .instructions import InstructionTask

    return InstructionTask(data, tokenizer, max_length=max_length, **_checked(InstructionTask, options))


def _checked(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    import inspect

    allowed = [p for p in inspect.signature(cls.__init__).parameters
               if p not in ("self", "data", "tokenizer", "max_length", "samples_dir", "samples_name")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"task option(s) {unknown} do not apply to {cls.name}; it takes {allowed}")
    return options


def preset_values(task: str | None, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (TrainConfig fields) on top of the preset of ``task``, with their dataset options settled.

    Unchanged for tasks without a preset. The preset's dataset options apply only when the run
    keeps the preset's dataset (see ``dataset_options``).
    """
    if task not in TASK_PRESETS:
        return dict(values)
    preset = {k: v for k, v in TASK_PRESETS[task].items() if k != "dataset_options"}
    out = {**preset, "task": task, **values}
    out["dataset_options"] = dataset_options(task, out["dataset"], values.get("dataset_options"))
    return out


def dataset_options(task: str | None, dataset: str, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``load_dataset`` options of a ``task`` run on ``dataset``: ``options`` over the task's defaults.

    A preset's options are meant for the preset's own dataset (natural-instructions'
    ``subtasks``), so any other dataset does not get them. A local file or ``hub:`` dataset read
    for a generation task is read as that task's rows (``task_type`` "generation" for e2e,
    "instruction" for instructions) unless ``options`` say otherwise.
    """
    defaults: dict[str, Any] = {}
    preset = TASK_PRESETS.get(task or "", {})
    if str(dataset) == preset.get("dataset"):
        defaults.update(preset.get("dataset_options", {}))
    elif task in DATA_TYPE_OF_TASK and not _is_registered(str(dataset)):
        defaults["task_type"] = DATA_TYPE_OF_TASK[task]
    return {**defaults, **(options or {})}


def _is_registered(dataset: str) -> bool:
    from ..sources import registry

    return dataset in registry.current()
