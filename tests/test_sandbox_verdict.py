"""The verdict comes from the judge, a process the sample cannot reach: forgeries from inside the sample's
process fail, and honest samples of HumanEval-like problems get the verdict the benchmark's own harness
(program + tests in one interpreter) gives them. The problems below are written for these tests in the
shape of HumanEval's (helpers in the prompt that the tests call, tuples, dicts, None, ``is True``, the
function called by its own name, random inputs)."""

from __future__ import annotations

import pytest
from generation_tiny import TinyTaskData

from sharelora.tasks import sandbox
from sharelora.tasks.code_math import evaluate_humaneval, humaneval_check, humaneval_program
from sharelora.tasks.sandbox import Check, Limits, codec, run_check

FAST = Limits(timeout_s=3.0)
UNISOLATED = {} if sandbox.isolation()["isolated"] else {"allow_unisolated": True}

ADD = {"task_id": "T/add", "entry_point": "add", "prompt": "def add(a: int, b: int) -> int:\n    \"\"\"a + b\"\"\"\n",
       "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n"}


def humaneval(problems, completions):
    data = TinyTaskData("he", "generation", {"test": problems})
    r = evaluate_humaneval(None, None, data, completions=completions, timeout_s=FAST.timeout_s, **UNISOLATED)
    return [s["status"] for s in r["samples"]], [s["error"] for s in r["samples"]]


# ---- forgeries from inside the sample's process ---------------------------------------------------
# Each completion first proves it reached what it forges with (printing "reached"), then forges.

REPORT_VIA_MAIN = """    return 0
import os, sys
_m = sys.modules["__main__"]
print("reached", _m.report, flush=True)
_m.report(type="result", ok=True, error=None, nonce=getattr(_m, "nonce", None))
os._exit(0)
"""
REPORT_VIA_FRAME = """    return 0
import os, sys
_g = sys._getframe(1).f_globals
print("reached", _g["report"], flush=True)
_g["report"](type="result", ok=True, error=None, nonce=_g.get("nonce"))
os._exit(0)
"""
REPORT_VIA_GC = """    return 0
import gc, os
for _o in gc.get_objects():
    if isinstance(_o, dict) and "nonce" in _o and callable(_o.get("report")):
        print("reached", _o["report"], flush=True)
        _o["report"](type="result", ok=True, error=None, nonce=_o["nonce"])
        os._exit(0)
"""
FAKE_RESULT_ON_EVERY_FD = """    return 0
import json, os
_line = (json.dumps({"type": "result", "ok": True, "error": None}) + "\\n").encode()
for _fd in range(1, 1024):
    try:
        os.write(_fd, _line)
        print("reached fd", _fd, flush=True)
    except OSError:
        pass
os._exit(0)
"""
ALWAYS_EQUAL = """    class Everything:
        def __eq__(self, other):
            return True
        def __ne__(self, other):
            return False
        __hash__ = object.__hash__
    return Everything()
"""
ALWAYS_EQUAL_INT = """    class Everything(int):
        def __eq__(self, other):
            return True
        __hash__ = int.__hash__
    return Everything(0)
"""
FORGERIES = {"report-via-__main__": REPORT_VIA_MAIN, "report-via-frame-globals": REPORT_VIA_FRAME,
             "report-via-gc": REPORT_VIA_GC, "fake-result-on-every-fd": FAKE_RESULT_ON_EVERY_FD,
             "always-equal-object": ALWAYS_EQUAL, "always-equal-int-subclass": ALWAYS_EQUAL_INT}


@pytest.mark.parametrize("completion", list(FORGERIES.values()), ids=list(FORGERIES))
def test_a_forged_verdict_fails(completion):
    statuses, errors = humaneval([ADD], [completion])
    assert statuses == ["failed"], errors


@pytest.mark.parametrize("name", ["report-via-__main__", "report-via-frame-globals", "report-via-gc",
                                  "fake-result-on-every-fd"])
def test_the_forgeries_reach_what_they_forge_with_and_still_fail(name):
    """Not a vacuous pass: each forgery finds a report function (or writes to its descriptors) in its process."""
    r = run_check(humaneval_check(ADD, humaneval_program(ADD, FORGERIES[name])), FAST, **UNISOLATED)
    assert "reached" in r.output and r.status == "failed", (r.output, r.error)


def test_an_always_equal_object_cannot_be_sent_and_a_builtin_subclass_is_sent_as_its_value():
    enc, dec = codec()["encode"], codec()["decode"]

    class Everything:
        def __eq__(self, other):
            return True

    with pytest.raises(TypeError, match="cannot be compared safely"):
        enc(Everything())

    class Sneaky(str):
        def __eq__(self, other):
            return True

        __hash__ = str.__hash__

    sent = dec(enc([Sneaky("no"), (Sneaky("x"),)]))
    assert sent == ["no", ("x",)] and type(sent[0]) is str and sent != ["yes", ("x",)]


