"""The training loop: plain PyTorch, readable top to bottom.

    load data and model -> wrap with the method -> AdamW with linear warmup/decay
    for each optimizer step:
        forward/backward over grad_accum micro-batches, clip, step
        every log_every steps: append a "train" record to log.jsonl
        at each epoch end: evaluate on dev, keep the best weights
        every checkpoint_every steps and at each epoch end: write the resume checkpoint
    load the best weights -> evaluate on test -> save the adapter, results.json, curves.png

Determinism: the run is seeded once (model head and adapter initialisation, dropout), and the
data order of epoch e is a permutation drawn from its own generator seeded with (seed, e). A
checkpoint stores weights, optimizer, generator states and the step, so a resumed run takes
exactly the steps the uninterrupted run would have taken and reaches the same weights.

Several processes (``torchrun --nproc-per-node N -m sharelora train ...`` or ``accelerate launch``;
distributed.py): every process runs this same loop. ``batch_size`` is the global batch: a step's
examples are the same whatever the number of processes, split between them (and each share into
``grad_accum`` micro-batches); each process's summed loss is divided by the step's global weight
and multiplied by the number of processes, so DDP's (or FSDP's) average of the gradients is the
gradient of the step's mean loss, as one process computes it. Evaluation is split and gathered
(evaluate.py). Rank 0 alone writes: the lock, the log, the progress bar and messages, checkpoints,
the best weights, the adapter, results.json and the plot; every process resumes from the same
checkpoint, with its own generator states. Dropout draws differ between processes (each has its
own stream), so a run with dropout matches a single-process run in distribution, not digit by digit.

Output directory (``runs/<name>`` by default):
    results.json      config, parameter counts, dev/test metrics, times, memory
    log.jsonl         one record per log interval, dev evaluation and the final test
    curves.png        training loss and dev metric
    adapter/          the best weights: ``save_pretrained`` output + run_info.json
    state/            resume checkpoint and best-so-far weights (removed when the run finishes)
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..tasks import Task
from ..tasks.build import build_task
from .config import TrainConfig, resolve_targets
from .distributed import (
    Processes, check_batch, for_evaluation, from_main, full_tensor, gather_list, gradient_sync, make_accelerator,
    on_main, whole_trainable, wrap,
)
from .evaluate import RUN_INFO, evaluate, model_logits
from .lock import output_dir_lock
from .memory import run_info as memory_run_info
from .logs import JsonlLog, directory_bytes, environment, peak_rss_mb, plot_curves, reset_peak_rss
from .methods import parameter_summary, prepare_model
from .optim import adamw
from .state import (
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
    trainable_parameters,
)


class RunExistsError(ValueError):
    """The output directory already holds a run and neither resume nor overwrite was asked for."""


@dataclass
class RunPaths:
    root: Path

    @property
    def results(self) -> Path:
        return self.root / "results.json"

    @property
    def log(self) -> Path:
        return self.root / "log.jsonl"

    @property
    def plot(self) -> Path:
        return self.root / "curves.png"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def checkpoint(self) -> Path:
        return self.state / "checkpoint.safetensors"

    @property
    def best(self) -> Path:
        return self.state / "best.safetensors"


def pick_device(name: str = "auto") -> torch.device:
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


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases and LayerNorm weights (1-d) get no weight decay."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no trainable parameters; check --method and --targets")
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return adamw(groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)


class _StopFlag:
    """First Ctrl-C asks the loop to stop after the current step (it then checkpoints); a second aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> _StopFlag:
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


def _prepare_output(paths: RunPaths, resume: bool, overwrite: bool) -> dict | None:
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


