"""The ``sharelora`` command line.

Each subcommand is a ``Command``: a function that adds its arguments to an argparse parser and
a function that runs it. The commands here only parse arguments and call the library
(``sharelora.training``, ``sharelora.tasks``); heavy imports happen inside ``run`` so ``--help``
is instant.

Adding a command: call ``register_command(...)`` here, or put a module in ``PLUGINS`` that
defines ``register(register_command)``, e.g. ``sharelora/bench/cli.py``:

    def register(register_command):
        register_command("bench", "time and memory of LoRA vs ShareLoRA", add_arguments, run)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Command:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}

# Modules that add commands of their own (skipped while they do not exist yet).
PLUGINS = ("sharelora.bench.cli", "sharelora.tasks.cli", "sharelora.serve.cli")


def register_command(name: str, help: str, add_arguments, run) -> None:
    """Make ``sharelora NAME`` call ``run(args)`` after ``add_arguments(parser)`` built its parser."""
    if name in COMMANDS:
        raise ValueError(f"command {name!r} is registered twice")
    COMMANDS[name] = Command(name, help, add_arguments, run)


class CliError(Exception):
    """A user error: printed as one line naming the fix, exit status 2."""


# --- shared argument groups ------------------------------------------------------------------------
def csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. query,value")
    return items


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


# Options of a training run: (flags, TrainConfig field, argparse keywords). Defaults are SUPPRESSed
# so that only options given on the command line override TrainConfig's defaults or --config.
def _run_options() -> list[tuple[str, str, dict]]:
    from .training.config import METHODS, TrainConfig

    d = TrainConfig()
    return [
        ("--model", "model", dict(metavar="NAME_OR_PATH", help=f"built-in model name, hub id or local model directory (default: {d.model})")),
        ("--dataset", "dataset", dict(metavar="NAME_OR_PATH", help=f"built-in dataset, local CSV/JSON(L) file or hub:owner/name (default: {d.dataset})")),
        ("--method", "method", dict(choices=list(METHODS), help=f"what to train (default: {d.method})")),
        ("--task", "task", dict(choices=["auto", "classification", "e2e", "instructions"],
                                help="auto (from the dataset), classification, or a generation task: e2e | instructions, "
                                     "which start from their own defaults (model smollm2, its dataset, q/v targets, sizes)")),
        ("--rank", "rank", dict(type=_positive_int, help=f"LoRA rank r (default: {d.rank})")),
        ("--alpha", "alpha", dict(type=_positive_float, help=f"LoRA alpha; the update is scaled by alpha/r (default: {d.alpha:g})")),
        ("--dropout", "dropout", dict(type=_fraction, help=f"dropout on the adapter input (default: {d.dropout})")),
        ("--targets", "targets", dict(type=csv_list, metavar="A,B", help=f"modules to adapt (default: {','.join(d.targets)})")),
        ("--modules-to-save", "modules_to_save", dict(type=csv_list, metavar="A,B", help="modules trained in full with the adapter (default: the classification head)")),
        ("--lr", "lr", dict(type=_positive_float, help="peak learning rate (default: 2e-3 for adapters, 3e-5 for full)")),
        ("--weight-decay", "weight_decay", dict(type=float, help=f"AdamW weight decay (default: {d.weight_decay})")),
        ("--epochs", "epochs", dict(type=_positive_int, help=f"passes over the training set (default: {d.epochs})")),
        ("--max-steps", "max_steps", dict(type=_positive_int, help="stop after this many optimizer steps")),
        ("--batch-size", "batch_size", dict(type=_positive_int, help=f"examples per optimizer step, over all processes "
                                            f"(split between them and --grad-accum) (default: {d.batch_size})")),
        ("--grad-accum", "grad_accum", dict(type=_positive_int, help=f"micro-batches per optimizer step (default: {d.grad_accum})")),
        ("--warmup-ratio", "warmup_ratio", dict(type=_fraction, help=f"fraction of steps with linear warmup (default: {d.warmup_ratio})")),
        ("--max-grad-norm", "max_grad_norm", dict(type=_positive_float, help=f"gradient clipping norm (default: {d.max_grad_norm})")),
        ("--max-length", "max_length", dict(type=_positive_int, help=f"tokens per example (default: {d.max_length})")),
        ("--seed", "seed", dict(type=int, help=f"random seed (default: {d.seed})")),
        ("--max-train-examples", "max_train_examples", dict(type=_positive_int, help="use only the first N training examples")),
        ("--max-eval-examples", "max_eval_examples", dict(type=_positive_int, help="use only the first N dev / test examples")),
        ("--eval-batch-size", "eval_batch_size", dict(type=_positive_int, help=f"batch size for evaluation (default: {d.eval_batch_size})")),
        ("--log-every", "log_every", dict(type=_positive_int, help=f"optimizer steps per log record (default: {d.log_every})")),
        ("--checkpoint-every", "checkpoint_every", dict(type=_positive_int, help=f"optimizer steps between resume checkpoints (default: {d.checkpoint_every})")),
        ("--cache-dir", "cache_dir", dict(metavar="DIR", help="where fetched models and data are kept (default: ~/.cache/sharelora)")),
        ("--device", "device", dict(help="auto (cuda if available), cpu or cuda[:i] (default: auto)")),
        ("--fsdp", "fsdp", dict(action="store_true",
                                help="with several processes (torchrun / accelerate launch): shard the model with "
                                     "FSDP2 (one unit per transformer block, the shared adapter tensors in the root) "
                                     "instead of replicating it with DDP")),
        # Memory options (sharelora.training.memory).
        ("--bf16", "bf16", dict(action="store_true",
                                help="frozen base weights in bfloat16 and the forward under bf16 autocast; the "
                                     "adapter and head keep fp32 master weights (full fine-tuning: fp32 weights, "
                                     "autocast only)")),
        ("--gradient-checkpointing", "gradient_checkpointing", dict(
            action="store_true", help="recompute each transformer block's activations in backward instead of "
                                      "keeping them (exact; about one more forward of time)")),
        ("--quantize", "quantize", dict(choices=["4bit", "8bit"],
                                        help="load the base's linear maps quantized with bitsandbytes: 4bit = NF4 "
                                             "with double quantization (QLoRA), 8bit = LLM.int8(); the heads stay "
                                             "float. Needs: pip install 'sharelora[quantize]'")),
        ("--quantize-compute-dtype", "quantize_compute_dtype", dict(
            choices=["float32", "bfloat16", "float16"],
            help="dtype the 4-bit layers compute in (default: bfloat16 with --bf16, else float32)")),
    ]


# Options that describe how to read a local data file; passed to sources.load_dataset.
DATA_OPTIONS = [
    ("--text-column", "text_column", "column holding the text (local files)"),
    ("--text-pair-column", "text_pair_column", "column holding the second text of a pair (local files)"),
    ("--label-column", "label_column", "column holding the label (local files)"),
    ("--task-type", "task_type", "what the rows of a local file are: classification, regression, generation "
                                 "(e2e: mr, target) or instruction (instruction, input, output) "
                                 "(default: classification; --task e2e / instructions imply theirs)"),
]
LOCAL_TASK_TYPES = ["classification", "regression", "generation", "instruction"]


def _key_value(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. train=1000 or dev_size=0.2), got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_data_arguments(parser: argparse.ArgumentParser, suppress: bool = True) -> None:
    data = parser.add_argument_group("data options (local files; see sharelora.sources.load_dataset)")
    default = argparse.SUPPRESS if suppress else None
    for flag, dest, help_text in DATA_OPTIONS:
        kwargs = {"choices": LOCAL_TASK_TYPES} if dest == "task_type" else {"metavar": "NAME"}
        data.add_argument(flag, dest=dest, default=default, help=help_text, **kwargs)
    data.add_argument("--data-option", dest="data_option", type=_key_value, action="append", default=default,
                      metavar="KEY=VALUE", help="any other load_dataset option, e.g. dev_size=0.2 or train=1000 (repeatable)")


def data_options_from_args(args: argparse.Namespace) -> dict:
    options = dict(getattr(args, "data_option", None) or [])
    for _, dest, _ in DATA_OPTIONS:
        if getattr(args, dest, None) is not None:
            options[dest] = getattr(args, dest)
    return options


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("run")
    group.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                       help="JSON file of TrainConfig fields; options given here override it")
    for flag, dest, kwargs in _run_options():
        group.add_argument(flag, dest=dest, default=argparse.SUPPRESS, **kwargs)
    add_data_arguments(parser)
    from .tasks.cli import add_task_arguments

    add_task_arguments(parser)


def config_from_args(args: argparse.Namespace):
    """TrainConfig from --config (if any) with the options given on the command line on top."""
    from .training.config import TrainConfig

    values: dict = {}
    if getattr(args, "config", None):
        path = Path(args.config)
        if not path.is_file():
            raise CliError(f"--config {path} does not exist; pass a JSON file of TrainConfig fields")
        try:
            values = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CliError(f"--config {path} is not valid JSON ({e})") from None
        known = set(TrainConfig().to_dict())
        unknown = sorted(set(values) - known)
        if unknown:
            raise CliError(f"--config {path} has unknown fields {unknown}; known fields: {sorted(known)}")
    from .tasks.cli import task_options_from_args, with_task_preset

    for _, dest, _ in _run_options():
        if hasattr(args, dest):
            values[dest] = getattr(args, dest)
    values["task_options"] = {**(values.get("task_options") or {}), **task_options_from_args(args)}
    for attr in ("output_dir",):
        if getattr(args, attr, None) is not None:
            values[attr] = getattr(args, attr)
    values["dataset_options"] = {**(values.get("dataset_options") or {}), **data_options_from_args(args)}
    # Last: which of the preset's values (and dataset options) apply depends on every option above.
    values = with_task_preset(values, values.get("task"))
    cfg = TrainConfig.from_dict(values)
    try:
        cfg.validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    return cfg


# --- train ------------------------------------------------------------------------------------------
def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fine-tune a model on a classification data set with a ShareLoRA method, LoRA or full fine-tuning. "
        "With no arguments: MiniLM on Rotten Tomatoes, ShareA r=8 on query/value (a few minutes on a laptop CPU). "
        "Several processes: torchrun --nproc-per-node N -m sharelora train ... (or accelerate launch -m sharelora "
        "train ...); --batch-size stays the global batch, rank 0 writes the run."
    )
    add_run_arguments(p)
    p.add_argument("--output-dir", default=None, metavar="DIR", help="where the run is written (default: runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    p.add_argument("--overwrite", action="store_true", help="delete a previous run in --output-dir first")
    p.add_argument("--keep-state", action="store_true", help="keep the resume checkpoint after the run finishes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to log.jsonl)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for PyTorch (default: all cores; 1 is faster on a CPU busy with other jobs)")


def _train_run(args: argparse.Namespace) -> int:
    from .training import train

    cfg = config_from_args(args)
    if args.resume and args.overwrite:
        raise CliError("--resume and --overwrite contradict each other; pass one of them")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
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
    from .tasks.cli import not_pretrained_note

    print(f"\n{results['name']}: {results['method']}, {p['adapter']:,} adapter parameters "
          f"({p['trainable']:,} trained incl. head){not_pretrained_note(results)}")
    print(f"  dev {metric} {results['dev'][metric]:.4f} (best epoch {results['best_epoch']:g})"
          + (f", test {metric} {test[metric]:.4f}" if test else ""))
    print(f"  train time {results['train_time_s']:.0f} s, peak RSS {results['peak_rss_mb']:.0f} MB")
    print(f"  results: {out / 'results.json'}\n  adapter: {out / 'adapter'}\n  curves:  {out / 'curves.png'}")
    return 0


# --- compare ----------------------------------------------------------------------------------------
def _seeds(text: str) -> list[int]:
    try:
        if "," in text:
            return [int(s) for s in text.split(",") if s.strip()]
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count (3) or a list of seeds (0,1,2), got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected at least one seed, got {n}")
    return list(range(n))


def _compare_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Train several methods on the same data with several seeds and write a Markdown table, a plot and JSON "
        "(compare.md, compare.png, compare.json). Rerunning the same command resumes an interrupted comparison."
    )
    p.add_argument("--methods", type=csv_list, default=["full", "lora", "sharea", "shareb", "shareab"],
                   metavar="A,B", help="methods to compare (default: full,lora,sharea,shareb,shareab)")
    p.add_argument("--seeds", type=_seeds, default=[0, 1, 2], help="number of seeds (3 = seeds 0,1,2) or a list 0,1,2 (default: 3)")
    p.add_argument("--full-lr", type=_positive_float, default=None, help="learning rate of full fine-tuning (default: 3e-5); --lr sets the adapters'")
    p.add_argument("--output-dir", default=None, metavar="DIR", help="where runs and tables go (default: runs/compare-<model>-<dataset>)")
    p.add_argument("--in-process", action="store_true", help="run every training in this process (faster start; peak memory is then shared)")
    p.add_argument("--progress", action="store_true", help="show each run's progress bar")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs side by side, each with CPUs/jobs threads (default: 1; 2 suits a 2-core CPU best)")
    add_run_arguments(p)
    from .tasks.cli import add_compare_arguments

    add_compare_arguments(p)


def _compare_run(args: argparse.Namespace) -> int:
    from .training.compare import compare
    from .training.config import METHODS, short_name

    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        raise CliError(f"unknown method(s) {', '.join(unknown)} in --methods; choose from {', '.join(METHODS)}")
    base = config_from_args(argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "output_dir"}))
    out = args.output_dir or f"runs/compare-{short_name(base.model)}-{short_name(base.dataset)}"
    if base.task in ("e2e", "instructions"):
        from .tasks.cli import compare_generation_from_args

        return compare_generation_from_args(args, base, out)
    command = "sharelora " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    summary = compare(base, args.methods, args.seeds, out, full_lr=args.full_lr, isolate=not args.in_process,
                      progress=args.progress, jobs=args.jobs, command=command)
    print()
    print((Path(out) / "compare.md").read_text(encoding="utf-8"))
    print(f"written: {out}/compare.md, compare.json, compare.png ({len(summary['runs'])} runs)")
    return 0


# --- eval / export-peft / merge ------------------------------------------------------------------------------
def _adapter_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a run directory (runs/<name>) or its adapter/ directory")


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Evaluate a trained adapter (or fully fine-tuned model) on a split of a data set; "
                     "--task mmlu scores an adapter or a base model (--model) on MMLU.")
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", nargs="?", default=None,
                   help="a run directory (runs/<name>) or its adapter/ directory (optional with --task mmlu --model)")
    p.add_argument("--dataset", default=None, metavar="NAME_OR_PATH", help="data set (default: the one it was trained on)")
    p.add_argument("--split", default="test", choices=["train", "dev", "test"], help="split to evaluate (default: test)")
    p.add_argument("--max-examples", type=_positive_int, default=None,
                   help="evaluate only the first N examples (default: the run's --max-eval-examples on its "
                        "own dev / test, else all)")
    p.add_argument("--batch-size", type=_positive_int, default=None,
                   help="evaluation batch size (default: the run's --eval-batch-size, else 64)")
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where fetched models and data are kept")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (default: auto)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the metrics to this JSON file")
    add_data_arguments(p, suppress=False)
    from .tasks.cli import add_eval_arguments

    add_eval_arguments(p)


def _eval_run(args: argparse.Namespace) -> int:
    from .sources import load_dataset
    from .tasks import ClassificationTask
    from .tasks.cli import eval_generation, is_generation_adapter
    from .training import evaluate, load_trained_model
    from .training.evaluate import eval_settings
    from .training.loop import pick_device

    if args.task == "mmlu" or args.task in ("e2e", "instructions") or is_generation_adapter(args.adapter_dir):
        return eval_generation(args)
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
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


def _two_dirs(p: argparse.ArgumentParser, what: str) -> None:
    _adapter_argument(p)
    p.add_argument("out_dir", metavar="OUT_DIR", help=what)
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where fetched models are kept")


def _export_peft_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a ShareLoRA adapter as a standard PEFT LoRA directory (one lora_A / lora_B per layer), "
                     "loadable by peft and LoRA serving engines; outputs are identical.")
    _two_dirs(p, "directory for the PEFT adapter")


def _load_adapter_method(adapter_dir: str, cache_dir: str | None):
    from .training import load_trained_model

    model, tokenizer, info = load_trained_model(adapter_dir, cache_dir=cache_dir)
    if info["method"] == "full":
        raise CliError(f"{adapter_dir} is a fully fine-tuned model, not an adapter; it already loads on its own")
    return model, tokenizer, info


def _export_peft_run(args: argparse.Namespace) -> int:
    model, _, _ = _load_adapter_method(args.adapter_dir, args.cache_dir)
    out = model.export_peft(args.out_dir)
    print(f"PEFT LoRA adapter written to {out}")
    return 0


def _merge_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Merge the adapter into the base weights (W += alpha/r B A) and save a plain model with its tokenizer. "
                     "A run on a 4-bit / 8-bit base (--quantize) is merged into the dequantized base: a float model "
                     "with the trained model's outputs.")
    _two_dirs(p, "directory for the merged model")


def _merge_run(args: argparse.Namespace) -> int:
    from .training.evaluate import RUN_INFO

    model, tokenizer, info = _load_adapter_method(args.adapter_dir, args.cache_dir)
    # A run on a quantized base is rebuilt on it; its merge goes into the dequantized weights, which
    # is what the run computed with (merging into the float original would differ by the rounding).
    merged = model.merge_and_unload(dequantize=bool(info.get("quantize")))
    merged.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    # A merged model is a complete model: `sharelora eval OUT_DIR` loads it like a fully fine-tuned one.
    merged_info = {k: v for k, v in info.items() if k != "adapter_dir"}
    merged_info.update(method="full", merged_from=str(info["adapter_dir"]))
    (Path(args.out_dir) / RUN_INFO).write_text(json.dumps(merged_info, indent=2) + "\n", encoding="utf-8")
    print(f"merged model written to {args.out_dir} (evaluate it with: sharelora eval {args.out_dir})")
    return 0


register_command("train", "fine-tune with ShareLoRA, LoRA or full fine-tuning (no arguments: the main job)",
                 _train_arguments, _train_run)
register_command("compare", "compare methods over seeds: Markdown table, plot, JSON", _compare_arguments, _compare_run)
register_command("eval", "evaluate a trained adapter on a data split", _eval_arguments, _eval_run)
register_command("export-peft", "write an adapter as a standard PEFT LoRA directory", _export_peft_arguments, _export_peft_run)
register_command("merge", "merge an adapter into its base model and save the model", _merge_arguments, _merge_run)


_LOADED_PLUGINS: set[str] = set()


def _load_plugins() -> None:
    for module_name in PLUGINS:
        if module_name in _LOADED_PLUGINS:  # build_parser may run more than once in a process (tests)
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and module_name.startswith(e.name):  # the plugin itself (or its package) is absent
                continue
            raise
        module.register(register_command)
        _LOADED_PLUGINS.add(module_name)


def build_parser() -> argparse.ArgumentParser:
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="sharelora",
        description="ShareLoRA: LoRA with low-rank matrices shared across layers (arXiv 2406.10785).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(_command=cmd)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "this cannot be done as asked": printed as one line, exit status 2.

    ShareLoraError and RunExistsError are ValueErrors; the sources raise SourceError.
    """
    errors: list[type[BaseException]] = [CliError, ValueError, FileNotFoundError]
    try:
        from .sources.errors import SourceError

        errors.append(SourceError)
    except ImportError:
        pass
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_command", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args._command.run(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        if os.environ.get("SHARELORA_DEBUG"):
            raise
        print(f"sharelora {args._command.name}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
