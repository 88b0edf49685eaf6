"""Benchmark of many adapters on demand: ``python -m sharelora.serve.bench_ondemand`` (docs/SERVING.md).

``--adapters`` task-shared rank-``--rank`` adapters (one task group: one shared A, each its own B),
each saved alone in a directory of an adapter root (each directory carries its copy of the basis,
as adapters saved one by one do), served from one base model by ``sharelora serve``'s app (uvicorn,
the routes, the ``AdapterPool``) and called with the official openai client. Scenarios, one server
each (its own copy of the base model), all in one process:

* ``N resident`` for each N of ``--sizes``: the N adapters are loaded before timing (a 1-token
  request each); the timed requests go round-robin over them (request i uses adapter
  (offset + i) mod N, the offset moving by ``--requests`` each repetition);
* ``N on demand, --max-adapters B`` (N = the largest size): nothing loaded before timing, at most B
  resident; round-robin over N > B adapters makes every timed request a cold load (and an eviction
  once B are resident): the worst case for an LRU cache;
* scoring: ``--score-prompts`` long prompts scored through the server (``echo``, ``max_tokens: 0``,
  ``logprobs: 1``) against the offline forward (``log_softmax`` of the same adapter's logits, one
  prompt at a time, no server).

Repetitions are **interleaved**: each of ``--reps`` rounds runs every scenario once, in an order
rotated by one each round, so a slow minute of a shared machine falls on every scenario alike.
Each timed scenario is ``--requests`` completions of exactly ``--new-tokens`` tokens (end-of-sequence
ignored, greedy) from ``--clients`` client threads. Tokens/s = generated tokens / wall time; latency
per request, from the call to the answer (a cold load included).

Memory, per N, each in a fresh subprocess (so RSS belongs to that N alone): RSS after loading the base
model and after loading N adapters; the adapter tensor bytes (own tensors of each, the shared basis
once); against PEFT's N x LoRA (the same adapters as standard LoRA: every layer its A and B).

Forward steps: the models of the resident scenarios take turns, one decode step each (a batch of
``--clients`` rows, round-robin over their adapters), ``--step-rounds`` times: the step's time
alone, interleaved at the finest grain, where the end-to-end rows carry the machine's noise.

Cold-load latency by adapter size: ``--load-ranks`` adapters of growing rank, ``--load-count`` of each,
requested one after another on a server with ``--max-adapters 4`` (every load also evicts): the pool's
load time (read, make room, add to the model) and the request's latency, against a warm request.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .bench import _cpus, make_prompts, p50_p95, threaded_calls

GROUP = "bench"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --- adapters on disk ------------------------------------------------------------------------------------
def build_task_adapters(base, root: Path, names: list[str], rank: int, targets: list[str], seed: int = 0) -> dict:
    """Task-shared adapters ``names``, each in ``root/<name>`` (its copy of the shared A, its own B; B
    scaled so that the model still writes text). Returns the tensor bytes of one: its own, the shared
    basis, and the same adapter as standard PEFT LoRA (every layer its own A and B)."""
    import torch

    from ..method import ShareLoraConfig, checkpoint, get_sharelora_model

    torch.manual_seed(seed)
    config = ShareLoraConfig(rank=rank, alpha=2 * rank, share="A", task_share="A", task_group=GROUP,
                             target_modules=list(targets), init_lora_weights=False)
    model = get_sharelora_model(base, config, adapter_name="proto")
    state = {k: v.detach().clone() for k, v in model.adapter_state_dict("proto").items()}
    saved = model.sharelora_configs["proto"]
    shared_keys = {k.split("/", 1)[1] for k in model.plans["proto"].shared_tensors()}
    model.unload()
    g = torch.Generator().manual_seed(seed + 1)
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        tensors = {k: (torch.randn(v.shape, generator=g) * v.std() * 0.05 if k.endswith("lora_B") else v)
                   for k, v in state.items()}
        checkpoint.save_adapter(root / name, saved, tensors)
    own = sum(v.numel() * 4 for k, v in state.items() if k not in shared_keys)
    shared = sum(v.numel() * 4 for k, v in state.items() if k in shared_keys)
    return {"own_bytes": own, "shared_bytes": shared, "peft_lora_bytes": peft_lora_bytes(base, rank, targets)}


def peft_lora_bytes(base, rank: int, targets: list[str]) -> int:
    """Tensor bytes of one standard LoRA adapter (fp32) of ``rank`` on ``targets`` of ``base``."""
    import torch

    names = tuple(targets)
    total = 0
    for name, module in base.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in names:
            total += rank * (module.in_features + module.out_features) * 4
    return total


# --- a server in this process ----------------------------------------------------------------------------
class _Server:
    def __init__(self, served, root: Path, max_adapters: int | None, max_batch: int, label: str):
        import uvicorn

        from .app import create_app
        from .launch import bind
        from .scheduler import Scheduler
        from .settings import Settings

        settings = Settings(model=served.name, adapter_root=str(root), max_adapters=max_adapters,
                            max_batch=max_batch, max_queue=10_000)
        self.label = label
        self.served = served
        self.scheduler = Scheduler(served, max_batch=max_batch, max_queue=10_000)
        self.app = create_app(served, self.scheduler, settings)
        self.pool = self.app.state.adapters
        self.sock = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        from openai import OpenAI

        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1", api_key="none",
                             max_retries=0, timeout=3600)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def _generate(server: _Server, prompts: list[str], names: list[str], new_tokens: int, clients: int) -> dict:
    def call(job):
        prompt, model = job
        t0 = time.perf_counter()
        r = server.client.completions.create(model=model, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                             extra_body={"ignore_eos": True})
        return r.usage.completion_tokens, time.perf_counter() - t0

    before = server.pool.stats()
    results, wall = threaded_calls(call, list(zip(prompts, names)), clients)
    after = server.pool.stats()
    tokens = sum(r[0] for r in results)
    p50, p95 = p50_p95([r[1] for r in results])
    return {"requests": len(prompts), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 2), "p50_s": round(p50, 3), "p95_s": round(p95, 3),
            "loads": after.loads - before.loads, "evictions": after.evictions - before.evictions,
            "resident_after": after.resident}


def _score_http(server: _Server, prompts: list[list[int]], model: str, clients: int) -> dict:
    def call(ids):
        r = server.client.completions.create(model=model, prompt=ids, max_tokens=0, echo=True, logprobs=1)
        return r.usage.prompt_tokens, r.choices[0].logprobs.token_logprobs

    results, wall = threaded_calls(call, prompts, clients)
    tokens = sum(r[0] for r in results)
    return {"prompts": len(prompts), "prompt_tokens": tokens, "wall_s": round(wall, 2),
            "prompt_tokens_per_s": round(tokens / wall, 1), "logprobs": [r[1] for r in results]}


def _score_offline(served, prompts: list[list[int]], model: str) -> dict:
    """The offline forward of the same adapter: one prompt at a time, log_softmax of its fp32 logits."""
    import torch

    lps = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids])
            logits = served.lora(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[model]).logits
            lp = torch.log_softmax(logits[0].float(), -1)
            lps.append([None] + lp[:-1].gather(1, x[0, 1:].view(-1, 1)).view(-1).tolist())
    wall = time.perf_counter() - t0
    tokens = sum(len(p) for p in prompts)
    return {"prompts": len(prompts), "prompt_tokens": tokens, "wall_s": round(wall, 2),
            "prompt_tokens_per_s": round(tokens / wall, 1), "logprobs": lps}


def _step_times(models: dict[str, tuple], rows: int, steps: int, context: int = 40) -> dict:
    """The forward of one decode step of ``rows`` rows, for each of ``models`` ({label: (served, adapter per
    row)}), the models taking turns step by step (``steps`` rounds): median and quartiles in ms. Without
    HTTP, sampling or scheduling, and interleaved at the finest grain, this isolates what the number of
    resident adapters costs the forward itself."""
    import torch

    from .batch_cache import BatchCache

    g = torch.Generator().manual_seed(0)
    vocab = min(1000, min(served.vocab_size for served, _ in models.values()))
    prompt = torch.randint(0, vocab, (rows, context), generator=g)
    mask = torch.ones_like(prompt)
    positions = torch.arange(context).expand(rows, context)
    ids = torch.randint(0, vocab, (rows, 1), generator=g)
    step_mask = torch.ones(rows, context + 1, dtype=torch.long)
    step_positions = torch.full((rows, 1), context)
    kv, times = {}, {label: [] for label in models}
    with torch.inference_mode():
        for label, (served, adapters) in models.items():
            kv[label] = BatchCache.of(served.forward(prompt, mask, positions, None, adapters)[1], mask)
        for _ in range(steps):
            for label, (served, adapters) in models.items():
                cache = kv[label].to_cache()
                t0 = time.perf_counter()
                served.forward(ids, step_mask, step_positions, cache, adapters)
                times[label].append(time.perf_counter() - t0)
    out = {}
    for label, v in times.items():
        v = sorted(v)
        out[label] = {"median_ms": round(statistics.median(v) * 1000, 2), "q25_ms": round(v[len(v) // 4] * 1000, 2),
                      "q75_ms": round(v[3 * len(v) // 4] * 1000, 2), "steps": len(v)}
    return out


def _warm(server: _Server, names: list[str], clients: int) -> list[float]:
    """Load ``names`` (a 1-token request each); the pool's load seconds."""
    before = len(server.pool.load_seconds)
    threaded_calls(lambda n: server.client.completions.create(model=n, prompt="Hello", max_tokens=1, temperature=0),
                   names, clients)
    return list(server.pool.load_seconds)[before:]


