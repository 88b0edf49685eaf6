"""Several classification tasks in one model: joint training on mixed-task batches, or continual.

    train_multitask(MultiTaskConfig(tasks=["rotten-tomatoes", "vitaminc", "multiemo"], method="sharea",
                                    task_share="A"))

What the model holds (its layout):
    per task (default): one adapter per task, named after it. ``task_share`` says what the adapters
        share (SPEC.md, "Sharing across tasks"): with ShareA and ``task_share="A"`` one A per module
        type serves every layer and every task, and each task owns only its B's. With
        ``task_share="AB"`` every task reads the same A and B and owns only a core per adapted module
        (``task_core``: an r x r matrix C, "matrix", or an r-vector c, "diagonal"):
        h = W0 x + (alpha / r) B C_t A x. The tasks that train the basis (the first, the first K, or every task of
        a joint run) start with C_t = I on B = 0, i.e. as a task-shared ShareLoRA adapter; the others with C_t = 0
        (``ShareLoraModel.init_cores``; ``basis_init``), so every task starts at the base. Every task trains
        its own copy of the classification head (``modules_to_save``). A batch routes each row to
        its task's adapter and head (``adapter_names``).
    one adapter (``one_adapter=True``, and always for HydraLoRA, ``heads > 1``): one adapter for all
        tasks; no task id reaches it (HydraLoRA's router mixes its K B heads per token instead).
        One head scores the union of the tasks' labels.

Heads of tasks with different label counts: the base's classifier is built with max_t n_t outputs
(per task: task t reads the first n_t) or sum_t n_t (one adapter: task t reads its own block of
n_t). A task's loss and predictions see only its outputs, so it sends no gradient to the others.

Joint training (one stage): an epoch is sum_t N_t rows. With ``sampling_temperature`` T = 1 it is
every training row once, all tasks shuffled together (each task in proportion to its size); with
T != 1 each row's task is drawn with p_t proportional to N_t^(1/T) (T large: uniform), then the
task's next row in its own shuffled order. Either way a batch mixes rows of several tasks, and the
order of an epoch is a function of (seed, stage, epoch) alone, so a resumed run takes the same
steps. The best epoch has the highest mean dev metric over the tasks; each task's test metric is
computed once, with its weights.

Continual (``continual=True``): stage k trains task k alone. Stage 1 trains the task-shared tensors;
later stages train only their task's own tensors and head (``set_adapter(train_shared=False)``;
``continual_train_shared=True`` keeps training the shared ones), so every earlier task computes bit
for bit what it did: its forgetting is exactly zero. After each stage, with that stage's best
weights (the best epoch on its own task's dev), every task seen so far is scored on dev and test:
the matrix R[k][t], and forgetting_t = R[t][t] - R[last][t] (test metric). ``basis_tasks`` = K > 1:
stage 1 trains the first K tasks jointly (mixed rows, as a joint run) and with them the shared
tensors; each later stage trains one task alone with the shared tensors frozen. ``basis_from``: the
shared tensors come from another adapter directory (a ``sharelora compress --task-core`` fit of
existing adapters, or an earlier run) and stay frozen in every stage. ``grow_basis`` = G (task
cores): each task after the basis stage adds G directions to the shared A and B, which it alone
trains and the later tasks read (``ShareLoraConfig.grow_basis``). ``orthonormalize_basis`` (matrix
cores): once the basis is final (the basis stage's best weights, before they are scored and kept;
right after ``basis_from`` is loaded) it is reparametrized to orthonormal directions of equal length,
every core absorbing the factors, so every task computes what it did and the later cores train on a
well-conditioned basis (results.json "orthonormalized_basis": counts, B's condition before and after). Before each such stage trains,
``basis_fit`` records how much of its task's gradient the basis it finds spans (results.json
"basis_fit": fit, chance, per module type). Baselines:
``one_adapter=True`` with ``continual`` is plain sequential fine-tuning of one adapter through the
tasks (it forgets); ``task_share="none"`` gives every task an adapter of its own.

The loop is the training engine's (engine.py: AdamW with linear warmup and decay, restarted per
stage; gradient accumulation; clipping; Ctrl-C and resume; log.jsonl; the output directory's lock);
``MultiTaskRun`` is its recipe: the stages, the mixed rows and their routing, the mean dev metric,
the per-stage scores. Under a launcher it runs as ``sharelora train`` does (distributed.py): a
step's global batch of mixed rows is split over the processes, DDP averages the gradients (looking
for the tensors a process's rows did not use: a task absent from its share), evaluation is split
and gathered, and rank 0 alone writes. Each stage wraps the model anew (DDP) and makes a new
optimizer, since a stage changes what is trainable. ``--fsdp`` shards joint and continual runs: FSDP
reduces a zero gradient for a tensor a process's rows did not use, a task absent from the whole step
keeps no gradient (as with one process), and a continual stage keeps the units of the first (FSDP2
follows ``requires_grad`` whenever it gathers a unit) with a new optimizer.

Output directory: as ``sharelora train`` (results.json, log.jsonl, curves.png with a curve per task,
adapter/ in the multi-adapter format with a run_info.json that names every task's data set, adapter
and outputs, state/ while running).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..tasks import ClassificationTask, EncodedSplit, label_space
from .config import TrainConfig, resolve_targets, short_name
from .distributed import is_sharded
from .engine import Run, Stage, jsonable, save_with_run_info
from .evaluate import model_logits
from .logs import plot_curves
from .memory import apply_memory_options
from .methods import TASK_CORES, TASK_SHARES, head_modules, sharelora_config, task_config

ONE_ADAPTER = "multitask"  # the adapter's name in the one-adapter layout


# --- configuration ---------------------------------------------------------------------------------
@dataclass
class MultiTaskConfig(TrainConfig):
    """A multi-task run: ``TrainConfig``'s fields (``dataset`` unused) plus the tasks and how they share.

    ``tasks``: "NAME=DATASET" or "DATASET" (named after it) items; a dataset is a registry name or
    a local file / folder. ``task_dataset_options``: {task name: load_dataset options}. ``epochs``
    and ``max_steps`` apply to each stage of a continual run.
    """

    tasks: list[str] = field(default_factory=lambda: ["rotten-tomatoes", "vitaminc"])
    task_share: str = "A"
    task_core: str = "none"  # with task_share "AB": each task's own r x r ("matrix") or r ("diagonal") core
    continual: bool = False
    basis_tasks: int = 1  # continual: the first k tasks train the shared tensors jointly (stage 1), then frozen
    basis_from: str | None = None  # an adapter directory whose task-shared tensors every stage reads, frozen
    continual_train_shared: bool = False
    grow_basis: int = 0  # task cores, continual: every task after the basis stage adds G directions to the basis
    # The stages that do not train the basis (continual, after the basis stage; every stage with basis_from): the
    # peak lr of each task's own adapter tensors (its cores) and of its head (None: lr; head_lr None: core_lr).
    # Basis directions a task grows (grow_basis) train at lr, as the basis does. core_lr 0: the own tensors stay
    # at their start (zero cores: the base model), so the head alone learns (a head-only check).
    core_lr: float | None = None
    head_lr: float | None = None
    # Task cores (matrix): once the basis is final (after the basis stage; after loading basis_from) reparametrize it to
    # orthonormal directions of equal length, the cores absorbing the factors (ShareLoraModel.orthonormalize_basis).
    orthonormalize_basis: bool = False
    one_adapter: bool = False
    heads: int = 1  # K > 1: HydraLoRA (K routed B heads; the one-adapter layout)
    router_top_k: int | None = None
    sampling_temperature: float = 1.0
    task_dataset_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    ADDED_LATER = {**TrainConfig.ADDED_LATER, "grow_basis": 0, "core_lr": None, "head_lr": None,
                    "orthonormalize_basis": False}

    @property
    def hydra(self) -> bool:
        return self.heads > 1

    @property
    def layout(self) -> str:
        return "one-adapter" if self.one_adapter or self.hydra else "per-task"

    @property
    def method_label(self) -> str:
        """The method as tables name it: "sharea", "hydra" (LoRA with K heads), "sharea-hydra", ..."""
        if self.hydra:
            return "hydra" if self.method in ("lora", "hydra") else f"{self.method}-hydra"
        return self.method

    def task_datasets(self) -> dict[str, str]:
        """{task name: dataset} from ``tasks``; a name is also the task's adapter name."""
        out: dict[str, str] = {}
        for item in self.tasks:
            name, sep, dataset = item.partition("=")
            if not sep:
                name, dataset = re.sub(r"[^A-Za-z0-9_-]+", "-", short_name(item)), item
            if not name or not dataset or not re.fullmatch(r"[A-Za-z0-9_-]+", name):
                raise ValueError(f"task {item!r}: write NAME=DATASET with a NAME of letters, digits, '-' or '_' "
                                 "(e.g. sst=runs/data/sst.csv), or a registered dataset name")
            if name in out:
                raise ValueError(f"task name {name!r} appears twice in tasks {self.tasks}; name them NAME=DATASET")
            if name == ONE_ADAPTER:
                raise ValueError(f"{ONE_ADAPTER!r} names the shared adapter of the one-adapter layout; "
                                 "give the task another name")
            out[name] = dataset
        return out

    @property
    def name(self) -> str:
        tasks = "+".join(self.task_datasets())
        share = "" if self.layout == "one-adapter" else f"-ts{self.task_share}"
        if self.task_core != "none" and self.layout == "per-task":
            share += f"-{self.task_core}"
        if self.basis_tasks != 1:
            share += f"-basis{self.basis_tasks}"
        if self.basis_from is not None:
            share += "-given"
        if self.grow_basis:
            share += f"-grow{self.grow_basis}"
        if self.orthonormalize_basis:
            share += "-ortho"
        heads = f"{self.heads}" if self.hydra else ""
        mode = "-continual" if self.continual else "-joint"
        one = "-one" if self.one_adapter and not self.hydra else ""
        return (f"{short_name(self.model)}-{tasks}-{self.method_label}{heads}{share}{one}{mode}"
                f"-r{self.rank}-s{self.seed}{self.memory_suffix}")

    def validate(self) -> None:
        if self.method == "hydra":  # HydraLoRA: plain LoRA's A (not shared across layers) and K routed B heads
            if not isinstance(self.heads, int) or self.heads < 2:
                raise ValueError(f"--method hydra routes K >= 2 B heads; give --heads K (e.g. --heads 3), "
                                 f"got heads={self.heads!r}")
            dataclasses.replace(self, method="lora").validate()
            return
        super().validate()
        if self.is_full:
            raise ValueError("multitask trains adapters (a head per task); choose an adapter method, e.g. "
                             "--method sharea, lora or hydra")
        if not self.tasks:
            raise ValueError("tasks is empty; name the tasks, e.g. --tasks rotten-tomatoes,vitaminc")
        self.task_datasets()
        if self.task_share not in TASK_SHARES:
            raise ValueError(f"task_share must be none, A, B or AB, got {self.task_share!r}")
        if self.task_core not in TASK_CORES:
            raise ValueError(f"task_core must be one of {', '.join(TASK_CORES)}, got {self.task_core!r}")
        if self.layout == "one-adapter" and (self.task_core != "none" or self.task_share == "AB"):
            raise ValueError("task cores (--task-share AB --task-core ...) give every task an adapter of its own; "
                             "drop --one-adapter / --heads")
        if self.layout == "per-task":
            task_config(self, None)  # task_share and task_core agree
        if not isinstance(self.basis_tasks, int) or not 1 <= self.basis_tasks <= len(self.tasks):
            raise ValueError(f"basis_tasks must be an integer from 1 to the number of tasks ({len(self.tasks)}), "
                             f"got {self.basis_tasks!r}")
        if self.basis_from is not None:
            if self.layout != "per-task" or self.task_share == "none":
                raise ValueError("--basis-from reads the task-shared tensors of another run; give the tasks "
                                 "shared tensors to read (--task-share A, B or AB) and no --one-adapter / --heads")
            if self.basis_tasks != 1 or self.continual_train_shared:
                raise ValueError("--basis-from freezes a given basis for every task; drop --basis-tasks and "
                                 "--continual-train-shared")
        if not isinstance(self.grow_basis, int) or isinstance(self.grow_basis, bool) or self.grow_basis < 0:
            raise ValueError(f"grow_basis must be an integer >= 0 (new basis directions per task), got {self.grow_basis!r}")
        if self.grow_basis and (self.task_core == "none" or not self.continual):
            raise ValueError("--grow-basis G lets each task after the basis stage add G directions to the shared A and "
                             "B: it needs task cores (--task-share AB --task-core matrix|diagonal) and --continual")
        if not isinstance(self.orthonormalize_basis, bool):
            raise ValueError(f"orthonormalize_basis must be true or false, got {self.orthonormalize_basis!r}")
        if self.orthonormalize_basis:
            if self.task_core != "matrix" or not (self.continual or self.basis_from is not None) \
                    or self.continual_train_shared:
                raise ValueError("--orthonormalize-basis reparametrizes the basis of matrix task cores once it is "
                                 "final (after the basis stage): it needs --task-share AB --task-core matrix and "
                                 "--continual (or --basis-from), without --continual-train-shared")
            if self.fsdp:
                raise ValueError("--orthonormalize-basis needs the whole basis in each process: drop --fsdp")
        if self.basis_tasks > 1 and not self.continual:
            raise ValueError("--basis-tasks K trains the shared tensors jointly on the first K tasks and then "
                             "freezes them for the rest, one task after another: add --continual")
        if not isinstance(self.heads, int) or self.heads < 1:
            raise ValueError(f"heads must be a positive integer, got {self.heads!r} (HydraLoRA: 2 or more)")
        if self.router_top_k is not None and not (self.hydra and 1 <= self.router_top_k <= self.heads):
            raise ValueError(f"router_top_k needs heads > 1 and 1 <= router_top_k <= heads, got {self.router_top_k!r}")
        if not self.sampling_temperature > 0:
            raise ValueError(f"sampling_temperature must be > 0 (1 = proportional to size), got "
                             f"{self.sampling_temperature!r}")
        if self.continual_train_shared and not self.continual:
            raise ValueError("continual_train_shared applies to --continual runs only")
        for key, value, bound in (("core_lr", self.core_lr, ">= 0"), ("head_lr", self.head_lr, "> 0")):
            if value is None:
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or not (value >= 0 if key == "core_lr" else value > 0):
                raise ValueError(f"{key} must be a number {bound} (and finite), got {value!r} (e.g. {key}=6e-2)")
            if key == "core_lr" and value == 0 and self.head_lr is None:
                raise ValueError("--core-lr 0 keeps each later task's own tensors at their start, so only its head "
                                 "trains: give the head's lr with --head-lr (e.g. --head-lr 6e-3)")
            if not self.continual or self.continual_train_shared or self.layout != "per-task":
                raise ValueError(f"--{key.replace('_', '-')} sets the lr of the stages that train only each task's own "
                                 "tensors and head: it needs --continual with the per-task layout and no "
                                 "--continual-train-shared")
        if self.task not in ("auto", "classification"):
            raise ValueError(f"multitask trains classification tasks; task {self.task!r} does not apply")
        unknown = sorted(set(self.task_dataset_options) - set(self.task_datasets()))
        if unknown:
            raise ValueError(f"task_dataset_options names unknown task(s) {unknown}; tasks: {list(self.task_datasets())}")

    def resolved(self) -> MultiTaskConfig:
        if self.method == "hydra":
            self.validate()
            return dataclasses.replace(self, method="lora").resolved()
        cfg = super().resolved()
        cfg.tasks = list(self.tasks)
        cfg.task_dataset_options = {k: dict(v) for k, v in self.task_dataset_options.items()}
        return cfg


