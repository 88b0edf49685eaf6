"""Benchmark of serving many adapters: ``python -m sharelora.serve.bench`` (docs/SERVING.md).

``--requests`` completions of ``--new-tokens`` tokens each (the end-of-sequence token ignored, so
every request generates exactly that many) from ``--clients`` concurrent client threads, on
``--model`` (default SmolLM2-135M from ``sharelora.sources``) with rank-``--rank`` adapters on
``--targets``. Scenarios:

* batched, 1 / 4 / 16 distinct adapters, task-shared A (one ``task_group``, ``task_share="A"``)
  and independent (``task_share="none"``): the scheduler of ``sharelora serve``, no socket;
* one at a time: the same scheduler with ``max_batch=1`` (16 task-shared adapters);
* PEFT swap: a ``peft.PeftModel`` with the independent adapters exported to PEFT, one request at a
  time, ``set_adapter`` before each ``generate`` (a server without cross-adapter batching);
* HTTP (``--http``): 16 task-shared adapters through the real server and the openai client.

The baselines that run one request at a time take ``--baseline-requests`` requests (fewer: they
are slow, and their throughput does not depend on the count). Tokens/s counts generated tokens
over the wall time of the scenario; latency is per request, from submission to its last token.
The batched outputs are compared token by token with the one-at-a-time outputs of the same
requests (greedy decoding): batching must not change a single token.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

WORDS = ("the a cat dog city river mountain story about learns to fly over write explain why how what when "
         "short long small big red blue green quick slow happy old new house garden tree sun moon star sea "
         "friend teacher student book letter song poem recipe travel morning night summer winter").split()


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def make_prompts(n: int, seed: int = 0, lo: int = 12, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "." for _ in range(n)]


def build_adapters(base, out: Path, n: int, rank: int, targets: list[str], seed: int = 0) -> dict[str, Path]:
    """Two multi-adapter directories of ``n`` adapters (random A and B, B scaled down so the model
    still writes text): ``shared`` (one A per module type for all) and ``independent``; and the
    independent ones exported as PEFT LoRA directories under ``peft/<name>``."""
    import torch

    from ..method import ShareLoraConfig, get_sharelora_model

    dirs = {}
    for kind, task_share in (("shared", "A"), ("independent", "none")):
        torch.manual_seed(seed)
        names = [f"{kind[0]}{i:02d}" for i in range(n)]
        cfg = lambda: ShareLoraConfig(rank=rank, alpha=2 * rank, share="A", task_share=task_share,  # noqa: E731
                                      target_modules=list(targets), init_lora_weights=False)
        model = get_sharelora_model(base, cfg(), adapter_name=names[0])
        for name in names[1:]:
            model.add_adapter(name, cfg())
        for name in names:
            state = model.adapter_state_dict(name)
            model.load_adapter_state_dict({k: v * 0.05 if k.endswith("lora_B") else v for k, v in state.items()},
                                          name)
        dirs[kind] = model.save_pretrained(out / kind)
        if kind == "independent":
            model.export_peft(out / "peft", adapter_name=names)
            dirs["peft"] = out / "peft"
        model.unload()  # the base model as it was, for the next set and for serving
    return dirs


def threaded_calls(call, jobs: list, clients: int) -> tuple[list, float]:
    """``call(job)`` for every job from ``clients`` threads: (the results in job order, wall seconds).
    The first error a client meets stops that client and is raised once all threads have finished."""
    results: list = [None] * len(jobs)
    lock = threading.Lock()
    todo = iter(range(len(jobs)))
    errors: list = []

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                results[i] = call(jobs[i])
            except Exception as e:  # noqa: BLE001 - reported
                errors.append(e)
                return

    threads = [threading.Thread(target=client) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return results, wall


def p50_p95(values: list[float]) -> tuple[float, float]:
    """Median and 95th percentile (inclusive method; one value is both)."""
    v = sorted(values)
    if len(v) == 1:
        return v[0], v[0]
    return statistics.median(v), statistics.quantiles(v, n=20, method="inclusive")[18]


def run_clients(call, jobs: list, clients: int) -> dict:
    """Run ``call(job) -> (token ids, latency s)`` for every job from ``clients`` threads."""
    results, wall = threaded_calls(call, jobs, clients)
    tokens = sum(len(r[0]) for r in results)
    p50, p95 = p50_p95([r[1] for r in results])
    return {"requests": len(jobs), "tokens": tokens, "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 2),
            "p50_s": round(p50, 3), "p95_s": round(p95, 3), "outputs": [r[0] for r in results]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharelora.serve.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--baseline-requests", type=int, default=16)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--only", default=None, help="scenario names to run, separated by ';' (names contain commas), e.g. "
                        "'batched, 1 adapter;PEFT swap' (default: all)")
    p.add_argument("--http", action="store_true", help="also 16 task-shared adapters through HTTP + openai")
    p.add_argument("--json", type=Path, default=Path("serve-bench.json"))
    p.add_argument("--markdown", type=Path, default=None)
    args = p.parse_args(argv)

    import torch

    from .model import ServedModel
    from .scheduler import SamplingParams, Scheduler

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    served = ServedModel.load(args.model, device=args.device)
    _log(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s; building adapters")
    tmp = Path(tempfile.mkdtemp(prefix="sharelora-serve-bench-"))
    dirs = build_adapters(served.base, tmp, 16, args.rank, args.targets.split(","))
    for kind in ("shared", "independent"):
        served.add_adapter(served.read_adapter(dirs[kind]))
    prompts = [served.encode(text) for text in make_prompts(args.requests)]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)

    def jobs(prefix: str, k: int, n: int) -> list:
        return [(prompts[i], f"{prefix}{i % k:02d}") for i in range(n)]

    scenarios = [
        ("batched, 1 adapter", "shared", 1, args.max_batch, args.requests),
        ("batched, 4 task-shared adapters", "shared", 4, args.max_batch, args.requests),
        ("batched, 16 task-shared adapters", "shared", 16, args.max_batch, args.requests),
        ("batched, 4 independent adapters", "independent", 4, args.max_batch, args.requests),
        ("batched, 16 independent adapters", "independent", 16, args.max_batch, args.requests),
        ("one at a time, 16 task-shared adapters", "shared", 16, 1, args.baseline_requests),
    ]
    only = {n.strip() for n in args.only.split(";")} if args.only else None
    rows: list[dict] = []
    for name, kind, k, max_batch, n in scenarios:
        if only and name not in only:
            continue
        _log(f"{name}: {n} requests x {args.new_tokens} tokens from {args.clients} clients ...")
        with Scheduler(served, max_batch=max_batch, max_queue=10_000) as sched:
            def call(job, sched=sched):
                c = sched.generate(job[0], job[1], params, timeout=3600)
                return c.token_ids, c.latency_s

            r = run_clients(call, jobs(kind[0], k, n), args.clients)
            r["steps"] = sched.steps
        rows.append({"scenario": name, "adapters": k, "kind": kind, "max_batch": max_batch, **r})
        _log(f"  {r['tokens_per_s']:.1f} tokens/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s")

    if not only or "PEFT swap" in only:
        rows.append(_peft_swap(args, dirs["peft"], prompts, params))
    if args.http:
        rows.append(_http(args, served, prompts, params))

    by = {r["scenario"]: r for r in rows}
    single = by.get("batched, 1 adapter")
    for r in rows:
        r["vs_single_adapter"] = round(r["tokens_per_s"] / single["tokens_per_s"], 3) if single else None
    checks = {}
    alone = by.get("one at a time, 16 task-shared adapters")
    mixed = by.get("batched, 16 task-shared adapters")
    if alone and mixed:
        n = alone["requests"]
        checks["batched_equals_one_at_a_time"] = sum(a == b for a, b in zip(alone["outputs"], mixed["outputs"][:n]))
        checks["compared"] = n
    peft = by.get("PEFT swap, 16 adapters")
    indep = by.get("batched, 16 independent adapters")
    if peft and indep:
        checks["peft_swap_equals_batched_independent"] = sum(
            a == b for a, b in zip(peft["outputs"], indep["outputs"][:peft["requests"]]))
        checks["peft_compared"] = peft["requests"]
    results = {
        "command": "python -m sharelora.serve.bench " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(served.device),
                    "cpus": _cpus()},
        "model": args.model, "rank": args.rank, "targets": args.targets, "new_tokens": args.new_tokens,
        "clients": args.clients, "rows": [{k: v for k, v in r.items() if k != "outputs"} for r in rows],
        "checks": checks,
    }
    args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    table = markdown(results)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")
    print(table)
    return 0


def _cpus() -> str:
    import os

    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    return f"{os.cpu_count()} x {model}"


def _peft_swap(args, peft_dir: Path, prompts, params) -> dict:
    """A PeftModel with 16 LoRA adapters, one request at a time, set_adapter before each."""
    import torch
    from peft import PeftModel

    from ..sources import load_model

    base = load_model(args.model, task="causal-lm").model.to(args.device).eval()
    names = sorted(d.name for d in peft_dir.iterdir())
    model = PeftModel.from_pretrained(base, peft_dir / names[0], adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(peft_dir / n, adapter_name=n)
    model.eval()
    lock = threading.Lock()
    n = args.baseline_requests
    _log(f"PEFT swap: {n} requests x {args.new_tokens} tokens from {args.clients} clients ...")

    def call(job):
        ids, adapter = job
        t0 = time.perf_counter()
        with lock, torch.inference_mode():
            model.set_adapter(adapter)
            x = torch.tensor([ids], device=args.device)
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=params.max_tokens,
                                 min_new_tokens=params.max_tokens, do_sample=False, pad_token_id=0)
        return out[0, x.shape[1]:].tolist(), time.perf_counter() - t0

    jobs = [(prompts[i], names[i % 16]) for i in range(n)]
    r = run_clients(call, jobs, args.clients)
    _log(f"  {r['tokens_per_s']:.1f} tokens/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s")
    del model, base
    return {"scenario": "PEFT swap, 16 adapters", "adapters": 16, "kind": "peft", "max_batch": 1, **r}


def _http(args, served, prompts, params) -> dict:
    """16 task-shared adapters through uvicorn + the routes, called with the openai client."""
    import uvicorn
    from openai import OpenAI

    from .app import create_app
    from .launch import bind
    from .scheduler import Scheduler
    from .settings import Settings

    settings = Settings(model=args.model, max_batch=args.max_batch, max_queue=10_000)
    sched = Scheduler(served, max_batch=args.max_batch, max_queue=10_000)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(served, sched, settings), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    client = OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="none", max_retries=0,
                    timeout=3600)
    _log(f"HTTP: {args.requests} requests x {args.new_tokens} tokens from {args.clients} openai clients ...")

    def call(job):
        ids, adapter = job
        t0 = time.perf_counter()
        r = client.completions.create(model=adapter, prompt=ids, max_tokens=params.max_tokens, temperature=0,
                                      extra_body={"ignore_eos": True})
        return [0] * r.usage.completion_tokens, time.perf_counter() - t0

    try:
        r = run_clients(call, [(prompts[i], f"s{i % 16:02d}") for i in range(args.requests)], args.clients)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
    _log(f"  {r['tokens_per_s']:.1f} tokens/s, p50 {r['p50_s']:.2f} s, p95 {r['p95_s']:.2f} s")
    return {"scenario": "HTTP + openai client, 16 task-shared adapters", "adapters": 16, "kind": "shared",
            "max_batch": args.max_batch, **r}


def markdown(results: dict) -> str:
    lines = ["| scenario | requests | tokens/s | p50 latency (s) | p95 latency (s) | vs 1 adapter batched |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results["rows"]:
        ratio = f"{r['vs_single_adapter']:.2f}x" if r.get("vs_single_adapter") is not None else ""
        lines.append(f"| {r['scenario']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['p50_s']:.2f} | "
                     f"{r['p95_s']:.2f} | {ratio} |")
    c = results.get("checks") or {}
    if "compared" in c:
        lines.append("")
        lines.append(f"Greedy tokens of the batched 16-adapter run equal to one at a time: "
                     f"{c['batched_equals_one_at_a_time']}/{c['compared']} requests.")
    if "peft_swap_equals_batched_independent" in c:
        lines.append(f"PEFT swap tokens equal to the batched independent adapters': "
                     f"{c['peft_swap_equals_batched_independent']}/{c['peft_compared']} requests.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
