"""``sharelora eval``: score a trained adapter (or fully fine-tuned model) on a split, or a model on MMLU.

The command parses its flags and calls ``sharelora.evaluate_run`` (runs/evaluate.py), which a Python
user calls the same way."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .common import add_data_arguments, data_options_from_args, positive_int


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
    g.add_argument("--allow-unisolated-sandbox", action="store_true",
                   help="humaneval: run the generated code even where the sandbox cannot isolate it (no Linux "
                        "namespaces, e.g. a restricted container). It then runs as your user with only resource "
                        "limits: it can write your files outside its temporary directory, leave processes behind "
                        "(setsid) and signal your processes, this one included. Without this flag it is refused "
                        "there (default: refuse)")
    g.add_argument("--subjects", default=None, metavar="A,B", help="mmlu: only these subjects (default: all 57)")
    g.add_argument("--max-per-subject", type=int, default=None, help="mmlu: at most N questions per subject")
    g.add_argument("--num-beams", type=int, default=None, help="e2e: beam width (default: the run's)")


def run(args: argparse.Namespace) -> int:
    from ..runs.evaluate import evaluate_run

    out = Path(args.json) if args.json else None
    result = evaluate_run(
        args.adapter_dir, split=args.split, task=args.task, dataset=args.dataset,
        data_options=data_options_from_args(args),
        adapters=[n.strip() for n in args.adapter.split(",") if n.strip()] if args.adapter is not None else None,
        max_examples=args.max_examples, batch_size=args.batch_size, cache_dir=args.cache_dir, device=args.device,
        model=args.model, shots=args.shots, max_new_tokens=args.max_new_tokens, prompt_format=args.prompt_format,
        sandbox_timeout=args.sandbox_timeout,
        allow_unisolated_sandbox=args.allow_unisolated_sandbox, max_per_subject=args.max_per_subject, num_beams=args.num_beams,
        subjects=[s.strip() for s in args.subjects.split(",")] if args.subjects else None,
        samples_path=out.parent / f"{out.stem}-samples-{{split}}.jsonl" if out else None)
    rows = {k: result[k] for k in ("per_subject", "samples") if isinstance(result.get(k), (list, dict))}
    print(json.dumps({k: v for k, v in result.items() if k not in rows}, indent=2))
    for key, value in rows.items():  # the benchmarks' per-subject rows and samples: in --json only
        print(f"{key.replace('_', ' ')}: {len(value)} (in --json)")
    if out:
        out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def register(register_command) -> None:
    register_command("eval", "evaluate a trained adapter on a data split", add_arguments, run)