# --- one task of a multi-task model -------------------------------------------------------------------
class TaskHead(ClassificationTask):
    """One task of a multi-task model: a classification task whose rows go through adapter ``adapter``
    (routed with ``adapter_names`` when ``routed``) and whose classes are the shared classifier's outputs
    ``logits`` = (start, end); its loss, predictions and metrics see only those."""

    def __init__(self, name: str, data: Any, tokenizer: Any, max_length: int, adapter: str, logits: tuple[int, int],
                 routed: bool):
        super().__init__(data, tokenizer, max_length=max_length)
        self.name, self.adapter, self.routed = name, adapter, routed
        self.start, self.end = logits
        if self.end - self.start != self.num_labels:
            raise ValueError(f"task {name!r} has {self.num_labels} labels but reads {self.end - self.start} outputs")

    def model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
        inputs = super().model_inputs(batch)
        if self.routed:
            inputs["adapter_names"] = [self.adapter] * batch["input_ids"].shape[0]
        return inputs

    def outputs(self, logits: torch.Tensor) -> torch.Tensor:
        return logits[:, self.start : self.end]

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return super().loss(self.outputs(logits), labels, reduction=reduction)

    def predict(self, logits: torch.Tensor) -> list:
        return super().predict(self.outputs(logits))


def head_layout(num_labels: dict[str, int], one_adapter: bool) -> tuple[int, dict[str, tuple[int, int]]]:
    """(classifier outputs, {task: (start, end)}): max_t n_t, each from 0; or sum_t n_t, in blocks."""
    if not one_adapter:
        return max(num_labels.values()), {t: (0, n) for t, n in num_labels.items()}
    slices, start = {}, 0
    for t, n in num_labels.items():
        slices[t] = (start, start + n)
        start += n
    return start, slices


