"""What several commands share: the user-error type, argument types, the options of a training run
and of a local data file, and the TrainConfig they make (``config_from_args``).

Only argparse and the standard library at import time, so ``sharelora --help`` stays instant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from typing import Any


class CliError(Exception):
    """A user error: printed as one line naming the fix, exit status 2."""


def command_line() -> str:
    """The command as the user typed it, for the records a command writes beside its results."""
    return "sharelora " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def not_pretrained_note(results: dict[str, Any]) -> str:
    return " [NOT PRETRAINED: random weights]" if results.get("pretrained") is False else ""


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


# --- shared argument groups ------------------------------------------------------------------------
def csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list, e.g. query,value")
    return items


_REGEX_CHARACTERS = set("*?[](){}|^$+\\")


def target_modules(text: str) -> list[str] | str:
    """--targets: "query,value" (names, suffix match), "all-linear", or a regex (full match on the module path;
    recognised by a character such as * ? [ ] ( ) | ^ $ + that no module name holds)."""
    text = text.strip()
    if text == "all-linear" or _REGEX_CHARACTERS & set(text):
        return text
    return csv_list(text)


def int_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in csv_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected layer indices >= 0, got {text!r}")
    return values


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {value}")
    return value


def report_to(text: str) -> list[str]:
    """--report-to: none | all | tracker names, comma-separated (training/trackers.py)."""
    from ..training.trackers import parse_report_to

    try:
        return parse_report_to(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


# Options of a training run: (flags, TrainConfig field, argparse keywords). Defaults are SUPPRESSed
# so that only options given on the command line override TrainConfig's defaults or --config.
def _run_options() -> list[tuple[str, str, dict]]:
    from ..training.config import TrainConfig
    from ..training.methods import METHODS

    d = TrainConfig()
    return [
        ("--model", "model", dict(metavar="NAME_OR_PATH", help=f"built-in model name, hub id or local model directory (default: {d.model})")),
        ("--dataset", "dataset", dict(metavar="NAME_OR_PATH", help=f"built-in dataset, local CSV/JSON(L) file or hub:owner/name (default: {d.dataset})")),
        ("--method", "method", dict(choices=list(METHODS), help=f"what to train (default: {d.method})")),
        ("--task", "task", dict(choices=["auto", "classification", "e2e", "instructions"],
                                help="auto (from the dataset), classification, or a generation task: e2e | instructions, "
                                     "which start from their own defaults (model smollm2, its dataset, q/v targets, sizes)")),
        ("--rank", "rank", dict(type=positive_int, help=f"LoRA rank r (default: {d.rank})")),
        ("--alpha", "alpha", dict(type=positive_float, help=f"LoRA alpha; the update is scaled by alpha/r (default: {d.alpha:g})")),
        ("--dropout", "dropout", dict(type=fraction, help=f"dropout on the adapter input (default: {d.dropout})")),
        (("--targets", "--target-modules"), "targets", dict(type=target_modules, metavar="A,B|REGEX|all-linear",
                                                           help=f"modules to adapt: names (suffix match), a regex (full match "
                                                                f"on the module path) or all-linear (default: {','.join(d.targets)})")),
        ("--modules-to-save", "modules_to_save", dict(type=csv_list, metavar="A,B", help="modules trained in full with the adapter (default: the classification head)")),
        ("--lr", "lr", dict(type=positive_float, help="peak learning rate (default: 2e-3 for adapters, 3e-5 for full)")),
        ("--weight-decay", "weight_decay", dict(type=float, help=f"AdamW weight decay (default: {d.weight_decay})")),
        ("--epochs", "epochs", dict(type=positive_int, help=f"passes over the training set (default: {d.epochs})")),
        ("--max-steps", "max_steps", dict(type=positive_int, help="stop after this many optimizer steps")),
        ("--batch-size", "batch_size", dict(type=positive_int, help=f"examples per optimizer step, over all processes "
                                            f"(split between them and --grad-accum) (default: {d.batch_size})")),
        ("--grad-accum", "grad_accum", dict(type=positive_int, help=f"micro-batches per optimizer step (default: {d.grad_accum})")),
        ("--warmup-ratio", "warmup_ratio", dict(type=fraction, help=f"fraction of steps with linear warmup (default: {d.warmup_ratio})")),
        ("--max-grad-norm", "max_grad_norm", dict(type=positive_float, help=f"gradient clipping norm (default: {d.max_grad_norm})")),
        ("--max-length", "max_length", dict(type=positive_int, help=f"tokens per example (default: {d.max_length})")),
        ("--seed", "seed", dict(type=int, help=f"random seed (default: {d.seed})")),
        ("--max-train-examples", "max_train_examples", dict(type=positive_int, help="use only the first N training examples")),
        ("--max-eval-examples", "max_eval_examples", dict(type=positive_int, help="use only the first N dev / test examples")),
        ("--eval-batch-size", "eval_batch_size", dict(type=positive_int, help=f"batch size for evaluation (default: {d.eval_batch_size})")),
        ("--log-every", "log_every", dict(type=positive_int, help=f"optimizer steps per log record (default: {d.log_every})")),
        ("--checkpoint-every", "checkpoint_every", dict(type=positive_int, help=f"optimizer steps between resume checkpoints (default: {d.checkpoint_every})")),
        ("--cache-dir", "cache_dir", dict(metavar="DIR", help="where fetched models and data are kept (default: ~/.cache/sharelora)")),
        ("--device", "device", dict(help="auto (cuda if available), cpu or cuda[:i] (default: auto)")),
        ("--fsdp", "fsdp", dict(action="store_true",
                                help="with several processes (torchrun / accelerate launch): shard the model with "
                                     "FSDP2 (one unit per transformer block, the shared adapter tensors in the root) "
                                     "instead of replicating it with DDP")),
        ("--report-to", "report_to", dict(type=report_to, metavar="none|all|NAME[,NAME]",
                                          help="also send log.jsonl's records and the config to experiment trackers: "
                                               "tensorboard (<output-dir>/tensorboard), wandb, mlflow, or all that "
                                               "are installed (default: none; e.g. pip install "
                                               "'sharelora[tensorboard]')")),
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


# ShareLoRA options of a run, beyond its method's preset (TrainConfig.method_options; methods.py):
# (flag, ShareLoraConfig field, argparse keywords).
METHOD_OPTION_FLAGS = [
    ("--share", "share", dict(choices=["none", "A", "B", "AB"],
                              help="which matrices one tensor serves across layers (default: the method's: lora "
                                   "none, sharea A, shareb B, shareab AB)")),
    ("--scope", "scope", dict(choices=["layers", "qkv"],
                              help="layers: one shared tensor per module type (the paper); qkv: one for query, key "
                                   "and value of all layers (default: the method's; sharea-qkv: qkv)")),
    ("--share-block-size", "share_block_size", dict(type=positive_int, metavar="K",
                                                    help="share only within blocks of K consecutive layers")),
    ("--layers-to-transform", "layers_to_transform", dict(type=int_list, metavar="I,J",
                                                          help="adapt only these layers (default: all)")),
    ("--dropout-mask", "dropout_mask", dict(choices=["input", "module"],
                                            help="input: modules reading one input share a dropout mask and one "
                                                 "down-projection product (default); module: a mask per module (PEFT)")),
]


def add_method_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("method options (ShareLoRA methods; any field with --method-option)")
    for flag, key, kwargs in METHOD_OPTION_FLAGS:
        group.add_argument(flag, dest=f"method_option_{key}", default=argparse.SUPPRESS, **kwargs)
    group.add_argument("--method-option", dest="method_option", type=_key_value, action="append",
                       default=argparse.SUPPRESS, metavar="KEY=VALUE",
                       help="any other option of the method's config (a ShareLoraConfig field such as fused_modules, "
                            "or a PEFT method's, e.g. num_vectors=64); VALUE is JSON or text (repeatable)")


def method_options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    options = dict(getattr(args, "method_option", None) or [])
    options.update({key: getattr(args, f"method_option_{key}") for _, key, _ in METHOD_OPTION_FLAGS
                    if hasattr(args, f"method_option_{key}")})
    return options


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
                       help="YAML or JSON file of the run's fields (every option, by its name with _ for -; a run "
                            "directory's config.yaml is one); options given here override it")
    for flag, dest, kwargs in _run_options():
        flags = flag if isinstance(flag, tuple) else (flag,)
        group.add_argument(*flags, dest=dest, default=argparse.SUPPRESS, **kwargs)
    add_method_arguments(parser)
    add_data_arguments(parser)
    add_task_arguments(parser)


def read_config_arg(args: argparse.Namespace, cls: type | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields in ``--config`` (none without it), checked against ``cls``'s (TrainConfig's) and ``extra``."""
    from ..training.config import TrainConfig, check_fields, read_config_file

    path = getattr(args, "config", None)
    if not path:
        return {}
    try:
        values = read_config_file(path)
        check_fields(cls or TrainConfig, values, f"--config {path}", extra)
    except (ValueError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    return values


def settle(args: argparse.Namespace, defaults: dict[str, Any], values: dict[str, Any],
           types: dict[str, Any] | None = None) -> None:
    """Set each key of ``defaults`` on ``args``: the command line's value, else ``values``' (a config file's,
    taken out of it; a string read with ``types[key]``), else the default."""
    for key, default in defaults.items():
        if hasattr(args, key):
            values.pop(key, None)
            continue
        value = values.pop(key, default)
        kind = (types or {}).get(key)
        if kind is not None and isinstance(value, str):
            try:
                value = kind(value)
            except argparse.ArgumentTypeError as e:
                raise CliError(f"--config {args.config}: {key}: {e}") from None
        setattr(args, key, value)


def config_from_args(args: argparse.Namespace, cls: type | None = None, values: dict[str, Any] | None = None):
    """A TrainConfig (or ``cls``, e.g. MultiTaskConfig) from ``values`` (default: --config's fields) with the
    options given on the command line on top."""
    from ..training.config import TrainConfig

    cls = cls or TrainConfig
    values = dict(read_config_arg(args, cls) if values is None else values)
    from ..tasks.build import preset_values

    for _, dest, _ in _run_options():
        if hasattr(args, dest):
            values[dest] = getattr(args, dest)
    values["task_options"] = {**(values.get("task_options") or {}), **task_options_from_args(args)}
    values["method_options"] = {**(values.get("method_options") or {}), **method_options_from_args(args)}
    for attr in ("output_dir",):
        if getattr(args, attr, None) is not None:
            values[attr] = getattr(args, attr)
    values["dataset_options"] = {**(values.get("dataset_options") or {}), **data_options_from_args(args)}
    # Last: which of the preset's values (and dataset options) apply depends on every option above.
    values = preset_values(values.get("task"), values)
    cfg = cls.from_dict(values)
    try:
        cfg.validate()
    except ValueError as e:
        raise CliError(str(e)) from None
    return cfg
