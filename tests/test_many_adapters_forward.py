"""A forward's cost does not grow with the adapters it does not use: the blocks' hooks clear only the shared
down-projections that stored something (a server holds hundreds of adapters, a batch uses a few)."""

from __future__ import annotations

import torch

from serve_tiny import cfg, randomize, tiny_causal_lm

from sharelora import ShareLoraConfig, get_sharelora_model
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


def grouping(model) -> dict:
    """{(adapter, module): (the modules that share its projection, its A keys)} of every slot."""
    out, members = {}, {}
    for name, layer in model.sharelora_layers():
        for adapter, slot in layer.slots.items():
            if slot.shared_down is not None:
                members.setdefault(id(slot.shared_down), []).append(name)
    for name, layer in model.sharelora_layers():
        for adapter, slot in layer.slots.items():
            s = slot.shared_down
            out[(adapter, name)] = None if s is None else (tuple(members[id(s)]), s.a_keys)
    return out


def test_adding_an_adapter_groups_only_its_own_modules_as_a_full_regrouping_would(monkeypatch):
    import sharelora.method.model as method_model

    model = get_sharelora_model(tiny_causal_lm(), cfg(task_share="A"), adapter_name="a0")
    model.add_adapter("b", ShareLoraConfig(rank=4, share="none", target_modules=["q_proj", "k_proj", "v_proj"]))
    model.add_adapter("c", cfg(task_share="A"))
    model.delete_adapter("b")
    model.add_adapter("d", cfg(share="none"))
    calls = []
    real = SharedDownProjection.__init__

    def init(self, *args, **kw):
        calls.append(1)
        real(self, *args, **kw)

    monkeypatch.setattr(method_model.SharedDownProjection, "__init__", init)
    model.add_adapter("e", cfg(task_share="A"))
    assert len(calls) == 2  # e's projection in each of the 2 blocks, none for a0, c, d
    hooks = len(model._shared_down_hooks)
    incremental = grouping(model)
    for n in model.adapter_names:
        randomize(model, n, hash(n) % 100, shared=n == "a0")
    model.eval()
    x = torch.randint(7, 60, (4, 6))
    names = ["a0", "c", "d", "e"]
    with torch.no_grad():
        before = model(input_ids=x, adapter_names=names).logits
        model.set_adapter("e")
        single = model(input_ids=x).logits
    model._share_down_projections()  # the full regrouping
    assert grouping(model) == incremental and len(model._shared_down_hooks) == hooks
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x, adapter_names=names).logits, before, rtol=0, atol=0)
        torch.testing.assert_close(model(input_ids=x).logits, single, rtol=0, atol=0)


def test_an_adapter_that_disagrees_with_its_task_group_is_refused():
    import pytest

    from sharelora.method.errors import ShareLoraError

    model = get_sharelora_model(tiny_causal_lm(), cfg(task_share="A", task_group="g"), adapter_name="a0")
    for i in range(1, 5):
        model.add_adapter(f"a{i}", cfg(task_share="A", task_group="g"))
    with pytest.raises(ShareLoraError, match="its rank=8 differs from adapter 'a0'"):
        model.add_adapter("bad", cfg(task_share="A", task_group="g", rank=8))
    with pytest.raises(ShareLoraError, match="other shared tensors"):
        model.add_adapter("bad", ShareLoraConfig(rank=4, share="A", task_share="A", task_group="g",
                                                 target_modules=["q_proj"]))
    assert model.adapter_names == [f"a{i}" for i in range(5)]
    model.add_adapter("other", cfg(task_share="A", task_group="h", rank=8))  # another group: its own A
