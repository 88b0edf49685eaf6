"""Peak training memory of one method, measured in a fresh process.

Peak RSS is a per-process high-water mark, so methods timed side by side in one process cannot
be told apart by it; each method therefore gets its own process that builds the model, takes a
few training steps and reports:

    rss_after_build_bytes   resident memory once the model and optimizer exist
    peak_rss_bytes          peak resident memory during the steps (the kernel's VmHWM, reset after
                            the build where Linux allows it, else the process's lifetime peak)
    cuda_peak_bytes         torch.cuda.max_memory_allocated during the steps (CUDA only)

Run as ``python -m sharelora.bench.memory '<json job>'``; it prints one JSON line.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import subprocess
import sys

import torch

from ..training.logs import reset_peak_rss as _reset_peak_rss  # one home for the VmHWM reset


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(job: dict) -> dict:
    from .methods import AdapterSettings, prepare
    from .models import ModelSpec, build_base, make_inputs

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    spec = ModelSpec.from_dict(job["spec"])
    base, _, _ = build_base(spec, job["weights"])
    base.to(device)
    vocab = base.get_input_embeddings().num_embeddings
    p = prepare(job["method"], base, spec, AdapterSettings(**job["settings"]))
    if job["method"] == "full":
        del base  # full fine-tuning owns a copy; the frozen original is not part of its footprint
    batch = make_inputs(spec, vocab, seed=job["seed"], device=device)
    gc.collect()
    out = {"method": job["method"], "rss_after_build_bytes": _rss_bytes(), "peak_is_since_build": _reset_peak_rss()}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        out["cuda_allocated_after_build_bytes"] = torch.cuda.memory_allocated(device)
    for _ in range(job["steps"]):
        p.step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated(device)
    out["peak_rss_bytes"] = _peak_rss_bytes()
    return out


def measure_in_subprocess(job: dict, timeout: float = 1800) -> dict:
    """Run ``measure(job)`` in a fresh Python process and return its result (or {"error": ...})."""
    cmd = [sys.executable, "-m", "sharelora.bench.memory", json.dumps(job)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"method": job["method"], "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