# --- memory, in a subprocess -------------------------------------------------------------------------------
def _memory_child(args) -> int:
    """Print {rss before/after, tensor bytes} of the base model with ``args.memory`` adapters loaded."""
    import torch

    from .adapters import AdapterPool
    from .model import ServedModel

    if args.threads:
        torch.set_num_threads(args.threads)
    served = ServedModel.load(args.model, device="cpu")
    gc.collect()
    rss0 = _rss_mib()
    names = sorted(d.name for d in Path(args.root).iterdir())[:args.memory]
    for n in names:
        served.add_adapter(served.read_adapter(Path(args.root) / n, n))
    gc.collect()
    rss1 = _rss_mib()
    pool = AdapterPool(served, None)
    print(json.dumps({"adapters": len(names), "rss_base_mib": round(rss0, 1), "rss_mib": round(rss1, 1),
                      "tensor_bytes": pool.stats().bytes}))
    return 0


def _memory(args, n: int) -> dict:
    cmd = [sys.executable, "-m", "sharelora.serve.bench_ondemand", "--model", args.model, "--memory", str(n),
           "--root", str(args.root)] + (["--threads", str(args.threads)] if args.threads else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharelora.serve.bench_ondemand", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--sizes", default="1,16,128,512", help="numbers of resident adapters, comma-separated")
    p.add_argument("--bound", type=int, default=64, help="--max-adapters of the on-demand scenario")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--score-prompts", type=int, default=16)
    p.add_argument("--score-words", type=int, default=150)
    p.add_argument("--load-ranks", default="8,32,128")
    p.add_argument("--load-count", type=int, default=12)
    p.add_argument("--step-rounds", type=int, default=100, help="rounds of the forward-step comparison")
    p.add_argument("--no-memory", action="store_true", help="skip the RSS subprocesses")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workdir", type=Path, default=None, help="where the adapters are written (default: a temp dir)")
    p.add_argument("--json", type=Path, default=Path("serve-ondemand.json"))
    p.add_argument("--markdown", type=Path, default=None)
    p.add_argument("--memory", type=int, default=None, help=argparse.SUPPRESS)  # the memory subprocess
    p.add_argument("--root", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory is not None:
        return _memory_child(args)

    import torch

    from .model import ServedModel

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    load_at_start = os.getloadavg()
    sizes = [int(x) for x in args.sizes.split(",")]
    big = max(sizes)
    targets = args.targets.split(",")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="sharelora-ondemand-"))
    root = work / "root"
    names = [f"t{i:04d}" for i in range(big)]
    first = ServedModel.load(args.model, device="cpu")
    _log(f"writing {big} task-shared adapters under {root} ...")
    t0 = time.perf_counter()
    sizes_one = build_task_adapters(first.base, root, names, args.rank, targets)
    _log(f"  {time.perf_counter() - t0:.1f} s; one adapter: {sizes_one}")
    args.root = root

    memory = []
    if not args.no_memory:
        for n in sizes:
            _log(f"memory with {n} adapters (subprocess) ...")
            m = _memory(args, n)
            m["peft_n_lora_bytes"] = n * sizes_one["peft_lora_bytes"]
            m["predicted_bytes"] = sizes_one["shared_bytes"] + n * sizes_one["own_bytes"]
            memory.append(m)
            _log(f"  {m}")

    servers: dict[str, tuple[_Server, list[str]]] = {}
    warm_loads: dict[str, list[float]] = {}
    for n in sizes:
        served = first if n == sizes[0] else ServedModel.load(args.model, device="cpu")
        label = f"{n} resident"
        srv = _Server(served, root, None, args.max_batch, label)
        _log(f"{label}: loading {n} adapters ...")
        t0 = time.perf_counter()
        warm_loads[label] = _warm(srv, names[:n], args.clients)
        _log(f"  {time.perf_counter() - t0:.1f} s")
        servers[label] = (srv, names[:n])
    label = f"{big} on demand, --max-adapters {args.bound}"
    srv = _Server(ServedModel.load(args.model, device="cpu"), root, args.bound, args.max_batch, label)
    srv.client.completions.create(model=srv.served.name, prompt="Hello", max_tokens=1)  # warm the base
    servers[label] = (srv, names)

    prompts = make_prompts(args.requests * args.reps, seed=1)
    score_texts = make_prompts(args.score_prompts, seed=2, lo=args.score_words, hi=args.score_words + 20)
    scorer = servers[f"{sizes[0]} resident"][0]
    score_ids = [scorer.served.encode(t) for t in score_texts]
    scenarios = list(servers) + ["scoring: server", "scoring: offline forward"]
    rows: dict[str, list[dict]] = {s: [] for s in scenarios}
    checks = {}
    for rep in range(args.reps):
        order = scenarios[rep % len(scenarios):] + scenarios[:rep % len(scenarios)]
        _log(f"round {rep + 1}/{args.reps}: {order}")
        for s in order:
            if s == "scoring: server":
                r = _score_http(scorer, score_ids, names[0], args.clients)
            elif s == "scoring: offline forward":
                r = _score_offline(scorer.served, score_ids, names[0])
            else:
                server, pool_names = servers[s]
                offset = rep * args.requests
                jobs = [pool_names[(offset + i) % len(pool_names)] for i in range(args.requests)]
                r = _generate(server, prompts[offset:offset + args.requests], jobs, args.new_tokens, args.clients)
            rows[s].append(r)
            _log(f"  {s}: " + ", ".join(f"{k} {v}" for k, v in r.items() if k != "logprobs"))
    http_lp, off_lp = rows["scoring: server"][0]["logprobs"], rows["scoring: offline forward"][0]["logprobs"]
    checks["scoring_max_abs_diff"] = max(abs(a - b) for x, y in zip(http_lp, off_lp) for a, b in zip(x[1:], y[1:]))
    for s in ("scoring: server", "scoring: offline forward"):
        for r in rows[s]:
            r.pop("logprobs")

    _log(f"forward steps, {args.step_rounds} rounds, models taking turns ...")
    step_models = {}
    batch = min(args.clients, args.max_batch)
    for n in sizes:
        srv, pool_names = servers[f"{n} resident"]
        step_models[f"{n} resident"] = (srv.served, [pool_names[i % len(pool_names)] for i in range(batch)])
    steps = _step_times(step_models, batch, args.step_rounds)
    _log(f"  {steps}")
    bound_pool = servers[f"{big} on demand, --max-adapters {args.bound}"][0].pool
    for srv, _ in servers.values():
        srv.close()
    del servers
    _remove_all(first)
    _log("cold loads by adapter size ...")
    cold = _cold_loads(args, first, work, targets)

    summary = _summarize(rows, sizes, scenarios)
    results = {
        "command": "python -m sharelora.serve.bench_ondemand " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average_start": [round(x, 2) for x in load_at_start],
        "load_average_end": [round(x, 2) for x in os.getloadavg()],
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": _cpus()},
        "model": args.model, "rank": args.rank, "targets": args.targets, "new_tokens": args.new_tokens,
        "requests": args.requests, "reps": args.reps, "clients": args.clients, "max_batch": args.max_batch,
        "adapter": sizes_one, "memory": memory, "summary": summary, "rows": rows, "checks": checks,
        "forward_step": steps,
        "warm_loads": {k: _lat(v) for k, v in warm_loads.items()},
        "on_demand_loads": _lat(list(bound_pool.load_seconds)), "cold_loads_by_size": cold,
    }
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    print(table)
    return 0