# --- data order --------------------------------------------------------------------------------------
@dataclass
class MixedSplit:
    """The training rows of several tasks, task after task, and the task of each row."""

    split: EncodedSplit
    task_of_row: list[int]
    sizes: list[int]

    @classmethod
    def of(cls, splits: list[EncodedSplit]) -> MixedSplit:
        types = [s.token_type_ids for s in splits]
        if any(t is None for t in types) and not all(t is None for t in types):
            raise ValueError("the tasks' tokenized rows disagree on token_type_ids; use one tokenizer for all")
        joined = EncodedSplit(
            "train", [ids for s in splits for ids in s.input_ids],
            None if types[0] is None else [t for s in splits for t in s.token_type_ids],
            [y for s in splits for y in s.labels])
        return cls(joined, [i for i, s in enumerate(splits) for _ in range(len(s))], [len(s) for s in splits])


def mixed_order(sizes: list[int], seed: int, stage: int, epoch: int, temperature: float = 1.0) -> list[int]:
    """The rows (indices into the tasks' rows, task after task) epoch ``epoch`` of stage ``stage`` visits.

    ``sum(sizes)`` rows; a function of the arguments only. T = 1: a permutation of every row. T != 1:
    each position's task drawn with p_t proportional to size_t^(1/T), then that task's next row in
    its own permutations (drawn again whenever it runs out).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + stage * 10_007 + epoch)
    total = sum(sizes)
    if temperature == 1.0:
        return torch.randperm(total, generator=g).tolist()
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    weights = torch.tensor([n ** (1.0 / temperature) if n else 0.0 for n in sizes], dtype=torch.float64)
    tasks = torch.multinomial(weights / weights.sum(), total, replacement=True, generator=g).tolist()
    streams: list[list[int]] = [[] for _ in sizes]
    order = []
    for t in tasks:
        if not streams[t]:
            streams[t] = torch.randperm(sizes[t], generator=g).tolist()[::-1]
        order.append(offsets[t] + streams[t].pop())
    return order


# --- data and model ------------------------------------------------------------------------------------
def load_task_data(cfg: MultiTaskConfig, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """{task name: TaskData}: given ones (tests), else each task's dataset through ``sources``."""
    datasets = cfg.task_datasets()
    if data is not None:
        missing = sorted(set(datasets) - set(data))
        if missing:
            raise ValueError(f"no data given for task(s) {missing}")
        out = {n: data[n] for n in datasets}
    else:
        from ..sources import load_dataset

        out = {n: load_dataset(d, cache_dir=cfg.cache_dir, **cfg.task_dataset_options.get(n, {}))
               for n, d in datasets.items()}
    for n, d in out.items():
        kind = getattr(d, "task_type", "classification")
        if kind != "classification":
            raise ValueError(f"task {n!r} ({getattr(d, 'name', n)}) is a {kind} data set; multitask trains "
                             "classification tasks (a head each)")
    return out


