"""The serve benchmark of two commits, interleaved: A B A B ... on one machine in one run.

    python docs/benchmarks/serve_before_after.py --before 00fe255 --after HEAD --rounds 4 \
        --json docs/benchmarks/serve-before-after-cpu-2026-12-06.json -- --threads 1 --requests 32

Each commit's ``src`` is taken with ``git archive`` into a temporary directory (``--after WORKTREE``
uses this checkout's files as they are), and each round runs ``python -m sharelora.serve.bench``
(the arguments after ``--``) once per commit, in a fresh process, alternating which goes first.
Interleaving spreads the machine's slow and fast moments over both commits; the report gives each
scenario's median tokens/s per commit with its min-max spread, and the after / before ratio of
the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCENARIOS = "batched, 1 adapter;batched, 16 task-shared adapters;batched, 16 independent adapters"


def checkout(rev: str, into: Path) -> tuple[Path, str]:
    """(the ``src`` directory of ``rev``, its commit id); WORKTREE: this checkout's own ``src``."""
    if rev == "WORKTREE":
        return ROOT / "src", "worktree"
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", rev], check=True, capture_output=True,
                         text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", sha, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src", sha


def run_bench(src: Path, bench_args: list[str], out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src)}
    cmd = [sys.executable, "-m", "sharelora.serve.bench", "--only", SCENARIOS, "--json", str(out), *bench_args]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", default="WORKTREE")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--json", type=Path, required=True)
    args = p.parse_args(argv)
    runs: dict[str, list] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "a").mkdir()
        (tmp / "b").mkdir()
        srcs = {"before": checkout(args.before, tmp / "a"), "after": checkout(args.after, tmp / "b")}
        for r in range(args.rounds):
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            for which in order:
                t0 = time.time()
                res = run_bench(srcs[which][0], bench_args, tmp / f"{which}-{r}.json")
                row = {x["scenario"]: x["tokens_per_s"] for x in res["rows"]}
                runs[which].append({"round": r, "started": time.strftime("%H:%M:%S", time.localtime(t0)),
                                    "tokens_per_s": row, "machine": res["machine"]})
                print(f"round {r} {which:6s} " + "  ".join(f"{k}: {v:.1f}" for k, v in row.items()), flush=True)
    summary = {}
    for scenario in runs["before"][0]["tokens_per_s"]:
        cell = {}
        for which in ("before", "after"):
            xs = [run["tokens_per_s"][scenario] for run in runs[which]]
            cell[which] = {"median": round(statistics.median(xs), 2), "min": min(xs), "max": max(xs), "runs": xs}
        cell["after_over_before"] = round(cell["after"]["median"] / cell["before"]["median"], 3)
        summary[scenario] = cell
    record = {"command": "python docs/benchmarks/serve_before_after.py " + " ".join(sys.argv[1:]),
              "before": srcs["before"][1], "after": srcs["after"][1], "date": time.strftime("%Y-%m-%d"),
              "machine": runs["before"][0]["machine"],
              "load_average_at_end": os.getloadavg(), "summary": summary, "runs": runs}
    args.json.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    for scenario, cell in summary.items():
        b, a = cell["before"], cell["after"]
        print(f"| {scenario} | {b['median']:.1f} ({b['min']:.1f}-{b['max']:.1f}) | {a['median']:.1f} "
              f"({a['min']:.1f}-{a['max']:.1f}) | {cell['after_over_before']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
