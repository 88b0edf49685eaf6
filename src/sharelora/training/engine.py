"""The training engine: the one loop behind every command that trains.

    sharelora train       loop.SingleTaskRun    one task; the best epoch by its dev metric
    sharelora multitask   multitask.MultiTaskRun several tasks: one stage of mixed batches (joint), or a
                                                stage per task (continual)
    transfer / overfit    studies.py            ``fit``: the same steps on a model in memory, no files
    sharelora bench       bench/methods.py      ``optimizer_step``: the step the loop takes

A run has torchtune's recipe shape (``recipes/lora_finetune_single_device.py``): ``Run.run()`` is

    lock the output directory -> setup -> train -> save_checkpoint (during train) -> finish -> cleanup

and a recipe (a subclass) supplies the few pieces in which runs differ, as small named hooks:

    load()                      data, model bundle, tasks, encoded splits, the (unwrapped) model, self.stages
    start_stage(k)              what stage k trains (default: every trainable tensor); the engine then
                                wraps the model (DDP / FSDP) and makes a fresh optimizer
    batch_loss(stage, rows)     the summed loss of one micro-batch (its forward)
    step_weight(stage, rows)    what a step's summed loss is divided by (examples, or target tokens)
    evaluate_dev(stage)         dev metrics at an epoch end, logged; returns (score, what to keep as best_dev)
    settle_stage(stage)         after a stage, its best weights loaded, before it is scored and kept: a
                                function-preserving last change (multitask: --orthonormalize-basis)
    score_stage(stage)          after a stage, with its best weights loaded (train: the test split)
    results() / save_outputs()  results.json's dict; the adapter directory and the plot

Every step: AdamW with linear warmup and decay, the step's rows split over the processes and each
share into ``grad_accum`` micro-batches, clipping, one optimizer step; every ``log_every`` steps a
"train" record in log.jsonl; at each epoch end the dev evaluation and the best weights; every
``checkpoint_every`` steps, at each epoch end and on Ctrl-C the resume checkpoint.

Determinism: the run is seeded once (head and adapter initialisation, dropout) and the rows of
epoch e of stage k are a function of (seed, k, e), so a checkpoint (weights, optimizer, generator
states, step) is all a resumed run needs to take exactly the steps the uninterrupted run takes.

Several processes (``torchrun --nproc-per-node N -m sharelora train|multitask ...``; distributed.py):
every process runs this loop. ``batch_size`` is the global batch: a step's rows are the same
whatever the number of processes, split between them (and each share into micro-batches); each
process's summed loss is divided by the step's global weight and multiplied by the number of
processes, so DDP's (or FSDP's) average of the gradients is the gradient of the step's mean loss,
as one process computes it. Evaluation is split and gathered (``Task.evaluate``). Rank 0 alone
writes: the lock, the log, the progress bar and messages, checkpoints, the best weights, the
adapter, results.json and the plot; every process resumes from the same checkpoint with its own
generator states. Dropout draws differ between processes (each has its own stream), so a run with
dropout matches a single-process run in distribution, not digit by digit.

Output directory (``runs/<name>`` by default):
    config.yaml       the resolved config: ``sharelora train --config runs/<name>/config.yaml`` is this run
    results.json      config, parameter counts, dev/test metrics, times, memory
    log.jsonl         one record per log interval and evaluation (logs.py)
    curves.png        training loss and dev metric
    adapter/          the best weights: ``save_pretrained`` output + run_info.json
    state/            resume checkpoint, best-so-far weights and what each finished stage trained
                      (stage<k>.safetensors); removed when the run finishes
    .lock             while the run is active: its pid, host and start time (lock.py)
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import CONFIG_FILE, TrainConfig, write_config
from .distributed import (
    Processes, check_batch, for_evaluation, from_main, full_tensor, gather_list, gradient_sync, make_accelerator,
    on_main, whole_trainable, wrap,
)
from .lock import output_dir_lock
from .logs import JsonlLog, directory_bytes, environment, peak_rss_mb, reset_peak_rss
from .trackers import run_trackers
from .memory import load_options, run_info as memory_run_info
from .optim import adamw
from .state import (
    atomic_write_text, capture_rng, load_checkpoint, load_weights, read_state, save_checkpoint, save_weights,
    trainable_parameters,
)


class RunExistsError(ValueError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


class RunPaths:
    """The files of a run directory (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.results, self.log, self.plot = self.root / "results.json", self.root / "log.jsonl", self.root / "curves.png"
        self.adapter, self.state = self.root / "adapter", self.root / "state"
        self.checkpoint, self.best = self.state / "checkpoint.safetensors", self.state / "best.safetensors"


# --- small pieces every run uses ------------------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    """"auto": CUDA when there is one, else the CPU; "cpu" / "cuda[:i]" as named (CUDA must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but CUDA is not available; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def process_seed(seed: int, rank: int) -> int:
    """The seed of process ``rank``'s own generators (dropout) once the model is built; rank 0 keeps ``seed``'s stream."""
    return seed + 1_000_003 * rank


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The order in which epoch ``epoch`` visits the training set: a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=g).tolist()


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then linear decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float,
                   lr_of: Callable[[str], float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and LayerNorm weights (1-d) get no weight decay.

    ``lr_of(name)``: a parameter's own peak learning rate (default ``lr`` for all). Each group keeps its
    peak as ``base_lr``; one schedule sets every group's rate from its peak (``set_lr``). One rate gives
    the two groups (decay, no decay) in that order, as checkpoints of a single rate hold them.
    """
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; check --method and --targets")
    rates: dict[float, list[list[nn.Parameter]]] = {}
    for name, p in params.items():
        rate = lr if lr_of is None else float(lr_of(name))
        rates.setdefault(rate, [[], []])[0 if p.ndim >= 2 else 1].append(p)
    groups = [{"params": ps, "weight_decay": weight_decay if kind == 0 else 0.0, "base_lr": rate}
              for rate, both in rates.items() for kind, ps in enumerate(both)]
    return adamw(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def set_lr(optimizer: torch.optim.Optimizer, schedule: Callable[[float], float], default: float) -> None:
    """Every group's learning rate: ``schedule(peak)`` (e.g. ``lr_at(step, peak, ...)``) of its peak ``base_lr``
    (``default`` for a group restored from a checkpoint written before groups had one)."""
    for group in optimizer.param_groups:
        group["lr"] = schedule(group.get("base_lr", default))


def optimizer_step(optimizer: torch.optim.Optimizer, clip: Callable[[], torch.Tensor] | None = None) -> float | None:
    """One optimizer step on the accumulated gradients, then clear them: the only ``step()`` of the package.

    ``clip``: clips the gradients and returns their norm before clipping (the loop's
    ``clip_grad_norm_``); its value is returned. ``None``: no clipping (the benchmark's step).
    """
    norm = None if clip is None else full_tensor(clip()).item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (it then checkpoints); a second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def prepare_output(paths: RunPaths, resume: bool, overwrite: bool) -> dict | None:
    """Check the output directory; returns finished results when resuming a completed run."""
    if overwrite and paths.root.exists():
        for p in (paths.results, paths.log, paths.plot):
            p.unlink(missing_ok=True)
        for d in (paths.adapter, paths.state):
            shutil.rmtree(d, ignore_errors=True)
    has_results = paths.results.is_file()
    has_checkpoint = paths.checkpoint.is_file()
    if resume and has_results and not has_checkpoint:
        return json.loads(paths.results.read_text(encoding="utf-8"))
    if not resume and (has_results or has_checkpoint or paths.log.exists()):
        raise RunExistsError(
            f"output directory {paths.root} already holds a run; pass --resume to continue it, "
            "--overwrite to start it again, or choose another --output-dir"
        )
    if not has_checkpoint:  # a fresh start (also "--resume" of a run that never checkpointed)
        paths.log.unlink(missing_ok=True)
        shutil.rmtree(paths.state, ignore_errors=True)
    paths.root.mkdir(parents=True, exist_ok=True)
    return None


def save_with_run_info(model: nn.Module, path: Path, info: dict[str, Any], tokenizer: Any = None) -> None:
    """``model.save_pretrained`` (and the tokenizer's, when given) plus run_info.json, via a temporary directory."""
    from .evaluate import RUN_INFO

    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into a string."""
    return json.loads(json.dumps(value, default=str))


# --- stages -----------------------------------------------------------------------------------------
@dataclass
class Stage:
    """What one stage trains on: ``rows`` training rows visited in ``order(epoch)``; ``tasks``: their names."""

    index: int
    rows: int
    order: Callable[[int], list[int]]
    tasks: Sequence[str] = ()
    steps_per_epoch: int = 0
    total_steps: int = 0
    warmup_steps: int = 0


def schedule(stage: Stage, batch_size: int, epochs: int, max_steps: int | None, warmup_ratio: float) -> Stage:
    """``stage`` with its steps: ceil(rows / batch) per epoch, ``epochs`` of them (at most ``max_steps``)."""
    stage.steps_per_epoch = math.ceil(stage.rows / batch_size)
    stage.total_steps = epochs * stage.steps_per_epoch
    if max_steps is not None:
        stage.total_steps = min(stage.total_steps, max_steps)
    stage.warmup_steps = round(warmup_ratio * stage.total_steps)
    return stage


def fit(model: nn.Module, batch_loss: Callable[[list[int]], torch.Tensor], step_weight: Callable[[list[int]], float],
        rows: int, *, steps: int, lr: float, batch_size: int, seed: int, weight_decay: float = 0.0,
        warmup_ratio: float = 0.06, max_grad_norm: float = 1.0, start_epoch: int = 0,
        on_epoch_end: Callable[[int], None] | None = None) -> list[float]:
    """``steps`` steps of the engine on a model in memory (one process, no files); returns the step losses.

    The steps are the loop's (epoch order, warmup and decay, AdamW, clipping); ``batch_loss(rows)``
    is the summed loss of rows, ``step_weight(rows)`` its divisor. ``on_epoch_end(epoch)`` is
    called after each full pass; epochs count from ``start_epoch``.
    """
    optimizer = make_optimizer(model, lr, weight_decay)
    params = list(trainable_parameters(model).values())
    stage = Stage(0, rows, lambda e: epoch_order(rows, seed, start_epoch + e))
    schedule(stage, batch_size, math.ceil(steps / math.ceil(rows / batch_size)), steps, warmup_ratio)
    losses = []
    model.train()
    for step in range(steps):
        epoch, b = divmod(step, stage.steps_per_epoch)
        indices = stage.order(epoch)[b * batch_size : (b + 1) * batch_size]
        set_lr(optimizer, lambda peak: lr_at(step, peak, stage.warmup_steps, steps), lr)
        loss = batch_loss(indices) / step_weight(indices)
        loss.backward()
        optimizer_step(optimizer, lambda: torch.nn.utils.clip_grad_norm_(params, max_grad_norm))
        losses.append(loss.item())
        if on_epoch_end is not None and (step + 1) % stage.steps_per_epoch == 0:
            on_epoch_end(start_epoch + epoch + 1)
    return losses


# --- the run ------------------------------------------------------------------------------------------
class Run:
    """One training run (see the module docstring): the loop, with the recipe's hooks left to subclasses.

    Arguments as ``training.train``. A subclass's ``load`` sets ``self.core`` (the unwrapped model:
    parameter names, checkpoints, saving), ``self.stages`` and what its other hooks read.
    """

    find_unused_parameters = False  # DDP: whether a step may leave trainable tensors out of a process's forward

    def __init__(self, cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, bundle: Any = None,
                 data: Any = None, on_step: Callable[[int], bool | None] | None = None, progress: bool = True,
                 keep_state: bool = False):
        self.wall_start = time.perf_counter()
        self.cfg = cfg.resolved()
        self.resume, self.overwrite, self.keep_state, self.progress = resume, overwrite, keep_state, progress
        self.bundle, self.data, self.on_step = bundle, data, on_step
        self.paths = RunPaths(Path(self.cfg.output_dir))
        self.stages: list[Stage] = []
        self._order: tuple[tuple[int, int], list[int]] | None = None

    # --- hooks --------------------------------------------------------------------------------------------
    def load(self) -> None:
        """Data, model bundle, tasks, encoded splits; ``self.core`` and ``self.stages``."""
        raise NotImplementedError

    def load_model(self, task: str, num_labels: int | None = None) -> None:
        """``self.bundle``: the one given, else ``cfg.model`` fetched (rank 0 first, into the cache) with --bf16 /
        --quantize's dtype and layers, after seeding: a new head starts from the same weights for the same seed."""
        if self.bundle is None:
            from ..sources import load_model

            seed_everything(self.cfg.seed)
            with self.acc.main_process_first():
                self.bundle = load_model(self.cfg.model, task=task, num_labels=num_labels, cache_dir=self.cfg.cache_dir,
                                         report_new_weights=self.main, **load_options(self.cfg))

    def start_stage(self, stage: Stage) -> None:
        """Make what stage ``stage`` trains trainable (and nothing else); by default what is trainable stays."""

    def batch_loss(self, stage: Stage, rows: list[int]) -> torch.Tensor:
        """The summed loss of training rows ``rows`` of ``stage``: one micro-batch's forward."""
        raise NotImplementedError

    def step_weight(self, stage: Stage, rows: list[int]) -> float:
        """What the summed loss of a step's rows is divided by; by default their number."""
        return len(rows)

    def evaluate_dev(self, stage: Stage) -> tuple[float, Any]:
        """Dev metrics at an epoch end, logged: (the score that selects the best weights, the best_dev to keep)."""
        raise NotImplementedError

    def improves(self, score: float, best: float) -> bool:
        return score > best

    def settle_stage(self, stage: Stage) -> dict[str, Any]:
        """After a stage, with its best weights loaded, before ``score_stage`` and before they are kept for a
        resume in a later stage (state/stage<k>.safetensors): a last change to them that must not alter what
        the model computes (multitask: ``orthonormalize_basis``). Returns fields for the stage's record.
        It must be deterministic: a run killed before the next stage's checkpoint repeats it on resume."""
        return {}

    def score_stage(self, stage: Stage) -> dict[str, Any]:
        """After a stage, with its best weights loaded (and before the next stage starts): what its record in
        state["stages"] holds besides its step and best epoch."""
        return {}

    def record_fields(self, stage: Stage) -> dict[str, Any]:
        """Fields every "train" record of ``stage`` carries besides step, epoch, loss, lr, grad_norm, rate."""
        return {}

    def parameter_summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def results(self) -> dict[str, Any]:
        """results.json's dict (``common_results`` and the recipe's own), computed by every process."""
        raise NotImplementedError

    def save_outputs(self, model: nn.Module) -> None:
        """Rank 0: the adapter directory and the plot (``model``: every trainable tensor whole)."""
        raise NotImplementedError

    # --- the recipe --------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train (or resume, or read back) the run; under a launcher every process returns the same results."""
        cfg, paths = self.cfg, self.paths
        self.acc = make_accelerator(cfg.device, fsdp=cfg.fsdp, find_unused_parameters=self.find_unused_parameters)
        with contextlib.ExitStack() as held:
            def lock_and_prepare() -> tuple[dict | None, bool]:  # rank 0 only
                held.enter_context(output_dir_lock(cfg.output_dir))  # before anything is read or written there
                return prepare_output(paths, self.resume, self.overwrite), paths.checkpoint.is_file()

            finished, has_checkpoint = on_main(self.acc, lock_and_prepare)
            if finished is not None:
                if self.acc.is_main_process:
                    print(f"{paths.root} already finished; results in {paths.results}")
                return finished
            self.setup(resume=self.resume and has_checkpoint)
            if not self.train():
                return self.interrupted()
            return self.cleanup(self.finish())

    def setup(self, resume: bool) -> None:
        """Processes, seeds, data and model (``load``), then the first stage or the checkpoint's."""
        acc, cfg = self.acc, self.cfg
        self.main, self.rank, self.world = acc.is_main_process, acc.process_index, acc.num_processes
        self.processes = Processes(acc)
        self.device = acc.device
        self.micro_batch = check_batch(cfg.batch_size, cfg.grad_accum, self.world)
        reset_peak_rss()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.seed)
        self.load()
        cfg = self.cfg  # with what load() resolved (targets "auto")
        if self.main:
            write_config(cfg, self.paths.root / CONFIG_FILE)  # `--config <output_dir>/config.yaml`: this run again
        for stage in self.stages:
            schedule(stage, cfg.batch_size, cfg.epochs, cfg.max_steps, cfg.warmup_ratio)
        self.core.train()
        self.summary = self.parameter_summary()
        if self.rank > 0:  # every process draws its own dropout masks (the model above is the same everywhere)
            seed_everything(process_seed(cfg.seed, self.rank))
        # --report-to: rank 0's trackers get every record log.jsonl gets, and the run's config
        self.log = JsonlLog(self.paths.log, trackers=run_trackers(cfg.report_to, cfg.name, self.paths.root, cfg.to_dict())
                            if self.main else None)
        self.state: dict[str, Any] = {
            "stage": 0, "stage_step": 0, "step": 0, "best_metric": None, "best_step": None, "best_epoch": None,
            "best_dev": None, "train_time_s": 0.0, "window_loss": 0.0, "window_steps": 0, "stages": [],
            "config": cfg.resume_key(), "resumed": 0,
        }
        if resume:
            self.load_checkpoint()
        else:
            self.begin_stage(self.stages[0])

    def begin_stage(self, stage: Stage) -> None:
        """``start_stage``, then the model wrapped anew (DDP syncs what is trainable when it is built) and a
        fresh optimizer over what the stage trains."""
        self.start_stage(stage)
        self.model, self.optimizer = wrap(self.acc, self.core,
                                          lambda m: make_optimizer(m, self.stage_lr(stage), self.cfg.weight_decay,
                                                                   lambda name: self.param_lr(stage, name)),
                                          fsdp=self.cfg.fsdp, unused=self.find_unused_parameters)
        self.params = list(trainable_parameters(self.core).values())  # after wrapping: FSDP's shards

    def stage_lr(self, stage: Stage) -> float:
        """The peak learning rate of ``stage``'s adapter tensors (what the log's ``lr`` follows)."""
        return self.cfg.lr

    def param_lr(self, stage: Stage, name: str) -> float:
        """The peak learning rate of trainable parameter ``name`` in ``stage`` (default: the stage's)."""
        return self.stage_lr(stage)

    def load_checkpoint(self) -> None:
        """Continue from ``state/checkpoint.safetensors``: its stage, weights, optimizer, generators and log."""
        paths, cfg, state = self.paths, self.cfg, self.state
        saved = read_state(paths.checkpoint)
        if saved.get("config") != cfg.resume_key():
            diff = sorted(k for k in cfg.resume_key() if saved.get("config", {}).get(k) != cfg.resume_key()[k])
            raise ValueError(f"cannot resume {paths.root}: its checkpoint was written with different settings "
                             f"{diff}; resume with the original options or use --overwrite")
        stage = self.stages[saved.get("stage", 0)]
        self.restore_stages(stage)
        self.begin_stage(stage)
        saved = load_checkpoint(paths.checkpoint, self.core, self.optimizer, rank=self.rank)
        saved.setdefault("stage_step", saved["step"])  # a checkpoint of one stage written before stages existed
        state.update({k: saved[k] for k in state if k in saved})
        state["resumed"] += 1
        if not saved["rng_restored"]:  # written by fewer processes: this one starts a stream of its own
            seed_everything(process_seed(cfg.seed, self.rank) + state["step"])
        if self.main:
            self.log.truncate_after(state["step"], finished_stages=len(state["stages"]))
            where = f" (stage {state['stage'] + 1}/{len(self.stages)})" if len(self.stages) > 1 else ""
            print(f"resuming {paths.root} at step {state['step']}/{self.total_steps}{where}")

    def restore_stages(self, stage: Stage) -> None:
        """Before resuming inside ``stage``: what each finished stage trained, in order (``end_stage`` saved it)."""
        for done in self.stages[: stage.index]:
            path = self.stage_file(done)
            if not path.is_file():
                raise ValueError(f"cannot resume {self.paths.root}: its checkpoint is in stage {stage.index + 1} but "
                                 f"{path} (what stage {done.index + 1} trained) is missing; use --overwrite")
            load_weights(path, self.core, frozen=True)

    def stage_file(self, stage: Stage) -> Path:
        return self.paths.state / f"stage{stage.index}.safetensors"

    @property
    def total_steps(self) -> int:
        return sum(s.total_steps for s in self.stages)

    def train(self) -> bool:
        """Every stage to its last step; False when asked to stop first (then checkpointed)."""
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=self.state["step"], desc=self.cfg.name,
                        disable=not (self.progress and self.main), dynamic_ncols=True)
        self._time_base, self._loop_start = self.state["train_time_s"], time.perf_counter()
        try:
            with StopFlag() as stop:
                while self.state["stage"] < len(self.stages):
                    stage = self.stages[self.state["stage"]]
                    if not self.train_stage(stage, stop):
                        return False
                    self.end_stage(stage)
        finally:
            self.bar.close()
        return True

    def train_stage(self, stage: Stage, stop: StopFlag) -> bool:
        """Steps of ``stage`` from where the state is to its last; False when asked to stop first."""
        cfg, state = self.cfg, self.state
        window_start, window_rows = time.perf_counter(), 0
        while state["stage_step"] < stage.total_steps:
            indices = self.step_rows(stage, state["stage_step"])
            step = state["stage_step"]
            schedule = lambda peak: lr_at(step, peak, stage.warmup_steps, stage.total_steps)  # noqa: E731
            lr = schedule(self.stage_lr(stage))  # what the log shows: the schedule of the stage's adapter rate
            loss, grad_norm = self.train_step(stage, indices, schedule)
            state["stage_step"] += 1
            state["step"] += 1
            window_rows += len(indices)
            state["window_loss"] += loss
            state["window_steps"] += 1
            if state["stage_step"] % cfg.log_every == 0 or state["stage_step"] == stage.total_steps:
                seconds = time.perf_counter() - window_start
                self.log_train(stage, lr, grad_norm, window_rows / seconds if seconds > 0 else float("nan"))
                window_start, window_rows = time.perf_counter(), 0
            self.bar.update(1)
            epoch_end = state["stage_step"] % stage.steps_per_epoch == 0 or state["stage_step"] == stage.total_steps
            if epoch_end:
                self.epoch_end(stage)
            if self.on_step is not None and self.on_step(state["step"]):
                stop.requested = True
            # Stop where any process was asked to (Ctrl-C reaches them at different moments).
            stop.requested = self.acc.reduce(torch.tensor(float(stop.requested), device=self.device),
                                             "max").item() > 0
            state["train_time_s"] = self._time_base + time.perf_counter() - self._loop_start
            if epoch_end or state["stage_step"] % cfg.checkpoint_every == 0 or stop.requested:
                self.save_checkpoint()
            if stop.requested and state["stage_step"] < stage.total_steps:
                return False
        return True

    def step_rows(self, stage: Stage, stage_step: int) -> list[int]:
        """The training rows of step ``stage_step`` of ``stage`` (the epoch's order, cut in batches)."""
        epoch, b = divmod(stage_step, stage.steps_per_epoch)
        key = (stage.index, epoch)
        if self._order is None or self._order[0] != key:
            self._order = (key, stage.order(epoch))
        return self._order[1][b * self.cfg.batch_size : (b + 1) * self.cfg.batch_size]

    def train_step(self, stage: Stage, indices: list[int], schedule: Callable[[float], float]) -> tuple[float, float]:
        """One optimizer step over rows ``indices`` with every group's rate ``schedule(its peak)``: (the step's
        mean loss over every process, grad norm)."""
        set_lr(self.optimizer, schedule, self.stage_lr(stage))
        weight = self.step_weight(stage, indices)
        # Every process runs as many micro-batches as the one with the largest share (rank 0), so that
        # each joins every collective of the step; the last one syncs the gradients.
        count = math.ceil(math.ceil(len(indices) / self.world) / self.micro_batch)
        loss = 0.0
        with self.acc.split_between_processes(indices) as mine:  # this process's share of the step
            for m in range(count):
                part = mine[m * self.micro_batch : (m + 1) * self.micro_batch]
                with gradient_sync(self.acc, self.model, sync=m == count - 1):
                    loss += self.micro_step(stage, part, indices[:1], weight)
        self.before_optimizer_step(stage, indices)
        grad_norm = optimizer_step(self.optimizer, lambda: self.acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        loss = self.acc.reduce(torch.tensor(loss, dtype=torch.float64, device=self.device), "sum").item()
        return loss, grad_norm

    def micro_step(self, stage: Stage, part: list[int], stand_in: list[int], weight: float) -> float:
        """Forward and backward of one micro-batch; returns its share of the step's mean loss.

        The loss is summed over the micro-batch and divided by the whole step's weight: summed over
        micro-batches and processes it is the step's mean loss whatever grad_accum and the number of
        processes are. DDP and FSDP average gradients over the processes, so each process
        backpropagates ``world`` times its part. A process with no rows left in the step (its share
        ran out) still runs ``stand_in`` with weight 0: it must join the gradient sync, and its
        gradients add nothing.
        """
        loss = self.batch_loss(stage, part or stand_in) / weight
        self.acc.backward(loss * self.world if part else loss * 0.0)
        return loss.item() if part else 0.0

    def before_optimizer_step(self, stage: Stage, indices: list[int]) -> None:
        """After the step's backward, before clipping and the step (multi-task FSDP: unused tensors)."""

    def log_train(self, stage: Stage, lr: float, grad_norm: float, rate: float) -> None:
        state = self.state
        loss = state["window_loss"] / state["window_steps"]
        if self.main:
            self.log.append({"kind": "train", "step": state["step"], **self.record_fields(stage),
                             "epoch": state["stage_step"] / stage.steps_per_epoch, "loss": loss, "lr": lr,
                             "grad_norm": grad_norm, "examples_per_s": rate})
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}")
        state["window_loss"], state["window_steps"] = 0.0, 0

    def epoch_end(self, stage: Stage) -> None:
        """Dev evaluation; the weights kept as the stage's best if its score improved."""
        state = self.state
        score, best_dev = self.evaluate_dev(stage)
        if state["best_metric"] is None or self.improves(score, state["best_metric"]):
            state.update(best_metric=score, best_step=state["step"],
                         best_epoch=state["stage_step"] / stage.steps_per_epoch, best_dev=best_dev)
            save_weights(self.paths.best, self.core, write=self.main)

    def evaluate(self, task: Any, split: Any) -> dict[str, Any]:
        """``task``'s metrics of the model on ``split``, every process scoring a share (gathered)."""
        with for_evaluation(self.acc, self.model) as scored:
            return task.evaluate(scored, split, self.cfg.eval_batch_size, self.device, self.processes)

    def end_stage(self, stage: Stage) -> None:
        """The stage's best weights -> ``score_stage``, recorded in state["stages"]; then the next stage
        starts (and is checkpointed), its predecessors' trained tensors kept for a resume inside it."""
        self.acc.wait_for_everyone()  # rank 0's best weights are on disk before anyone reads them
        load_weights(self.paths.best, self.core)
        state = self.state
        settled = self.settle_stage(stage)  # before the scores and the stage file: both see the final weights
        state["stages"].append({"stage": stage.index, "tasks": list(stage.tasks), "step": state["step"],
                                **{k: state[k] for k in ("best_step", "best_epoch", "best_metric", "best_dev")},
                                **settled, **self.score_stage(stage)})
        state["stage"] += 1
        if state["stage"] < len(self.stages):
            save_weights(self.stage_file(stage), self.core, write=self.main)
            state.update(stage_step=0, best_metric=None, best_step=None, best_epoch=None, best_dev=None)
            self.begin_stage(self.stages[state["stage"]])
            self.save_checkpoint()  # a resume from here starts the next stage, the finished ones as they were

    def save_checkpoint(self) -> None:
        """The resume checkpoint: every process takes part (generator states, FSDP shards); rank 0 writes."""
        own_gpu = [self.device.index or 0] if self.world > 1 and self.device.type == "cuda" else None
        rngs = gather_list(self.acc, [capture_rng(cuda_devices=own_gpu)])
        save_checkpoint(self.paths.checkpoint, self.core, self.optimizer, self.state, rngs=rngs, write=self.main)

    def common_results(self) -> dict[str, Any]:
        """The fields of every results.json: the run, its parameters, times, processes, memory, environment.
        Every process calls it (it gathers every process's peak memory)."""
        cfg, device, peak_rss = self.cfg, self.device, gather_list(self.acc, [peak_rss_mb()])
        return {
            "status": "finished", "name": cfg.name, "model": self.bundle.name, "pretrained": self.bundle.pretrained,
            "config": cfg.to_dict(), "parameters": self.summary, "steps": self.total_steps,
            "train_time_s": self.state["train_time_s"], "wall_time_s_this_process": time.perf_counter() - self.wall_start,
            "resumed": self.state["resumed"], "processes": self.world, "fsdp": bool(cfg.fsdp),
            "peak_rss_mb": peak_rss[0], "peak_rss_mb_per_process": peak_rss,  # rank 0's; every process's
            "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "device": str(device), "environment": environment(), "model_info": jsonable(self.bundle.info),
        }

    def common_run_info(self) -> dict[str, Any]:
        """What every adapter's run_info.json records for ``sharelora eval`` / merge to rebuild the model."""
        cfg = self.cfg
        return {"model": cfg.model, "max_length": cfg.max_length,
                "eval_batch_size": cfg.eval_batch_size,  # with max_eval_examples: eval rescoring as the run did
                "max_eval_examples": cfg.max_eval_examples, "seed": cfg.seed,
                **memory_run_info(cfg)}  # how the base was loaded (bf16 / quantized)

    def interrupted(self) -> dict[str, Any]:
        step, total = self.state["step"], self.total_steps
        if self.main:
            self.log.close()  # the trackers (--report-to); a resumed run rewrites its own events
            print(f"stopped at step {step}/{total}; continue with --resume (checkpoint: {self.paths.checkpoint})")
        return {"status": "interrupted", "step": step, "total_steps": total, "output_dir": str(self.paths.root)}

    def finish(self) -> dict[str, Any]:
        """results.json's dict; rank 0 writes the adapter, the plot and results.json."""
        results = self.results()
        with whole_trainable(self.core) as whole:  # FSDP: every process helps gather the adapter rank 0 writes
            if self.main:
                self.save_outputs(whole)
                self.log.close()  # the trackers (--report-to)
        self.acc.wait_for_everyone()  # the adapter is written: every process can report its size
        results["adapter_bytes"] = directory_bytes(self.paths.adapter)
        if self.main:
            atomic_write_text(self.paths.results, json.dumps(results, indent=2, sort_keys=True) + "\n")
        return results

    def cleanup(self, results: dict[str, Any]) -> dict[str, Any]:
        """The resume state removed (unless kept); every process returns rank 0's results."""
        if self.main and not self.keep_state:
            # The checkpoint first: a kill during the removal must not leave a checkpoint without the
            # best weights it refers to (a --resume would then fail instead of reading results.json).
            self.paths.checkpoint.unlink(missing_ok=True)
            shutil.rmtree(self.paths.state, ignore_errors=True)
        self.acc.wait_for_everyone()
        return from_main(self.acc, results)  # the same on every process (rank 0 measured the files)
