"""Measurements: interleaved step timing, interleaved inference latency, adapter file size.

Timings are interleaved (each repetition runs every method once, in an order rotated by one
per repetition) so that a change in machine load hits every method alike; each method's ratio
to a reference is taken within a repetition (paired) and summarised by its median and spread.
"""

from __future__ import annotations

import gc
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .models import fingerprint


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Call:
    """What one sample runs: ``timed`` is timed; ``setup`` / ``teardown`` (e.g. merge / unmerge) are not."""

    timed: Callable[[], None]
    setup: Callable[[], None] | None = None
    teardown: Callable[[], None] | None = None

    def __call__(self, device: torch.device) -> tuple[float, float, int]:
        """(wall seconds, CPU seconds of this process, minor page faults) of one ``timed`` call."""
        if self.setup:
            self.setup()
        _sync(device)
        f0 = _minor_faults()
        c0, t0 = time.process_time(), time.perf_counter()
        self.timed()
        _sync(device)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        faults = _minor_faults() - f0
        if self.teardown:
            self.teardown()
        return dt, dc, faults


def rotations(names: list[str], reps: int) -> list[list[str]]:
    """The run order of each repetition: A B C, B C A, C A B, ... (every position equally often)."""
    n = len(names)
    return [[names[(i + r) % n] for i in range(n)] for r in range(reps)]


def interleaved(calls: dict[str, Call], reps: int, warmup: int, device: torch.device,
                extra: dict[str, dict[str, list]] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each call, ``reps`` samples each, interleaved A B C, B C A, ... after ``warmup`` rounds.

    When ``extra`` is given, ``extra["cpu_s"][name]`` and ``extra["minor_faults"][name]`` receive
    each sample's process CPU seconds and page faults. Python's garbage collector is paused while
    timing (a collection would land on a random method).
    """
    names = list(calls)
    for _ in range(warmup):
        for n in names:
            calls[n](device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    faults: dict[str, list[int]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for order in rotations(names, reps):
            for n in order:
                wall, c, f = calls[n](device)
                samples[n].append(wall)
                cpu[n].append(c)
                faults[n].append(f)
    finally:
        if gc_was_enabled:
            gc.enable()
    if extra is not None:
        extra["cpu_s"] = cpu
        extra["minor_faults"] = faults
    return samples


def summary(values: list[float]) -> dict:
    """median, quartiles, min, max and relative spread ((p75 - p25) / median) of a sample."""
    v = sorted(values)
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    med = statistics.median(v)
    return {"median": med, "p25": q[0], "p75": q[2], "min": v[0], "max": v[-1],
            "rel_iqr": (q[2] - q[0]) / med if med else 0.0, "n": len(v)}


def paired_ratio(samples: dict[str, list[float]], name: str, ref: str) -> dict | None:
    """The ratio name / ref within each repetition, summarised (None when ref was not run)."""
    if ref not in samples or name not in samples:
        return None
    return summary([a / b for a, b in zip(samples[name], samples[ref])])


def time_training(prepared: dict, batch: dict, reps: int, warmup: int, device: torch.device,
                  extra: dict | None = None) -> dict[str, list[float]]:
    """Training step (forward + backward + AdamW step) of every method, interleaved, same batch."""
    fp = fingerprint(batch)
    calls = {}
    for name, p in prepared.items():
        p.seen_inputs.append(fp)
        calls[name] = Call(lambda p=p: p.step(batch))
    return interleaved(calls, reps, warmup, device, extra)


def time_inference(base, prepared: dict, batch: dict, reps: int, warmup: int,
                   device: torch.device) -> dict[str, list[float]]:
    """Forward latency (eval, no grad) of the base model and of each adapter unmerged and merged.

    Keys: "base", "<method>/unmerged", "<method>/merged". A merged sample merges before and
    unmerges after its forward, outside the timed region.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def forward(model):
        def run():
            with torch.no_grad():
                model(**inputs)
        return run

    calls = {"base": Call(forward(base))}
    for name, p in prepared.items():
        if p.merge is None:
            continue
        calls[f"{name}/unmerged"] = Call(forward(p.model))
        calls[f"{name}/merged"] = Call(forward(p.model), setup=p.merge, teardown=p.unmerge)
    base.eval()
    for p in prepared.values():
        p.model.eval()
    try:
        return interleaved(calls, reps, warmup, device)
    finally:
        for p in prepared.values():
            p.model.train()


def adapter_file_bytes(p) -> int | None:
    """Size of the file the method saves (adapter, or all weights for full fine-tuning)."""
    if p.save is None:
        return None
    with tempfile.TemporaryDirectory(prefix="sharelora-bench-") as d:
        path = p.save(Path(d))
        return path.stat().st_size if path is not None and path.exists() else None
