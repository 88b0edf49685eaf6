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

from ..training.evaluate import read_run_info

EVAL_TASKS = ("auto", "classification", "e2e", "instructions", "mmlu", "humaneval", "gsm8k")
EVAL_BATCH_SIZE = 64  # eval's batch size when neither the command nor run_info.json gives one


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
    a multi-task directory's are {"adapter_dir", "tasks": {task: metrics}}; the benchmarks also return
    their per-subject rows or samples.
    """
    if task not in EVAL_TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {', '.join(EVAL_TASKS)}")
    if adapters is not None and not is_multitask_dir(run_dir):
        raise ValueError(f"adapters pick tasks of a multi-task directory; {run_dir} holds one adapter, drop --adapter")
    options = dict(data_options or {})
    if task in ("auto", "classification") and is_multitask_dir(run_dir):
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
    from ..sources import load_dataset
    from ..tasks.build import build_task, dataset_options

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
    net, tokenizer, _, where = _trained_model(run_dir, cache_dir, device)
    samples = Path(samples_path) if samples_path is not None else None
    scorer = build_task(name, data, tokenizer, max_length=info["max_length"], options=task_options,
                        output_dir=samples.parent if samples else None, samples_name=samples.name if samples else None)
    if scorer.num_labels != info.get("num_labels", scorer.num_labels):
        raise ValueError(f"{data.name} has {scorer.num_labels} label(s) but the model was trained with "
                         f"{info['num_labels']}; evaluate on a data set with the same labels")
    result = {"adapter_dir": info["adapter_dir"], **({"task": name} if name != "classification" else {}),
              "dataset": data.name, **_score(scorer, net, info, split, batch_size, max_examples, dataset, where)}
    written = scorer.samples_path(split) if name == "e2e" else None
    if written is not None:
        result["samples"] = str(written)
    return result


def evaluate_tasks(adapter_dir: str | Path, names: list[str] | None = None, split: str = "test",
                   dataset: str | None = None, data_options: dict[str, Any] | None = None,
                   batch_size: int | None = None, max_examples: int | None = None, cache_dir: str | None = None,
                   device: str = "auto") -> dict[str, Any]:
    """Metrics of the tasks of a multi-task adapter directory on ``split``: {task: metrics}.

    Each task is scored on its own data set (run_info.json) unless ``dataset`` is given (one task
    only), with the run's eval batch size and example cap on its own dev / test, as it logged them.
    """
    from ..sources import load_dataset
    from ..tasks import label_space
    from ..training.multitask import TaskHead

    info = read_run_info(adapter_dir)
    chosen = chosen_tasks(info, names)
    if dataset is not None and len(chosen) != 1:
        raise ValueError(f"--dataset scores one task; name it with --adapter (tasks: {chosen})")
    net, tokenizer, _, where = _trained_model(adapter_dir, cache_dir, device)
    results = {}
    for n in chosen:
        t = info["tasks"][n]
        if dataset is None and not t.get("dataset"):
            raise ValueError(f"task {n!r} of {info['adapter_dir']} names no data set (its adapter came from a PEFT "
                             "directory); pass --dataset")
        options = {**(t.get("dataset_options") or {}), **(data_options or {})} if dataset is None else dict(
            data_options or {})
        data = load_dataset(dataset or t["dataset"], cache_dir=cache_dir, **options)
        if label_space(data)[1] != t["num_labels"]:
            raise ValueError(f"{getattr(data, 'name', n)} has {label_space(data)[1]} label(s) but task {n!r} was "
                             f"trained with {t['num_labels']}; evaluate it on a data set with the same labels")
        head = TaskHead(n, data, tokenizer, info["max_length"], t["adapter"], tuple(t["logits"]),
                        routed=info.get("layout") != "one-adapter")
        results[n] = {"dataset": getattr(data, "name", None), "adapter": head.adapter,
                      **_score(head, net, info, split, batch_size, max_examples, dataset, where)}
    return {"adapter_dir": info["adapter_dir"], "tasks": results}


def is_multitask_dir(adapter_dir: str | Path | None) -> bool:
    """Whether ``adapter_dir`` (a run directory or its adapter/) holds several tasks (multitask, compress)."""
    if not adapter_dir:
        return False
    try:
        return bool(read_run_info(adapter_dir).get("tasks"))
    except FileNotFoundError:
        return False


def chosen_tasks(info: dict[str, Any], names: list[str] | None) -> list[str]:
    """``names`` (all when None) checked against the tasks of a multi-task directory's run_info.json."""
    tasks = list(info["tasks"])
    unknown = [n for n in names or [] if n not in tasks]
    if unknown:
        raise ValueError(f"{info['adapter_dir']} has no task {unknown}; its tasks: {tasks}")
    return list(names) if names else tasks


def eval_settings(info: dict[str, Any], split: str, batch_size: int | None = None, max_examples: int | None = None,
                  own_data: bool = True) -> tuple[int, int | None]:
    """Batch size and example cap for re-scoring a run on ``split``: (batch_size, max_examples).

    Values given (not None) win; otherwise the run's own, from run_info.json: its
    ``eval_batch_size``, and on its own data set's (``own_data``) dev / test its
    ``max_eval_examples``, so the scores equal those the run logged. A run_info.json written
    before these were recorded gives 64 and all examples.
    """
    if batch_size is None:
        batch_size = info.get("eval_batch_size") or EVAL_BATCH_SIZE
    if max_examples is None and own_data and split in ("dev", "test"):
        max_examples = info.get("max_eval_examples")
    return batch_size, max_examples


def _score(scorer: Any, model: Any, info: dict[str, Any], split: str, batch_size: int | None,
           max_examples: int | None, dataset: str | None, device: Any) -> dict[str, Any]:
    """``scorer``'s metrics of ``model`` on ``split``, with the run's own settings where none are given."""
    batch, cap = eval_settings(info, split, batch_size, max_examples, own_data=dataset is None)
    encoded = scorer.encode(split, cap)
    return {"split": split, "examples": len(encoded), **scorer.evaluate(model, encoded, batch, device)}


def _trained_model(run_dir: str | Path, cache_dir: str | None, device: str) -> tuple[Any, Any, dict, Any]:
    """(model, tokenizer, run info, device) of the run in ``run_dir``, on ``device`` ("auto": CUDA if any)."""
    from ..training.engine import pick_device
    from ..training.evaluate import load_trained_model

    where = pick_device(device)
    return (*load_trained_model(run_dir, cache_dir=cache_dir, device=str(where)), where)


def _benchmark(run_dir: str | Path | None, task: str, *, model: str | None, dataset: str | None, cache_dir: str | None,
               device: str, shots: int, max_examples: int | None, batch_size: int | None, max_new_tokens: int | None,
               prompt_format: str, sandbox_timeout: float, subjects: list[str] | None, max_per_subject: int | None,
               progress: bool, allow_unisolated_sandbox: bool = False) -> dict[str, Any]:
    """MMLU, HumanEval or GSM8K of the run's model or of a base ``model``."""
    from ..sources import load_dataset, load_model
    from ..training.engine import pick_device

    if run_dir:
        net, tokenizer, info, where = _trained_model(run_dir, cache_dir, device)
        what: dict[str, Any] = {"adapter_dir": info["adapter_dir"], "model": info["model"]}
    elif model:
        where = pick_device(device)
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
