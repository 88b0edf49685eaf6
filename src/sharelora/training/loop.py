"""``sharelora train``: one task, as a recipe of the training engine (engine.py).

    load data and model -> wrap with the method -> the engine's steps, dev evaluation at each
    epoch end, resume checkpoints -> the best weights -> test -> adapter, results.json, curves.png

What this recipe adds to the engine: the task (``tasks.build``: classification, regression, E2E,
instructions), its one stage over the training split in ``epoch_order``, a micro-batch's loss
through the task, the best epoch by the task's dev metric, and the test split scored once with
the best weights. Determinism, processes, resume and the output directory: engine.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..tasks import Task
from ..tasks.build import build_task
from .config import TrainConfig, resolve_targets
from .engine import (  # noqa: F401 (RunExistsError, RunPaths, lr_at, pick_device: the loop's public names)
    Run, RunExistsError, RunPaths, Stage, epoch_order, jsonable, lr_at, pick_device, save_with_run_info,
)
from .evaluate import model_logits
from .logs import plot_curves
from .methods import parameter_summary, prepare_model


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
    return SingleTaskRun(cfg, resume=resume, overwrite=overwrite, bundle=bundle, data=data, on_step=on_step,
                         progress=progress, keep_state=keep_state).run()


class SingleTaskRun(Run):
    """The engine's recipe for one task: its hooks (engine.Run) filled in for ``sharelora train``."""

    def load(self) -> None:
        from ..tasks import label_space
        from ..tasks.build import model_task, task_name

        cfg = self.cfg
        if self.data is None:
            from ..sources import load_dataset

            with self.acc.main_process_first():  # rank 0 fetches into the cache, the others then read it
                self.data = load_dataset(cfg.dataset, cache_dir=cfg.cache_dir, **cfg.dataset_options)
        if model_task(task_name(cfg.task, self.data)) == "causal-lm":
            self.load_model("causal-lm")
        else:
            self.load_model("classification", num_labels=label_space(self.data)[1])
        self.cfg = cfg = resolve_targets(cfg, self.bundle.model)  # "auto": the architecture's query/value maps
        # Generation tasks write their decoded samples into the output directory: rank 0's task only.
        self.task: Task = build_task(cfg.task, self.data, self.bundle.tokenizer, max_length=cfg.max_length,
                                     options=cfg.task_options, output_dir=self.paths.root if self.main else None)
        self.train_split = self.task.encode("train", cfg.max_train_examples)
        self.dev_split = self.task.encode("dev", cfg.max_eval_examples)
        self.test_split = self.task.encode("test", cfg.max_eval_examples) if "test" in self.task.splits else None
        self.core = prepare_model(self.bundle.model, cfg).to(self.device)
        rows = len(self.train_split)
        self.stages = [Stage(0, rows, lambda epoch: epoch_order(rows, cfg.seed, epoch))]

    def parameter_summary(self) -> dict[str, Any]:
        return parameter_summary(self.core, self.cfg)

    def batch_loss(self, stage: Stage, rows: list[int]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in self.task.collate(self.train_split, rows).items()}
        logits = model_logits(self.model, self.task.model_inputs(batch))
        return self.task.loss(logits, batch["labels"], reduction="sum")

    def step_weight(self, stage: Stage, rows: list[int]) -> float:
        return self.task.step_weight(self.train_split, rows)

    def evaluate_dev(self, stage: Stage) -> tuple[float, Any]:
        step, epoch, metric = self.state["step"], self.state["stage_step"] / stage.steps_per_epoch, self.metric
        dev = self.evaluate(self.task, self.dev_split)
        if self.main:
            self.log.append({"kind": "eval", "split": "dev", "step": step, "epoch": epoch, **dev})
            self.bar.write(f"step {step} epoch {epoch:.2f}: dev {metric} {dev[metric]:.4f} loss {dev['loss']:.4f}")
        return dev[metric], dev

    def improves(self, score: float, best: float) -> bool:
        return self.task.improves(score, best)

    @property
    def metric(self) -> str:
        return self.task.primary_metric

    def score_stage(self, stage: Stage) -> dict[str, Any]:
        """The test split, once, with the best weights."""
        self.test = None if self.test_split is None else self.evaluate(self.task, self.test_split)
        if self.main and self.test is not None:
            self.log.append({"kind": "test", "split": "test", "step": self.state["best_step"], **self.test})
        return {}

    def save_outputs(self, model: nn.Module) -> None:
        """adapter/: ``save_pretrained`` (adapter methods: the ShareLoRA adapter, each shared tensor once; full
        fine-tuning: the whole model and its tokenizer, a model of its own) and run_info.json; the plot."""
        cfg, task = self.cfg, self.task
        info = {**self.common_run_info(), "method": cfg.method, "dataset": cfg.dataset,
                "dataset_options": cfg.dataset_options, "task_type": task.task_type, "num_labels": task.num_labels,
                "label_names": task.label_names, "model_task": task.model_task, **task.run_info()}
        save_with_run_info(model, self.paths.adapter, info, tokenizer=self.bundle.tokenizer if cfg.is_full else None)
        plot_curves(self.log.records(), self.paths.plot, self.metric, title=f"{cfg.name} ({cfg.method})")

    def results(self) -> dict[str, Any]:
        state, task, stage = self.state, self.task, self.stages[0]
        return {
            **self.common_results(), "method": self.cfg.method, "dataset": self.data.name,
            "task_type": task.task_type, "task": task.name, "metric": self.metric,
            "greater_is_better": task.greater_is_better,
            "optimizer_state_mb": _optimizer_state_bytes(self.optimizer) / 2**20,
            "examples": {"train": len(self.train_split), "dev": len(self.dev_split),
                         "test": len(self.test_split) if self.test_split else 0},
            "steps_per_epoch": stage.steps_per_epoch, "best_step": state["best_step"],
            "best_epoch": state["best_epoch"], "dev": state["best_dev"], "test": self.test,
            "data_info": jsonable(self.data.info),
        }


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
