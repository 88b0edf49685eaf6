"""HumanEval / GSM8K plumbing: stop sequences, number parsing, canonical vs wrong programs in the sandbox,
few-shot pool held out, generation on a tiny random LLaMA."""

import json

import pytest
from generation_tiny import TinyTaskData, tiny_llama, tiny_tokenizer

from sharelora.tasks.code_math import (
    evaluate_gsm8k,
    evaluate_humaneval,
    generate_until,
    code_block,
    gsm8k_chat_prompt,
    gsm8k_prompt,
    humaneval_chat_program,
    humaneval_chat_prompt,
    humaneval_check,
    humaneval_program,
    last_number,
    normalize_number,
    truncate_at_stops,
)

from sharelora.tasks import sandbox

# Where the sandbox cannot isolate (no namespaces), these tests' own programs run in the fallback, opted in.
UNISOLATED = {} if sandbox.isolation()["isolated"] else {"allow_unisolated": True}

PROBLEM = {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"Sum.\"\"\"\n", "entry_point": "add",
           "canonical_solution": "    return a + b\n",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def test_completion_is_cut_at_the_first_stop():
    assert truncate_at_stops("    return 1\ndef g():\n#x", ("\ndef ", "\n#")) == "    return 1"
    assert truncate_at_stops("no stop", ("\ndef ",)) == "no stop"


@pytest.mark.parametrize("text,number", [("so 1,234 dollars", "1234"), ("18.0", "18"), ("$7.50", "7.5"),
                                         ("-3", "-3"), ("none", None)])
def test_numbers_are_normalised(text, number):
    assert normalize_number(text) == number


def test_the_last_number_is_the_prediction():
    assert last_number("3 + 4 = 7. The answer is 1,007.") == "1007"
    assert last_number("no digits") is None


def test_canonical_completion_passes_and_a_wrong_one_fails():
    data = TinyTaskData("he", "generation", {"test": [PROBLEM, PROBLEM]})
    r = evaluate_humaneval(None, None, data, completions=["    return a + b\n", "    return a - b\n"], timeout_s=3,
                           **UNISOLATED)
    assert [s["status"] for s in r["samples"]] == ["passed", "failed"] and r["pass_at_1"] == 0.5
    assert humaneval_program(PROBLEM, "X") == PROBLEM["prompt"] + "X\n"  # the tests are not in the sample's program
    check = humaneval_check(PROBLEM, "X")
    assert (check.setup, check.entry_point) == (PROBLEM["prompt"], "add") and check.tests.endswith("check(add)\n")


HELPER = {"task_id": "T/1", "entry_point": "twice",
          "prompt": "import math\n\n\ndef one():\n    return 1\n\n\ndef twice(x):\n    \"\"\"Double.\"\"\"\n",
          "test": "def check(candidate):\n    assert candidate(3) == 6 * one()\n"}


def test_chat_replies_run_their_code_block_with_the_prompts_header():
    whole = "Sure:\n```python\ndef twice(x):\n    return 2 * x\n```\nIt doubles x."
    program = humaneval_chat_program(HELPER, whole)
    assert program.startswith("import math\n\n\ndef one():") and "Sure" not in program and "It doubles" not in program
    assert "check(" not in program  # the tests run in the judge, not in the sample's program
    assert humaneval_chat_program(HELPER, "```python\n    return 2 * x\n```").startswith(HELPER["prompt"])  # a body
    assert code_block("```\nx = 1\n") == "x = 1\n" and code_block("no block") == "no block"  # unclosed; none
    data = TinyTaskData("he", "generation", {"test": [HELPER, HELPER, PROBLEM]})
    replies = [whole, "```python\ndef twice(x):\n    return x\n```", "```py\ndef add(a, b):\n    return a + b\n```"]
    r = evaluate_humaneval(None, None, data, completions=replies, timeout_s=3, prompt_format="chat", **UNISOLATED)
    assert [s["status"] for s in r["samples"]] == ["passed", "failed", "passed"] and r["prompt_format"] == "chat"
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        evaluate_humaneval(None, None, data, completions=replies, prompt_format="markdown")


def test_gsm8k_chat_gives_the_exemplars_as_turns():
    tok = tiny_tokenizer(chat_template=True)
    shot = {"question": "1+1?", "answer": "1+1=2", "final": "2"}
    text = gsm8k_chat_prompt(tok, "2+2?", [shot])
    assert text.index("Question: 1+1?") < text.index("1+1=2 The answer is 2.") < text.index("Question: 2+2?")
    data = TinyTaskData("g", "generation", {"dev": [shot], "test": [{"question": "2+2?", "answer": "", "final": "4"}]})
    r = evaluate_gsm8k(None, tok, data, shots=1, completions=["2+2=4. The answer is 4."], prompt_format="chat")
    assert r["correct"] == 1 and r["prompt_format"] == "chat"
    with pytest.raises(ValueError, match="prompt_format must be one of"):
        evaluate_gsm8k(None, tok, data, completions=[""], prompt_format="turns")


def test_the_chat_prompt_goes_through_the_chat_template_and_needs_one():
    text = humaneval_chat_prompt(tiny_tokenizer(chat_template=True), PROBLEM)
    assert PROBLEM["prompt"] in text and "```python" in text
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        humaneval_chat_prompt(tiny_tokenizer(), PROBLEM)


def test_generation_stops_a_row_once_finished_says_so():
    tok = tiny_tokenizer()
    calls = []

    def finished(text):
        calls.append(text)
        return True  # every row is done after its first new token

    texts = generate_until(tiny_llama(), tok, ["what is", "the answer is a"], (), max_new_tokens=6, batch_size=2,
                           finished=finished)
    assert calls and all(len(tok(t, add_special_tokens=False)["input_ids"]) <= 1 for t in texts)


def test_a_hanging_completion_is_a_failure_not_a_hang():
    data = TinyTaskData("he", "generation", {"test": [PROBLEM]})
    r = evaluate_humaneval(None, None, data, completions=["    while True:\n        pass\n"], timeout_s=1, **UNISOLATED)
    assert r["passed"] == 0 and r["samples"][0]["status"] == "timeout"


def test_gsm8k_exact_match_and_few_shot_exemplars_come_from_the_held_out_pool():
    shot = {"question": "1+1?", "answer": "1+1=2", "final": "2"}
    test = [{"question": "2+2?", "answer": "", "final": "4"}, {"question": "3+3?", "answer": "", "final": "6"}]
    data = TinyTaskData("g", "generation", {"dev": [shot], "test": test})
    r = evaluate_gsm8k(None, None, data, shots=1, completions=[" 2+2 = 4.", " it is 7"])
    assert r["correct"] == 1 and r["accuracy"] == 0.5
    assert gsm8k_prompt("2+2?", [shot]).startswith("Question: 1+1?\nAnswer: 1+1=2 The answer is 2.\n\nQuestion: 2+2?")
    with pytest.raises(ValueError, match="few-shot pool"):
        evaluate_gsm8k(None, None, data, shots=2, completions=["", ""])


def test_generation_on_a_tiny_model_is_batched_and_cut():
    tok = tiny_tokenizer()
    texts = generate_until(tiny_llama(), tok, ["what is", "the answer is a"], ("?",), max_new_tokens=5, batch_size=2)
    assert len(texts) == 2 and all("?" not in t for t in texts)


@pytest.fixture
def tiny_lm(monkeypatch):
    """`sharelora eval --task humaneval|gsm8k --model tiny` reads a tiny random LLaMA and the given data."""
    from generation_tiny import TinyBundle

    shot = {"question": "1+1?", "answer": "1+1=2", "final": "2"}
    data = {"humaneval": TinyTaskData("humaneval", "generation", {"test": [PROBLEM, PROBLEM]}),
            "gsm8k": TinyTaskData("gsm8k", "generation", {"dev": [shot], "test": [
                {"question": "2+2?", "answer": "", "final": "4"}, {"question": "3+3?", "answer": "", "final": "6"}]})}
    monkeypatch.setattr("sharelora.sources.load_model",
                        lambda *a, **k: TinyBundle(tiny_llama(), tiny_tokenizer(chat_template=True)))
    monkeypatch.setattr("sharelora.sources.load_dataset", lambda name, **k: data[name])


@pytest.mark.parametrize("task,extra,score", [("humaneval", ["--sandbox-timeout", "2"], "pass_at_1"),
                                              ("humaneval", ["--prompt-format", "chat"], "pass_at_1"),
                                              ("gsm8k", ["--shots", "1", "--prompt-format", "chat"], "accuracy"),
                                              ("gsm8k", ["--shots", "1"], "accuracy")])
def test_cli_eval_generates_scores_and_writes_every_sample(tiny_lm, tmp_path, capsys, task, extra, score):
    import json

    from sharelora.cli import main

    out = tmp_path / f"{task}.json"
    if UNISOLATED and task == "humaneval":
        extra = [*extra, "--allow-unisolated-sandbox"]
    assert main(["eval", "--task", task, "--model", "tiny", "--max-new-tokens", "4", "--json", str(out), *extra]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == "tiny-llama" and 0.0 <= result[score] <= 1.0
    assert len(result["samples"]) == 2  # every problem generated and scored
    if task == "humaneval":  # each program ran in the sandbox and came back as a status
        assert all(s["status"] in ("passed", "failed", "timeout", "output_limit") for s in result["samples"])
    assert "samples: 2" in capsys.readouterr().out


def test_cli_eval_without_a_model_or_adapter_names_the_fix(tiny_lm, capsys):
    from sharelora.cli import main

    assert main(["eval", "--task", "humaneval"]) == 2
    assert "--model NAME" in capsys.readouterr().err


@pytest.fixture
def no_namespaces(monkeypatch):
    """A machine where the sandbox gets no namespaces (the fallback), with the once-per-process warning unsaid."""
    monkeypatch.setattr(sandbox, "USE_NAMESPACES", False)
    monkeypatch.setattr(sandbox, "_WARNED", False)


def test_without_isolation_humaneval_is_refused_before_generating_unless_allowed(no_namespaces, capsys):
    data = TinyTaskData("he", "generation", {"test": [PROBLEM]})
    with pytest.raises(sandbox.SandboxUnavailable, match="allow_unisolated=True"):
        evaluate_humaneval(None, None, data)  # no model: generating first would fail otherwise
    r = evaluate_humaneval(None, None, data, completions=["    return a + b\n"], timeout_s=3, allow_unisolated=True)
    assert r["passed"] == 1 and r["sandbox"]["isolated"] is False
    assert capsys.readouterr().err.count(sandbox.FALLBACK_WARNING) == 1


def test_cli_eval_humaneval_refuses_without_isolation_and_runs_with_the_flag(tiny_lm, no_namespaces, tmp_path, capsys):
    from sharelora.cli import main

    args = ["eval", "--task", "humaneval", "--model", "tiny", "--max-new-tokens", "4", "--sandbox-timeout", "2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cannot isolate generated code" in err and "--allow-unisolated-sandbox" in err
    out = tmp_path / "he.json"
    assert main([*args, "--allow-unisolated-sandbox", "--json", str(out)]) == 0
    assert capsys.readouterr().err.count(sandbox.FALLBACK_WARNING) == 1
    assert len(json.loads(out.read_text())["samples"]) == 2
