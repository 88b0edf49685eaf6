"""The scheduler's own cache bookkeeping, before and after issue 28, timed alone (no model forward).

    python docs/benchmarks/serve_cache_overhead.py --before 00fe255 --after HEAD

A cache of SmolLM2-135M's shape (30 layers, 3 KV heads of 64, full attention) with 8 rows of 64
columns. Per decode step the scheduler reads the forward's cache (old: ``cache_layers``; new:
``BatchCache.of``); when a row joins it merges and rebuilds a transformers cache (old:
``merge_caches`` + ``cache_from_layers``; new: ``BatchCache.join`` + ``to_cache``); when one leaves
it selects and rebuilds (old: ``select_rows`` + ``cache_from_layers``; new: ``select`` + ``to_cache``).
Each commit runs in its own process (its ``src`` from ``git archive``); medians of 200 calls, in
microseconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = r"""
import json, statistics, time, torch
from transformers import DynamicCache
torch.set_num_threads(1)
L, B, H, C, D = 30, 8, 3, 64, 64
kv = [(torch.randn(B, H, C, D), torch.randn(B, H, C, D)) for _ in range(L)]
one = [(torch.randn(1, H, 20, D), torch.randn(1, H, 20, D)) for _ in range(L)]
mask, mask1 = torch.ones(B, C, dtype=torch.long), torch.ones(1, 20, dtype=torch.long)
cache = DynamicCache(ddp_cache_data=kv)
def med(fn, n=200):
    out = []
    for _ in range(n):
        t = time.perf_counter(); fn(); out.append(time.perf_counter() - t)
    return round(statistics.median(out) * 1e6, 1)
try:
    from sharelora.serve.batch_cache import BatchCache
    state, row = BatchCache.of(cache, mask), BatchCache.of(DynamicCache(ddp_cache_data=one), mask1)
    r = {"per_step_read": med(lambda: BatchCache.of(cache, mask)),
         "join": med(lambda: BatchCache.join([state, row]).to_cache()),
         "leave": med(lambda: state.select(list(range(B - 1))).to_cache())}
except ImportError:
    from sharelora.serve.scheduler import cache_from_layers, cache_layers, merge_caches, select_rows
    layers = cache_layers(cache)
    r = {"per_step_read": med(lambda: cache_layers(cache)),
         "join": med(lambda: cache_from_layers(merge_caches([(layers, mask), (one, mask1)])[0])),
         "leave": med(lambda: cache_from_layers(select_rows(layers, mask, list(range(B - 1)))[0]))}
print(json.dumps(r))
"""


def src_of(rev: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True)
    p.add_argument("--after", default="HEAD")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    out = {"before": [], "after": []}
    with tempfile.TemporaryDirectory() as tmp:
        srcs = {}
        for which, rev in (("before", args.before), ("after", args.after)):
            (Path(tmp) / which).mkdir()
            srcs[which] = src_of(rev, Path(tmp) / which)
        for r in range(args.rounds):
            for which in (("before", "after") if r % 2 == 0 else ("after", "before")):
                env = {**os.environ, "PYTHONPATH": str(srcs[which]), "OMP_NUM_THREADS": "1"}
                res = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
                out[which].append(json.loads(res.stdout.strip().splitlines()[-1]))
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
