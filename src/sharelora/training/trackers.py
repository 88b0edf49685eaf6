"""Experiment trackers (``--report-to``): a run's ``log.jsonl`` records and config in TensorBoard, W&B or MLflow.

Through accelerate's tracker API (``accelerate.tracking``: ``TensorBoardTracker``, ``WandBTracker``,
``MLflowTracker``: ``start``, ``store_init_configuration``, ``log``, ``finish``). The run's
``JsonlLog`` (logs.py) hands every record it writes to a ``Trackers``, which the training loops
create on rank 0 only, where they write ``log.jsonl``; so the trackers see exactly the records of
``log.jsonl``, as scalars named ``<kind>/[<task>/]<metric>``:

    {"kind": "train", "step": 20, "loss": 0.61, "lr": 0.002, ...}     -> train/loss, train/lr, ... at step 20
    {"kind": "eval", "split": "dev", "task": "sst", "accuracy": 0.8}  -> dev/sst/accuracy
    {"kind": "test", "step": 40, "accuracy": 0.79}                    -> test/accuracy, test/step (the checkpoint's)
    {"kind": "stage", "split": "test", "task": "sst", ...}            -> stage/test/sst/accuracy

A tracker's step never goes back (W&B drops such records): a record of an earlier step than one
already logged (the final test, written for the best checkpoint's step) is logged at the latest
step, with its own step as ``<kind>/step``. The config (``TrainConfig.to_dict()``, as in
results.json) is stored once as the run's hyperparameters, lists and mappings as JSON strings.

Where each writes:
    tensorboard   <output_dir>/tensorboard/ (event files; a resumed run purges the events it logs again)
    wandb         W&B's own settings (WANDB_MODE=offline, WANDB_PROJECT, ...: project "sharelora" by
                  default), files under <output_dir>/wandb/; a resumed run is a new W&B run
    mlflow        MLflow's tracking store (MLFLOW_TRACKING_URI; MLflow's default is ./mlflow.db),
                  experiment "sharelora" (or MLFLOW_EXPERIMENT_NAME); a resumed run is a new MLflow run
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..extras import missing_modules, require

TRACKERS = ("tensorboard", "wandb", "mlflow")  # each is also the name of its pip extra
PROJECT = "sharelora"  # W&B project / MLflow experiment when the environment names none


def parse_report_to(value: str | Iterable[str] | None) -> list[str]:
    """``"none"`` -> [], ``"all"`` -> every tracker installed here, else the comma-separated names."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    names = [str(n).strip().lower() for n in items if str(n).strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [t for t in TRACKERS if not missing_modules(t)]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or "none" in names or "all" in names:
        raise ValueError(f"report_to {value!r}: choose none, all, or trackers among {', '.join(TRACKERS)} "
                         "(comma-separated, e.g. tensorboard,wandb)")
    return list(dict.fromkeys(names))


def check_installed(report_to: Iterable[str]) -> None:
    """MissingExtraError (one line naming the extra) for a tracker whose package is not installed."""
    for name in report_to:
        require(name, f"--report-to {name}")


def hyperparameters(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` with values every tracker stores: lists and mappings as JSON strings."""
    return {k: v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)
            for k, v in config.items()}


def metrics(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one ``log.jsonl`` record, named ``<kind>/[<split>/][<task>/]<metric>`` (module doc)."""
    kind = record.get("kind", "log")
    prefix = record.get("split", kind) if kind in ("eval", "test") else kind
    if kind == "stage":
        prefix = f"stage/{record.get('split', 'dev')}"
    if "task" in record:
        prefix = f"{prefix}/{record['task']}"
    skip = {"kind", "split", "task", "step"} | ({"stage"} if kind != "stage" else set())
    return {f"{prefix}/{k}": float(v) for k, v in record.items()
            if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The trackers of one run (rank 0): started at the first record, then fed every record."""

    def __init__(self, names: Iterable[str], run_name: str, output_dir: str | os.PathLike, config: dict[str, Any]):
        self.names = list(names)
        check_installed(self.names)
        self.run_name, self.output_dir, self.config = run_name, Path(output_dir), config
        self.trackers: list[Any] = []
        self.step = -1  # the latest step logged: a tracker's step never goes back
        self.started = False

    def _start(self, first_step: int) -> None:
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        made = {
            # purge_step: a resumed run drops the events of the interrupted one that it logs again
            "tensorboard": lambda: TensorBoardTracker("tensorboard", self.output_dir, purge_step=first_step),
            "wandb": lambda: WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=self.run_name,
                                          dir=str(self.output_dir)),
            "mlflow": lambda: MLflowTracker(os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT), run_name=self.run_name),
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            tracker = made[name]()
            tracker.start()
            tracker.store_init_configuration(hyperparameters(self.config))
            self.trackers.append(tracker)
        self.started = True

    def log(self, record: dict[str, Any]) -> None:
        """Send one ``log.jsonl`` record to every tracker."""
        values = metrics(record)
        step = int(record.get("step", max(self.step, 0)))
        if not self.started:
            self._start(step)
        if step < self.step:  # the final test of the best checkpoint: at the latest step, with its own
            values[f"{record.get('split', record.get('kind'))}/step"] = float(step)
            step = self.step
        self.step = step
        for tracker in self.trackers:
            tracker.log(values, step=step)

    def finish(self) -> None:
        """Flush and close every tracker (the run is over)."""
        for tracker in self.trackers:
            tracker.finish()
        self.trackers, self.started = [], False


def run_trackers(report_to: Iterable[str], run_name: str, output_dir: str | os.PathLike,
                 config: dict[str, Any]) -> Trackers | None:
    """``Trackers`` for a run, or None when it reports to none (``--report-to none``, the default)."""
    names = parse_report_to(report_to)
    return Trackers(names, run_name, output_dir, config) if names else None
