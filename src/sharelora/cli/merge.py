"""``sharelora merge``: fold the adapter into the base weights and save a plain model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .export import adapter_and_out_dirs, load_adapter_run


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Merge the adapter into the base weights (W += alpha/r B A) and save a plain model with its tokenizer. "
                     "A run on a 4-bit / 8-bit base (--quantize) is merged into the dequantized base: a float model "
                     "with the trained model's outputs.")
    adapter_and_out_dirs(p, "directory for the merged model")


def run(args: argparse.Namespace) -> int:
    from ..training.evaluate import RUN_INFO
    from ..training.state import atomic_write_text

    model, tokenizer, info = load_adapter_run(args.adapter_dir, args.cache_dir)
    # A run on a quantized base is rebuilt on it; its merge goes into the dequantized weights, which
    # is what the run computed with (merging into the float original would differ by the rounding).
    if str(info["method"]).startswith("peft-"):  # PEFT's VeRA / VB-LoRA: PEFT's own merge
        merged = model.merge_and_unload()
    else:
        merged = model.merge_and_unload(dequantize=bool(info.get("quantize")))
    merged.save_pretrained(args.out_dir)
    tokenizer.save_pretrained(args.out_dir)
    # A merged model is a complete model: `sharelora eval OUT_DIR` loads it like a fully fine-tuned one.
    merged_info = {k: v for k, v in info.items() if k != "adapter_dir"}
    merged_info.update(method="full", merged_from=str(info["adapter_dir"]))
    atomic_write_text(Path(args.out_dir) / RUN_INFO, json.dumps(merged_info, indent=2) + "\n")
    print(f"merged model written to {args.out_dir} (evaluate it with: sharelora eval {args.out_dir})")
    return 0


def register(register_command) -> None:
    register_command("merge", "merge an adapter into its base model and save the model", add_arguments, run)
