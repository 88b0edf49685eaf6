"""``sharelora bench``: training-step time, memory, optimizer state, adapter size and inference
latency of ShareLoRA against the frozen-model floor, PEFT LoRA (plain and with tied A) and full
fine-tuning, timed interleaved on one batch. See docs/BENCHMARKS.md."""

from ..extras import require

require("train", "sharelora bench")
require("peft", "sharelora bench (it measures PEFT LoRA)")

from .methods import METHODS, AdapterSettings, FloorModel, Prepared, prepare, tie_peft_lora_A
from .run import BenchConfig, run_bench

__all__ = ["METHODS", "AdapterSettings", "BenchConfig", "FloorModel", "Prepared", "prepare", "run_bench",
           "tie_peft_lora_A"]
