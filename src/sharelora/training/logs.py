"""The run's record: a JSONL metrics log, a PNG of its curves, and resource measurements.

Each line of ``log.jsonl`` is one JSON object with a ``"kind"``:
    {"kind": "train", "step", "epoch", "loss", "lr", "grad_norm", "examples_per_s", "elapsed_s"}
    {"kind": "eval", "split": "dev", "step", "epoch", <metrics>, "loss"}
    {"kind": "test", "split": "test", "step", <metrics>, "loss"}   (the best checkpoint)
A multi-task run (multitask.py) adds ``"task"`` (and ``"stage"``) to its eval and test records and
writes ``{"kind": "stage", "stage", "task", "split", "step", <metrics>}`` after each stage.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

from .state import atomic_write_text


class JsonlLog:
    """Append-only JSONL file, flushed per record so a killed run keeps what it logged.

    ``trackers`` (trackers.py, ``--report-to``): every record appended also goes to them; ``close``
    finishes them when the run is over.
    """

    def __init__(self, path: Path, trackers: Any = None):
        self.path = Path(path)
        self.trackers = trackers

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        """Finish the trackers (the file itself needs nothing: each record was flushed)."""
        if self.trackers is not None:
            self.trackers.finish()

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short by a kill: drop it
                continue
        return out

    def truncate_after(self, step: int, finished_stages: int = 0) -> None:
        """Drop records logged after ``step``, any final test record and the "stage" records of stages after
        the first ``finished_stages``: a resumed run logs them again."""
        kept = [r for r in self.records() if r.get("step", 0) <= step and r.get("kind") != "test"
                and not (r.get("kind") == "stage" and r.get("stage", 0) >= finished_stages)]
        atomic_write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))


def plot_curves(records: list[dict[str, Any]], path: Path, metric: str, title: str = "") -> None:
    """PNG with two panels: training loss per logged step, and the dev metric per evaluation.

    A multi-task run's ``"eval"`` records carry a ``"task"``: one dev curve per task, and a dashed
    line where each stage of a continual run ended (``"stage"`` records).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("kind") == "train"]
    dev = [r for r in records if r.get("kind") == "eval" and r.get("split") == "dev"]
    tasks = list(dict.fromkeys(r.get("task") for r in dev))
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", label="train loss")
    if dev and tasks == [None] and all("loss" in r for r in dev):
        ax_loss.plot([r["step"] for r in dev], [r["loss"] for r in dev], "o-", color="tab:orange", label="dev loss")
    for task in tasks:
        rows = [r for r in dev if r.get("task") == task]
        ax_dev.plot([r["step"] for r in rows], [r.get(metric, float("nan")) for r in rows], "o-", label=task)
    for step in sorted({r["step"] for r in records if r.get("kind") == "stage"})[:-1]:
        for ax in (ax_loss, ax_dev):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8)
    for ax, label in ((ax_loss, "loss"), (ax_dev, f"dev {metric}")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_loss.legend()
    if tasks and tasks != [None]:
        ax_dev.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- resources -----------------------------------------------------------------------------------
def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (since start, or since ``reset_peak_rss``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def directory_bytes(path: Path) -> int:
    """Total size of the files in a directory (an adapter's size on disk)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def environment() -> dict[str, Any]:
    """Versions and machine facts for results.json."""
    import platform

    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        from importlib.metadata import version

        info["sharelora"] = version("sharelora")
    except Exception:  # not installed as a distribution (running from a source tree)
        info["sharelora"] = None
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info