def build_model(base: nn.Module, cfg: MultiTaskConfig, tasks: list[str]) -> nn.Module:
    """``base`` with the run's adapters: one per task (in ``tasks`` order), or the one shared adapter."""
    from sharelora import get_sharelora_model

    if not (cfg.modules_to_save or head_modules(base)):
        raise ValueError(f"{type(base).__name__} has no classification head (classifier / score) to train per "
                         "task; name it with --modules-to-save")
    config = sharelora_config(cfg, base)
    if cfg.layout == "one-adapter":
        config = dataclasses.replace(config, heads=cfg.heads, router=cfg.hydra, router_top_k=cfg.router_top_k)
        return get_sharelora_model(base, config, adapter_name=ONE_ADAPTER)
    config = task_config(cfg, base)
    basis = [] if cfg.basis_from is not None else tasks[: cfg.basis_tasks] if cfg.continual else list(tasks)
    grow = {"grow_basis": cfg.grow_basis} if cfg.grow_basis else {}  # each later task grows the basis
    model = get_sharelora_model(base, dataclasses.replace(config, **({} if tasks[0] in basis else grow)),
                                adapter_name=tasks[0])
    for name in tasks[1:]:
        model.add_adapter(name, dataclasses.replace(config, **({} if name in basis else grow)))
    if config.task_core != "none":  # the tasks that train the basis start as ShareLoRA (core I, B = 0), the others at 0
        if basis and config.basis_init == "lora":
            model.init_cores(basis, trains_basis=True)
        model.init_cores([n for n in tasks if n not in basis], trains_basis=False)
    return model


