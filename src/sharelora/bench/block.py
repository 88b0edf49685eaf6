"""What ShareLoRA's q/v pair adds to one attention block, in isolation (the bench's microscope).

    python -m sharelora.bench.block [--hidden 576] [--kv 192] [--tokens 512] [--blocks 4]
                                    [--rank 8] [--dropout 0.1] [--threads N] [--reps 300]

A stack of ``--blocks`` frozen q, k, v projections (SmolLM2's shape by default: 576 -> 576, 192,
192; 4 x 128 tokens) reads one input x that requires grad, so backward computes x's gradient
and no weight gradient: the block part of the bench's floor. Against it, interleaved and paired
as in ``sharelora bench``: ShareA on q, v with dropout, and without. Each output receives a fresh
copy of a fixed dense gradient, as from a model's next layer. Reports the median step time per block and what
each variant adds to the floor; ``--tokens 1`` leaves only the fixed per-call cost (Python,
autograd, dispatch).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch
from torch import nn


class _QKV(nn.Module):
    def __init__(self, hidden: int, kv: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, kv, bias=False)
        self.v_proj = nn.Linear(hidden, kv, bias=False)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


class _Blocks(nn.Module):
    def __init__(self, hidden: int, kv: int, blocks: int):
        super().__init__()
        self.layers = nn.ModuleList(_QKV(hidden, kv) for _ in range(blocks))

    def forward(self, x):
        return [y for layer in self.layers for y in layer(x)]


def build(hidden: int = 576, kv: int = 192, blocks: int = 4, rank: int = 8, dropout: float = 0.1,
          seed: int = 0) -> dict[str, nn.Module]:
    """The frozen floor and ShareA (q, v) with and without dropout, all on the same weights."""
    from ..method import ShareLoraConfig, get_sharelora_model

    torch.manual_seed(seed)
    floor = _Blocks(hidden, kv, blocks).requires_grad_(False)
    models = {"floor": floor}
    for name, p in ((f"sharelora-A p={dropout:g}", dropout), ("sharelora-A p=0", 0.0)):
        clone = _Blocks(hidden, kv, blocks)
        clone.load_state_dict(floor.state_dict())
        cfg = ShareLoraConfig(rank=rank, share="A", dropout=p, target_modules=["q_proj", "v_proj"],
                              init_lora_weights=False)
        models[name] = get_sharelora_model(clone, cfg).train()
    return models


def _step(model: nn.Module, x: torch.Tensor, grads: list[torch.Tensor]) -> None:
    # fresh gradient tensors, as a model's next layer hands over (same cost for every method)
    torch.autograd.backward(model(x), [g.clone() for g in grads])
    x.grad = None
    for p in model.parameters():
        p.grad = None


def measure(models: dict[str, nn.Module], tokens: int = 512, reps: int = 300, warmup: int = 10,
            seed: int = 0) -> dict:
    """Median step seconds per model and per block, and each model's paired excess over the floor."""
    floor = models["floor"]
    blocks = len(floor.layers)
    hidden = floor.layers[0].q_proj.in_features
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g).requires_grad_()
    with torch.no_grad():
        grads = [torch.randn(y.shape, generator=g) for y in floor(x)]
    times = {name: [] for name in models}
    for _ in range(warmup):
        for m in models.values():
            _step(m, x, grads)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(reps):
            for name, m in models.items():
                t0 = time.perf_counter()
                _step(m, x, grads)
                times[name].append(time.perf_counter() - t0)
    finally:
        if gc_was_enabled:
            gc.enable()
    out = {"tokens": tokens, "hidden": hidden, "blocks": blocks, "reps": reps, "threads": torch.get_num_threads(),
           "methods": {}}
    for name, ts in times.items():
        excess = [(t - f) / blocks for t, f in zip(ts, times["floor"])]
        out["methods"][name] = {"us_per_block": statistics.median(ts) / blocks * 1e6,
                                "added_us_per_block": statistics.median(excess) * 1e6}
    return out


def markdown(result: dict) -> str:
    lines = [f"{result['blocks']} blocks, {result['tokens']} tokens x {result['hidden']}, "
             f"{result['threads']} thread(s), median of {result['reps']}", "",
             "| method | µs per block | added to the floor, µs per block |", "|---|---|---|"]
    for name, r in result["methods"].items():
        lines.append(f"| {name} | {r['us_per_block']:.0f} | {r['added_us_per_block']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sharelora.bench.block", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--kv", type=int, default=192, help="k and v output size (default 192: SmolLM2's 3 kv heads)")
    p.add_argument("--tokens", type=int, default=512, help="batch x sequence (default 4 x 128)")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--reps", type=int, default=300)
    args = p.parse_args(argv)
    for name in ("hidden", "kv", "tokens", "blocks", "rank", "reps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from .run import retain_freed_memory

    retain_freed_memory()
    result = measure(build(args.hidden, args.kv, args.blocks, args.rank, args.dropout), args.tokens, args.reps)
    result["command"] = "python -m sharelora.bench.block " + " ".join(sys.argv[1:] if argv is None else argv)
    print(markdown(result))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
