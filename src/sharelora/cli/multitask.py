"""``sharelora multitask``: several classification tasks in one model, jointly or one after another."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import (
    CliError, add_run_arguments, config_from_args, csv_list, not_pretrained_note, positive_float, positive_int,
    read_config_arg,
)
from .train import add_run_control_arguments, start_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..training.methods import TASK_CORES, TASK_SHARES  # [train]: imported here, so a missing extra is one line

    p.description = (
        "Train one model on several classification tasks: jointly on mixed-task batches (default) or one task "
        "after another (--continual), a head per task, per-task dev metrics every epoch, the best checkpoint on "
        "the mean dev metric, per-task test metrics at the end. E.g. sharelora multitask --tasks "
        "rotten-tomatoes,vitaminc --method sharea --task-share A. Output as sharelora train (results.json, "
        "log.jsonl, curves.png with a curve per task, a multi-adapter adapter/); --resume continues a killed run."
    )
    p.add_argument("--tasks", type=csv_list, default=argparse.SUPPRESS, metavar="A,B",
                   help="the tasks: registered dataset names or NAME=PATH items (a local file or folder); required "
                        "unless --config names them")
    p.add_argument("--task-share", choices=list(TASK_SHARES), default=argparse.SUPPRESS,
                   help="what the tasks' adapters share: A (one A per module type for every task and layer; "
                        "each task owns its B's), B, AB (every task reads the same A and B and owns only a core: "
                        "--task-core), or none (an adapter each) (default: A)")
    p.add_argument("--task-core", choices=list(TASK_CORES), default=argparse.SUPPRESS,
                   help="with --task-share AB: each task's own part per adapted module, an r x r matrix C "
                        "(matrix: B C A) or an r-vector c (diagonal: B diag(c) A). The tasks that train the basis "
                        "start as a ShareLoRA adapter (B = 0, core = identity), the others at core 0 on the trained "
                        "basis, so every task starts exactly at the base model (--method-option basis_init=random: "
                        "the earlier random B and zero cores) (default: none)")
    p.add_argument("--basis-tasks", type=positive_int, default=argparse.SUPPRESS, metavar="K",
                   help="with --continual: the first K tasks train the shared tensors (the basis) jointly in "
                        "stage 1, then they are frozen and the other tasks follow one by one, each training only "
                        "its own tensors and head (default: 1, the basis from the first task alone)")
    p.add_argument("--basis-from", default=argparse.SUPPRESS, metavar="DIR",
                   help="the task-shared tensors (A, B) from DIR (a `sharelora compress --task-core` output or an "
                        "earlier multitask run, with the same --method, --rank, --targets and --task-share), frozen "
                        "in every stage: each task trains only its own tensors (cores) and head")
    p.add_argument("--grow-basis", type=int, default=argparse.SUPPRESS, metavar="G",
                   help="with task cores and --continual: every task after the basis stage adds G new directions "
                        "to the shared A and B (trained by it alone, read by the later tasks; the earlier tasks "
                        "stay bit-identical); results.json records each task's basis fit (default: 0)")
    p.add_argument("--core-lr", type=float, default=argparse.SUPPRESS, metavar="LR",
                   help="with --continual: the peak lr of each task's own tensors (its cores) and head in the stages "
                        "that train only those, i.e. every stage after the basis (every stage with --basis-from); the "
                        "basis stage, and the basis directions a task grows (--grow-basis), keep --lr. 0: the own "
                        "tensors stay at their start and the head alone trains (a head-only check; needs --head-lr) "
                        "(default: --lr)")
    p.add_argument("--head-lr", type=positive_float, default=argparse.SUPPRESS, metavar="LR",
                   help="with --continual: the peak lr of each task's head in the stages after the basis "
                        "(default: their --core-lr)")
    p.add_argument("--orthonormalize-basis", action="store_true", default=argparse.SUPPRESS,
                   help="with --task-core matrix and --continual (or --basis-from): once the basis is final (after "
                        "the basis stage, before it is scored; or as loaded) make its directions orthonormal and of "
                        "equal length, each core absorbing the factors: every task computes what it did, and the "
                        "later cores train on a well-conditioned basis")
    p.add_argument("--continual", action="store_true", default=argparse.SUPPRESS,
                   help="the tasks one after another: the first trains the shared tensors, later ones only their "
                        "own; every earlier task is re-scored after each stage (forgetting)")
    p.add_argument("--continual-train-shared", action="store_true", default=argparse.SUPPRESS,
                   help="with --continual: keep training the shared tensors in later stages (they then forget)")
    p.add_argument("--one-adapter", action="store_true", default=argparse.SUPPRESS,
                   help="one adapter for all tasks, no task id (with --continual: plain sequential fine-tuning)")
    p.add_argument("--heads", type=positive_int, default=argparse.SUPPRESS,
                   help="K > 1: HydraLoRA, one shared A and K B heads mixed per token by a router (default: 1)")
    p.add_argument("--router-top-k", type=positive_int, default=argparse.SUPPRESS, help="HydraLoRA: keep the top k heads per token")
    p.add_argument("--sampling-temperature", type=positive_float, default=argparse.SUPPRESS,
                   help="joint training: a row's task drawn with p_t ~ N_t^(1/T); 1 = every row once, in proportion "
                        "to size (default: 1)")
    add_run_arguments(p)
    for action in p._actions:  # --method hydra: HydraLoRA (lora with --heads K)
        if action.dest == "method" and action.choices is not None:
            action.choices = [*action.choices, "hydra"]
    add_run_control_arguments(p)


MULTITASK_FIELDS = ("tasks", "task_share", "task_core", "basis_tasks", "basis_from", "grow_basis", "core_lr", "head_lr",
                    "orthonormalize_basis", "continual", "continual_train_shared", "one_adapter", "heads", "router_top_k",
                    "sampling_temperature", "task_dataset_options")


def config_from_multitask_args(args: argparse.Namespace):
    """MultiTaskConfig from --config (its fields, the tasks too) with the options given here on top."""
    from ..training.multitask import MultiTaskConfig

    values = read_config_arg(args, MultiTaskConfig)
    values.update({key: getattr(args, key) for key in MULTITASK_FIELDS if hasattr(args, key)})
    if not values.get("tasks"):
        raise CliError("name the tasks: --tasks A,B (registered data sets or NAME=PATH items), or tasks: in --config")
    return config_from_args(args, MultiTaskConfig, values)


def run(args: argparse.Namespace) -> int:
    from ..training.multitask import train_multitask

    cfg = config_from_multitask_args(args)
    start_run(args)
    results = train_multitask(cfg, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                              keep_state=args.keep_state)
    if results.get("status") == "interrupted":
        return 130
    out = Path(results["config"]["output_dir"])
    metric = results["metric"]
    p = results["parameters"]
    print(f"\n{results['name']}: {results['method']} ({results['layout']}), "
          f"{json.dumps({k: v for k, v in p.items() if isinstance(v, int)})}{not_pretrained_note(results)}")
    for name, t in results["tasks"].items():
        test = t.get("test") or {}
        print(f"  {name}: dev {metric} {t['dev'][metric]:.4f}" + (f", test {test[metric]:.4f}" if test else ""))
    mean = results["mean"]
    print(f"  mean: dev {mean['dev']:.4f}" + (f", test {mean['test']:.4f}" if mean.get("test") is not None else ""))
    if "forgetting" in results:
        print(f"  forgetting ({metric}, test): {json.dumps(results['forgetting']['per_task'])}")
    print(f"  results: {out / 'results.json'}\n  adapter: {out / 'adapter'}\n  curves:  {out / 'curves.png'}")
    return 0


def register(register_command) -> None:
    register_command("multitask", "train one model on several tasks (joint, continual or HydraLoRA)", add_arguments, run)