def test_tampering_with_its_own_encoder_sends_at_most_a_builtin_value():
    """The sample owns its process, including the code that answers: it can choose which builtin value
    it answers, never make the judge compare against anything else."""
    raw_number = "import sys\nsys.modules['__main__'].encode = lambda v: 5\n"
    constant = "import sys\nsys.modules['__main__'].encode = lambda v: ['i', '5']\n"
    statuses, errors = humaneval([ADD, ADD], ["    return 0\n" + raw_number, "    return 0\n" + constant])
    assert statuses == ["failed", "failed"]
    assert "raw JSON number" in errors[0] and errors[1].startswith("AssertionError")  # 5 == 5, then 5 != 0


def test_a_reply_past_the_message_cap_fails(monkeypatch):
    monkeypatch.setattr(sandbox, "MESSAGE_BYTES", 1000)
    r = run_check(Check("def f():\n    return 'x' * 5000\n", "f", "assert f() == 'x' * 5000\n"), FAST, **UNISOLATED)
    assert r.status == "failed" and "more than 1000 bytes" in r.error


# ---- the codec -------------------------------------------------------------------------------------

CROSSING_VALUES = [
    None, True, False, 0, -7, 2 ** 200, -(3 ** 90), 0.1, -0.0, float("inf"), 1e-310, 1 + 2j, "", "héllo\ud800", b"\x00\xff",
    [1, [2, (3, "4")]], (), (None,), {"a": 1, 2: [3], (4, 5): {6}}, {1, 2.5, "x"}, frozenset({(1, 2)}),
    [[(0, 0), (1, 4)], {"b": 2, "a": 2}],
]


# ids by position and type, not repr: a set's repr depends on the process's string hash seed, and
# pytest-xdist workers must collect the same test ids
@pytest.mark.parametrize("value", CROSSING_VALUES,
                         ids=[f"{i}-{type(v).__name__}" for i, v in enumerate(CROSSING_VALUES)])
def test_values_cross_with_their_exact_builtin_types(value):
    enc, dec = codec()["encode"], codec()["decode"]
    back = dec(enc(value))
    assert back == value and repr(back) == repr(value)  # repr tells 1 from True and 1.0, list from tuple

    def types(x):
        if isinstance(x, (list, tuple, set, frozenset)):
            return (type(x), [types(v) for v in sorted(x, key=repr)])
        if isinstance(x, dict):
            return (dict, sorted(((types(k), types(v)) for k, v in x.items()), key=repr))
        return type(x).__name__

    assert str(types(back)) == str(types(value))


def test_nan_crosses_as_nan():
    import math

    c = codec()
    assert math.isnan(c["decode"](c["encode"](float("nan"))))


@pytest.mark.parametrize("line,why", [
    (b'["value", 5]\n', "raw JSON number"),
    (b'["value", 5.0]\n', "raw JSON number"),
    (b'["value", NaN]\n', "raw JSON number"),
    (b'["value", {"a": 1}]\n', "raw JSON number or object"),
    (b'{"type": "result", "ok": true}\n', "raw JSON number or object"),
    (b'"ready"\n', "not a list"),
    (b'[]\n', "not a list"),
    (b'not json\n', "not JSON"),
    (b"[" * 100000 + b"]" * 100000 + b"\n", None),
])
def test_the_judge_reads_only_well_formed_messages(line, why):
    c = codec()
    with pytest.raises(c["SampleError"], match=why):
        c["decode"](c["read_message"](line)[1])


@pytest.mark.parametrize("value,why", [
    (["i", "0x10"], "not a value"), (["i", " 5"], "not a value"), (["i", "1_0"], "not a value"), (["i"], "not a value"),
    (["f", "zz"], "not a value"), (["y", "abc"], "not a value"), (["q", "1"], "not a value"),
    (["d", ["l"], "x"], "unhashable"), (["S", ["l"]], "unhashable"), (["d", "a"], "not a value"), ([5], "not a value"),
    (["l"] * 1 + [["l", ["l", ["l"]]]] , None),
])
def test_the_judge_rebuilds_only_tagged_builtin_values(value, why):
    c = codec()
    if why is None:  # shallow nesting is fine
        assert c["decode"](value) == [[[[]]]]
        return
    with pytest.raises(c["SampleError"], match=why):
        c["decode"](value)