def load_inputs(cfg: TrainConfig, bundle: Any = None, data: Any = None) -> tuple[Any, Any]:
    """The dataset and model bundle of a run: given ones (tests), or fetched through sources.

    The global generators are seeded before the model is built, so the new classification head
    starts from the same weights for the same seed.
    """
    from ..tasks import label_space
    from ..tasks.build import model_task, task_name

    if data is None:
        from ..sources import load_dataset

        data = load_dataset(cfg.dataset, cache_dir=cfg.cache_dir, **cfg.dataset_options)
    if bundle is None:
        from ..sources import load_model
        from .memory import load_options

        seed_everything(cfg.seed)
        memory = load_options(cfg)  # --bf16 / --quantize: the dtype and bitsandbytes settings ({} without them)
        if model_task(task_name(cfg.task, data)) == "causal-lm":
            bundle = load_model(cfg.model, task="causal-lm", cache_dir=cfg.cache_dir, **memory)
        else:
            _, num_labels = label_space(data)
            bundle = load_model(cfg.model, task="classification", num_labels=num_labels, cache_dir=cfg.cache_dir,
                                **memory)
    return bundle, data


def train(
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    bundle: Any = None,
    data: Any = None,
    on_step: Callable[[int], bool | None] | None = None,
    progress: bool = True,
    keep_state: bool = False,
) -> dict[str, Any]:
    """Train one run and return its results (also written to ``<output_dir>/results.json``).

    Args:
        cfg: the run's configuration.
        resume: continue from ``<output_dir>/state/checkpoint.safetensors`` if it exists; a
            finished run is returned as it is.
        overwrite: delete a previous run in the output directory first.
        bundle, data: a ``ModelBundle`` and ``TaskData`` to use instead of fetching
            ``cfg.model`` / ``cfg.dataset`` (tests pass tiny ones).
        on_step: called with the global step after every optimizer step; returning True stops
            the run as Ctrl-C does (checkpoint, then return with status "interrupted").
        progress: show a tqdm progress bar.
        keep_state: keep the resume checkpoint after the run finishes.

    Under a launcher every process calls this and gets the same results; rank 0 alone writes.

    Raises OutputDirLockedError at once if another process is writing into the output directory
    (``<output_dir>/.lock``, see lock.py); a lock left by a killed process is taken over.
    """
    wall_start = time.perf_counter()
    cfg = cfg.resolved()
    accelerator = make_accelerator(cfg.device, fsdp=cfg.fsdp)
    paths = RunPaths(Path(cfg.output_dir))
    with contextlib.ExitStack() as held:
        def lock_and_prepare() -> tuple[dict | None, bool]:  # rank 0 only
            held.enter_context(output_dir_lock(cfg.output_dir))  # before anything is read or written there
            return _prepare_output(paths, resume, overwrite), paths.checkpoint.is_file()

        finished, has_checkpoint = on_main(accelerator, lock_and_prepare)
        if finished is not None:
            if accelerator.is_main_process:
                print(f"{paths.root} already finished; results in {paths.results}")
            return finished
        return _train(cfg, accelerator, paths, wall_start, resume=resume and has_checkpoint, bundle=bundle,
                      data=data, on_step=on_step, progress=progress, keep_state=keep_state)


