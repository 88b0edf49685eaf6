"""HumanEval (greedy pass@1) and GSM8K (exact match of the final number) for a causal LM.

HumanEval: the model continues the problem's ``prompt`` (a signature and docstring) greedily; the
completion is cut at the first of :data:`HUMANEVAL_STOPS`; the candidate's program
``prompt + completion`` runs in :mod:`.sandbox` (never in this process), and the problem's tests run
in a second sandboxed process, the judge (:func:`humaneval_check`): it runs the prompt (for helpers
some tests use), binds ``entry_point`` to a proxy of the candidate's function, and runs
``test + f"check({entry_point})"``; every value the candidate returns reaches the tests as a plain
builtin value, so only the judge can say "passed" (see :mod:`.sandbox`). The sample passes if the
tests run to their end without an exception, as in the benchmark's own harness.
pass@1 = passed / problems (greedy: one sample per problem, so this is the unbiased estimator).
``prompt_format="chat"`` (for instruct models, which answer a bare prompt with prose) instead asks,
through the tokenizer's chat template, for the whole function in a ```python block
(:data:`HUMANEVAL_CHAT_REQUEST`), stops once the block is closed, and the candidate's program is the
prompt's lines before ``def <entry_point>`` (imports, helpers) + the block's code; a block that does
not define the entry point is taken as its body (prompt + code), a reply without a block as code.

GSM8K (``prompt_format="chat"``: the same exemplars as chat turns): the prompt is ``k`` solved examples (``"Question: ...\\nAnswer: <solution> The answer is
N.\\n\\n"``, taken from the dataset's ``dev`` split, a seeded slice held out of the test problems
because the package ships only test.jsonl) and then ``"Question: <q>\\nAnswer:"``; the completion
is cut at the next ``"Question:"``; the prediction is the LAST number in it (commas removed, a
trailing ``.0`` ignored); exact match against the number after ``####`` in the reference.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .sandbox import Check

HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
HUMANEVAL_CHAT_REQUEST = ("Complete the following Python function. Reply with the whole function in one ```python "
                          "code block.\n\n```python\n{prompt}```")
PROMPT_FORMATS = ("completion", "chat")
_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)
GSM8K_STOPS = ("Question:", "\n\n\n")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def truncate_at_stops(text: str, stops: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop sequence."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def normalize_number(text: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"18.0"`` -> ``"18"``, ``"$7"``-style prefixes dropped; None if no number."""
    m = _NUMBER.search(text.replace("$", ""))
    if not m:
        return None
    s = m.group(0).replace(",", "")
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def last_number(text: str) -> str | None:
    """The last number written in ``text``, normalised (see :func:`normalize_number`)."""
    found = _NUMBER.findall(text.replace("$", ""))
    found = [f for f in found if any(c.isdigit() for c in f)]
    return normalize_number(found[-1]) if found else None


