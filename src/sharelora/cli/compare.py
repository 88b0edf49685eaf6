"""``sharelora compare``: several methods over seeds on the same data; table, plot and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import (
    CliError, add_run_arguments, command_line, config_from_args, csv_list, positive_float, positive_int,
    read_config_arg, settle,
)


def seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (3) or a list of seeds (0,1,2), got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {n}")
    return list(range(n))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train several methods on the same data with several seeds and write a Markdown table, a plot and JSON "
        "(compare.md, compare.png, compare.json). Rerunning the same command resumes an interrupted comparison."
    )
    p.add_argument("--methods", type=csv_list, default=argparse.SUPPRESS,
                   metavar="M[@K=V,...],...",
                   help="methods to compare, each optionally with settings: e.g. lora@r=2,lora@r=8,sharea@r=16,"
                        "peft-vera@r=1024,peft-vblora@r=4,num_vectors=64,vector_length=128,lr=0.004 (a KEY=VALUE "
                        "without @ continues the entry before it). Methods: full, lora, sharea, shareb, shareab, "
                        "sharea-qkv (keys r, alpha, dropout, lr; --rank is their default r), peft-vera (r, d_initial, "
                        "dropout, projection_prng_key, lr), peft-vblora (r, num_vectors, vector_length, topk, "
                        "dropout, lr); PEFT's methods take PEFT's defaults for what is not given (VeRA r=256, "
                        "VB-LoRA r=4, num_vectors=256, vector_length=256), not --rank "
                        "(default: full,lora,sharea,shareb,shareab)")
    p.add_argument("--seeds", type=seeds, default=argparse.SUPPRESS, help="number of seeds (3 = seeds 0,1,2) or a list 0,1,2 (default: 3)")
    p.add_argument("--full-lr", type=positive_float, default=argparse.SUPPRESS, help="learning rate of full fine-tuning (default: 3e-5); --lr sets the adapters'")
    p.add_argument("--output-dir", default=argparse.SUPPRESS, metavar="DIR", help="where runs and tables go (default: runs/compare-<model>-<dataset>)")
    p.add_argument("--in-process", action="store_true", default=argparse.SUPPRESS, help="run every training in this process (faster start; peak memory is then shared)")
    p.add_argument("--progress", action="store_true", default=argparse.SUPPRESS, help="show each run's progress bar")
    p.add_argument("--jobs", type=positive_int, default=argparse.SUPPRESS,
                   help="runs side by side, each with CPUs/jobs threads (default: 1; 2 suits a 2-core CPU best)")
    p.add_argument("--threads", type=positive_int, default=argparse.SUPPRESS,
                   help="CPU threads of each run (default: CPUs/jobs with --jobs > 1, else all)")
    add_run_arguments(p)
    g = p.add_argument_group("instructions: MMLU after training")
    g.add_argument("--mmlu-shots", type=int, default=argparse.SUPPRESS, help="score every trained adapter (and the base model) "
                   "on MMLU with this many shots (0 or 5)")
    g.add_argument("--mmlu-subjects", default=argparse.SUPPRESS, metavar="A,B", help="MMLU subjects (default: all)")
    g.add_argument("--mmlu-max-per-subject", type=int, default=argparse.SUPPRESS, help="MMLU questions per subject")


# compare's own options (a --config file may hold them beside the runs' fields) and their defaults
COMPARE_DEFAULTS = {"methods": ["full", "lora", "sharea", "shareb", "shareab"], "seeds": [0, 1, 2], "full_lr": None,
                    "output_dir": None, "in_process": False, "progress": False, "jobs": 1, "threads": None,
                    "mmlu_shots": None, "mmlu_subjects": None, "mmlu_max_per_subject": None}


def run(args: argparse.Namespace) -> int:
    from ..training.compare import compare
    from ..training.config import short_name
    from ..training.methods import parse_methods

    values = read_config_arg(args, extra=tuple(COMPARE_DEFAULTS))
    settle(args, COMPARE_DEFAULTS, values, types={"methods": csv_list, "seeds": seeds})
    if isinstance(args.seeds, int):
        args.seeds = list(range(args.seeds))

    try:
        specs = parse_methods(args.methods)
    except ValueError as e:
        raise CliError(str(e)) from None
    base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "output_dir"}),
                            values=values)
    out = args.output_dir or f"runs/compare-{short_name(base.model)}-{short_name(base.dataset)}"
    if base.task in ("e2e", "instructions"):
        if any(s.settings or s.method.startswith("peft-") for s in specs):
            raise CliError("generation comparisons take plain method names (lora,sharea,...) and --rank; "
                           "per-method settings and PEFT's methods are for classification comparisons")
        return _compare_generation(args, base, out)
    summary = compare(base, specs, args.seeds, out, full_lr=args.full_lr, isolate=not args.in_process,
                      progress=args.progress, jobs=args.jobs, threads=args.threads, command=command_line())
    _report(out, summary)
    return 0


def _compare_generation(args: argparse.Namespace, base, out: str) -> int:
    from ..training.compare_generation import compare_generation

    mmlu = None
    if args.mmlu_shots is not None:
        mmlu = {"shots": args.mmlu_shots, "max_per_subject": args.mmlu_max_per_subject,
                "subjects": [s.strip() for s in args.mmlu_subjects.split(",")] if args.mmlu_subjects else None}
    summary = compare_generation(base, args.methods, args.seeds, out, mmlu=mmlu, isolate=not args.in_process,
                                 progress=args.progress, command=command_line())
    _report(out, summary)
    return 0


def _report(out: str, summary: dict) -> None:
    print()
    print((Path(out) / "compare.md").read_text(encoding="utf-8"))
    print(f"written: {out}/compare.md, compare.json, compare.png ({len(summary['runs'])} runs)")


def register(register_command) -> None:
    register_command("compare", "compare methods over seeds: Markdown table, plot, JSON", add_arguments, run)