def _lat(values: list[float]) -> dict:
    if not values:
        return {"count": 0}
    p50, p95 = p50_p95(values)
    return {"count": len(values), "p50_s": round(p50, 4), "p95_s": round(p95, 4)}


def _cold_loads(args, served, work: Path, targets: list[str]) -> list[dict]:
    """Per rank: the pool's load seconds and a cold request's latency, against a warm request's."""
    root = work / "sizes"
    out = []
    ranks = [int(r) for r in args.load_ranks.split(",")]
    for rank in ranks:
        names = [f"r{rank}-{i:02d}" for i in range(args.load_count)]
        size = build_task_adapters(served.base, root, names, rank, targets, seed=rank)
        srv = _Server(served, root, 4, args.max_batch, f"rank {rank}")
        try:
            prompt = "Hello there"
            warm = []
            for _ in range(4):
                t0 = time.perf_counter()
                srv.client.completions.create(model=served.name, prompt=prompt, max_tokens=1, temperature=0)
                warm.append(time.perf_counter() - t0)
            before = len(srv.pool.load_seconds)
            cold = []
            for n in names:
                t0 = time.perf_counter()
                srv.client.completions.create(model=n, prompt=prompt, max_tokens=1, temperature=0)
                cold.append(time.perf_counter() - t0)
            loads = list(srv.pool.load_seconds)[before:]
        finally:
            srv.close()
            _remove_all(served)
        out.append({"rank": rank, "own_mib": round(size["own_bytes"] / 2**20, 3),
                    "file_mib": round((size["own_bytes"] + size["shared_bytes"]) / 2**20, 3),
                    "load": _lat(loads), "cold_request": _lat(cold), "warm_request": _lat(warm)})
        _log(f"  rank {rank}: {out[-1]}")
    return out


