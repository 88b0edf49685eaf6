"""``evaluate_run``: what ``sharelora eval`` does, as one library call.

    from sharelora import evaluate_run
    evaluate_run("runs/minilm-rotten-tomatoes-sharea-r8-s0")                 # its test split, as the run scored it
    evaluate_run("runs/mt", split="dev", adapters=["sent"])                   # tasks of a multi-task run
    evaluate_run("runs/inst", task="mmlu", shots=5)                           # an adapter on MMLU
    evaluate_run(model="smollm2", task="gsm8k", shots=4, max_examples=100)    # a base model, no run

It picks the evaluator the run needs: every task of a multi-task directory on its own data set;
a generation run's task rebuilt with its decoding options; a classification run's task; or a
benchmark (MMLU, HumanEval, GSM8K) of the run's model or of a base ``model``. Batch size and
example cap default to the run's own (run_info.json), so the scores equal those the run logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

EVAL_TASKS = ("auto", "classification", "e2e", "instructions", "mmlu", "humaneval", "gsm8k")


def evaluate_run(run_dir: str | Path | None = None, *, split: str = "test", task: str = "auto",
                 dataset: str | None = None, data_options: dict[str, Any] | None = None,
                 adapters: list[str] | None = None, max_examples: int | None = None, batch_size: int | None = None,
                 cache_dir: str | None = None, device: str = "auto", model: str | None = None, shots: int = 0,
                 max_new_tokens: int | None = None, prompt_format: str = "completion", sandbox_timeout: float = 5.0,
                 subjects: list[str] | None = None, max_per_subject: int | None = None, num_beams: int | None = None,
                 samples_path: str | Path | None = None, progress: bool = True,
                 allow_unisolated_sandbox: bool = False) -> dict[str, Any]:
    """Metrics of the run in ``run_dir`` (a run directory or its adapter/) or of a base ``model``.

    Args:
        split: "train", "dev" or "test".
        task: "auto" (what the run was trained on), a training task, or a benchmark: "mmlu" (answer
            letter log-likelihood), "humaneval" (greedy pass@1, code run in a sandbox), "gsm8k"
            (exact match of the final number).
        dataset, data_options: another data set than the run's (and how to read it).
        adapters: the tasks of a multi-task directory to score (None: all).
        max_examples, batch_size: default the run's own ``max_eval_examples`` / ``eval_batch_size``.
        model: a base model to benchmark without a run (mmlu, humaneval, gsm8k).
        shots, max_new_tokens, prompt_format, sandbox_timeout, subjects, max_per_subject: the
            benchmarks' settings; ``num_beams``: an E2E run's beam width on every split.
        samples_path: where an E2E run's decoded outputs go (``{split}`` in the name is the split).
        allow_unisolated_sandbox: run HumanEval samples even where the sandbox has no Linux namespaces
            (as the evaluator's user; tasks/sandbox.py says what that does not protect). Without it such
            a machine refuses before a model is loaded.

    Returns the metrics with what was scored (``adapter_dir``, ``dataset``, ``split``, ``examples``);
    the benchmarks also return their per-subject rows or samples.
    """
    from .multitask import is_multitask_dir

    if task not in EVAL_TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {', '.join(EVAL_TASKS)}")
    if adapters is not None and not is_multitask_dir(run_dir):
        raise ValueError(f"adapters pick tasks of a multi-task directory; {run_dir} holds one adapter, drop --adapter")
    options = dict(data_options or {})
    if task in ("auto", "classification") and is_multitask_dir(run_dir):
        from .multitask import evaluate_tasks

        return evaluate_tasks(run_dir, adapters, split=split, dataset=dataset, data_options=options,
                              batch_size=batch_size, max_examples=max_examples, cache_dir=cache_dir, device=device)
    if task == "humaneval":
        from ..tasks.sandbox import require_isolation

        require_isolation(allow_unisolated_sandbox)  # refused before a model is loaded
    if task in ("mmlu", "humaneval", "gsm8k"):
        return _benchmark(run_dir, task, model=model, dataset=dataset, cache_dir=cache_dir, device=device, shots=shots,
                          max_examples=max_examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                          prompt_format=prompt_format, sandbox_timeout=sandbox_timeout, subjects=subjects,
                          max_per_subject=max_per_subject, progress=progress,
                          allow_unisolated_sandbox=allow_unisolated_sandbox)
    if run_dir is None:
        raise ValueError("evaluation needs a run directory (runs/<name> or its adapter/); only the benchmarks "
                         "(task mmlu, humaneval, gsm8k) score a base model")
    from .evaluate import eval_settings, load_trained_model, read_run_info
    from ..sources import load_dataset
    from ..tasks.build import build_task, dataset_options
    from .engine import pick_device

    info = read_run_info(run_dir)
    name = info.get("task") if info.get("model_task") == "causal-lm" else "classification"
    if task not in ("auto", name):
        raise ValueError(f"{info['adapter_dir']} was trained on task {name!r}, not {task!r}; drop --task or pass "
                         f"--task {name}")
    task_options = dict(info.get("task_options") or _legacy_task_options(info)) if name != "classification" else {}
    if num_beams is not None:
        if name != "e2e":
            raise ValueError(f"num_beams applies to e2e adapters (decoding); {info['adapter_dir']} is {name!r}")
        task_options.update(num_beams=num_beams, dev_num_beams=num_beams)
    if dataset is None:
        options = {**(info.get("dataset_options") or {}), **options}
    elif name != "classification":
        options = dataset_options(name, dataset, options)
    data = load_dataset(dataset or info["dataset"], cache_dir=cache_dir, **options)
    where = pick_device(device)
    net, tokenizer, _ = load_trained_model(run_dir, cache_dir=cache_dir, device=str(where))
    samples = Path(samples_path) if samples_path is not None else None
    scorer = build_task(name, data, tokenizer, max_length=info["max_length"], options=task_options,
                        output_dir=samples.parent if samples else None, samples_name=samples.name if samples else None)
    if scorer.num_labels != info.get("num_labels", scorer.num_labels):
        raise ValueError(f"{data.name} has {scorer.num_labels} label(s) but the model was trained with "
                         f"{info['num_labels']}; evaluate on a data set with the same labels")
    batch, cap = eval_settings(info, split, batch_size, max_examples, own_data=dataset is None)
    encoded = scorer.encode(split, cap)
    metrics = scorer.evaluate(net, encoded, batch, where)
    result = {"adapter_dir": info["adapter_dir"], **({"task": name} if name != "classification" else {}),
              "dataset": data.name, "split": split, "examples": len(encoded), **metrics}
    written = scorer.samples_path(split) if name == "e2e" else None
    if written is not None:
        result["samples"] = str(written)
    return result


def _benchmark(run_dir: str | Path | None, task: str, *, model: str | None, dataset: str | None, cache_dir: str | None,
               device: str, shots: int, max_examples: int | None, batch_size: int | None, max_new_tokens: int | None,
               prompt_format: str, sandbox_timeout: float, subjects: list[str] | None, max_per_subject: int | None,
               progress: bool, allow_unisolated_sandbox: bool = False) -> dict[str, Any]:
    """MMLU, HumanEval or GSM8K of the run's model or of a base ``model``."""
    from ..sources import load_dataset, load_model
    from .engine import pick_device
    from .evaluate import EVAL_BATCH_SIZE, load_trained_model

    where = pick_device(device)
    if run_dir:
        net, tokenizer, info = load_trained_model(run_dir, cache_dir=cache_dir, device=str(where))
        what: dict[str, Any] = {"adapter_dir": info["adapter_dir"], "model": info["model"]}
    elif model:
        bundle = load_model(model, task="causal-lm", cache_dir=cache_dir)
        net, tokenizer = bundle.model.to(where).eval(), bundle.tokenizer
        what = {"model": bundle.name, "pretrained": bundle.pretrained}
    else:
        raise ValueError(f"eval --task {task} needs an ADAPTER_DIR or --model NAME (e.g. --model smollm2)")
    data = load_dataset(dataset or task, cache_dir=cache_dir)
    if task == "mmlu":
        from ..tasks.mmlu import evaluate_mmlu

        result = evaluate_mmlu(net, tokenizer, data, shots=shots, subjects=subjects,
                               max_per_subject=max_per_subject or max_examples,
                               batch_size=batch_size or EVAL_BATCH_SIZE, device=where, progress=progress)
        return {**what, "dataset": data.name, **result}
    from ..tasks.code_math import evaluate_gsm8k, evaluate_humaneval

    options: dict[str, Any] = {"max_examples": max_examples, "batch_size": batch_size or 8, "device": where,
                               "progress": progress, "prompt_format": prompt_format}
    if max_new_tokens:
        options["max_new_tokens"] = max_new_tokens
    if task == "humaneval":
        result = evaluate_humaneval(net, tokenizer, data, timeout_s=sandbox_timeout,
                                    allow_unisolated=allow_unisolated_sandbox, **options)
    else:
        result = evaluate_gsm8k(net, tokenizer, data, shots=shots, **options)
    return {**what, "dataset": data.name, **result}


def _legacy_task_options(info: dict[str, Any]) -> dict[str, Any]:
    """Task options of a run_info.json written before it recorded ``task_options``."""
    if info.get("task") == "instructions":
        return {"use_chat_template": info["chat_template"]} if "chat_template" in info else {}
    return {k: info[k] for k in ("num_beams", "max_new_tokens") if k in info}
