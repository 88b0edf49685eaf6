"""Exact semantics of the adapted model: init, gradients, parameters, merging, disabling, dtypes."""

import copy

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraLayer, get_sharelora_model

from conftest import (BUILDERS, assert_close_fp32, assert_compile_matches_eager, example_input, run, tiny_bert,
                      tiny_gpt2, tiny_llama)


def adapted(arch, share="A", init=True, **kw):
    build, targets = BUILDERS[arch]
    base = build()
    cfg = ShareLoraConfig(rank=4, alpha=8, share=share, target_modules=targets, init_lora_weights=init, **kw)
    return base, get_sharelora_model(copy.deepcopy(base), cfg)


@pytest.mark.numerics
@pytest.mark.parametrize("share", ["none", "A", "B", "AB"])
def test_adapted_model_equals_base_at_init(arch, share):
    base, model = adapted(arch, share)
    x = example_input(arch)
    torch.testing.assert_close(run(model, arch, x), run(base, arch, x), rtol=0, atol=0)


@pytest.mark.parametrize("share", ["A", "B", "AB"])
def test_parameters_yield_each_shared_tensor_once(share):
    _, model = adapted("bert", share)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(model.plan.tensors)
    assert sum(p.numel() for p in trainable) == model.plan.num_parameters()
    assert len({id(p) for p in trainable}) == len(trainable)
    opt = torch.optim.AdamW(trainable)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == model.plan.num_parameters()


def test_only_adapter_and_modules_to_save_are_trainable():
    model = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=2, target_modules=["query"], modules_to_save=["classifier"]))
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names == {n for n in names if n.startswith("sharelora_bank.") or ".classifier." in n}
    assert any(".classifier." in n for n in names)


@pytest.mark.numerics
@pytest.mark.parametrize("share", ["A", "B"])
def test_gradient_of_shared_matrix_is_sum_over_layers(share):
    """A shared matrix's gradient equals the sum of the gradients per-layer copies would get."""
    _, shared = adapted("bert", share, init=False)
    _, per_layer = adapted("bert", "none", init=False)
    role = share
    # give every per-layer copy the shared tensor's values, and the per-layer-side tensors equal values
    with torch.no_grad():
        for t_s, t_p in zip(shared.plan.targets, per_layer.plan.targets):
            for r in "AB":
                src = shared.sharelora_bank[getattr(t_s, f"{r.lower()}_key").replace(".", "/")]
                per_layer.sharelora_bank[getattr(t_p, f"{r.lower()}_key").replace(".", "/")].copy_(src)
    x = example_input("bert")
    run(shared, "bert", x).square().sum().backward()
    run(per_layer, "bert", x).square().sum().backward()
    for key, spec in shared.plan.tensors.items():
        if spec.role != role:
            continue
        g_shared = shared.sharelora_bank[key.replace(".", "/")].grad
        g_sum = sum(per_layer.sharelora_bank[f"{u}.lora_{role}".replace(".", "/")].grad for u in spec.users)
        # autograd accumulates the layers' contributions in another order than this sum
        assert_close_fp32(g_shared, g_sum, what=key)


def _train_a_bit(model, arch):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    x = example_input(arch)
    for _ in range(2):
        opt.zero_grad()
        run(model, arch, x).square().mean().backward()
        opt.step()
    return x


@pytest.mark.numerics
@pytest.mark.parametrize("share", ["none", "A", "AB"])
def test_merged_outputs_equal_unmerged(arch, share):
    _, model = adapted(arch, share, init=False)
    x = _train_a_bit(model, arch)
    model.eval()
    with torch.no_grad():
        before = run(model, arch, x)
        model.merge()
        merged = run(model, arch, x)
        model.unmerge()
        after = run(model, arch, x)
    # (W + c B A) x vs W x + c B (A x), and W + d - d != W in fp32: rounding of the same sums
    assert_close_fp32(merged, before)
    assert_close_fp32(after, before)


@pytest.mark.numerics
def test_merge_and_unload_returns_plain_model_with_same_outputs(arch):
    base, model = adapted(arch, "A", init=False)
    x = _train_a_bit(model, arch)
    model.eval()
    with torch.no_grad():
        expected = run(model, arch, x)
        plain = model.merge_and_unload()
        assert not any(isinstance(m, ShareLoraLayer) for m in plain.modules())
        assert type(plain) is type(base)
        assert_close_fp32(run(plain, arch, x), expected)  # merged vs unmerged, as above


