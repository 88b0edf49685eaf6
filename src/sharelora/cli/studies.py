"""``sharelora transfer`` and ``sharelora overfit``: the paper's robustness studies on generation tasks.

    sharelora transfer   train on task 1, continue on task 2, measure how much of task 1 is kept
    sharelora overfit    train vs dev loss over epochs on a small training set
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import command_line


# --- transfer and overfit (plugin commands) ---------------------------------------------------------------
def _study_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="lora,sharea", help="adapter methods to compare (default: lora,sharea)")
    p.add_argument("--seeds", default="0", help="seeds, e.g. 0,1 (default: 0)")
    p.add_argument("--model", default="smollm2", help="causal LM (default: smollm2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--output-dir", default=None, metavar="DIR")
    p.add_argument("--cache-dir", default=None, metavar="DIR")


def _transfer_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Transfer / retention: train an adapter on task 1 (E2E), continue training the same adapter on "
                     "task 2 (instructions), and measure how much of task 1 is kept (its dev loss and BLEU before "
                     "and after), for each method.")
    _study_arguments(p)
    p.add_argument("--first", default="e2e", choices=["e2e", "instructions"], help="task 1 (default: e2e)")
    p.add_argument("--second", default="instructions", choices=["e2e", "instructions"], help="task 2 (default: instructions)")
    p.add_argument("--first-steps", type=int, default=60, help="optimizer steps on task 1 (default: 60)")
    p.add_argument("--second-steps", type=int, default=60, help="optimizer steps on task 2 (default: 60)")
    p.add_argument("--eval-examples", type=int, default=40, help="dev examples per task for the retention measure")


def _overfit_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Overfitting curve: train on a small training set for several epochs and record the train and "
                     "dev loss (both teacher-forced, dropout off) after every epoch, for each method.")
    _study_arguments(p)
    p.add_argument("--task", default="e2e", choices=["e2e", "instructions"], help="task (default: e2e)")
    p.add_argument("--train-examples", type=int, default=48, help="size of the small training set (default: 48)")
    p.add_argument("--epochs", type=int, default=8, help="epochs (default: 8)")
    p.add_argument("--eval-examples", type=int, default=60, help="dev examples (default: 60)")


def _split_list(text: str, kind=str) -> list:
    return [kind(t.strip()) for t in text.split(",") if t.strip()]


def _transfer_run(args: argparse.Namespace) -> int:
    from ..training.studies import transfer_study

    out = args.output_dir or f"runs/transfer-{args.first}-to-{args.second}"
    transfer_study(methods=_split_list(args.methods), seeds=_split_list(args.seeds, int), first=args.first,
                   second=args.second, first_steps=args.first_steps, second_steps=args.second_steps,
                   eval_examples=args.eval_examples, model=args.model, rank=args.rank, lr=args.lr,
                   batch_size=args.batch_size, output_dir=out, cache_dir=args.cache_dir, command=command_line())
    print((Path(out) / "transfer.md").read_text(encoding="utf-8"))
    return 0


def _overfit_run(args: argparse.Namespace) -> int:
    from ..training.studies import overfit_study

    out = args.output_dir or f"runs/overfit-{args.task}"
    overfit_study(methods=_split_list(args.methods), seeds=_split_list(args.seeds, int), task=args.task,
                  train_examples=args.train_examples, epochs=args.epochs, eval_examples=args.eval_examples,
                  model=args.model, rank=args.rank, lr=args.lr, batch_size=args.batch_size, output_dir=out,
                  cache_dir=args.cache_dir, command=command_line())
    print((Path(out) / "overfit.md").read_text(encoding="utf-8"))
    return 0


def register(register_command) -> None:
    register_command("transfer", "train on task 1, continue on task 2, measure task-1 retention (LoRA vs ShareA)",
                     _transfer_arguments, _transfer_run)
    register_command("overfit", "train vs dev loss over epochs on a small training set, per method",
                     _overfit_arguments, _overfit_run)
