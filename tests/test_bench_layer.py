"""The fast layer kernel computes exactly what the plain ops compute (the bench's optimisations)."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from sharelora import ShareLoraConfig, get_sharelora_model
from sharelora.method import cpu_kernel, layers
from sharelora.method.layers import ShareLoraLayer, _drop_threshold, dropout_keep_mask

from conftest import (BUILDERS, assert_close_fp32, assert_compile_matches_eager, example_input, run, tiny_bert,
                      tiny_llama, tiny_plain)

pytestmark = pytest.mark.numerics


def _force_plain(monkeypatch):
    monkeypatch.setattr(ShareLoraLayer, "_can_fuse", lambda self, x, A, B: False)


def _outputs_and_grads(model, arch, x):
    model.zero_grad(set_to_none=True)
    out = run(model, arch, x)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in model.sharelora_bank.items()}


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "plain"])
@pytest.mark.parametrize("share", ["none", "A", "AB"])
def test_fused_kernel_equals_plain_ops_without_dropout(arch, share, monkeypatch):
    build, targets = BUILDERS[arch]
    model = get_sharelora_model(build(), ShareLoraConfig(rank=4, alpha=8, share=share, target_modules=targets,
                                                         init_lora_weights=False))
    model.train()
    plain = copy.deepcopy(model)
    x = example_input(arch)
    fused_out, fused_grads = _outputs_and_grads(model, arch, x)
    _force_plain(monkeypatch)
    plain_out, plain_grads = _outputs_and_grads(plain, arch, x)
    # the same math, summed in another order (one fused autograd function vs F.linear's)
    assert_close_fp32(fused_out, plain_out)
    for k in plain_grads:
        assert_close_fp32(fused_grads[k], plain_grads[k], what=k)


@pytest.fixture
def torch_threads():
    """Set torch's thread count for one test and restore it afterwards."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _kernel_built() -> bool:
    return cpu_kernel.get() is not None


@pytest.fixture(params=["kernel", "positions", "positions-bytes", "bits"])
def mask_method(request, monkeypatch, torch_threads):
    """Every way the layer draws and applies dropout's mask: the compiled CPU kernel when it is built;
    otherwise on CPU "positions" serves p <= 0.25, applied by index_fill_ with one torch thread and
    as a byte mask with more ("positions-bytes"), and "bits" the rest."""
    if request.param == "kernel":
        if not _kernel_built():
            pytest.skip("the CPU kernel could not be built here")
    else:
        monkeypatch.setattr(cpu_kernel, "get", lambda: None)
    monkeypatch.setattr(layers, "_POSITIONS_MAX_P", -1.0 if request.param == "bits" else 0.25)
    torch_threads(2 if request.param == "positions-bytes" else 1)
    return request.param.split("-")[0]


def test_the_cpu_kernel_builds_where_there_is_a_compiler():
    import shutil

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler")
    if os.environ.get("SHARELORA_CPU_KERNEL", "1") == "0":
        pytest.skip("SHARELORA_CPU_KERNEL=0 turns the kernel off")
    assert _kernel_built()


def test_kernel_masks_of_successive_draws_are_independent():
    if not _kernel_built():
        pytest.skip("the CPU kernel could not be built here")
    torch.manual_seed(0)
    a, _ = dropout_keep_mask(torch.Size([400, 500]), 0.3)
    b, _ = dropout_keep_mask(torch.Size([400, 500]), 0.3)
    assert not torch.equal(a, b)
    da, db = a.flatten() - a.mean(), b.flatten() - b.mean()
    corr = (da @ db / (da.norm() * db.norm())).item()
    assert abs(corr) < 5 / (a.numel() ** 0.5)  # 5 sigma
    # neighbours within one mask are uncorrelated too (the hash of consecutive indices)
    lag = (da[:-1] @ da[1:] / (da.norm() ** 2)).item()
    assert abs(lag) < 5 / (a.numel() ** 0.5)


