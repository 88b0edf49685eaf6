"""``sharelora bench --section mixed``: one forward over a batch whose rows use N distinct adapters.

A mixed batch gives every row its own adapter: ``model(**batch, adapter_names=[...])``, one name
per row. The libraries timed (``--libraries``):

    sharelora   ShareA adapters with ``task_share="A"``: one A per module type for every layer and
                task, so the routed layer computes ``u = x A^T`` once for all rows; each task owns its
                B's and the rows' B products are one batched product ``u_i (scaling B_{a(i)})^T``.
    core        ``task_share="AB", task_core="matrix"``: every task reads the same A and B and owns an
                r x r core per layer: ``x A^T`` and ``(.) B^T`` are one product each for the batch,
                only ``u_i C_{a(i)}^T`` is per row (an (n, T, r) x (r, r) bmm).
    core-diag   the same with ``task_core="diagonal"`` (``u_i * c_{a(i)}``).
    peft        PEFT LoRA's ``adapter_names`` path: per distinct adapter, ``B_a A_a x`` on that
                adapter's sub-batch, scattered back.

For each number N of distinct adapters (rows assigned round-robin: row i uses adapter i mod N):

    <lib>/single      one active adapter, no adapter_names (the fused single-adapter path)
    <lib>/names       adapter_names=[t0] * batch (every row one adapter, routed)
    <lib>/mixed-N     adapter_names round-robin over t0..t{N-1}
    base              the frozen base model

interleaved (every repetition runs every variant once, in an order rotated by one), and reports
each latency as a ratio to the same library's ``single`` within the repetition (paired), median
and p25-p75. Before timing, every N is checked: the mixed output of each row equals that row
computed with its adapter alone (set_adapter, no routing), for every library (for N above
``check_limit``, the adapters of an evenly spread ``check_limit`` of them), and the first ShareLoRA
library's mixed output equals PEFT's on every row (the PEFT adapters hold its update as A and
B C or B), so the bench cannot time a wrong computation.

Memory: N adapters take base + N x own + shared once (ShareLoRA) or base + N x own (PEFT), in
parameter bytes read from the models; the totals are checked against the tensors they hold.

``python -m sharelora.bench.mixed [flags]`` is ``sharelora bench --section mixed [flags]``.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from . import measure
from .methods import frozen_copy
from .models import build_base, fingerprint, make_inputs, resolve_spec

DEFAULT_ADAPTERS = (1, 2, 4, 8, 16)
LIBRARIES = ("sharelora", "core", "core-diag", "peft")
DEFAULT_LIBRARIES = ("sharelora", "core", "peft")
_TASK_CORE = {"core": "matrix", "core-diag": "diagonal"}


@dataclass
class MixedConfig:
    """What the mixed-batch section runs (defaults: the anchor of issue 12, item 8)."""

    model: str = "smollm2"
    weights: str = "shape"            # timing needs shapes only; "auto" / "real" as in the main bench
    overrides: dict = field(default_factory=dict)
    targets: list[str] | None = None  # default: the model's q and v projections
    batch: int = 16
    seq: int = 64
    adapters: tuple[int, ...] = DEFAULT_ADAPTERS
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.1              # inactive in eval; kept so the adapters are configured as trained
    reps: int = 15
    warmup: int = 2
    threads: int = 2
    device: str | None = None         # default: cuda when present, else cpu
    malloc: str = "retain"
    peft: bool = True                 # False drops "peft" from libraries
    seed: int = 0
    libraries: tuple[str, ...] = DEFAULT_LIBRARIES
    check_limit: int = 64             # above this N, check an evenly spread check_limit of the adapters alone
    peft_max_adapters: int = 256      # PEFT's add_adapter costs O(N) (1,024 adapters: ~1 h to build on 2 cores)

    def validate(self) -> None:
        unknown = [lib for lib in self.libraries if lib not in LIBRARIES]
        if unknown or not self.libraries:
            raise ValueError(f"libraries must be some of {', '.join(LIBRARIES)}, got {list(self.libraries)}")
        if self.check_limit < 1:
            raise ValueError(f"check_limit must be >= 1, got {self.check_limit}")
        if not self.adapters or any(n < 1 for n in self.adapters):
            raise ValueError(f"adapters must be positive counts of distinct adapters, got {list(self.adapters)}")
        if max(self.adapters) > self.batch:
            raise ValueError(f"{max(self.adapters)} distinct adapters need a batch of at least that many rows; "
                             f"the batch has {self.batch} (raise --batch or lower --adapters)")
        if self.reps < 1 or self.warmup < 0:
            raise ValueError(f"reps must be >= 1 and warmup >= 0, got reps={self.reps}, warmup={self.warmup}")


def adapter_name(i: int) -> str:
    return f"t{i}"


def round_robin(n_adapters: int, rows: int) -> list[str]:
    """Row i uses adapter ``t{i mod n}``: every adapter gets rows/n rows, spread over the batch."""
    return [adapter_name(i % n_adapters) for i in range(rows)]


# --- building -------------------------------------------------------------------------------------
def build_sharelora(base, targets, cfg: MixedConfig, count: int, library: str = "sharelora"):
    """ShareLoRA on ``base`` with ``count`` task-shared adapters t0..t{count-1}, random tensors (so each differs).

    ``library``: "sharelora" (ShareA, task_share "A": a B per task), "core" / "core-diag" (task_share
    "AB": one A and one B per module type for every task, an r x r / r core per task and layer).
    """
    from ..method import get_sharelora_model
    from ..training.methods import preset_config

    core = _TASK_CORE.get(library)

    def config():  # the method vocabulary's presets (ShareA; ShareAB with task cores), as train and multitask
        common = dict(rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=list(targets),
                      init_lora_weights=False)
        if core is None:
            return preset_config("sharea", task_share="A", **common)
        return preset_config("shareab", task_share="AB", task_core=core, **common)

    torch.manual_seed(cfg.seed + 1)
    model = get_sharelora_model(base, config(), adapter_name=adapter_name(0))
    for i in range(1, count):
        model.add_adapter(adapter_name(i), config())
    model.set_adapter(adapter_name(0))
    return model.eval()


def build_peft(base, targets, cfg: MixedConfig, count: int, sharelora_model):
    """PEFT LoRA on ``base`` with ``count`` adapters holding a ShareLoRA model's updates: A and B (B C with task
    cores), so the same function."""
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(targets),
                          bias="none", init_lora_weights=False)

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(base, config(), adapter_name=adapter_name(0))
        for i in range(1, count):
            model.add_adapter(adapter_name(i), config())
    inner = model.base_model.model
    bank = sharelora_model.sharelora_bank
    with torch.no_grad():
        for i in range(count):
            name = adapter_name(i)
            for module_name, ours in sharelora_model.sharelora_layers():
                A, B = ours.slots[name].down_and_up(bank)
                layer = inner.get_submodule(module_name)
                layer.lora_A[name].weight.copy_(A)
                layer.lora_B[name].weight.copy_(B)
    model.set_adapter(adapter_name(0))
    return model.eval()


# --- the calls that are timed ---------------------------------------------------------------------
def _forward(model, inputs: dict, adapter_names: list[str] | None = None):
    def run():
        with torch.inference_mode():
            if adapter_names is None:
                return model(**inputs).logits
            return model(**inputs, adapter_names=adapter_names).logits
    return run


def variants(base, libraries: dict, inputs: dict, adapters: tuple[int, ...]) -> dict[str, callable]:
    """{variant name: a forward returning logits}: base, then per library single, names, mixed-N."""
    rows = inputs["input_ids"].shape[0]
    out = {"base": _forward(base, inputs)}
    for lib, model in libraries.items():
        out[f"{lib}/single"] = _forward(model, inputs)
        out[f"{lib}/names"] = _forward(model, inputs, round_robin(1, rows))
        for n in adapters:
            if 1 < n <= held(model):
                out[f"{lib}/mixed-{n}"] = _forward(model, inputs, round_robin(n, rows))
    return out


def held(model) -> int:
    """How many adapters a ShareLoRA or PEFT model holds (a library with fewer than N is not run at N)."""
    configs = getattr(model, "sharelora_configs", None) or getattr(model, "peft_config", None)
    return len(configs) if configs is not None else 1 << 62  # another wrapper: assume it holds them all


def variant_of(lib: str, n: int) -> str:
    return f"{lib}/names" if n == 1 else f"{lib}/mixed-{n}"


# --- correctness ----------------------------------------------------------------------------------
# Two fp32 computations of the same function in another grouping (bmm over rows instead of one mm,
# a sub-batch instead of the batch) agree to rounding; a wrong row's adapter, a missing scaling or
# update is an O(1) relative error. The bound is relative to the largest logit.
REL_TOL = 1e-4


def _close(actual: torch.Tensor, expected: torch.Tensor) -> tuple[bool, float]:
    scale = expected.abs().max().item() or 1.0
    err = (actual - expected).abs().max().item() / scale
    return err <= REL_TOL, err


def _alone(lib: str, model, inputs: dict, name: str, rows: torch.Tensor) -> torch.Tensor:
    """Logits of ``rows`` with adapter ``name`` the only active one, no routing."""
    sub = {k: v.index_select(0, rows) for k, v in inputs.items()}
    model.set_adapter(name)
    try:
        return _forward(model, sub)()
    finally:
        model.set_adapter(adapter_name(0))


def checked_adapters(n: int, limit: int) -> list[int]:
    """Which of t0..t{n-1} are checked alone: all up to ``limit``, else ``limit`` evenly spread (first and last)."""
    if n <= limit:
        return list(range(n))
    return sorted({round(j * (n - 1) / (limit - 1)) for j in range(limit)}) if limit > 1 else [0]


def check_mixed(libraries: dict, inputs: dict, n: int, limit: int = 64) -> dict:
    """For N distinct adapters: each library's mixed output per row = the row's adapter alone; ShareLoRA = PEFT.

    Above ``limit`` adapters, ``limit`` of them (evenly spread) are run alone; the comparison with
    PEFT covers every row. Also checks that the rows of adapters other than t0 differ from t0's
    output by far more than the tolerance, so the routing is exercised (the adapters compute
    different functions). Raises AssertionError with the largest relative difference when a check fails.
    """
    rows = inputs["input_ids"].shape[0]
    names = round_robin(n, rows)
    device = inputs["input_ids"].device
    report: dict = {"adapters": n, "checked_alone": len(checked_adapters(n, limit))}
    mixed_out = {}
    for lib, model in libraries.items():
        if held(model) < n:
            continue
        mixed = _forward(model, inputs, names)()
        mixed_out[lib] = mixed
        worst = 0.0
        for i in checked_adapters(n, limit):
            idx = torch.tensor([r for r in range(rows) if names[r] == adapter_name(i)], device=device)
            ok, err = _close(mixed.index_select(0, idx), _alone(lib, model, inputs, adapter_name(i), idx))
            worst = max(worst, err)
            if not ok:
                raise AssertionError(f"{lib}: rows of adapter {adapter_name(i)} in a batch of {n} distinct adapters "
                                     f"differ from that adapter alone by {err:.3g} (relative to max |logit|; "
                                     f"tolerance {REL_TOL:g})")
        report[f"{lib}_max_rel_diff_to_alone"] = worst
        if n > 1:
            single = _forward(model, inputs)()
            other = torch.tensor([r for r in range(rows) if names[r] != adapter_name(0)], device=device)
            _, spread = _close(mixed.index_select(0, other), single.index_select(0, other))
            if spread <= 100 * REL_TOL:
                raise AssertionError(f"{lib}: adapters t1..t{n - 1} give nearly t0's output ({spread:.3g}); "
                                     "the check would not see a row routed to the wrong adapter")
            report[f"{lib}_rel_diff_between_adapters"] = spread
    mirrored = next((lib for lib in libraries if lib != "peft"), None)
    if "peft" in mixed_out and mirrored in mixed_out:
        ok, err = _close(mixed_out["peft"], mixed_out[mirrored])
        if not ok:
            raise AssertionError(f"{mirrored}'s and PEFT's mixed outputs for {n} adapters differ by {err:.3g} "
                                 f"(tolerance {REL_TOL:g}) although they hold the same weights")
        report[f"{mirrored}_vs_peft_max_rel_diff"] = err
    return report


# --- memory -----------------------------------------------------------------------------------------
def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def memory_rows(base, libraries: dict, counts: tuple[int, ...]) -> dict:
    """Parameter bytes of N adapters: base + N x own + shared once; checked against the tensors the models hold."""
    base_bytes = _unique_bytes(base.parameters())
    out: dict = {"base_bytes": base_bytes}
    per_adapter: dict[str, tuple[int, int]] = {}
    for lib, model in libraries.items():
        if lib == "peft":
            lora = [p for n, p in model.named_parameters() if "lora_" in n]
            held_bytes = _unique_bytes(lora)
            own = _unique_bytes(p for n, p in model.named_parameters()
                                if "lora_" in n and n.endswith(f".{adapter_name(0)}.weight"))
            if held_bytes != held(model) * own:
                raise AssertionError(f"PEFT holds {held_bytes} adapter bytes, not {held(model)} x own {own}")
            per_adapter[lib] = (own, 0)
            out.update(peft_own_bytes=own, peft_held_bytes=held_bytes)
            continue
        report = model.parameter_report()
        element = next(iter(model.sharelora_bank.values())).element_size()
        own = report["adapters"][adapter_name(0)]["own_parameters"] * element
        shared = report["task_shared_parameters"] * element
        held_bytes = _unique_bytes(model.sharelora_bank.values())
        if held_bytes != shared + held(model) * own:
            raise AssertionError(f"{lib} holds {held_bytes} adapter bytes, not shared {shared} + {held(model)} x own "
                                 f"{own}")
        per_adapter[lib] = (own, shared)
        out.update({f"{lib}_own_bytes": own, f"{lib}_shared_bytes": shared, f"{lib}_held_bytes": held_bytes})
    out["libraries"] = list(libraries)
    out["rows"] = []
    for n in counts:
        row = {"adapters": n}
        for lib, (own, shared) in per_adapter.items():
            row[f"{lib}_adapter_bytes"] = shared + n * own
            row[f"{lib}_total_bytes"] = base_bytes + shared + n * own
        out["rows"].append(row)
    return out


# --- the run ------------------------------------------------------------------------------------------
def run_mixed(cfg: MixedConfig, log=print) -> dict:
    """Build, check every N, time every variant interleaved; a JSON-able result dict."""
    from .run import _load, machine_info, retain_freed_memory

    cfg.validate()
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(cfg.threads)
    malloc = "glibc, freed memory retained (mallopt)" if cfg.malloc == "retain" and retain_freed_memory() else "default"
    spec = resolve_spec(cfg.model, "causal-lm", cfg.targets, cfg.batch, cfg.seq, cfg.overrides)
    base, weights_used, note = build_base(spec, cfg.weights)
    base.to(device).eval()
    for p in base.parameters():
        p.requires_grad_(False)
    batch = make_inputs(spec, base.get_input_embeddings().num_embeddings, seed=cfg.seed, device=device)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    loaded = max(cfg.adapters)
    wanted = [lib for lib in cfg.libraries if lib != "peft" or cfg.peft]
    log(f"[mixed] {spec.name} ({weights_used} weights), batch {spec.batch} x {spec.seq}, targets {list(spec.targets)}, "
        f"r={cfg.rank}, {loaded} adapters per library ({', '.join(wanted)}), {cfg.threads} threads, {device}")

    libraries, build_s = {}, {}
    for lib in wanted:
        if lib != "peft":
            start = time.perf_counter()
            libraries[lib] = build_sharelora(frozen_copy(base), spec.targets, cfg, loaded, lib)
            build_s[lib] = time.perf_counter() - start
    peft_note = None
    if "peft" in wanted:
        mirror = next(iter(libraries.values()), None) or build_sharelora(frozen_copy(base), spec.targets, cfg, loaded)
        try:
            start = time.perf_counter()
            libraries["peft"] = build_peft(frozen_copy(base), spec.targets, cfg, min(loaded, cfg.peft_max_adapters),
                                           mirror)
            build_s["peft"] = time.perf_counter() - start
        except ImportError as e:
            peft_note = f"PEFT not run ({e})"
            log(f"[mixed] {peft_note}")
        if "peft" in libraries and held(libraries["peft"]) < loaded:
            peft_note = (f"PEFT holds {held(libraries['peft'])} adapters (peft_max_adapters): its add_adapter walks "
                         "every adapter, so building 1,024 would take ~1 h on this machine; larger N are not run")
            log(f"[mixed] {peft_note}")
    log(f"[mixed] built {loaded} adapters: " + ", ".join(f"{k} {v:.0f} s" for k, v in build_s.items()))

    checks = [check_mixed(libraries, inputs, n, cfg.check_limit) for n in cfg.adapters]
    log(f"[mixed] checked: mixed rows = each adapter alone, for N in {list(cfg.adapters)}")

    calls = {name: measure.Call(fn) for name, fn in variants(base, libraries, inputs, cfg.adapters).items()}
    load_before = _load()
    extra: dict = {}
    samples = measure.interleaved(calls, cfg.reps, cfg.warmup, device, extra)
    cpu = extra["cpu_s"]
    load_after = _load()
    log(f"[mixed] timed {len(calls)} variants x {cfg.reps} interleaved repetitions")

    rows = []
    for lib in libraries:
        single = f"{lib}/single"
        for n, v in [(1, single)] + [(n, variant_of(lib, n)) for n in cfg.adapters if n <= held(libraries[lib])]:
            row = {"library": lib, "adapters": n, "variant": v, "latency_s": measure.summary(samples[v]),
                   "ratio_to_single": measure.paired_ratio(samples, v, single),
                   "ratio_to_single_cpu": measure.paired_ratio(cpu, v, single),
                   "ratio_to_base": measure.paired_ratio(samples, v, "base")}
            if lib != "peft" and "peft" in libraries and v.replace(f"{lib}/", "peft/", 1) in samples:
                row["ratio_to_peft"] = measure.paired_ratio(samples, v, v.replace(f"{lib}/", "peft/", 1))
            rows.append(row)

    return {
        "command": None,  # filled in by the command line
        "section": "mixed",
        "config": {**asdict(cfg), "adapters": list(cfg.adapters)},
        "machine": {**machine_info(device, cfg.threads), "allocator": malloc},
        "model": spec.name,
        "weights": weights_used,
        "weights_note": note,
        "peft_note": peft_note,
        "spec": spec.to_dict(),
        "inputs": fingerprint(batch),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "base_forward_s": measure.summary(samples["base"]),
        "checks": checks,
        "rows": rows,
        "samples_s": samples,
        "cpu_samples_s": cpu,
        "memory": memory_rows(base, libraries, cfg.adapters),
        "build_s": build_s,
    }


# --- the report -----------------------------------------------------------------------------------
def _ms(s: dict) -> str:
    return f"{1e3 * s['median']:.1f} ({1e3 * s['p25']:.1f}–{1e3 * s['p75']:.1f})"


def _ratio(r: dict | None) -> str:
    return "—" if not r else f"{r['median']:.3f} ({r['p25']:.3f}–{r['p75']:.3f})"


def _mib(n: int | None) -> str:
    if n is None:
        return "—"
    return f"{n / 2**20:.2f}" if n >= 2**20 / 10 else f"{n / 2**20:.4f}"  # a task's cores: KiB, not 0.00


_HOW = {"single": "one active adapter, no adapter_names", "names": "adapter_names = [t0] x batch"}
_WHAT = {"sharelora": "ShareA, task_share=\"A\" (shared A, a B per task and layer)",
         "core": "task_share=\"AB\", task_core=\"matrix\" (shared A and B, an r x r core per task and layer)",
         "core-diag": "task_share=\"AB\", task_core=\"diagonal\" (an r-vector core per task and layer)",
         "peft": "PEFT LoRA, adapter_names (a sub-batch per adapter)"}


def markdown(results: dict) -> str:
    """The latency table (ratios paired within repetitions) and the memory table."""
    spec, m, cfg = results["spec"], results["machine"], results["config"]
    libs = results["memory"]["libraries"]
    head = (f"#### mixed batch: {spec['name']} ({results['weights']} weights), batch {spec['batch']} x {spec['seq']}, "
            f"r={cfg['rank']} on {', '.join(spec['targets'])}, inference, {m['torch_threads']} threads, {m['device']}, "
            f"{cfg['reps']} interleaved repetitions")
    legend = "; ".join(f"`{lib}`: {_WHAT[lib]}" for lib in libs)
    cols = ["library", "distinct adapters", "call", "forward ms, median (p25–p75)", "× one adapter (same library)",
            "× one adapter, CPU time", "× base", "× PEFT, same N"]
    if results.get("peft_note"):
        legend += f". {results['peft_note']}"
    lines = [head, "", legend, "", "| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|",
             f"| base | 0 | frozen base model | {_ms(results['base_forward_s'])} | — | — | 1 | — |"]
    for r in results["rows"]:
        kind = r["variant"].split("/", 1)[1]
        how = _HOW.get(kind, f"adapter_names round-robin over {r['adapters']}")
        ratios = [r["ratio_to_single"], r["ratio_to_single_cpu"], r["ratio_to_base"], r.get("ratio_to_peft")]
        lines.append(f"| {r['library']} | {r['adapters']} | {how} | {_ms(r['latency_s'])} | "
                     + " | ".join(_ratio(x) for x in ratios) + " |")
    mem = results["memory"]
    per = "; ".join(f"{lib} per adapter {_mib(mem.get(f'{lib}_own_bytes'))} own"
                    + (f" + {_mib(mem[f'{lib}_shared_bytes'])} shared once" if lib != "peft" else "") for lib in libs)
    lines += ["", f"Parameter memory (MiB): base {_mib(mem['base_bytes'])}; {per}", "",
              "| adapters | " + " | ".join(f"{lib} adapters | {lib} total" for lib in libs) + " |",
              "|---|" + "---|---|" * len(libs)]
    for r in mem["rows"]:
        lines.append(f"| {r['adapters']} | " + " | ".join(
            f"{_mib(r[f'{lib}_adapter_bytes'])} | {_mib(r[f'{lib}_total_bytes'])}" for lib in libs) + " |")
    worst = max((v for c in results["checks"] for k, v in c.items() if k.endswith("max_rel_diff_to_alone")), default=0)
    sampled = [f"{c['checked_alone']} of {c['adapters']}" for c in results["checks"]
               if c["checked_alone"] < c["adapters"]]
    peft = next((k.split("_vs_peft")[0] for c in results["checks"] for k in c if k.endswith("_vs_peft_max_rel_diff")),
                None)
    lines += ["", f"Checked before timing, for every N: mixed rows = each adapter alone (largest difference "
                  f"{worst:.1e} of max |logit|, tolerance {REL_TOL:g}"
                  + (f"; adapters run alone: {', '.join(sampled)}, evenly spread" if sampled else "") + ")"
                  + (f"; {peft}'s mixed output = PEFT's on the same weights, every row." if peft else ".")]
    return "\n".join(lines) + "\n"


def config_from_bench_args(args) -> MixedConfig:
    """The section's config from ``sharelora bench`` flags (unset flags take this section's defaults)."""
    models = args.models or ["smollm2"]
    if len(models) != 1:
        raise ValueError(f"--section mixed runs one model, got --models {','.join(models)}")
    d = MixedConfig()
    return MixedConfig(model=models[0], weights=args.weights or d.weights, overrides=args.shape,
                       targets=args.targets, batch=args.batch or d.batch, seq=args.seq or d.seq,
                       adapters=tuple(args.adapters or d.adapters), rank=args.rank, alpha=args.alpha,
                       dropout=args.dropout, reps=args.reps or d.reps, warmup=args.warmup,
                       threads=args.threads or d.threads, device=args.device, malloc=args.malloc,
                       libraries=tuple(getattr(args, "libraries", None) or d.libraries))