def load_basis(model: nn.Module, source: str | Path) -> list[str]:
    """Copy the task-shared tensors (``@<group>/...``: the shared A and B) of adapter directory ``source`` (a
    run or ``sharelora compress`` directory, or its adapter/) into ``model``; returns their keys.

    The keys and shapes must be the model's: the same method (share), rank, targets and task_share.
    """
    from ..method.checkpoint import WEIGHTS_NAME, read_safetensors

    root = Path(source)
    folder = root / "adapter" if (root / "adapter" / WEIGHTS_NAME).is_file() else root
    if not (folder / WEIGHTS_NAME).is_file():
        raise ValueError(f"--basis-from {source}: no {WEIGHTS_NAME} there or in its adapter/; give a multitask run "
                         "or a `sharelora compress` output directory")
    theirs, _ = read_safetensors(folder / WEIGHTS_NAME)
    mine = {k: p for k, p in model.multi_adapter_state_dict().items() if k.startswith("@")}
    given = {k: v for k, v in theirs.items() if k.startswith("@")}
    fix = ("build the basis with the same --method (share), --rank, --targets and --task-share as this run "
           "(e.g. sharelora compress OUT a=DIR b=DIR --rank 8 --share A --task-core matrix for --method sharea "
           "--task-share AB)")
    if not given:
        raise ValueError(f"--basis-from {source} holds no task-shared tensors (@group/...); {fix}")
    missing, extra = sorted(set(mine) - set(given)), sorted(set(given) - set(mine))
    shapes = [k for k in set(mine) & set(given) if mine[k].shape != given[k].shape]
    if missing or extra or shapes:
        raise ValueError(f"--basis-from {source} does not fit this run's shared tensors (missing {missing[:2]}, "
                         f"extra {extra[:2]}, other shapes {sorted(shapes)[:2]}); {fix}")
    with torch.no_grad():
        for k, p in mine.items():
            p.copy_(given[k].to(device=p.device, dtype=p.dtype))
    return sorted(mine)


def parameter_summary(model: nn.Module, cfg: MultiTaskConfig, tasks: list[str]) -> dict[str, Any]:
    """Adapter parameters of the whole model (each tensor once), per task, and what one more task adds."""
    report = model.parameter_report()
    summary: dict[str, Any] = {
        "adapter": int(report["adapter_parameters"]),
        "heads": int(report["modules_to_save_parameters"]),
        "task_shared": int(report["task_shared_parameters"]),
        "separate_lora": int(report["separate_lora_parameters"]),
        "all": int(report["all_parameters"]),
    }
    if cfg.layout == "per-task":
        per = report["adapters"]
        summary["per_task"] = {t: {"own": per[t]["own_parameters"], "shared": per[t]["shared_parameters"],
                                   "head": per[t]["modules_to_save_parameters"]} for t in tasks}
        summary["added_per_task"] = int(per[tasks[-1]]["own_parameters"])  # what the last task added
    else:
        summary["added_per_task"] = 0  # every task reads the same adapter (its head outputs aside)
    summary["report"] = report
    return summary


# --- training ---------------------------------------------------------------------------------------------
def train_multitask(cfg: MultiTaskConfig, *, resume: bool = False, overwrite: bool = False, bundle: Any = None,
                    data: dict[str, Any] | None = None, on_step: Callable[[int], bool | None] | None = None,
                    progress: bool = True, keep_state: bool = False) -> dict[str, Any]:
    """Train a multi-task run and return its results (also ``<output_dir>/results.json``).

    Arguments as ``training.train``; ``data`` is {task name: TaskData} and ``bundle`` a ModelBundle
    whose classifier has the layout's number of outputs (``head_layout``). A finished run is returned
    as it is with ``resume``; another process writing into the output directory is an error. Under a
    launcher every process calls this and gets the same results; rank 0 alone writes.
    """
    return MultiTaskRun(cfg, resume=resume, overwrite=overwrite, bundle=bundle, data=data, on_step=on_step,
                        progress=progress, keep_state=keep_state).run()


