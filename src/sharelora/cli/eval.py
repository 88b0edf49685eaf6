"""``sharelora eval``: score a trained adapter (or fully fine-tuned model) on a split, or a model on MMLU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import CliError, add_data_arguments, data_options_from_args, positive_int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a trained adapter (or fully fine-tuned model) on a split of a data set; "
                     "--task mmlu scores an adapter or a base model (--model) on MMLU.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", nargs="?", default=None,
                   help="a run directory (runs/<name>) or its adapter/ directory (optional with --task mmlu --model)")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH", help="data set (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to evaluate (default: test)")
    p.add_argument("--max-examples", type=positive_int, default=None,
                   help="evaluate only the first N examples (default: the run's --max-eval-examples on its "
                        "own dev / test, else all)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="evaluation batch size (default: the run's --eval-batch-size, else 64)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where fetched models and data are kept")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    p.add_argument("--adapter", default=None, metavar="NAME[,NAME]",
                   help="a multi-task directory (sharelora multitask / compress): score these tasks (default: all)")
    add_data_arguments(p, suppress=False)
    g = p.add_argument_group("generation tasks and MMLU")
    g.add_argument("--task", default="auto",
                   choices=["auto", "classification", "e2e", "instructions", "mmlu", "humaneval", "gsm8k"],
                   help="what to evaluate (default: auto = the task the adapter was trained on); "
                        "mmlu scores the answer letter's log-likelihood; humaneval: greedy pass@1 (code run in "
                        "a sandbox); gsm8k: exact match of the final number")
    g.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="mmlu without an adapter: evaluate this base model (e.g. smollm2)")
    g.add_argument("--shots", "--few-shot", dest="shots", type=int, default=0,
                   help="mmlu / gsm8k: solved examples before each question (default: 0; MMLU in the paper: 5)")
    g.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="humaneval / gsm8k: longest completion (default: 384 / 256)")
    g.add_argument("--prompt-format", choices=["completion", "chat"], default="completion",
                   help="humaneval / gsm8k: completion = the model continues the bare prompt (default; base "
                        "models); chat = through the chat template (instruct models): humaneval asks for the whole "
                        "function in a ```python block, whose code is run; gsm8k gives the exemplars as chat turns")
    g.add_argument("--sandbox-timeout", type=float, default=5.0,
                   help="humaneval: wall-clock seconds per program in the sandbox (default: 5)")
    g.add_argument("--subjects", default=None, metavar="A,B", help="mmlu: only these subjects (default: all 57)")
    g.add_argument("--max-per-subject", type=int, default=None, help="mmlu: at most N questions per subject")
    g.add_argument("--num-beams", type=int, default=None, help="e2e: beam width (default: the run's)")


def run(args: argparse.Namespace) -> int:
    from ..training.multitask import is_multitask_dir

    if args.adapter is not None and not is_multitask_dir(args.adapter_dir):
        raise CliError(f"--adapter picks tasks of a multi-task directory; {args.adapter_dir} holds one adapter, "
                       "drop --adapter")
    if args.task in ("auto", "classification") and is_multitask_dir(args.adapter_dir):
        result = _eval_tasks(args)
    elif args.task == "mmlu":
        result = _eval_mmlu(args)
    elif args.task in ("humaneval", "gsm8k"):
        result = _eval_code_math(args)
    elif args.task in ("e2e", "instructions") or _is_generation_adapter(args.adapter_dir):
        result = _eval_generation_adapter(args)
    else:
        result = _eval_classification(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _eval_tasks(args: argparse.Namespace) -> dict[str, Any]:
    """Every task (or the ``--adapter`` ones) of a multi-task directory, each on its own data set."""
    from ..training.multitask import evaluate_tasks

    names = [n.strip() for n in args.adapter.split(",") if n.strip()] if args.adapter else None
    result = evaluate_tasks(args.adapter_dir, names, split=args.split, dataset=args.dataset,
                            data_options=data_options_from_args(args), batch_size=args.batch_size,
                            max_examples=args.max_examples, cache_dir=args.cache_dir, device=args.device)
    print(json.dumps(result, indent=2))
    return result


def _eval_classification(args: argparse.Namespace) -> dict[str, Any]:
    from ..sources import load_dataset
    from ..tasks import ClassificationTask
    from ..training import evaluate, load_trained_model
    from ..training.evaluate import eval_settings
    from ..training.engine import pick_device

    if args.adapter_dir is None:
        raise CliError("eval needs ADAPTER_DIR (a run directory or its adapter/); only --task mmlu --model NAME works without")
    device = pick_device(args.device)
    model, tokenizer, info = load_trained_model(args.adapter_dir, cache_dir=args.cache_dir, device=str(device))
    options = dict(info.get("dataset_options") or {}) if args.dataset is None else {}
    options.update(data_options_from_args(args))
    data = load_dataset(args.dataset or info["dataset"], cache_dir=args.cache_dir, **options)
    task = ClassificationTask(data, tokenizer, max_length=info["max_length"])
    if task.num_labels != info["num_labels"]:
        raise CliError(f"{data.name} has {task.num_labels} label(s) but the model was trained with {info['num_labels']}; "
                       "evaluate on a data set with the same labels")
    batch_size, max_examples = eval_settings(info, args.split, args.batch_size, args.max_examples,
                                             own_data=args.dataset is None)
    split = task.encode(args.split, max_examples)
    metrics = evaluate(model, task, split, batch_size, device)
    result = {"adapter_dir": info["adapter_dir"], "dataset": data.name, "split": args.split, "examples": len(split), **metrics}
    print(json.dumps(result, indent=2))
    return result


def _adapter_or_base_model(args: argparse.Namespace):
    """(model, tokenizer, what was loaded, device) for the LM benchmarks: ADAPTER_DIR's run, or a base --model."""
    from ..sources import load_model
    from ..training import load_trained_model
    from ..training.engine import pick_device

    device = pick_device(args.device)
    if args.adapter_dir:
        model, tokenizer, info = load_trained_model(args.adapter_dir, cache_dir=args.cache_dir, device=str(device))
        what = {"adapter_dir": info["adapter_dir"], "model": info["model"]}
    else:
        if not args.model:
            raise CliError(f"eval --task {args.task} needs an ADAPTER_DIR or --model NAME (e.g. --model smollm2)")
        bundle = load_model(args.model, task="causal-lm", cache_dir=args.cache_dir)
        model, tokenizer = bundle.model.to(device).eval(), bundle.tokenizer
        what = {"model": bundle.name, "pretrained": bundle.pretrained}
    return model, tokenizer, what, device