@torch.no_grad()
def generate_until(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], stops: Sequence[str], *,
                   max_new_tokens: int = 256, batch_size: int = 8, device: str | torch.device = "cpu",
                   progress: Any = None, finished: Callable[[str], bool] | None = None) -> list[str]:
    """Greedy continuations of ``prompts`` (text), each cut at its first stop sequence.

    Batches are left-padded; a batch ends when every row holds a stop sequence (checked on the
    decoded new tokens after each step), satisfies ``finished(text)`` (kept whole), or holds the
    end-of-sequence token, or at ``max_new_tokens``.
    """
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    from .lm import left_padded, pad_id

    pad = pad_id(tokenizer)
    config = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    encoded = [list(tokenizer(p)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    out_texts = [""] * len(prompts)
    was_training = model.training
    model.eval()

    class AllStopped(StoppingCriteria):
        def __init__(self, width: int):
            self.width = width

        def __call__(self, input_ids, scores, **kwargs):
            new = input_ids[:, self.width:]
            texts = [tokenizer.decode(row, skip_special_tokens=True) for row in new]
            done = [any(s in text for s in stops) or (finished is not None and finished(text))
                    or (tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row.tolist())
                    for text, row in zip(texts, new)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = left_padded([encoded[i] for i in idx], pad)
        width = ids.shape[1]
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                             stopping_criteria=StoppingCriteriaList([AllStopped(width)]))
        for j, i in enumerate(idx):
            text = tokenizer.decode(out[j, width:].tolist(), skip_special_tokens=True)
            out_texts[i] = truncate_at_stops(text, stops)
        if progress is not None:
            progress.update(len(idx))
    model.train(was_training)
    return out_texts


def humaneval_program(problem: dict, completion: str) -> str:
    """The candidate's program: prompt + completion (the tests are not in it: the judge runs them)."""
    return f"{problem['prompt']}{completion}\n"


def humaneval_check(problem: dict, program: str) -> Check:
    """How the sandbox judges ``program``: the judge runs the prompt (trusted; its helpers, e.g. ``poly``,
    are what the tests call), then the problem's ``test`` and ``check(<entry_point>)`` against the candidate."""
    entry = problem["entry_point"]
    return Check(program=program, entry_point=entry, setup=problem["prompt"],
                 tests=f"{problem['test']}\n\ncheck({entry})\n")


def chat_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """``messages`` rendered by the tokenizer's chat template, ending with the assistant's turn to speak."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt format 'chat' needs a tokenizer with a chat template (an instruct model); use "
                         "the 'completion' format for a base model")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def humaneval_chat_prompt(tokenizer: Any, problem: dict) -> str:
    """The chat request for one problem, rendered by the tokenizer's chat template (ready to generate)."""
    return chat_prompt(tokenizer, [{"role": "user", "content": HUMANEVAL_CHAT_REQUEST.format(prompt=problem["prompt"])}])


def code_block(reply: str) -> str:
    """The first ```python (or bare ```) block of a chat reply (an unclosed one to the end); else the reply."""
    m = _FENCE.search(reply)
    return m.group(1) if m else reply


def humaneval_chat_program(problem: dict, reply: str) -> str:
    """The candidate's program of a chat reply: the prompt's lines before ``def <entry_point>`` + its code.

    A block that does not define the entry point is read as the body the prompt leaves open.
    """
    code, entry = code_block(reply), problem["entry_point"]
    defines = re.compile(rf"^def\s+{re.escape(entry)}\s*\(", re.M)
    if not defines.search(code):
        return humaneval_program(problem, code)
    where = defines.search(problem["prompt"])
    header = problem["prompt"][: where.start()] if where else ""
    return f"{header}{code}\n"


def _check_format(prompt_format: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")


def _closed_block(text: str) -> bool:
    return text.count("```") >= 2


def evaluate_humaneval(model: torch.nn.Module, tokenizer: Any, data: Any, *, max_examples: int | None = None,
                       max_new_tokens: int = 384, batch_size: int = 8, device: str | torch.device = "cpu",
                       timeout_s: float = 5.0, workers: int = 2, progress: bool = False,
                       completions: Sequence[str] | None = None, prompt_format: str = "completion",
                       allow_unisolated: bool = False) -> dict[str, Any]:
    """Greedy pass@1 on HumanEval problems (``data.splits["test"]``); see the module docstring.

    ``completions`` replaces generation (tests; e.g. the canonical solutions must all pass);
    with ``prompt_format="chat"`` they are chat replies. Where the sandbox cannot isolate the
    generated code (no Linux namespaces) this raises :class:`.sandbox.SandboxUnavailable` before
    generating, unless ``allow_unisolated`` (then it runs as this user; see ``FALLBACK_WARNING``).
    """
    from tqdm.auto import tqdm

    from .sandbox import Limits, require_isolation, run_checks

    _check_format(prompt_format)
    sandbox = require_isolation(allow_unisolated)
    chat = prompt_format == "chat"
    problems = list(data.splits["test"])[:max_examples]
    if completions is None:
        prompts = [humaneval_chat_prompt(tokenizer, p) if chat else p["prompt"] for p in problems]
        bar = tqdm(total=len(problems), desc="humaneval generate", disable=not progress)
        completions = generate_until(model, tokenizer, prompts, () if chat else HUMANEVAL_STOPS,
                                     max_new_tokens=max_new_tokens, batch_size=batch_size, device=device, progress=bar,
                                     finished=_closed_block if chat else None)
        bar.close()
    build = humaneval_chat_program if chat else humaneval_program
    checks = [humaneval_check(p, build(p, c)) for p, c in zip(problems, completions)]
    results = run_checks(checks, Limits(timeout_s=timeout_s), workers=workers, progress=progress,
                         desc="humaneval run", allow_unisolated=allow_unisolated)
    samples = [{"task_id": p["task_id"], "completion": c, "status": r.status, "error": r.error,
                "seconds": r.seconds} for p, c, r in zip(problems, completions, results)]
    passed = sum(r.passed for r in results)
    statuses: dict[str, int] = {}
    for r in results:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    return {"task": "humaneval", "problems": len(problems), "passed": passed,
            "pass_at_1": passed / max(1, len(problems)), "statuses": statuses, "prompt_format": prompt_format,
            "max_new_tokens": max_new_tokens,
            "timeout_s": timeout_s, "sandbox": sandbox, "samples": samples}


def gsm8k_prompt(question: str, shots: Sequence[dict]) -> str:
    head = "".join(f"Question: {s['question']}\nAnswer: {s['answer']} The answer is {s['final']}.\n\n" for s in shots)
    return f"{head}Question: {question}\nAnswer:"


def gsm8k_chat_prompt(tokenizer: Any, question: str, shots: Sequence[dict]) -> str:
    """The few-shot prompt as a conversation: each exemplar a user question and the assistant's solution."""
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": f"Question: {s['question']}"},
                     {"role": "assistant", "content": f"{s['answer']} The answer is {s['final']}."}]
    return chat_prompt(tokenizer, [*messages, {"role": "user", "content": f"Question: {question}"}])


def evaluate_gsm8k(model: torch.nn.Module, tokenizer: Any, data: Any, *, shots: int = 0,
                   max_examples: int | None = None, max_new_tokens: int = 256, batch_size: int = 8,
                   device: str | torch.device = "cpu", progress: bool = False,
                   completions: Sequence[str] | None = None, prompt_format: str = "completion") -> dict[str, Any]:
    """Exact match of the final number on GSM8K test problems; ``shots`` exemplars from ``dev``.

    ``prompt_format="chat"``: the exemplars and the question as a conversation in the tokenizer's
    chat template (for instruct models), scored the same way.
    """
    from tqdm.auto import tqdm

    _check_format(prompt_format)

    pool = list(data.splits.get("dev") or [])
    if shots < 0 or shots > len(pool):
        raise ValueError(f"shots must be 0..{len(pool)} (the held-out few-shot pool), got {shots}")
    problems = list(data.splits["test"])[:max_examples]
    if completions is None:
        prompts = [gsm8k_chat_prompt(tokenizer, p["question"], pool[:shots]) if prompt_format == "chat"
                   else gsm8k_prompt(p["question"], pool[:shots]) for p in problems]
        bar = tqdm(total=len(problems), desc=f"gsm8k {shots}-shot", disable=not progress)
        completions = generate_until(model, tokenizer, prompts, GSM8K_STOPS, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, device=device, progress=bar)
        bar.close()
    samples, correct = [], 0
    for p, c in zip(problems, completions):
        pred = last_number(c)
        gold = normalize_number(p["final"])
        ok = pred is not None and pred == gold
        correct += ok
        samples.append({"question": p["question"], "completion": c, "prediction": pred, "reference": gold,
                        "correct": ok})
    return {"task": "gsm8k", "shots": shots, "prompt_format": prompt_format, "problems": len(problems),
            "correct": correct,
            "accuracy": correct / max(1, len(problems)),
            "no_number": sum(s["prediction"] is None for s in samples), "max_new_tokens": max_new_tokens,
            "samples": samples}