def test_deep_nesting_is_refused():
    c = codec()
    deep = "x"
    for _ in range(200):
        deep = ["l", deep]
    with pytest.raises(c["SampleError"], match="nested more than"):
        c["decode"](deep)
    nested: list = []
    for _ in range(200):
        nested = [nested]
    with pytest.raises(ValueError, match="nested more than"):
        c["encode"](nested)


# ---- honest samples of HumanEval-like problems -------------------------------------------------------

POLY = {"task_id": "T/poly", "entry_point": "find_zero", "prompt": (
    "import math\n\n\ndef poly(xs: list, x: float):\n    return sum(c * math.pow(x, i) for i, c in enumerate(xs))\n\n\n"
    "def find_zero(xs: list):\n    \"\"\"A zero of the polynomial with coefficients xs (odd degree).\"\"\"\n"),
    "test": ("import copy\n\n\ndef check(candidate):\n    for xs in ([1, 2], [-6, 11, -6, 1], [2, 0, 0, 1]):\n"
             "        x = candidate(copy.deepcopy(xs))\n        assert math.fabs(poly(xs, x)) < 1e-4\n")}
POLY_RIGHT = ("    lo, hi = -1.0, 1.0\n    while poly(xs, lo) * poly(xs, hi) > 0:\n        lo, hi = lo * 2, hi * 2\n"
              "    for _ in range(200):\n        mid = (lo + hi) / 2\n"
              "        if poly(xs, mid) * poly(xs, lo) > 0:\n            lo = mid\n        else:\n            hi = mid\n"
              "    return lo\n")

ROWS = {"task_id": "T/rows", "entry_point": "get_row", "prompt": (
    "def get_row(grid, x):\n    \"\"\"Coordinates (row, column) of x, sorted by row, columns descending.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert candidate([[1, 2], [2, 1]], 2) == [(0, 1), (1, 0)]\n"
             "    assert candidate([], 1) == []\n    assert candidate([[5, 5]], 5) == [(0, 1), (0, 0)]\n")}
ROWS_RIGHT = ("    return sorted(((i, j) for i, row in enumerate(grid) for j, v in enumerate(row) if v == x),\n"
              "                  key=lambda p: (p[0], -p[1]))\n")
ROWS_LISTS = ("    return sorted(([i, j] for i, row in enumerate(grid) for j, v in enumerate(row) if v == x),\n"
              "                  key=lambda p: (p[0], -p[1]))\n")  # lists, not tuples: [0, 1] != (0, 1)

HIST = {"task_id": "T/hist", "entry_point": "histogram", "prompt": (
    "def histogram(text):\n    \"\"\"The most frequent letters of the space-separated text, with their count.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert candidate('a b b a') == {'a': 2, 'b': 2}\n"
             "    assert candidate('a b c a b') == {'a': 2, 'b': 2}\n    assert candidate('') == {}\n")}
HIST_RIGHT = ("    from collections import Counter\n    counts = Counter(text.split())\n"
              "    top = max(counts.values(), default=0)\n    return {k: v for k, v in counts.items() if v == top}\n")
HIST_COUNTER = "    from collections import Counter\n    return Counter(text.split())\n"  # all letters: wrong

SHIFT = {"task_id": "T/shift", "entry_point": "decode_shift", "prompt": (
    "def encode_shift(s: str):\n    return ''.join(chr((ord(c) + 5 - ord('a')) % 26 + ord('a')) for c in s)\n\n\n"
    "def decode_shift(s: str):\n    \"\"\"The inverse of encode_shift.\"\"\"\n"),
    "test": ("import random, string\n\n\ndef check(candidate):\n    for _ in range(50):\n"
             "        s = ''.join(random.choice(string.ascii_lowercase) for _ in range(random.randint(1, 20)))\n"
             "        assert candidate(encode_shift(s)) == s\n")}
SHIFT_RIGHT = "    return ''.join(chr((ord(c) - 5 - ord('a')) % 26 + ord('a')) for c in s)\n"
SHIFT_OFF_BY_ONE = "    return ''.join(chr((ord(c) - 4 - ord('a')) % 26 + ord('a')) for c in s)\n"

BOOL = {"task_id": "T/bool", "entry_point": "will_fly", "prompt": (
    "def will_fly(q, w):\n    \"\"\"True if q is a palindrome and its sum is at most w.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert candidate([3, 2, 3], 9) is True\n    assert candidate([1, 2], 5) is False\n"
             "    assert candidate([3], 5) is True\n")}
BOOL_RIGHT = "    return q == q[::-1] and sum(q) <= w\n"
BOOL_INT = "    return int(q == q[::-1] and sum(q) <= w)\n"  # 1 is not True

