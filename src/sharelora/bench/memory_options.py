"""Peak memory and step time of `sharelora train`'s memory options (docs/SCALING.md).

    python -m sharelora.bench.memory_options                       # SmolLM2 ShareA: fp32, bf16, 4-bit base, +/- checkpointing
    python -m sharelora.bench.memory_options --variants fp32,nf4 --steps 3 --json out.json

Each variant runs in a fresh process (peak RSS is a per-process high-water mark) that loads the
model as ``sharelora train`` would with those options (``training.memory.load_options``), wraps it
with ``prepare_model`` (so ``--bf16`` autocast and gradient checkpointing are the run's own), makes
the optimizer and then takes ``--steps`` training steps on a fixed batch of random tokens. It reports

    weights_mb           bytes of the model's tensors (state dict: a 4-bit weight with its scales), each once
    load_peak_rss_mb     peak resident memory while loading (transformers reads the fp32 checkpoint and
                         converts or quantizes it: the float tensors exist for a while)
    rss_after_build_mb   resident memory once model and optimizer exist (freed heap returned to the system
                         first, so what loading or quantizing held temporarily is not counted); it includes
                         the interpreter, torch and the tokenizer (~230 MiB before anything is loaded)
    peak_rss_mb          the kernel's VmHWM during the steps (reset after the build)
    step_s               median seconds of a step after the first (forward, backward, AdamW)
    loss                 first and last step's loss (a sanity check that it trains)
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

VARIANTS = {  # name -> TrainConfig memory fields
    "fp32": {},
    "fp32+ckpt": {"gradient_checkpointing": True},
    "bf16": {"bf16": True},
    "bf16+ckpt": {"bf16": True, "gradient_checkpointing": True},
    "nf4": {"quantize": "4bit"},  # compute dtype float32
    "nf4+ckpt": {"quantize": "4bit", "gradient_checkpointing": True},
    "nf4-bf16": {"quantize": "4bit", "bf16": True},  # QLoRA: bf16 compute, bf16 non-quantized weights
    "nf4-bf16+ckpt": {"quantize": "4bit", "bf16": True, "gradient_checkpointing": True},
}


def measure(job: dict) -> dict:
    import torch

    from ..bench.memory import _peak_rss_bytes, _reset_peak_rss, _rss_bytes
    from ..sources import load_model
    from ..training.config import TrainConfig
    from ..training.engine import optimizer_step
    from ..training.memory import load_options
    from ..training.methods import prepare_model

    torch.set_num_threads(job["threads"])
    cfg = TrainConfig(model=job["model"], method="sharea", targets=job["targets"], rank=job["rank"],
                      dropout=0.1, **VARIANTS[job["variant"]]).resolved()
    bundle = load_model(cfg.model, task="causal-lm", cache_dir=job.get("cache_dir"), report_new_weights=False,
                        **load_options(cfg))
    torch.manual_seed(0)  # the adapter's A and the dropout masks: the same in every variant
    model = prepare_model(bundle.model, cfg)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (job["batch"], job["seq"]), generator=g)
    tensors = {t.data_ptr(): t.nbytes for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    load_peak = _peak_rss_bytes()
    gc.collect()
    try:  # glibc keeps freed blocks mapped; hand them back so RSS shows what is alive
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    out = {"variant": job["variant"], "config": {k: getattr(cfg, k) for k in
                                                   ("bf16", "gradient_checkpointing", "quantize",
                                                    "quantize_compute_dtype")},
           "weights_mb": sum(tensors.values()) / 2**20, "load_peak_rss_mb": load_peak / 2**20,
           "rss_after_build_mb": _rss_bytes() / 2**20, "peak_is_since_build": _reset_peak_rss()}
    times, losses = [], []
    for _ in range(job["steps"]):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer_step(optimizer)  # the training engine's step
        times.append(time.perf_counter() - start)
        losses.append(loss.item())
    out.update(peak_rss_mb=_peak_rss_bytes() / 2**20, step_s=statistics.median(times[1:] or times),
               step_times_s=times, loss=[losses[0], losses[-1]])
    return out


def run_variant(job: dict, timeout: float = 1800) -> dict:
    r = subprocess.run([sys.executable, "-m", "sharelora.bench.memory_options", "--one", json.dumps(job)],
                       capture_output=True, text=True, timeout=timeout)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        return {"variant": job["variant"], "error": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def markdown(rows: list[dict]) -> str:
    base = next((r for r in rows if r["variant"] == "fp32" and "error" not in r), None)
    lines = ["| variant | weights (MiB) | peak RSS loading (MiB) | RSS after build (MiB) | peak RSS in steps (MiB) "
             "| added by the steps (MiB) | step (s) | vs fp32 step | loss first -> last |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} | | | | | | | |")
            continue
        ratio = f"{r['step_s'] / base['step_s']:.2f}x" if base else ""
        lines.append(f"| {r['variant']} | {r['weights_mb']:.0f} | {r['load_peak_rss_mb']:.0f} | {r['rss_after_build_mb']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - r['rss_after_build_mb']:.0f} "
                     f"| {r['step_s']:.2f} | "
                     f"{ratio} | {r['loss'][0]:.3f} -> {r['loss'][1]:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharelora.bench.memory_options", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one job in this process
    p.add_argument("--model", default="smollm2")
    p.add_argument("--targets", default="q_proj,v_proj")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is not timed)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return 0
    import os

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    rows = []
    for variant in args.variants.split(","):
        job = {"variant": variant, "model": args.model, "targets": args.targets.split(","), "rank": args.rank,
               "batch": args.batch, "seq": args.seq, "steps": args.steps,
               "threads": args.threads or os.cpu_count() or 1, "cache_dir": args.cache_dir}
        rows.append(run_variant(job))
        print(json.dumps(rows[-1]), flush=True)
    print(markdown(rows))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"argv": sys.argv[1:], "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
