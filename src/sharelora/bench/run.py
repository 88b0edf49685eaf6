"""``run_bench``: every method on every model, timed in one interleaved run with one batch."""

from __future__ import annotations

import datetime
import os
import platform
from dataclasses import asdict, dataclass, field

import torch

from . import measure
from .memory import measure_in_subprocess
from .methods import INFERENCE_METHODS, METHODS, AdapterSettings, prepare
from .models import build_base, fingerprint, make_inputs, resolve_spec

DEFAULT_MODELS = ("minilm", "smollm2")


@dataclass
class BenchConfig:
    """What ``sharelora bench`` runs. ``batch`` / ``seq`` / ``targets`` override every model's defaults."""

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    weights: str = "auto"              # "auto" (real when available), "real" or "shape"
    task: str | None = None            # for models that are not built in
    targets: list[str] | None = None
    qkv_targets: list[str] | None = None
    batch: int | None = None
    seq: int | None = None
    overrides: dict = field(default_factory=dict)  # config fields, e.g. {"num_hidden_layers": 2}
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1
    reps: int = 7
    warmup: int = 2
    inference: bool = True
    inference_reps: int | None = None  # default: 2 x reps (forwards are cheap)
    memory: bool = True
    memory_steps: int = 3
    device: str | None = None          # default: cuda when present, else cpu
    threads: int | None = None         # torch threads; default: every core
    malloc: str = "retain"             # "retain": glibc keeps freed memory (no page faults); "default"
    seed: int = 0

    def settings(self) -> AdapterSettings:
        return AdapterSettings(rank=self.rank, alpha=self.alpha, dropout=self.dropout)


def _cpu_dropout_kernel(device: torch.device) -> str | None:
    """Which form of the adapter's CPU dropout mask the ShareLoRA methods use (None off CPU)."""
    if device.type != "cpu":
        return None
    from ..method import cpu_kernel

    return "compiled kernel" if cpu_kernel.get() is not None else "torch operators (kernel not built)"


def machine_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": threads,
        "device": str(device),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import peft

        info["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory instead of returning it to the OS; False if not glibc.

    By default glibc unmaps large freed blocks and trims the heap, so the next step faults the
    same memory back in (~14,000 page faults per MiniLM step here). How many faults a step takes
    then depends on which method ran before it (a method after a bigger one finds memory already
    mapped), which is noise for an interleaved comparison. Keeping the memory mapped removes it
    for every method alike; it is what jemalloc / tcmalloc or MALLOC_TRIM_THRESHOLD_ do for
    CPU training too.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        m_trim_threshold, m_mmap_max = -1, -4
        return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bench_model(name: str, cfg: BenchConfig, device: torch.device, threads: int, log=print) -> dict:
    """Build ``name``, prepare every method on it, time, measure; one result dict."""
    spec = resolve_spec(name, cfg.task, cfg.targets, cfg.batch, cfg.seq, cfg.overrides)
    if cfg.qkv_targets:
        spec.qkv_targets = tuple(cfg.qkv_targets)
    base, weights_used, note = build_base(spec, cfg.weights)
    base.to(device)
    vocab = base.get_input_embeddings().num_embeddings
    batch = make_inputs(spec, vocab, seed=cfg.seed, device=device)
    log(f"[{spec.name}] {weights_used} weights, batch {spec.batch} x {spec.seq}, "
        f"targets {list(spec.targets)}, methods {cfg.methods}")

    prepared, errors = {}, {}
    for m in cfg.methods:
        try:
            prepared[m] = prepare(m, base, spec, cfg.settings())
        except Exception as e:  # noqa: BLE001 - a method that cannot be built is reported, not fatal
            errors[m] = f"{type(e).__name__}: {e}"
            log(f"[{spec.name}] {m}: not run ({errors[m]})")

    load_before = _load()
    train_extra: dict = {}
    train = measure.time_training(prepared, batch, cfg.reps, cfg.warmup, device, train_extra)
    log(f"[{spec.name}] training timed ({cfg.reps} interleaved repetitions)")
    infer = {}
    if cfg.inference and any(m in INFERENCE_METHODS for m in prepared):
        infer = measure.time_inference(base, {m: p for m, p in prepared.items() if m in INFERENCE_METHODS},
                                       batch, cfg.inference_reps or 2 * cfg.reps, cfg.warmup, device)
        log(f"[{spec.name}] inference timed")
    load_after = _load()

    memory = {}
    if cfg.memory:
        for m in prepared:
            job = {"spec": spec.to_dict(), "method": m, "weights": weights_used, "settings": asdict(cfg.settings()),
                   "steps": cfg.memory_steps, "device": str(device), "threads": threads, "seed": cfg.seed}
            memory[m] = measure_in_subprocess(job)
        log(f"[{spec.name}] peak memory measured ({len(memory)} processes)")

    rows = []
    for m, p in prepared.items():
        row = {
            "method": m,
            "trainable_parameters": p.trainable,
            "expected_trainable_parameters": p.expected_trainable,
            "step_s": measure.summary(train[m]),
            "step_samples_s": train[m],
            "step_cpu_s": measure.summary(train_extra["cpu_s"][m]),
            "ratio_to_floor_cpu": measure.paired_ratio(train_extra["cpu_s"], m, "floor"),
            "minor_page_faults_per_step": measure.summary(train_extra["minor_faults"][m])["median"],
            "ratio_to_floor": measure.paired_ratio(train, m, "floor"),
            "ratio_to_peft_lora": measure.paired_ratio(train, m, "peft-lora"),
            "optimizer_state_bytes": p.optimizer_state_bytes(),
            "adapter_file_bytes": measure.adapter_file_bytes(p) if m != "floor" else None,
            "adapter_expected_bytes": p.trainable * p.params[0].element_size() if p.params else 0,
            "inputs": sorted(set(p.seen_inputs)),
            "notes": p.notes,
        }
        if m in memory:
            row["memory"] = memory[m]
        if f"{m}/unmerged" in infer:
            row["inference"] = {
                "unmerged_ratio_to_base": measure.paired_ratio(infer, f"{m}/unmerged", "base"),
                "merged_ratio_to_base": measure.paired_ratio(infer, f"{m}/merged", "base"),
                "unmerged_s": measure.summary(infer[f"{m}/unmerged"]),
                "merged_s": measure.summary(infer[f"{m}/merged"]),
            }
        rows.append(row)
    return {
        "model": spec.name,
        "weights": weights_used,
        "weights_note": note,
        "spec": spec.to_dict(),
        "inputs": fingerprint(batch),
        "base_forward_s": measure.summary(infer["base"]) if "base" in infer else None,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "errors": errors,
        "methods": rows,
    }


def run_bench(cfg: BenchConfig, log=print) -> dict:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(METHODS)}")
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = cfg.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    if cfg.malloc not in ("retain", "default"):
        raise ValueError(f"malloc must be 'retain' or 'default', got {cfg.malloc!r}")
    malloc = "glibc, freed memory retained (mallopt)" if cfg.malloc == "retain" and retain_freed_memory() else "default"
    settings = asdict(cfg)
    results = {
        "command": None,  # filled in by the command line
        "config": settings,
        "machine": {**machine_info(device, threads), "allocator": malloc,
                    "cpu_dropout_kernel": _cpu_dropout_kernel(device)},
        "models": [bench_model(name, cfg, device, threads, log) for name in cfg.models],
    }
    return results
