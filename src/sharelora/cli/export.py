"""``sharelora export-peft``: a ShareLoRA adapter as a standard PEFT LoRA directory."""

from __future__ import annotations

import argparse


def adapter_and_out_dirs(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="a run directory (runs/<name>) or its adapter/ directory")
    p.add_argument("out_dir", metavar="OUT_DIR", help=what)
    p.add_argument("--cache-dir", default=None, metavar="DIR", help="where fetched models are kept")


def load_adapter_run(adapter_dir: str, cache_dir: str | None):
    """(model, tokenizer, run info) of an adapter run; a fully fine-tuned model is refused."""
    from ..training import load_trained_model
    from .common import CliError

    model, tokenizer, info = load_trained_model(adapter_dir, cache_dir=cache_dir)
    if info["method"] == "full":
        raise CliError(f"{adapter_dir} is a fully fine-tuned model, not an adapter; it already loads on its own")
    return model, tokenizer, info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a ShareLoRA adapter as a standard PEFT LoRA directory (one lora_A / lora_B per layer), "
                     "loadable by peft and LoRA serving engines; outputs are identical.")
    adapter_and_out_dirs(p, "directory for the PEFT adapter")
    p.add_argument("--adapter", default=None, metavar="NAME[,NAME]",
                   help="a multi-task directory: export these tasks (one: at OUT_DIR; several or all (the "
                        "default): OUT_DIR/<task>/)")


def run(args: argparse.Namespace) -> int:
    from ..runs.evaluate import is_multitask_dir
    from ..runs.export import export_tasks_peft

    if is_multitask_dir(args.adapter_dir):
        names = [n.strip() for n in args.adapter.split(",") if n.strip()] if args.adapter else None
        for name, out in export_tasks_peft(args.adapter_dir, args.out_dir, names, cache_dir=args.cache_dir).items():
            print(f"task {name}: PEFT LoRA adapter written to {out}")
        return 0
    if args.adapter is not None:
        from .common import CliError

        raise CliError(f"--adapter picks tasks of a multi-task directory; {args.adapter_dir} holds one adapter, "
                       "drop --adapter")
    from ..training.evaluate import read_run_info
    from .common import CliError

    method = str(read_run_info(args.adapter_dir).get("method"))
    if method.startswith("peft-"):
        raise CliError(f"{args.adapter_dir} was trained with --method {method}: its adapter/ is already a PEFT "
                       f"directory ({method[5:]}, not LoRA); load it with peft.PeftModel.from_pretrained, or merge it "
                       "with sharelora merge")
    model, _, _ = load_adapter_run(args.adapter_dir, args.cache_dir)
    out = model.export_peft(args.out_dir)
    print(f"PEFT LoRA adapter written to {out}")
    return 0


def register(register_command) -> None:
    register_command("export-peft", "write an adapter as a standard PEFT LoRA directory", add_arguments, run)
