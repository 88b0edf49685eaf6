"""The table of docs/RESULTS_CODE_MATH.md from the eval JSON files of docs/studies/code_math.sh.

    python docs/studies/code_math_report.py runs/code-math docs/results/code-math   # -> .json and .md
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

WHO = {"base": "SmolLM2-135M-Instruct (base)", "lora": "+ LoRA instruction adapter",
       "sharea": "+ ShareA instruction adapter", "shareab": "+ ShareAB instruction adapter"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson interval of a proportion k / n (in %): honest for k = 0."""
    if n == 0:
        return 0.0, 0.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 100 * max(0.0, centre - half), 100 * min(1.0, centre + half)


def row_of(r: dict, task: str, fmt: str, who: str, samples: list[dict]) -> dict:
    n = len(samples)
    k = sum(bool(x["correct"]) for x in samples) if task == "gsm8k" else sum(x["status"] == "passed" for x in samples)
    lo, hi = wilson(k, n)
    row = {"task": task, "format": fmt, "who": who, "solved": k, "problems": n, "score": 100 * k / max(1, n),
           "ci95": [lo, hi], "max_new_tokens": r["max_new_tokens"]}
    if task == "gsm8k":
        row["no_number"] = sum(x["prediction"] is None for x in samples)
    else:
        statuses: dict[str, int] = {}
        for x in samples:
            statuses[x["status"]] = statuses.get(x["status"], 0) + 1
        row["statuses"] = statuses
    return row


def rows(root: Path) -> list[dict]:
    out = []
    for path in sorted(root.glob("*.json")):
        name = path.stem
        if name.startswith("gsm8k-"):
            task, fmt, who = "gsm8k", name.split("-")[1], name.split("-", 2)[2]
        elif name.startswith("humaneval-"):
            task, fmt, who = "humaneval", name.split("-")[1], name.split("-", 2)[2]
        else:
            continue
        r = json.loads(path.read_text())
        out.append(row_of(r, task, fmt, who, r["samples"]))
    # GSM8K runs of different lengths: the longer ones also scored on the shortest's first problems (the same ones)
    gsm = [r for r in out if r["task"] == "gsm8k"]
    if gsm and len({r["problems"] for r in gsm}) > 1:
        n = min(r["problems"] for r in gsm)
        for r in [r for r in gsm if r["problems"] > n]:
            full = json.loads((root / f"gsm8k-{r['format']}-{r['who']}.json").read_text())
            out.append(row_of(full, "gsm8k", r["format"], r["who"], full["samples"][:n]))
    order = list(WHO)
    return sorted(out, key=lambda r: (r["task"], r["format"], -r["problems"],
                                      order.index(r["who"]) if r["who"] in order else 9))


def markdown(table: list[dict]) -> str:
    lines = ["| model | task (format) | problems | solved | score (95% CI) | notes |", "|---|---|---:|---:|---:|---|"]
    for r in table:
        task = {"4shot": "GSM8K (4-shot)", "chat4shot": "GSM8K (4-shot, chat turns)"}.get(r["format"], r["format"]) \
            if r["task"] == "gsm8k" else f"HumanEval ({r['format']})"
        notes = (f"{r['no_number']} with no number" if r["task"] == "gsm8k"
                 else ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items())))
        lines.append(f"| {WHO.get(r['who'], r['who'])} | {task} | {r['problems']} | {r['solved']} | "
                     f"{r['score']:.1f}% ({r['ci95'][0]:.1f}–{r['ci95'][1]:.1f}) | {notes} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    root, prefix = Path(argv[0]), Path(argv[1])
    table = rows(root)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_suffix(".json").write_text(json.dumps(table, indent=2) + "\n")
    prefix.with_suffix(".md").write_text(markdown(table))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