def _remove_all(served) -> None:
    """Unload every adapter (they were loaded on a scheduler thread, in inference mode: remove them so too)."""
    import torch

    with torch.inference_mode():
        for n in list(served.adapters):
            served.remove_adapter(n)


def _summarize(rows: dict, sizes: list[int], scenarios: list[str]) -> list[dict]:
    """Per scenario: the median over repetitions of tokens/s, p50, p95, and the ratio to N = first size
    taken within each repetition (then the median of those ratios)."""
    base = rows[f"{sizes[0]} resident"]
    out = []
    for s in scenarios:
        rs = rows[s]
        if s.startswith("scoring"):
            out.append({"scenario": s, "prompt_tokens_per_s": statistics.median(r["prompt_tokens_per_s"] for r in rs),
                        "per_rep": [r["prompt_tokens_per_s"] for r in rs]})
            continue
        ratios = [r["tokens_per_s"] / b["tokens_per_s"] for r, b in zip(rs, base)]
        out.append({"scenario": s, "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                    "p50_s": statistics.median(r["p50_s"] for r in rs), "p95_s": statistics.median(r["p95_s"] for r in rs),
                    "vs_first": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
                    "per_rep": [r["tokens_per_s"] for r in rs], "loads": sum(r["loads"] for r in rs),
                    "evictions": sum(r["evictions"] for r in rs)})
    return out