def _eval_code_math(args: argparse.Namespace) -> dict[str, Any]:
    """HumanEval pass@1 or GSM8K final-number accuracy of an adapter or a base model (``--model``)."""
    from ..sources import load_dataset
    from ..tasks.code_math import evaluate_gsm8k, evaluate_humaneval

    model, tokenizer, what, device = _adapter_or_base_model(args)
    data = load_dataset(args.dataset or args.task, cache_dir=args.cache_dir)
    options = {"max_examples": args.max_examples, "batch_size": args.batch_size or 8, "device": device, "progress": True}
    if args.max_new_tokens:
        options["max_new_tokens"] = args.max_new_tokens
    if args.task == "humaneval":
        result = evaluate_humaneval(model, tokenizer, data, timeout_s=args.sandbox_timeout,
                                    prompt_format=args.prompt_format, **options)
    else:
        result = evaluate_gsm8k(model, tokenizer, data, shots=args.shots, prompt_format=args.prompt_format, **options)
    result = {**what, "dataset": data.name, **result}
    samples = result.pop("samples")
    print(json.dumps(result, indent=2))
    print(f"samples: {len(samples)} (in --json)")
    result["samples"] = samples
    return result


def _eval_mmlu(args: argparse.Namespace) -> dict[str, Any]:
    from ..sources import load_dataset
    from ..tasks.mmlu import evaluate_mmlu
    from ..training.evaluate import EVAL_BATCH_SIZE

    model, tokenizer, what, device = _adapter_or_base_model(args)
    subjects = [s.strip() for s in args.subjects.split(",")] if args.subjects else None
    data = load_dataset(args.dataset or "mmlu", cache_dir=args.cache_dir)
    result = evaluate_mmlu(model, tokenizer, data, shots=args.shots, subjects=subjects,
                           max_per_subject=args.max_per_subject or args.max_examples,
                           batch_size=args.batch_size or EVAL_BATCH_SIZE, device=device, progress=True)
    result = {**what, "dataset": data.name, **result}
    per_subject = result.pop("per_subject")
    print(json.dumps(result, indent=2))
    print(f"per subject: {len(per_subject)} (in --json)")
    result["per_subject"] = per_subject
    return result


def _eval_generation_adapter(args: argparse.Namespace) -> dict[str, Any]:
    """Metrics of an e2e / instructions adapter on ``args.split``, decoded and scored as its run did.

    The run's task options (beam widths, new-token limit, chat template, ...) come from its
    run_info.json, as do its eval batch size and dev / test example cap unless ``--batch-size`` /
    ``--max-examples`` are given, so the scores equal the run's own evaluation of that split;
    ``--num-beams`` overrides the beam width of every split. With
    ``--json FILE`` the E2E outputs go beside it, to ``<FILE stem>-samples-<split>.jsonl``.
    """
    from ..sources import load_dataset
    from ..tasks.build import build_task, dataset_options
    from ..training import load_trained_model, read_run_info
    from ..training.evaluate import eval_settings
    from ..training.engine import pick_device

    if not args.adapter_dir:
        raise CliError(f"eval --task {args.task} needs ADAPTER_DIR (a run directory runs/<name> or its adapter/)")
    device = pick_device(args.device)
    info = read_run_info(args.adapter_dir)
    name = info.get("task")
    if name not in ("e2e", "instructions"):
        raise CliError(f"{info['adapter_dir']} was not trained on a generation task (run_info.json task: {name!r}); "
                       "evaluate it without --task")
    if args.task not in ("auto", name):
        raise CliError(f"{info['adapter_dir']} was trained on task {name!r}, not {args.task!r}; "
                       f"drop --task or pass --task {name}")
    options = dict(info.get("task_options") or _legacy_task_options(info))
    if args.num_beams is not None:
        if name != "e2e":
            raise CliError(f"--num-beams applies to e2e adapters (decoding); {info['adapter_dir']} is {name!r}")
        options.update(num_beams=args.num_beams, dev_num_beams=args.num_beams)
    if args.dataset is None:
        data_options = {**(info.get("dataset_options") or {}), **data_options_from_args(args)}
    else:
        data_options = dataset_options(name, args.dataset, data_options_from_args(args))
    data = load_dataset(args.dataset or info["dataset"], cache_dir=args.cache_dir, **data_options)
    model, tokenizer, _ = load_trained_model(args.adapter_dir, cache_dir=args.cache_dir, device=str(device))
    out = Path(args.json) if args.json else None
    task = build_task(name, data, tokenizer, max_length=info["max_length"], options=options,
                      output_dir=out.parent if out else None,
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


def _is_generation_adapter(adapter_dir: str | None) -> bool:
    if not adapter_dir:
        return False
    from ..training import read_run_info

    try:
        return read_run_info(adapter_dir).get("model_task") == "causal-lm"
    except FileNotFoundError:
        return False


def register(register_command) -> None:
    register_command("eval", "evaluate a trained adapter on a data split", add_arguments, run)