def test_without_the_kernel_the_layer_falls_back_to_torch_operators(monkeypatch):
    monkeypatch.setattr(cpu_kernel, "_state", {"tried": False, "module": None})
    monkeypatch.setenv("SHARELORA_CPU_KERNEL", "0")
    assert cpu_kernel.get() is None
    mask, keep_prob = layers._draw_mask(torch.Size([8, 6]), 0.1, torch.device("cpu"), torch.float32)
    assert torch.is_tensor(mask) and keep_prob == 0.9

    def broken():
        raise RuntimeError("no compiler\nerror: g++ not found")

    monkeypatch.setattr(cpu_kernel, "_state", {"tried": False, "module": None})
    monkeypatch.setenv("SHARELORA_CPU_KERNEL", "1")
    monkeypatch.setattr(cpu_kernel, "_build", broken)
    with pytest.warns(RuntimeWarning, match="could not be built .*g\\+\\+ not found.*SHARELORA_CPU_KERNEL=0"):
        assert cpu_kernel.get() is None
    assert cpu_kernel.get() is None  # tried once only


def test_positions_mask_is_the_same_draw_with_one_thread_or_more(torch_threads, monkeypatch):
    monkeypatch.setattr(cpu_kernel, "get", lambda: None)
    masks = []
    for threads in (1, 2):
        torch_threads(threads)
        torch.manual_seed(5)
        masks.append(dropout_keep_mask(torch.Size([64, 48]), 0.1))
        raw, _ = layers._draw_mask(torch.Size([64, 48]), 0.1, torch.device("cpu"), torch.float32)
        assert raw.dtype == (torch.int64 if threads == 1 else torch.uint8)
    assert masks[0][1] == masks[1][1] == 0.9
    torch.testing.assert_close(masks[0][0], masks[1][0], rtol=0, atol=0)
    assert 0 < (masks[0][0] == 0).sum() < masks[0][0].numel()


def test_fused_kernel_with_dropout_equals_reference_on_the_same_mask(mask_method):
    torch.manual_seed(0)
    base = torch.nn.Linear(12, 10)
    for p in base.parameters():
        p.requires_grad_(False)
    bank = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(3, 12)),
                                   "b": torch.nn.Parameter(torch.randn(10, 3))})
    from sharelora.method.plan import Target

    layer = ShareLoraLayer(base, [Target("m", "m", None, "m", 0, 12, 10, 0, "a", "b")], bank, scaling=2.0, dropout=0.25)
    layer.train()
    x = torch.randn(2, 5, 12, requires_grad=True)

    torch.manual_seed(123)
    out = layer(x)
    out.square().sum().backward()
    got = (out.detach(), x.grad.clone(), bank["a"].grad.clone(), bank["b"].grad.clone())

    x.grad = None
    bank["a"].grad = bank["b"].grad = None
    torch.manual_seed(123)
    keep, keep_prob = dropout_keep_mask(torch.Size([10, 12]), 0.25)  # the kernel's first (and only) draw
    keep = keep.view(2, 5, 12)
    assert keep_prob == (0.75 if mask_method in ("positions", "kernel") else _drop_threshold(0.25)[1])
    ref = base(x) + F.linear(F.linear(x * keep, bank["a"]) * (2.0 / keep_prob), bank["b"])
    ref.square().sum().backward()
    # the same mask exactly (0/1 products are exact); the sums run over 12 features and 10 tokens
    want = (ref.detach(), x.grad, bank["a"].grad, bank["b"].grad)
    for what, a, b in zip(("out", "x.grad", "A.grad", "B.grad"), got, want):
        assert_close_fp32(a, b, k=12, what=what)


def test_dropout_mask_has_the_requested_keep_probability(mask_method):
    threshold, keep_prob = _drop_threshold(0.1)
    assert abs(keep_prob - 0.9) < 2 ** -16
    torch.manual_seed(0)
    keep, keep_prob = dropout_keep_mask(torch.Size([1000, 1000]), 0.1)
    assert abs(keep_prob - 0.9) < 2 ** -16
    assert set(keep.unique().tolist()) == {0.0, 1.0}
    observed = keep.mean().item()
    assert abs(observed - keep_prob) < 5 * (keep_prob * (1 - keep_prob) / 1e6) ** 0.5
    # independent elements: the kept fraction of rows is as spread as a binomial's
    rows = keep.mean(1)
    assert abs(rows.var().item() / (keep_prob * (1 - keep_prob) / 1000) - 1) < 0.15


