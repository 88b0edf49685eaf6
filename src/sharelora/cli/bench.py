"""``sharelora bench`` (also ``python -m sharelora.bench``): time and memory of the methods, or of mixed-adapter batches."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .common import csv_list


def _overrides(text: str) -> dict:
    """``num_hidden_layers=2,hidden_size=64`` -> {"num_hidden_layers": 2, "hidden_size": 64}."""
    out = {}
    for item in csv_list(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"expected key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..bench.methods import METHODS
    from ..bench.run import DEFAULT_MODELS

    p.add_argument("--section", choices=("methods", "mixed"), default="methods",
                   help="methods: every method's training step, memory and inference (default); mixed: forward "
                        "latency of a batch whose rows use N distinct task-shared adapters, vs PEFT's adapter_names "
                        "(reads --models (one), --weights, --shape, --targets, --batch, --seq, --rank, --alpha, "
                        "--dropout, --reps, --warmup, --threads, --device, --malloc, --json, --markdown, --adapters, "
                        "--libraries)")
    p.add_argument("--models", type=csv_list,
                   help="comma list: minilm, smollm2, or transformers model ids / directories "
                        f"(default: {','.join(DEFAULT_MODELS)}; mixed section: smollm2)")
    p.add_argument("--methods", type=csv_list, default=list(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--weights", choices=("auto", "real", "shape"),
                   help="real weights (sharelora.sources) or a random-init model of the same shape; "
                        "auto uses real when available (default; mixed section: shape)")
    p.add_argument("--task", choices=("classification", "causal-lm"), help="task of a model that is not built in")
    p.add_argument("--shape", type=_overrides, default={}, metavar="K=V,...",
                   help="config overrides for every model, e.g. num_hidden_layers=2,hidden_size=128")
    p.add_argument("--targets", type=csv_list, help="q and v projection names (default: per model)")
    p.add_argument("--qkv-targets", type=csv_list, help="q, k and v projection names for sharelora-qkv")
    p.add_argument("--batch", type=int, help="batch size (default: minilm 32, smollm2 4; mixed section: 16)")
    p.add_argument("--seq", type=int, help="tokens per example (default: minilm 64, smollm2 128; mixed section: 64)")
    p.add_argument("--adapters", type=lambda t: [int(n) for n in csv_list(t)], metavar="N,...",
                   help="mixed section: numbers of distinct adapters in the batch (default 1,2,4,8,16)")
    p.add_argument("--libraries", type=csv_list, metavar="LIB,...",
                   help="mixed section: sharelora (task-shared A), core (task-shared A and B, r x r cores), "
                        "core-diag (diagonal cores), peft (default: sharelora,core,peft)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--reps", type=int, help="interleaved timed repetitions per method (default 7; mixed section: 15)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds before timing (default 2)")
    p.add_argument("--inference-reps", type=int, help="timed forwards per variant (default 2 x reps)")
    p.add_argument("--no-inference", action="store_true", help="skip the inference latencies")
    p.add_argument("--no-memory", action="store_true", help="skip the per-method peak-memory processes")
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    p.add_argument("--threads", type=int, help="torch threads (default: every core; mixed section: 2)")
    p.add_argument("--malloc", choices=("retain", "default"), default="retain",
                   help="retain: glibc keeps freed memory mapped, so page faults do not depend on which method "
                        "ran before (default); default: leave the allocator as it is")
    p.add_argument("--json", type=Path, help="JSON output file (default bench.json; mixed section: bench-mixed.json)")
    p.add_argument("--markdown", type=Path, help="also write the Markdown table to this file")


def config_from_args(args: argparse.Namespace):
    from ..bench.run import DEFAULT_MODELS, BenchConfig

    return BenchConfig(models=args.models or list(DEFAULT_MODELS), methods=args.methods,
                       weights=args.weights or "auto", task=args.task,
                       targets=args.targets, qkv_targets=args.qkv_targets, batch=args.batch, seq=args.seq,
                       overrides=args.shape, rank=args.rank, alpha=args.alpha, dropout=args.dropout,
                       reps=args.reps or 7, warmup=args.warmup, inference=not args.no_inference,
                       inference_reps=args.inference_reps, memory=not args.no_memory, device=args.device,
                       threads=args.threads, malloc=args.malloc)


def run(args: argparse.Namespace) -> int:
    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.section == "mixed":
        from ..bench.mixed import config_from_bench_args, markdown, run_mixed

        results = run_mixed(config_from_bench_args(args), log=log)
    else:
        from ..bench.report import markdown
        from ..bench.run import run_bench

        results = run_bench(config_from_args(args), log=log)
    results["command"] = "sharelora bench " + " ".join(shlex.quote(a) for a in getattr(args, "_argv", sys.argv[2:]))
    table = markdown(results)
    out = args.json or Path("bench-mixed.json" if args.section == "mixed" else "bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table, encoding="utf-8")
    print(table)
    print(json.dumps(results))
    return 0


def register(register_command) -> None:
    register_command("bench", "time and memory of ShareLoRA vs PEFT LoRA, full fine-tuning and the frozen floor",
                     add_arguments, run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sharelora.bench", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    args._argv = list(sys.argv[1:] if argv is None else argv)
    return run(args)
