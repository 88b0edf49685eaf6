"""Command-line pieces of the generation tasks (E2E, instructions, MMLU).

``sharelora.cli`` uses the helpers here for ``train`` / ``compare`` / ``eval --task ...`` and
loads this module as a plugin, which adds the two studies of the paper's robustness claims:

    sharelora transfer   train on task 1, continue on task 2, measure how much of task 1 is kept
    sharelora overfit    train vs dev loss over epochs on a small training set

Heavy imports happen inside the functions so ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

# Generation-task options of a run: (flag, TrainConfig.task_options key, type, help).
TASK_OPTION_FLAGS = [
    ("--num-beams", "num_beams", int, "e2e: beam width on the test split (default: 4; 1 = greedy)"),
    ("--dev-num-beams", "dev_num_beams", int, "e2e: beam width of the dev evaluations during training (default: 1)"),
    ("--max-new-tokens", "max_new_tokens", int, "e2e: longest generated description (default: 64)"),
    ("--max-dev-mrs", "max_dev_mrs", int, "e2e: decode at most this many dev MRs per evaluation (default: all 20)"),
]


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("generation tasks (--task e2e | instructions)")
    for flag, key, kind, help_text in TASK_OPTION_FLAGS:
        group.add_argument(flag, dest=f"task_option_{key}", type=kind, default=argparse.SUPPRESS, metavar="N",
                           help=help_text)


def task_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {key: getattr(args, f"task_option_{key}") for _, key, _, _ in TASK_OPTION_FLAGS
            if hasattr(args, f"task_option_{key}")}


def with_task_preset(values: dict[str, Any], task: str | None) -> dict[str, Any]:
    """``values`` on top of the preset of generation task ``task`` (unchanged for other tasks).

    Call it once every option is in ``values``: the preset's dataset options depend on the
    dataset finally chosen (``build.dataset_options``).
    """
    from .build import preset_values

    return preset_values(task, values)


def not_pretrained_note(results: dict[str, Any]) -> str:
    return " [NOT PRETRAINED: random weights]" if results.get("pretrained") is False else ""


# --- eval --task mmlu | e2e | instructions -------------------------------------------------------------
def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation tasks and MMLU")
    g.add_argument("--task", default="auto", choices=["auto", "classification", "e2e", "instructions", "mmlu"],
                   help="what to evaluate (default: auto = the task the adapter was trained on); "
                        "mmlu scores the answer letter's log-likelihood")
    g.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="mmlu without an adapter: evaluate this base model (e.g. smollm2)")
    g.add_argument("--shots", type=int, default=0, help="mmlu: solved examples before each question (default: 0; the paper: 5)")
    g.add_argument("--subjects", default=None, metavar="A,B", help="mmlu: only these subjects (default: all 57)")
    g.add_argument("--max-per-subject", type=int, default=None, help="mmlu: at most N questions per subject")
    g.add_argument("--num-beams", type=int, default=None, help="e2e: beam width (default: the run's)")


def eval_generation(args: argparse.Namespace) -> int:
    """``sharelora eval`` for MMLU and for adapters trained on a generation task."""
    from ..sources import load_dataset, load_model
    from ..training import load_trained_model
    from ..training.evaluate import EVAL_BATCH_SIZE
    from ..training.loop import pick_device
    from .mmlu import evaluate_mmlu

    device = pick_device(args.device)
    if args.task == "mmlu":
        if args.adapter_dir:
            model, tokenizer, info = load_trained_model(args.adapter_dir, cache_dir=args.cache_dir, device=str(device))
            what = {"adapter_dir": info["adapter_dir"], "model": info["model"]}
        else:
            if not args.model:
                raise ValueError("eval --task mmlu needs an ADAPTER_DIR or --model NAME (e.g. --model smollm2)")
            bundle = load_model(args.model, task="causal-lm", cache_dir=args.cache_dir)
            model, tokenizer = bundle.model.to(device).eval(), bundle.tokenizer
            what = {"model": bundle.name, "pretrained": bundle.pretrained}
        subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
        data = load_dataset(args.dataset or "mmlu", cache_dir=args.cache_dir)
        result = evaluate_mmlu(model, tokenizer, data, shots=args.shots, subjects=subjects,
                               max_per_subject=args.max_per_subject or args.max_examples,
                               batch_size=args.batch_size or EVAL_BATCH_SIZE,
                               device=device, progress=True)
        result = {**what, "dataset": data.name, **result}
        per_subject = result.pop("per_subject")
        print(json.dumps(result, indent=2))
        print(f"per subject: {len(per_subject)} (in --json)")
        result["per_subject"] = per_subject
    else:
        result = _eval_generation_adapter(args, device)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _eval_generation_adapter(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    """Metrics of an e2e / instructions adapter on ``args.split``, decoded and scored as its run did.

    The run's task options (beam widths, new-token limit, chat template, ...) come from its
    run_info.json, as do its eval batch size and dev / test example cap unless ``--batch-size`` /
    ``--max-examples`` are given, so the scores equal the run's own evaluation of that split;
    ``--num-beams`` overrides the beam width of every split. With
    ``--json FILE`` the E2E outputs go beside it, to ``<FILE stem>-samples-<split>.jsonl``.
    """
    from ..cli import data_options_from_args
    from ..sources import load_dataset
    from ..training import load_trained_model, read_run_info
    from ..training.config import TrainConfig
    from ..training.evaluate import eval_settings
    from .build import build_task, dataset_options

    if not args.adapter_dir:
        raise ValueError(f"eval --task {args.task} needs ADAPTER_DIR (a run directory runs/<name> or its adapter/)")
    info = read_run_info(args.adapter_dir)
    name = info.get("task")
    if name not in ("e2e", "instructions"):
        raise ValueError(f"{info['adapter_dir']} was not trained on a generation task (run_info.json task: {name!r}); "
                         "evaluate it without --task")
    if args.task not in ("auto", name):
        raise ValueError(f"{info['adapter_dir']} was trained on task {name!r}, not {args.task!r}; "
                         f"drop --task or pass --task {name}")
    options = dict(info.get("task_options") or _legacy_task_options(info))
    if args.num_beams is not None:
        if name != "e2e":
            raise ValueError(f"--num-beams applies to e2e adapters (decoding); {info['adapter_dir']} is {name!r}")
        options.update(num_beams=args.num_beams, dev_num_beams=args.num_beams)
    if args.dataset is None:
        data_options = {**(info.get("dataset_options") or {}), **data_options_from_args(args)}
    else:
        data_options = dataset_options(name, args.dataset, data_options_from_args(args))
    data = load_dataset(args.dataset or info["dataset"], cache_dir=args.cache_dir, **data_options)
    model, tokenizer, _ = load_trained_model(args.adapter_dir, cache_dir=args.cache_dir, device=str(device))
    cfg = TrainConfig(task=name, max_length=info["max_length"], task_options=options)
    out = Path(args.json) if args.json else None
    task = build_task(cfg, data, tokenizer, output_dir=out.parent if out else None,
                      samples_name=f"{out.stem}-samples-{{split}}.jsonl" if out else None)
    batch_size, max_examples = eval_settings(info, args.split, args.batch_size, args.max_examples,
                                             own_data=args.dataset is None)
    split = task.encode(args.split, max_examples)
    metrics = task.evaluate(model, split, batch_size, device)
    result = {"adapter_dir": info["adapter_dir"], "task": name, "dataset": data.name, "split": args.split,
              "examples": len(split), **metrics}
    samples = task.samples_path(args.split) if hasattr(task, "samples_path") else None
    if samples is not None:
        result["samples"] = str(samples)
    print(json.dumps(result, indent=2))
    return result


def _legacy_task_options(info: dict[str, Any]) -> dict[str, Any]:
    """Task options of a run_info.json written before it recorded ``task_options``."""
    if info.get("task") == "instructions":
        return {"use_chat_template": info["chat_template"]} if "chat_template" in info else {}
    return {k: info[k] for k in ("num_beams", "max_new_tokens") if k in info}


def is_generation_adapter(adapter_dir: str | None) -> bool:
    if not adapter_dir:
        return False
    from ..training import read_run_info

    try:
        return read_run_info(adapter_dir).get("model_task") == "causal-lm"
    except FileNotFoundError:
        return False


# --- compare over generation tasks ---------------------------------------------------------------------
def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("instructions: MMLU after training")
    g.add_argument("--mmlu-shots", type=int, default=None, help="score every trained adapter (and the base model) "
                   "on MMLU with this many shots (0 or 5)")
    g.add_argument("--mmlu-subjects", default=None, metavar="A,B", help="MMLU subjects (default: all)")
    g.add_argument("--mmlu-max-per-subject", type=int, default=None, help="MMLU questions per subject")


def compare_generation_from_args(args: argparse.Namespace, base: Any, out: str) -> int:
    from ..training.compare_generation import compare_generation

    mmlu = None
    if args.mmlu_shots is not None:
        mmlu = {"shots": args.mmlu_shots, "max_per_subject": args.mmlu_max_per_subject,
                "subjects": [s.strip() for s in args.mmlu_subjects.split(",")] if args.mmlu_subjects else None}
    command = "sharelora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = compare_generation(base, args.methods, args.seeds, out, mmlu=mmlu, isolate=not args.in_process,
                                 progress=args.progress, command=command)
    print()
    print((Path(out) / "compare.md").read_text(encoding="utf-8"))
    print(f"written: {out}/compare.md, compare.json, compare.png ({len(summary['runs'])} runs)")
    return 0


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
    command = "sharelora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    transfer_study(methods=_split_list(args.methods), seeds=_split_list(args.seeds, int), first=args.first,
                   second=args.second, first_steps=args.first_steps, second_steps=args.second_steps,
                   eval_examples=args.eval_examples, model=args.model, rank=args.rank, lr=args.lr,
                   batch_size=args.batch_size, output_dir=out, cache_dir=args.cache_dir, command=command)
    print((Path(out) / "transfer.md").read_text(encoding="utf-8"))
    return 0


def _overfit_run(args: argparse.Namespace) -> int:
    from ..training.studies import overfit_study

    out = args.output_dir or f"runs/overfit-{args.task}"
    command = "sharelora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    overfit_study(methods=_split_list(args.methods), seeds=_split_list(args.seeds, int), task=args.task,
                  train_examples=args.train_examples, epochs=args.epochs, eval_examples=args.eval_examples,
                  model=args.model, rank=args.rank, lr=args.lr, batch_size=args.batch_size, output_dir=out,
                  cache_dir=args.cache_dir, command=command)
    print((Path(out) / "overfit.md").read_text(encoding="utf-8"))
    return 0


def register(register_command) -> None:
    register_command("transfer", "train on task 1, continue on task 2, measure task-1 retention (LoRA vs ShareA)",
                     _transfer_arguments, _transfer_run)
    register_command("overfit", "train vs dev loss over epochs on a small training set, per method",
                     _overfit_arguments, _overfit_run)