class MultiTaskRun(Run):
    """The engine's recipe for several tasks: a stage of mixed rows (joint) or a stage per task (continual)."""

    find_unused_parameters = True  # a task absent from a process's micro-batch leaves its own tensors out

    # --- setup -------------------------------------------------------------------------------------------------
    def load(self) -> None:
        cfg = self.cfg
        with self.acc.main_process_first():  # rank 0 fetches into the cache, the others then read it
            self.data = load_task_data(cfg, self.data)
        self.names = list(self.data)
        counts = {n: label_space(d)[1] for n, d in self.data.items()}
        self.outputs, slices = head_layout(counts, cfg.layout == "one-adapter")
        self.load_model("classification", num_labels=self.outputs)
        bundle = self.bundle
        self.cfg = cfg = resolve_targets(cfg, bundle.model)  # targets "auto": the architecture's query/value maps
        routed = cfg.layout == "per-task"
        self.heads = {n: TaskHead(n, d, bundle.tokenizer, cfg.max_length, n if routed else ONE_ADAPTER, slices[n], routed)
                      for n, d in self.data.items()}
        self.train_splits = {n: h.encode("train", cfg.max_train_examples) for n, h in self.heads.items()}
        self.dev_splits = {n: h.encode("dev", cfg.max_eval_examples) for n, h in self.heads.items()}
        self.test_splits = {n: h.encode("test", cfg.max_eval_examples) for n, h in self.heads.items()
                            if "test" in h.splits}
        outputs = getattr(getattr(bundle.model, "config", None), "num_labels", self.outputs)
        if outputs != self.outputs:
            raise ValueError(f"the model's classifier has {outputs} outputs; the {cfg.layout} layout of tasks "
                             f"{counts} needs {self.outputs}")
        self.core = build_model(bundle.model, cfg, self.names).to(self.device)  # unwrapped: names, saving
        if cfg.bf16 or cfg.gradient_checkpointing:
            # Every task's tensors are trainable while the options go on, so --bf16 gives each adapter and head
            # fp32 master weights (start_stage then picks what a stage trains).
            self.core.set_adapter(self.adapters(self.names), train_shared=True)
            apply_memory_options(self.core, cfg)
        self.given_basis = None  # basis_from with orthonormalize_basis: what orthonormalizing it did
        if cfg.basis_from is not None:  # before any checkpoint is restored: a resume reads the same basis
            load_basis(self.core, cfg.basis_from)
            if cfg.orthonormalize_basis:  # the given basis is final: condition it now (every resume does the same)
                self.given_basis = self.orthonormalize()
        k = cfg.basis_tasks  # continual: the first k tasks in one joint stage, which trains the shared tensors
        stages = [self.names[:k]] + [[n] for n in self.names[k:]] if cfg.continual else [list(self.names)]
        self.mixed = [MixedSplit.of([self.train_splits[n] for n in names]) for names in stages]
        self.stages = [Stage(k, len(self.mixed[k].split), self._order_of(k), tasks=names)
                       for k, names in enumerate(stages)]

    def _order_of(self, k: int) -> Callable[[int], list[int]]:
        sizes, cfg = self.mixed[k].sizes, self.cfg
        return lambda epoch: mixed_order(sizes, cfg.seed, k, epoch, cfg.sampling_temperature)

    def adapters(self, tasks: list[str]) -> list[str]:
        """The adapters that rows of ``tasks`` go through."""
        return [ONE_ADAPTER] if self.cfg.layout == "one-adapter" else list(tasks)

    def parameter_summary(self) -> dict[str, Any]:
        return parameter_summary(self.core, self.cfg, self.names)

    def seen(self, k: int) -> list[str]:
        """The tasks trained in stages 0..k."""
        return [n for stage in self.stages[: k + 1] for n in stage.tasks]

    # --- stages --------------------------------------------------------------------------------------------
    def trains_shared(self, stage: Stage) -> bool:
        """Whether ``stage`` trains the task-shared tensors: stage 1 (the basis) unless they are given, every stage
        with ``continual_train_shared`` or one adapter for all tasks."""
        return ((stage.index == 0 and self.cfg.basis_from is None) or self.cfg.continual_train_shared
                or self.cfg.layout == "one-adapter")

    def stage_lr(self, stage: Stage) -> float:
        cfg = self.cfg
        return cfg.lr if cfg.core_lr is None or self.trains_shared(stage) else cfg.core_lr

    def param_lr(self, stage: Stage, name: str) -> float:
        """A stage that trains only its tasks' own tensors: heads at ``head_lr`` (default: the stage's rate,
        ``core_lr``), the task's own adapter tensors (cores) at ``core_lr``, and the basis directions it grows
        (``grow_basis``: task-shared tensors that it alone trains, a LoRA-like A and B) at ``lr``, as the basis."""
        cfg = self.cfg
        if self.trains_shared(stage):
            return cfg.lr
        if ".modules_to_save." in name:
            return cfg.head_lr if cfg.head_lr is not None else self.stage_lr(stage)
        if "sharelora_bank.@" in name:  # a grown block of the group's basis
            return cfg.lr
        return self.stage_lr(stage)

    def start_stage(self, stage: Stage) -> None:
        """Stage k's tensors trainable (and no others): its tasks' own ones; the shared ones in stage 1 only
        (unless ``continual_train_shared``). ``core_lr`` 0: the stage's own adapter tensors stay frozen."""
        shared = self.trains_shared(stage)
        self.core.set_adapter(self.adapters(stage.tasks), train_shared=shared)
        self._own: dict[str, list[torch.nn.Parameter]] | None = None
        if self.cfg.task_core != "none" and self.cfg.continual and not shared:
            self.measure_fit(stage)
        if self.cfg.core_lr == 0 and not shared:  # a head-only check: the own tensors keep their start
            for name, p in self.core.named_parameters():
                if p.requires_grad and ".modules_to_save." not in name:
                    p.requires_grad_(False)

    def measure_fit(self, stage: Stage, batches: int = 4) -> None:
        """How well the stage's task fits the basis it finds (before it trains; before its own growth):
        ``basis_fit`` on up to ``batches`` batches of its first epoch, into ``state["basis_fit"]``."""
        from ..method.basis import basis_fit

        fits = self.state.setdefault("basis_fit", {})
        rows = stage.order(0)[: batches * self.cfg.batch_size]
        self.model = self.core  # not yet wrapped for this stage (begin_stage wraps it next)
        for name in stage.tasks:
            if name not in fits:
                fits[name] = basis_fit(self.core, name, lambda: self.batch_loss(stage, rows), include_own_growth=False)

    def batch_loss(self, stage: Stage, rows: list[int]) -> torch.Tensor:
        """Each row through its task's adapter (per-task layout: ``adapter_names``), scored on its task's outputs."""
        mixed = self.mixed[stage.index]
        collate = self.heads[self.names[0]].collate
        batch = {key: v.to(self.device) for key, v in collate(mixed.split, rows).items()}
        tasks = [stage.tasks[mixed.task_of_row[i]] for i in rows]
        inputs: dict[str, Any] = {key: v for key, v in batch.items() if key != "labels"}
        if self.cfg.layout == "per-task":
            inputs["adapter_names"] = tasks
        logits = model_logits(self.model, inputs)
        loss = logits.new_zeros((), dtype=torch.float32)
        for name in dict.fromkeys(tasks):
            chosen = torch.tensor([j for j, t in enumerate(tasks) if t == name], device=self.device)
            loss = loss + self.heads[name].loss(logits.index_select(0, chosen), batch["labels"].index_select(0, chosen),
                                                reduction="sum")
        return loss

    def before_optimizer_step(self, stage: Stage, indices: list[int]) -> None:
        """FSDP gives every trainable tensor a gradient (zero where a process's rows did not use it); the tensors
        of a task with no row in the whole step get none, as one process and DDP leave them."""
        if self.cfg.layout != "per-task" or not is_sharded(self.model):
            return
        mixed = self.mixed[stage.index]
        present = {stage.tasks[mixed.task_of_row[i]] for i in indices}
        if self._own is None:
            names = {n: (f"sharelora_bank.{n}/", f".modules_to_save.{n}.") for n in stage.tasks}
            self._own = {n: [p for key, p in self.core.named_parameters() if p.requires_grad
                             and (key.startswith(bank) or head in key)] for n, (bank, head) in names.items()}
        for name in set(stage.tasks) - present:
            for p in self._own[name]:
                p.grad = None

    def record_fields(self, stage: Stage) -> dict[str, Any]:
        return {"stage": stage.index}

    # --- evaluation -----------------------------------------------------------------------------------------
    def evaluate_tasks(self, names: list[str], split: str) -> dict[str, dict[str, float]]:
        splits = self.dev_splits if split == "dev" else self.test_splits
        return {n: self.evaluate(self.heads[n], splits[n]) for n in names if n in splits}

    def mean_metric(self, metrics: dict[str, dict[str, float]]) -> float:
        return sum(m[self.heads[n].primary_metric] for n, m in metrics.items()) / len(metrics)

    def evaluate_dev(self, stage: Stage) -> tuple[float, Any]:
        """Every task seen so far on dev; the stage's tasks' mean dev metric selects its best weights."""
        k, step, epoch = stage.index, self.state["step"], self.state["stage_step"] / stage.steps_per_epoch
        dev = self.evaluate_tasks(self.seen(k), "dev")
        for name, metrics in dev.items():
            if self.main:
                self.log.append({"kind": "eval", "split": "dev", "task": name, "stage": k, "step": step,
                                 "epoch": epoch, **metrics})
        chosen = {n: dev[n] for n in stage.tasks}
        mean = self.mean_metric(chosen)
        metric = self.heads[self.names[0]].primary_metric
        if self.main:
            self.bar.write(f"step {step} (stage {k + 1}/{len(self.stages)}, epoch {epoch:.2f}): "
                           + ", ".join(f"{n} {m[self.heads[n].primary_metric]:.4f}" for n, m in dev.items())
                           + (f"; mean dev {metric} {mean:.4f}" if len(chosen) > 1 else ""))
        return mean, chosen

    def orthonormalize(self) -> dict[str, Any]:
        """The run's task group's basis made orthonormal, every task's function unchanged (``orthonormalize_basis``)."""
        return self.core.orthonormalize_basis(group=self.core.sharelora_configs[self.names[0]].task_group)

    def settle_stage(self, stage: Stage) -> dict[str, Any]:
        """``orthonormalize_basis``: at the end of the basis stage (its best weights loaded), the basis is final;
        reparametrized here it is what the stage's scores, its saved weights (a resume) and every later stage see."""
        if self.cfg.orthonormalize_basis and self.cfg.basis_from is None and stage.index == 0:
            return {"orthonormalized_basis": self.orthonormalize()}
        return {}

    def score_stage(self, stage: Stage) -> dict[str, Any]:
        """Every seen task on dev and test with the stage's best weights (the stage's record and log)."""
        seen = self.seen(stage.index)
        scores = {"dev": self.evaluate_tasks(seen, "dev"), "test": self.evaluate_tasks(seen, "test")}
        for split, per_task in scores.items():
            for name, metrics in per_task.items():
                if self.main:
                    self.log.append({"kind": "stage", "stage": stage.index, "task": name, "split": split,
                                     "step": self.state["step"], **metrics})
        return scores

    # --- results ------------------------------------------------------------------------------------------------
    def results(self) -> dict[str, Any]:
        cfg, state = self.cfg, self.state
        metric = self.heads[self.names[0]].primary_metric
        last = state["stages"][-1]
        tasks = {}
        for n, head in self.heads.items():
            first = next(s for s in state["stages"] if n in s["tasks"])
            tasks[n] = {
                "dataset": cfg.task_datasets()[n], "adapter": head.adapter, "num_labels": head.num_labels,
                "label_names": head.label_names, "logits": [head.start, head.end],
                "examples": {"train": len(self.train_splits[n]), "dev": len(self.dev_splits[n]),
                             "test": len(self.test_splits[n]) if n in self.test_splits else 0},
                "dev": last["dev"].get(n), "test": last["test"].get(n),
                "best_dev": first["best_dev"].get(n), "best_step": first["best_step"],
            }
        results: dict[str, Any] = {
            **self.common_results(), "method": cfg.method_label, "layout": cfg.layout,
            "task_share": cfg.task_share if cfg.layout == "per-task" else None, "heads": cfg.heads,
            "task_core": cfg.task_core, "basis_tasks": cfg.basis_tasks, "basis_from": cfg.basis_from,
            "grow_basis": cfg.grow_basis, "basis_fit": state.get("basis_fit"),
            "orthonormalized_basis": self.given_basis or state["stages"][0].get("orthonormalized_basis"),
            "continual": cfg.continual, "metric": metric, "tasks": tasks,
            "mean": {split: _mean([t[split][self.heads[n].primary_metric] for n, t in tasks.items() if t.get(split)])
                     for split in ("dev", "test")},
            "stages": state["stages"], "data_info": {n: jsonable(d.info) for n, d in self.data.items()},
        }
        if cfg.continual:
            results["forgetting"] = forgetting(state["stages"], self.names, metric)
        return results

    def save_outputs(self, model: nn.Module) -> None:
        """adapter/: every adapter (save_pretrained, multi-adapter format) and a run_info.json of the tasks."""
        cfg, metric = self.cfg, self.heads[self.names[0]].primary_metric
        info = {
            **self.common_run_info(), "method": cfg.method_label, "multitask": True, "layout": cfg.layout,
            "task_type": "classification", "model_task": "classification", "num_labels": self.outputs,
            "tasks": {n: {"dataset": cfg.task_datasets()[n], "dataset_options": cfg.task_dataset_options.get(n, {}),
                          "adapter": h.adapter, "logits": [h.start, h.end], "num_labels": h.num_labels,
                          "label_names": h.label_names} for n, h in self.heads.items()},
        }
        save_with_run_info(model, self.paths.adapter, info)
        plot_curves(self.log.records(), self.paths.plot, metric,
                    title=f"{cfg.name} ({cfg.method_label}, {'continual' if cfg.continual else 'joint'})")


def forgetting(stages: list[dict[str, Any]], names: list[str], metric: str, split: str = "test") -> dict[str, Any]:
    """R[k][t] (``split`` metric of task t after stage k) and forgetting_t = R[t's stage][t] - R[last][t]."""
    matrix = [[s[split][n][metric] if n in s[split] else None for n in names] for s in stages]
    per_task = {}
    for j, n in enumerate(names):
        k = next(i for i, s in enumerate(stages) if n in s["tasks"])
        per_task[n] = matrix[k][j] - matrix[-1][j]
    earlier = [per_task[n] for s in stages[:-1] for n in s["tasks"]]
    return {"split": split, "metric": metric, "tasks": names, "matrix": matrix, "per_task": per_task,
            "mean_over_earlier_tasks": _mean(earlier)}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