def test_disable_adapter_gives_base_outputs_and_restores():
    base, model = adapted("llama", "A", init=False)
    x = example_input("llama")
    with torch.no_grad():
        adapted_out = run(model, "llama", x)
        with model.disable_adapter():  # the base layers' own ops on the same weights: equal, not close
            torch.testing.assert_close(run(model, "llama", x), run(base, "llama", x), rtol=0, atol=0)
        torch.testing.assert_close(run(model, "llama", x), adapted_out, rtol=0, atol=0)


def _trained_head_model():
    """A tiny BERT classifier whose adapter and trained head copy both differ from the base's."""
    base, model = adapted("bert", "A", init=False, modules_to_save=["classifier"])
    with torch.no_grad():
        for p in model.base_model.classifier.modules_to_save["default"].parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)))
    return base, model.eval()


def test_no_adapter_means_the_base_model_head_included():
    # disable_adapter(), adapter_names=["__base__"] and the base model before wrapping: one "no adapter"
    base, model = _trained_head_model()
    x = example_input("bert")
    with torch.no_grad():
        expected = run(base, "bert", x)
        assert not torch.allclose(run(model, "bert", x), expected, atol=1e-3)  # the head copy is trained
        with model.disable_adapter():
            disabled = run(model, "bert", x)
            routed_inside = model(**x, adapter_names=["default"] * x["input_ids"].shape[0]).logits
        routed = model(**x, adapter_names=["__base__"] * x["input_ids"].shape[0]).logits
    torch.testing.assert_close(disabled, expected, rtol=0, atol=0)
    torch.testing.assert_close(routed, expected, rtol=0, atol=0)
    torch.testing.assert_close(routed_inside, expected, rtol=0, atol=0)  # inside the block, as PEFT: no adapter


def test_disable_adapter_restores_the_trained_head():
    _, model = _trained_head_model()
    x = example_input("bert")
    with torch.no_grad():
        before = run(model, "bert", x)
        with model.disable_adapter():
            run(model, "bert", x)
        torch.testing.assert_close(run(model, "bert", x), before, rtol=0, atol=0)
    assert not model.base_model.classifier.disabled


def test_disable_on_merged_adapter_is_an_error():
    _, model = adapted("bert", "A", init=False)
    model.merge()
    with pytest.raises(ShareLoraError, match="unmerge"):
        with model.disable_adapter():
            pass


def test_wrapping_twice_is_an_error():
    _, model = adapted("bert")
    with pytest.raises(ShareLoraError, match="already has ShareLoRA layers"):
        get_sharelora_model(model, ShareLoraConfig(target_modules=["query"]))


def test_dropout_only_acts_in_training_mode():
    _, model = adapted("bert", "A", init=False, dropout=0.5)
    x = example_input("bert")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(run(model, "bert", x), run(model, "bert", x), rtol=0, atol=0)  # a re-run
    model.train()
    with torch.no_grad():
        assert not torch.allclose(run(model, "bert", x), run(model, "bert", x))


def test_bf16_base_weights_train_fp32_adapter():
    base = tiny_llama().to(torch.bfloat16)
    model = get_sharelora_model(base, ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    out = model(**example_input("llama")).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    grads = [p.grad for p in model.sharelora_bank.values()]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


@pytest.mark.numerics
def test_gradient_checkpointing_gives_same_gradients():
    def grads(checkpointing, reentrant=False):
        model = get_sharelora_model(tiny_llama(), ShareLoraConfig(rank=4, share="A", target_modules=["q_proj", "v_proj"],
                                                                  init_lora_weights=False))
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": reentrant})
        x = example_input("llama")
        model(**x, labels=x["input_ids"]).loss.backward()
        return {k: p.grad.clone() for k, p in model.sharelora_bank.items()}

    ref = grads(False)
    for reentrant in (False, True):
        got = grads(True, reentrant)
        for k in ref:
            assert_close_fp32(got[k], ref[k], what=k)  # the shared tensors' gradients add up in another order


@pytest.mark.numerics
def test_torch_compile_matches_eager():
    _, model = adapted("bert", "A", init=False)
    assert_compile_matches_eager(model, "bert")


def test_attribute_access_falls_through_to_base_model():
    _, model = adapted("gpt2")
    assert model.config.n_layer == 3
    assert callable(model.generate)
