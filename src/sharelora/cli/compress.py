"""``sharelora compress``: existing adapters -> one multi-task adapter with a shared A (or A, B and task cores);
per-task update error."""

from __future__ import annotations

import argparse

from .common import CliError, positive_int


def name_and_dir(text: str) -> tuple[str, str]:
    name, sep, directory = text.partition("=")
    if not sep or not name or not directory:
        raise argparse.ArgumentTypeError(f"expected NAME=DIR (e.g. rt=runs/lora-rt), got {text!r}")
    return name, directory


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Compress classification adapters (sharelora runs or PEFT LoRA directories) into one multi-task adapter: "
        "one A per module type shared by every task and layer (the top-rank right singular vectors of the "
        "stacked updates), a least-squares B per task, each task's own head. Prints each task's relative update "
        "error ||B'A - BA|| / ||BA||. With --task-core matrix, A and B are both shared by every task (the "
        "top singular vectors of the stacked updates on both sides, refined by alternating sweeps) and each task "
        "keeps only a k x k core per module, its least-squares fit (B C A). Score a task with sharelora eval OUT "
        "--adapter NAME; export one with sharelora export-peft OUT --adapter NAME DIR."
    )
    p.add_argument("out_dir", metavar="OUT", help="the directory to write (adapter/ and compression.json)")
    p.add_argument("adapters", nargs="+", type=name_and_dir, metavar="NAME=DIR",
                   help="a task name and its adapter: a run directory (runs/<name>), its adapter/, a PEFT "
                        "LoRA directory, or DIR:TASK for one task of a multi-task directory (sharelora multitask "
                        "or compress)")
    p.add_argument("--rank", type=positive_int, required=True, help="k, the rank of the shared A")
    p.add_argument("--share", choices=["A", "AB"], default="A",
                   help="A: a B per task and layer; AB: one B per task and module type (default: A)")
    p.add_argument("--per-layer", action="store_true",
                   help="one shared A per module (shared by the tasks only), not per module type")
    p.add_argument("--basis", choices=["update", "A"], default="update",
                   help="decompose the stacked updates (default; least total error) or the stacked A's")
    p.add_argument("--task-core", choices=["none", "matrix", "diagonal"], default="none",
                   help="none (default): a B per task. matrix: B shared by the tasks too (one per module type with "
                        "--share AB, per layer with --share A) and a rank x rank core per task and module; exact "
                        "when the rank covers the stacked ranks. diagonal: a rank-vector core (the least-squares "
                        "diagonal of the same basis; exact only for updates that basis diagonalises)")
    p.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="the base model (for PEFT directories that name none; must match the runs')")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier compressed adapter in OUT")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where fetched models are kept")


def run(args: argparse.Namespace) -> int:
    from ..runs.compress import REPORT, compress_runs

    adapters = dict(args.adapters)
    if len(adapters) != len(args.adapters):
        raise CliError("a task name appears twice; give every NAME=DIR a different NAME")
    report = compress_runs(args.out_dir, adapters, args.rank, share=args.share, across_layers=not args.per_layer,
                           basis=args.basis, model=args.model, cache_dir=args.cache_dir, overwrite=args.overwrite,
                           task_core=args.task_core)
    core = f", {args.task_core} task cores" if args.task_core != "none" else ""
    print(f"compressed {len(adapters)} adapters into rank {args.rank} (share {args.share}, basis {args.basis}{core}): "
          f"{report['source_parameters']:,} -> {report['parameters']:,} adapter parameters (heads not counted)")
    if args.task_core != "none":
        print(f"  shared basis {report['shared_parameters']:,}; each task's cores {report['parameters_per_task']:,}; "
              f"total relative error {report['relative_error_total']:.4f} after {report['sweeps']} sweeps "
              f"({report['relative_error_hosvd']:.4f} from the SVDs alone)")
    width = max(len(n) for n in adapters)
    print(f"  {'task':<{width}}  mean update error  max update error")
    for name, t in report["tasks"].items():
        print(f"  {name:<{width}}  {t['mean_error']:17.4f}  {t['max_error']:16.4f}")
    for note in report.get("notes", []):
        print(f"  note: {note}")
    print(f"  adapter: {args.out_dir}/adapter\n  report:  {args.out_dir}/{REPORT}")
    return 0


def register(register_command) -> None:
    register_command("compress", "compress adapters into one multi-task adapter with a shared A", add_arguments, run)
