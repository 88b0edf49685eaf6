"""What the commands do with the run directories training writes: score them (``evaluate_run``, `sharelora
eval`), export a multi-task run's tasks as PEFT LoRA (`sharelora export-peft`), compress several runs into
one multi-task directory (`sharelora compress`). Above training/ (whose run directory format it reads:
run_info.json, ``load_trained_model``), below the command line."""

from ..extras import require

require("train", "sharelora.runs (evaluating, exporting and compressing finished runs)")
