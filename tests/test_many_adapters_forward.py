"""A forward's cost does not grow with the adapters it does not use: the blocks' hooks clear only the shared
down-projections that stored something (a server holds hundreds of adapters, a batch uses a few)."""

from __future__ import annotations

import torch

from serve_tiny import cfg, randomize, tiny_causal_lm

from sharelora import get_sharelora_model
from sharelora.method.layers import SharedDownProjection


def test_a_routed_forward_clears_only_the_projections_of_its_adapters(monkeypatch):
    names = [f"a{i}" for i in range(40)]
    model = get_sharelora_model(tiny_causal_lm(), cfg(task_share="A"), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg(task_share="A"))
    for i, n in enumerate(names):
        randomize(model, n, i, shared=i == 0)
    model.eval()
    x = torch.randint(7, 60, (3, 5))
    # routed rows, one adapter for every row, and no routing (the active adapter: q and v share one product)
    batches = [["a3", "a7", "a3"], ["a3", "a3", "a3"], None]
    model.set_adapter("a5")
    with torch.no_grad():
        want = [model(input_ids=x, adapter_names=b).logits for b in batches]
    cleared, stored = [], []
    real_clear, real_store = SharedDownProjection.clear, SharedDownProjection.store

    def clear(self, *args):
        cleared.append(self)
        real_clear(self, *args)

    def store(self, *args):
        stored.append(self)
        real_store(self, *args)

    monkeypatch.setattr(SharedDownProjection, "clear", clear)
    monkeypatch.setattr(SharedDownProjection, "store", store)
    for b, w in zip(batches, want):
        cleared.clear()
        stored.clear()
        with torch.no_grad():
            got = model(input_ids=x, adapter_names=b).logits
        torch.testing.assert_close(got, w, rtol=0, atol=0)
        # only what this forward stored is cleared (before: 40 adapters x 2 hooks x 2 blocks = 160 calls)
        assert len(cleared) == len({id(s) for s in stored}) <= 2 * len(set(b or ["a5"]))
        assert all(s.u is None for s in cleared)
    assert len(stored) == 2  # the unrouted forward stored one product per block, and cleared it