NONE = {"task_id": "T/none", "entry_point": "extremes", "prompt": (
    "def extremes(lst):\n    \"\"\"(largest negative, smallest positive), None where there is none.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert candidate([2, 4, 1]) == (None, 1)\n"
             "    assert candidate([-3, -1, 5]) == (-1, 5)\n    assert candidate([]) == (None, None)\n")}
NONE_RIGHT = ("    neg = [x for x in lst if x < 0]\n    pos = [x for x in lst if x > 0]\n"
              "    return (max(neg) if neg else None, min(pos) if pos else None)\n")
NONE_ZEROS = ("    neg = [x for x in lst if x < 0]\n    pos = [x for x in lst if x > 0]\n"
              "    return (max(neg) if neg else 0, min(pos) if pos else 0)\n")

BY_NAME = {"task_id": "T/name", "entry_point": "sort_third", "prompt": (
    "def sort_third(l: list):\n    \"\"\"l with the items at indices divisible by 3 sorted among themselves.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert tuple(sort_third([1, 2, 3])) == tuple(sort_third([1, 2, 3]))\n"
             "    assert tuple(candidate([5, 6, 3, 4, 8, 9, 2])) == (2, 6, 3, 4, 8, 9, 5)\n")}
BY_NAME_RIGHT = "    l = list(l)\n    l[::3] = sorted(l[::3])\n    return l\n"
BY_NAME_WRONG = "    return sorted(l)\n"

FLOAT = {"task_id": "T/float", "entry_point": "mean_abs_dev", "prompt": (
    "from typing import List\n\n\ndef mean_abs_dev(numbers: List[float]) -> float:\n    \"\"\"Mean absolute deviation.\"\"\"\n"),
    "test": ("def check(candidate):\n    assert abs(candidate([1.0, 2.0, 3.0]) - 2.0 / 3.0) < 1e-6\n"
             "    assert abs(candidate([1.0, 2.0, 3.0, 4.0]) - 1.0) < 1e-6\n")}
FLOAT_RIGHT = "    m = sum(numbers) / len(numbers)\n    return sum(abs(x - m) for x in numbers) / len(numbers)\n"
FLOAT_NUMPY_SCALAR = "    return type('f64', (float,), {})(1.0)\n"  # a float subclass, sent as 1.0: wrong for the first



def test_always_equal_objects_inside_a_returned_list_fail():
    inside = ALWAYS_EQUAL.replace("return Everything()", "return [Everything(), Everything()] if grid else []")
    statuses, errors = humaneval([ROWS], [inside])
    assert statuses == ["failed"] and "cannot be compared safely" in errors[0]


HONEST = [  # (problem, completion, the benchmark harness's verdict)
    (ADD, "    return a + b\n", "passed"), (ADD, "    return a * b\n", "failed"),
    (POLY, POLY_RIGHT, "passed"), (POLY, "    return 0.0\n", "failed"),
    (ROWS, ROWS_RIGHT, "passed"), (ROWS, ROWS_LISTS, "failed"),
    (HIST, HIST_RIGHT, "passed"), (HIST, HIST_COUNTER, "failed"),
    (SHIFT, SHIFT_RIGHT, "passed"), (SHIFT, SHIFT_OFF_BY_ONE, "failed"),
    (BOOL, BOOL_RIGHT, "passed"), (BOOL, BOOL_INT, "failed"),
    (NONE, NONE_RIGHT, "passed"), (NONE, NONE_ZEROS, "failed"),
    (BY_NAME, BY_NAME_RIGHT, "passed"), (BY_NAME, BY_NAME_WRONG, "failed"),
    (FLOAT, FLOAT_RIGHT, "passed"), (FLOAT, FLOAT_NUMPY_SCALAR, "failed"),
    (ADD, "    raise ValueError('no')\n", "failed"), (ADD, "    return a +\n", "failed"),
]


def test_honest_samples_get_the_verdict_of_the_benchmarks_own_harness():
    problems = [p for p, _, _ in HONEST]
    completions = [c for _, c, _ in HONEST]
    statuses, errors = humaneval(problems, completions)
    assert statuses == [v for _, _, v in HONEST], list(zip([p["task_id"] for p in problems], statuses, errors))
    assert errors[-2] == "ValueError: no" and "SyntaxError" in errors[-1]


@pytest.mark.parametrize("problem,completion,verdict", HONEST[:6], ids=lambda x: x if isinstance(x, str) and
                         len(x) < 8 else None)
def test_the_benchmark_harness_agrees_with_these_verdicts(problem, completion, verdict):
    """The reference: program and tests in one interpreter, as human-eval runs them (here, in a sandbox)."""
    program = f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"
    r = sandbox.run_program(program, FAST, **UNISOLATED)
    assert ("passed" if r.completed else "failed") == verdict, r.error