def markdown(results: dict) -> str:
    lines = ["| scenario | tokens/s (median) | per repetition | p50 latency (s) | p95 latency (s) | vs 1 adapter "
             "(median of per-round ratios) | cold loads |", "|---|---:|---|---:|---:|---:|---:|"]
    for r in results["summary"]:
        if "tokens_per_s" in r:
            lines.append(f"| {r['scenario']} | {r['tokens_per_s']:.1f} | {', '.join(f'{x:.1f}' for x in r['per_rep'])} | "
                         f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['vs_first']:.2f}x ({', '.join(f'{x:.2f}' for x in r['ratios'])}) | "
                         f"{r['loads']} |")
    steps = results.get("forward_step") or {}
    if steps:
        first = next(iter(steps.values()))["median_ms"]
        lines += ["", "| forward step (models taking turns) | median (ms) | quartiles (ms) | vs first |",
                  "|---|---:|---|---:|"]
        for label, st in steps.items():
            lines.append(f"| {label} | {st['median_ms']:.1f} | {st['q25_ms']:.1f} - {st['q75_ms']:.1f} | "
                         f"{first / st['median_ms']:.2f}x |")
    lines += ["", "| scoring | prompt tokens/s (median) | per repetition |", "|---|---:|---|"]
    for r in results["summary"]:
        if "prompt_tokens_per_s" in r:
            lines.append(f"| {r['scenario']} | {r['prompt_tokens_per_s']:.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in r['per_rep'])} |")
    if results["memory"]:
        lines += ["", "| adapters | RSS base (MiB) | RSS with adapters (MiB) | RSS added (MiB) | adapter tensors (MiB) "
                  "| shared once + N x own (MiB) | PEFT N x LoRA (MiB) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for m in results["memory"]:
            lines.append(f"| {m['adapters']} | {m['rss_base_mib']:.0f} | {m['rss_mib']:.0f} | "
                         f"{m['rss_mib'] - m['rss_base_mib']:.0f} | {m['tensor_bytes'] / 2**20:.1f} | "
                         f"{m['predicted_bytes'] / 2**20:.1f} | {m['peft_n_lora_bytes'] / 2**20:.1f} |")
    lines += ["", "| adapter rank | own tensors (MiB) | file (MiB) | load p50 / p95 (s) | cold request p50 / p95 (s) "
              "| warm request p50 (s) |", "|---:|---:|---:|---:|---:|---:|"]
    for c in results["cold_loads_by_size"]:
        lines.append(f"| {c['rank']} | {c['own_mib']:.2f} | {c['file_mib']:.2f} | {c['load']['p50_s']:.3f} / "
                     f"{c['load']['p95_s']:.3f} | {c['cold_request']['p50_s']:.3f} / {c['cold_request']['p95_s']:.3f} | "
                     f"{c['warm_request']['p50_s']:.3f} |")
    c = results["checks"]
    lines += ["", f"Scoring through the server vs the offline forward: largest log-probability difference "
              f"{c['scoring_max_abs_diff']:.2e}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