def test_dropout_is_unbiased_and_scaled_on_the_small_product(mask_method):
    """E[layer update] with dropout equals the update without: 1/(1-p) is applied exactly once."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 4).requires_grad_(False)
    bank = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(2, 6)), "b": torch.nn.Parameter(torch.randn(4, 2))})
    from sharelora.method.plan import Target

    layer = ShareLoraLayer(base, [Target("m", "m", None, "m", 0, 6, 4, 0, "a", "b")], bank, scaling=1.5, dropout=0.2)
    x = torch.randn(1, 6).expand(20000, 6).contiguous()
    with torch.no_grad():
        layer.train()
        mean_train = layer(x).mean(0)
        layer.eval()
        expected = layer(x[:1])[0]
    # A statistical bound, not a rounding one (the masks are the seed's on any CPU): 7-16 standard errors of
    # the mean over 20000 rows; a missing or doubled 1/(1-p) is a bias of p |update|, 5-9 times the bound.
    torch.testing.assert_close(mean_train, expected, rtol=0.02, atol=0.02)


def test_adapter_equals_base_at_init_in_training_mode_with_dropout():
    base = tiny_bert()
    model = get_sharelora_model(copy.deepcopy(base), ShareLoraConfig(rank=4, share="A", dropout=0.1,
                                                                     target_modules=["query", "value"]))
    model.train()
    x = example_input("bert")
    with torch.no_grad():
        torch.testing.assert_close(run(model, "bert", x), run(base, "bert", x), rtol=0, atol=0)


# --- qkv: the shared down-projection is computed once per attention block --------------------------
def _qkv_model(build=tiny_llama, targets=("q_proj", "k_proj", "v_proj"), dropout=0.0):
    cfg = ShareLoraConfig(rank=4, share="A", scope="qkv", target_modules=list(targets), init_lora_weights=False,
                          dropout=dropout)
    return get_sharelora_model(build(), cfg)


def _count_down_projections(monkeypatch):
    calls = {"n": 0}
    original = layers._LoraLinear.forward

    def counting(ctx, *args):
        calls["n"] += 1
        return original(ctx, *args)

    monkeypatch.setattr(layers._LoraLinear, "forward", staticmethod(counting))
    return calls


@pytest.mark.parametrize("build,targets,arch", [(tiny_llama, ("q_proj", "k_proj", "v_proj"), "llama"),
                                                (tiny_bert, ("query", "key", "value"), "bert")])
def test_qkv_computes_the_shared_product_once_per_block(build, targets, arch, monkeypatch):
    calls = _count_down_projections(monkeypatch)
    model = _qkv_model(build, targets, dropout=0.1)
    model.train()
    run(model, arch, example_input(arch)).sum().backward()
    layers_n = len({t.layer for t in model.plan.targets})
    assert calls["n"] == layers_n  # not 3 x layers
    unfused = _qkv_model(build, targets)
    for _, layer in unfused.sharelora_layers():
        layer.reuse_shared_input = False
    calls["n"] = 0
    run(unfused, arch, example_input(arch))
    assert calls["n"] == 3 * layers_n


@pytest.mark.parametrize("train", [True, False])
def test_qkv_reuse_gives_the_same_outputs_and_gradients(train):
    model = _qkv_model()
    unfused = copy.deepcopy(model)
    for _, layer in unfused.sharelora_layers():
        layer.reuse_shared_input = False
    model.train(train)
    unfused.train(train)
    x = example_input("llama")
    a_out, a_grads = _outputs_and_grads(model, "llama", x)
    b_out, b_grads = _outputs_and_grads(unfused, "llama", x)
    # one (N, d) x (d, 3r) product vs three (N, d) x (d, r) ones: the same sums, other blockings
    assert_close_fp32(a_out, b_out)
    for k in a_grads:
        assert_close_fp32(a_grads[k], b_grads[k], what=k)


def test_qkv_reuse_holds_no_tensor_after_the_forward():
    model = _qkv_model(dropout=0.1)
    model.train()
    run(model, "llama", example_input("llama")).sum().backward()
    shared = {id(l.shared_down): l.shared_down for _, l in model.sharelora_layers() if l.shared_down is not None}
    assert shared and all(s.x is None and s.u is None for s in shared.values())


@pytest.mark.parametrize("scope", ["qkv", "layers"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_shared_product_with_gradient_checkpointing_gives_the_same_gradients(scope, reentrant):
    def grads(checkpointing):
        torch.manual_seed(0)
        model = _qkv_model(dropout=0.1) if scope == "qkv" else get_sharelora_model(
            tiny_llama(), ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "v_proj"],
                                          init_lora_weights=False, dropout=0.1))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        x = example_input("llama")
        torch.manual_seed(1)  # the same dropout masks in both runs
        model(**x, labels=x["input_ids"]).loss.backward()
        return {k: p.grad.clone() for k, p in model.sharelora_bank.items()}

    ref = grads(False)
    got = grads(True)
    # the recomputed forward is the same; the shared tensors' gradients add up in another order
    for k in ref:
        assert_close_fp32(got[k], ref[k], what=k)


@pytest.mark.parametrize("scope", ["qkv", "layers"])
def test_shared_product_under_torch_compile_matches_eager(scope):
    model = _qkv_model() if scope == "qkv" else get_sharelora_model(
        tiny_llama(), ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "k_proj", "v_proj"],
                                      init_lora_weights=False))
    assert_compile_matches_eager(model, "llama")


def test_unload_removes_the_reuse_hooks():
    model = _qkv_model()
    plain = model.merge_and_unload()
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in plain.modules())


def test_autocast_uses_the_plain_ops_and_trains():
    model = get_sharelora_model(tiny_llama(), ShareLoraConfig(rank=4, share="A", dropout=0.1, init_lora_weights=False,
                                                              target_modules=["q_proj", "v_proj"]))
    model.train()
    x = example_input("llama")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**x, labels=x["input_ids"])
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.sharelora_bank.values())


def test_torch_func_functional_call_gives_the_same_gradients():
    model = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, share="A", init_lora_weights=False,
                                                             target_modules=["query", "value"]))
    x = example_input("bert")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def loss(p):
        return torch.func.functional_call(model, p, args=(), kwargs=x).logits.square().sum()

    grads = torch.func.grad(loss)(params)
    run(model, "bert", x).square().sum().backward()
    # torch.func traces the plain ops (no fused autograd function): the same sums in another order
    for k, g in grads.items():
        assert_close_fp32(g, dict(model.named_parameters())[k].grad, what=k)


# --- siblings that read one input (q and v) share one down-projection product -----------------------
def _siblings_model(build, targets, share="A", dropout=0.0, dropout_mask="input"):
    cfg = ShareLoraConfig(rank=4, share=share, target_modules=list(targets), init_lora_weights=False,
                          dropout=dropout, dropout_mask=dropout_mask)
    return get_sharelora_model(build(), cfg)


@pytest.mark.parametrize("arch", ["llama", "bert", "plain"])
@pytest.mark.parametrize("share", ["none", "A", "B"])
def test_siblings_compute_their_down_projections_in_one_product(arch, share, monkeypatch):
    build, targets = BUILDERS[arch]
    calls = _count_down_projections(monkeypatch)
    model = _siblings_model(build, targets, share, dropout=0.1)
    layers_n = len({t.layer for t in model.plan.targets})
    model.train()
    run(model, arch, example_input(arch)).sum().backward()
    assert calls["n"] == layers_n  # q and v of a block: one product, not two
    per_module = _siblings_model(build, targets, share, dropout=0.1, dropout_mask="module")
    calls["n"] = 0
    per_module.train()
    run(per_module, arch, example_input(arch))
    assert calls["n"] == 2 * layers_n  # each module draws its own mask while dropout is active
    calls["n"] = 0
    per_module.eval()
    with torch.no_grad():
        run(per_module, arch, example_input(arch))
    assert calls["n"] == layers_n  # no dropout: nothing to keep apart


@pytest.mark.parametrize("arch", ["llama", "bert", "plain"])
@pytest.mark.parametrize("share", ["none", "A", "AB"])
@pytest.mark.parametrize("plain_ops", [False, True])
def test_sibling_product_gives_the_same_outputs_and_gradients_as_separate_ones(arch, share, plain_ops, monkeypatch):
    build, targets = BUILDERS[arch]
    model = _siblings_model(build, targets + (["k_proj"] if arch == "llama" else []), share)
    separate = copy.deepcopy(model)
    for _, layer in separate.sharelora_layers():
        layer.reuse_shared_input = False
    if plain_ops:
        _force_plain(monkeypatch)
    model.train()
    separate.train()
    x = example_input(arch)
    a_out, a_grads = _outputs_and_grads(model, arch, x)
    b_out, b_grads = _outputs_and_grads(separate, arch, x)
    # one product with the stacked A's vs one per module: the same sums, other blockings
    assert_close_fp32(a_out, b_out)
    assert a_grads.keys() == b_grads.keys()
    for k in a_grads:
        assert_close_fp32(a_grads[k], b_grads[k], what=k)


def test_siblings_share_one_dropout_mask_exactly():
    """q and v of a block: h_q = q(x) + c (x ⊙ keep) A_q^T B_q^T, h_v likewise, with the same keep."""
    model = _siblings_model(lambda: tiny_plain(layers=1), ["q", "v"], share="none", dropout=0.25)
    model.train()
    x = example_input("plain")["x"]
    seen = {}
    block = model.base_model[0]
    for name in ("q", "v"):
        getattr(block, name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.detach()))
    torch.manual_seed(7)
    with torch.no_grad():
        run(model, "plain", {"x": x})
    torch.manual_seed(7)
    keep, keep_prob = dropout_keep_mask(torch.Size([x.shape[0] * x.shape[1], x.shape[2]]), 0.25)
    keep = keep.view_as(x)
    bank = model.sharelora_bank
    for name in ("q", "v"):
        A, B = (bank[k] for k in getattr(block, name).keys[0])
        base = getattr(block, name).base_layer
        ref = base(x) + F.linear(F.linear(x * keep, A) * (model.sharelora_config.scaling / keep_prob), B)
        assert_close_fp32(seen[name], ref.detach(), k=16, what=name)  # sums over 16 features


class _CrossBlock(torch.nn.Module):
    """q reads x, k and v read another tensor (cross-attention): the siblings cannot share."""

    def __init__(self, d=16):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(d, d) for _ in range(3))

    def forward(self, x, memory):
        return torch.tanh(self.q_proj(x)) * self.k_proj(memory) + self.v_proj(memory)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_siblings_reading_different_tensors_compute_their_own(dropout):
    torch.manual_seed(0)
    base = torch.nn.ModuleList([_CrossBlock() for _ in range(2)])
    cfg = ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "k_proj", "v_proj"], init_lora_weights=False,
                          dropout=dropout)
    model = get_sharelora_model(base, cfg)
    separate = copy.deepcopy(model)
    for _, layer in separate.sharelora_layers():
        layer.reuse_shared_input = False
    x, memory = torch.randn(2, 5, 16), torch.randn(2, 5, 16)

    def forward(m):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        h = x
        for block in m.base_model:
            h = block(h, memory)
        h.square().sum().backward()
        return h.detach(), {k: p.grad.clone() for k, p in m.sharelora_bank.items()}

    a_out, a_grads = forward(model)
    if dropout == 0.0:  # with dropout the masks are drawn in another order: only the path is checked
        b_out, b_grads = forward(separate)
        # The same sums in another order. The gradients reach |g| ~ 270 while some elements are ~0.04:
        # those differ by ~2 eps32 of the tensor's scale (6.6e-6 on AMD), far past an rtol of theirs.
        assert_close_fp32(a_out, b_out, k=16)
        for k in a_grads:
            assert_close_fp32(a_grads[k], b_grads[k], k=16, what=k)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in a_grads.values())


def test_dropout_mask_option_round_trips_and_is_checked():
    from sharelora.method.errors import ShareLoraError

    cfg = ShareLoraConfig(dropout=0.1, dropout_mask="module")
    assert ShareLoraConfig.from_dict(cfg.to_dict()).dropout_mask == "module"
    with pytest.raises(ShareLoraError, match="dropout_mask must be one of"):
        ShareLoraConfig(dropout_mask="layer")



def test_dropout_on_an_empty_input(mask_method):
    from sharelora.method.plan import Target

    bank = torch.nn.ParameterDict({"a": torch.nn.Parameter(torch.randn(2, 6)), "b": torch.nn.Parameter(torch.randn(4, 2))})
    layer = ShareLoraLayer(torch.nn.Linear(6, 4).requires_grad_(False), [Target("m", "m", None, "m", 0, 6, 4, 0, "a", "b")],
                           bank, scaling=1.0, dropout=0.1)
    layer.train()
    x = torch.randn(0, 6, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4)
    out.sum().backward()
    assert x.grad.shape == (0, 6)
