"""``sharelora train``: one fine-tuning run (also under torchrun / accelerate launch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import CliError, add_run_arguments, config_from_args, not_pretrained_note, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fine-tune a model on a classification data set with a ShareLoRA method, LoRA or full fine-tuning. "
        "With no arguments: MiniLM on Rotten Tomatoes, ShareA r=8 on query/value (a few minutes on a laptop CPU). "
        "Several processes: torchrun --nproc-per-node N -m sharelora train ... (or accelerate launch -m sharelora "
        "train ...); --batch-size stays the global batch, rank 0 writes the run."
    )
    add_run_arguments(p)
    add_run_control_arguments(p)


def add_run_control_arguments(p: argparse.ArgumentParser) -> None:
    """Where a run goes and how it starts: shared by ``train`` and the commands that train like it."""
    p.add_argument("--output-dir", default=None, metavar="DIR", help="where the run is written (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --output-dir first")
    p.add_argument("--keep-state", action="store_true", help="keep the resume checkpoint after the run finishes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for PyTorch (default: all cores; 1 is faster on a CPU busy with other jobs)")


def start_run(args: argparse.Namespace) -> None:
    """Check --resume / --overwrite and apply --threads before a run starts."""
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other; pass one of them")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)


def run(args: argparse.Namespace) -> int:
    from ..training import train

    cfg = config_from_args(args)
    start_run(args)
    results = train(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                    keep_state=args.keep_state)
    if results.get("status") == "interrupted":
        return 130
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under a launcher: rank 0 reports
        return 0
    out = Path(results["config"]["output_dir"])
    metric = results["metric"]
    test = results.get("test") or {}
    p = results["parameters"]
    print(f"\n{results['name']}: {results['method']}, {p['adapter']:,} adapter parameters "
          f"({p['trainable']:,} trained incl. head){not_pretrained_note(results)}")
    print(f"  dev {metric} {results['dev'][metric]:.4f} (best epoch {results['best_epoch']:g})"
          + (f", test {metric} {test[metric]:.4f}" if test else ""))
    print(f"  train time {results['train_time_s']:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB")
    print(f"  results: {out / 'results.json'}\n  adapter: {out / 'adapter'}\n  curves:  {out / 'curves.png'}")
    return 0


def register(register_command) -> None:
    register_command("train", "fine-tune with ShareLoRA, LoRA or full fine-tuning (no arguments: the main job)",
                     add_arguments, run)