def _train(cfg: TrainConfig, accelerator: Any, paths: RunPaths, wall_start: float, *, resume: bool, bundle: Any,
           data: Any, on_step: Callable[[int], bool | None] | None, progress: bool, keep_state: bool) -> dict[str, Any]:
    """The body of ``train``, run while rank 0 holds the output directory's lock."""
    main, rank, world = accelerator.is_main_process, accelerator.process_index, accelerator.num_processes
    micro_batch = check_batch(cfg.batch_size, cfg.grad_accum, world)
    reset_peak_rss()
    device = accelerator.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.seed)

    # --- data and model ----------------------------------------------------------------------
    with accelerator.main_process_first():  # rank 0 fetches into the cache, the others then read it
        bundle, data = load_inputs(cfg, bundle, data)
    cfg = resolve_targets(cfg, bundle.model)  # targets "auto": the architecture's query/value projections
    # Generation tasks write their decoded samples into the output directory: rank 0's task only.
    task = build_task(cfg.task, data, bundle.tokenizer, max_length=cfg.max_length, options=cfg.task_options,
                      output_dir=paths.root if main else None)
    train_split = task.encode("train", cfg.max_train_examples)
    dev_split = task.encode("dev", cfg.max_eval_examples)
    test_split = task.encode("test", cfg.max_eval_examples) if "test" in task.splits else None
    model, optimizer = wrap(accelerator, prepare_model(bundle.model, cfg), lambda m: make_optimizer(m, cfg),
                            fsdp=cfg.fsdp)
    model.train()
    core = accelerator.unwrap_model(model)  # without DDP's wrapper: parameter names, checkpoints, saving
    params = list(trainable_parameters(core).values())
    summary = parameter_summary(core, cfg)
    if rank > 0:  # every process draws its own dropout masks (the model above is the same everywhere)
        seed_everything(process_seed(cfg.seed, rank))

    steps_per_epoch = math.ceil(len(train_split) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    warmup_steps = round(cfg.warmup_ratio * total_steps)
    metric = task.primary_metric

    # --- resume ---------------------------------------------------------------------------------
    log = JsonlLog(paths.log)
    state: dict[str, Any] = {
        "step": 0, "best_metric": None, "best_step": None, "best_epoch": None, "best_dev": None,
        "train_time_s": 0.0, "window_loss": 0.0, "window_steps": 0, "config": cfg.resume_key(), "resumed": 0,
    }
    if resume:
        saved = load_checkpoint(paths.checkpoint, core, optimizer, rank=rank)
        if saved["config"] != cfg.resume_key():
            diff = sorted(k for k in cfg.resume_key() if saved["config"].get(k) != cfg.resume_key()[k])
            raise ValueError(
                f"cannot resume {paths.root}: its checkpoint was written with different settings {diff}; "
                "resume with the original options or use --overwrite"
            )
        state.update({k: saved[k] for k in state if k in saved})
        state["resumed"] += 1
        if not saved["rng_restored"]:  # written by fewer processes: this one starts a stream of its own
            seed_everything(process_seed(cfg.seed, rank) + state["step"])
        if main:
            log.truncate_after(state["step"])
            print(f"resuming {paths.root} at step {state['step']}/{total_steps}")

    def checkpoint() -> None:  # every process takes part (generator states, FSDP shards); rank 0 writes
        state["step"] = step
        own_gpu = [device.index or 0] if world > 1 and device.type == "cuda" else None
        rngs = gather_list(accelerator, [capture_rng(cuda_devices=own_gpu)])
        save_checkpoint(paths.checkpoint, core, optimizer, state, rngs=rngs, write=main)

    # --- the loop ---------------------------------------------------------------------------------
    from tqdm.auto import tqdm

    bar = tqdm(total=total_steps, initial=state["step"], desc=cfg.name, disable=not (progress and main),
               dynamic_ncols=True)
    step = state["step"]
    loop_start = time.perf_counter()
    time_at_start = state["train_time_s"]
    window_start, window_examples = time.perf_counter(), 0
    status = "finished"
    with _StopFlag() as stop:
        while step < total_steps:
            epoch, batch_index = divmod(step, steps_per_epoch)
            indices = epoch_order(len(train_split), cfg.seed, epoch)[
                batch_index * cfg.batch_size : (batch_index + 1) * cfg.batch_size
            ]
            lr = lr_at(step, cfg.lr, warmup_steps, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr

            step_weight = task.step_weight(train_split, indices)
            # Every process runs as many micro-batches as the one with the largest share (rank 0), so
            # that each joins every collective of the step; the last one syncs the gradients.
            count = math.ceil(math.ceil(len(indices) / world) / micro_batch)
            loss_value = 0.0
            with accelerator.split_between_processes(indices) as mine:  # this process's share of the step
                for m in range(count):
                    part = mine[m * micro_batch : (m + 1) * micro_batch]
                    with gradient_sync(accelerator, model, sync=m == count - 1):
                        loss_value += _forward_backward(accelerator, model, task, train_split, part, indices[:1],
                                                        step_weight, world, device)
            grad_norm = full_tensor(accelerator.clip_grad_norm_(params, cfg.max_grad_norm)).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = accelerator.reduce(torch.tensor(loss_value, dtype=torch.float64, device=device), "sum").item()
            step += 1
            window_examples += len(indices)
            state["window_loss"] += loss_value
            state["window_steps"] += 1

            if step % cfg.log_every == 0 or step == total_steps:
                seconds = time.perf_counter() - window_start
                rate = window_examples / seconds if seconds > 0 else float("nan")
                if main:
                    log.append({
                        "kind": "train", "step": step, "epoch": step / steps_per_epoch,
                        "loss": state["window_loss"] / state["window_steps"], "lr": lr, "grad_norm": grad_norm,
                        "examples_per_s": rate,
                    })
                bar.set_postfix(loss=f"{state['window_loss'] / state['window_steps']:.4f}", lr=f"{lr:.2e}", ex_s=f"{rate:.1f}")
                state["window_loss"], state["window_steps"] = 0.0, 0
                window_start, window_examples = time.perf_counter(), 0
            bar.update(1)

            epoch_end = step % steps_per_epoch == 0 or step == total_steps
            if epoch_end:
                with for_evaluation(accelerator, model) as scored:
                    dev = evaluate(scored, task, dev_split, cfg.eval_batch_size, device, Processes(accelerator))
                if main:
                    log.append({"kind": "eval", "split": "dev", "step": step, "epoch": step / steps_per_epoch, **dev})
                    bar.write(f"step {step} epoch {step / steps_per_epoch:.2f}: dev {metric} {dev[metric]:.4f} "
                              f"loss {dev['loss']:.4f}")
                if state["best_metric"] is None or task.improves(dev[metric], state["best_metric"]):
                    state.update(best_metric=dev[metric], best_step=step, best_epoch=step / steps_per_epoch, best_dev=dev)
                    save_weights(paths.best, core, write=main)
            if on_step is not None and on_step(step):
                stop.requested = True
            # Stop where any process was asked to (Ctrl-C reaches them at different moments).
            stop.requested = accelerator.reduce(torch.tensor(float(stop.requested), device=device), "max").item() > 0
            state["train_time_s"] = time_at_start + time.perf_counter() - loop_start
            if epoch_end or step % cfg.checkpoint_every == 0 or stop.requested:
                checkpoint()
            if stop.requested and step < total_steps:
                status = "interrupted"
                break
    bar.close()
    if status == "interrupted":
        if main:
            print(f"stopped at step {step}/{total_steps}; continue with --resume (checkpoint: {paths.checkpoint})")
        return {"status": "interrupted", "step": step, "total_steps": total_steps, "output_dir": str(paths.root)}

    # --- best weights -> test, adapter, results ---------------------------------------------------------
    accelerator.wait_for_everyone()  # rank 0's best weights are on disk before anyone reads them
    load_weights(paths.best, core)
    test = None
    if test_split is not None:
        with for_evaluation(accelerator, model) as scored:
            test = evaluate(scored, task, test_split, cfg.eval_batch_size, device, Processes(accelerator))
    with whole_trainable(core) as whole:  # FSDP: every process helps gather the adapter rank 0 writes
        if main:
            if test is not None:
                log.append({"kind": "test", "split": "test", "step": state["best_step"], **test})
            save_adapter(whole, bundle, cfg, task, paths.adapter)
            plot_curves(log.records(), paths.plot, metric, title=f"{cfg.name} ({cfg.method})")
    accelerator.wait_for_everyone()  # the adapter is written: every process can report its size

    peak_rss = gather_list(accelerator, [peak_rss_mb()])
    results = {
        "status": "finished",
        "name": cfg.name,
        "method": cfg.method,
        "model": getattr(bundle, "name", cfg.model),
        "dataset": getattr(data, "name", cfg.dataset),
        "task_type": task.task_type,
        "task": task.name,
        "metric": metric,
        "greater_is_better": task.greater_is_better,
        "pretrained": getattr(bundle, "pretrained", None),
        "config": cfg.to_dict(),
        "parameters": summary,
        "adapter_bytes": directory_bytes(paths.adapter),
        "optimizer_state_mb": _optimizer_state_bytes(optimizer) / 2**20,
        "examples": {"train": len(train_split), "dev": len(dev_split), "test": len(test_split) if test_split else 0},
        "steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "best_step": state["best_step"],
        "best_epoch": state["best_epoch"],
        "dev": state["best_dev"],
        "test": test,
        "train_time_s": state["train_time_s"],
        "wall_time_s_this_process": time.perf_counter() - wall_start,
        "resumed": state["resumed"],
        "processes": world,
        "fsdp": bool(cfg.fsdp),
        "peak_rss_mb": peak_rss[0],  # rank 0's; every process's below
        "peak_rss_mb_per_process": peak_rss,
        "cuda_peak_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "device": str(device),
        "environment": environment(),
        "data_info": _jsonable(getattr(data, "info", {})),
        "model_info": _jsonable(getattr(bundle, "info", {})),
    }
    if main:
        atomic_write_text(paths.results, json.dumps(results, indent=2, sort_keys=True) + "\n")
        if not keep_state:
            # The checkpoint first: a kill during the removal must not leave a checkpoint without the
            # best weights it refers to (a --resume would then fail instead of reading results.json).
            paths.checkpoint.unlink(missing_ok=True)
            shutil.rmtree(paths.state, ignore_errors=True)
    accelerator.wait_for_everyone()
    return from_main(accelerator, results)  # the same on every process (rank 0 measured the files)


def _forward_backward(accelerator: Any, model: nn.Module, task: Any, split: Any, part: list[int], stand_in: list[int],
                      step_weight: float, world: int, device: torch.device) -> float:
    """Forward and backward of one micro-batch; returns its share of the step's mean loss.

    The loss is summed over the micro-batch (LM tasks: over target tokens) and divided by the whole
    step's weight: summed over micro-batches and processes it is the step's mean loss whatever
    grad_accum and the number of processes are. DDP and FSDP average gradients over the processes,
    so each process backpropagates ``world`` times its part. A process with no examples left in
    the step (its share ran out) still runs ``stand_in`` with weight 0: it must join the gradient
    sync, and its gradients add nothing.
    """
    batch = {k: v.to(device) for k, v in task.collate(split, part or stand_in).items()}
    logits = model_logits(model, task.model_inputs(batch))
    loss = task.loss(logits, batch["labels"], reduction="sum") / step_weight
    accelerator.backward(loss * world if part else loss * 0.0)
    return loss.item() if part else 0.0


def save_adapter(model: nn.Module, bundle: Any, cfg: TrainConfig, task: Task, path: Path) -> None:
    """Write the trained weights with ``save_pretrained`` (plus run_info.json) via a temporary directory.

    Adapter methods write the ShareLoRA adapter (each shared tensor once); full fine-tuning
    writes the whole model and its tokenizer, so the directory loads as a model of its own.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if cfg.is_full and getattr(bundle, "tokenizer", None) is not None:
        bundle.tokenizer.save_pretrained(tmp)
    info = {
        "model": cfg.model,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "dataset_options": cfg.dataset_options,
        "task_type": task.task_type,
        "num_labels": task.num_labels,
        "label_names": task.label_names,
        "max_length": cfg.max_length,
        "eval_batch_size": cfg.eval_batch_size,  # with max_eval_examples: `sharelora eval` rescoring as the run did
        "max_eval_examples": cfg.max_eval_examples,
        "seed": cfg.seed,
        "model_task": task.model_task,
        **task.run_info(),
        **memory_run_info(cfg),  # how the base was loaded (bf16 / quantized), for eval and merge
    }
    (tmp / RUN_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into a string."""
    return json.loads(json.dumps(value, default=str))
