"""Basis growth for task cores (``grow_basis=g``): a new task adds g directions to its group's shared A and B.

Earlier tasks do not read them (their outputs stay bit for bit what they were); the new task's core covers
r + G directions, G the blocks it reads; later tasks read every block. Counts, save/load, merge, mixed batches
and the PEFT export stay exact; ``basis_fit`` reports how much of a task's gradient the basis captures.
"""

import json

import pytest
import torch
from test_task_core import BUILD, CORES, TARGETS, TOL, alone, cfg, randomize, train_steps

from conftest import assert_close_fp32, example_input, run
from sharelora import ShareLoraError, ShareLoraModel, get_sharelora_model
from sharelora.method.basis import basis_fit
from sharelora.method.layers import bank_name

ARCHS = ["bert", "llama", "gpt2"]
R, L, D, G = 4, 3, 32, 2
D_OUT = {"bert": (D, D), "llama": (D, D // 2), "gpt2": (D, D)}  # per module type (q, v); LLaMA GQA: v 32 -> 16


def grown(arch, core="matrix"):
    """t0 trains the basis (random, as if trained), t1 grows it by G, t2 reads the grown basis; all random."""
    model = get_sharelora_model(BUILD[arch](), cfg(arch, core), adapter_name="t0")
    randomize(model, "t0", seed=1, basis=True)
    model.add_adapter("t1", cfg(arch, core, grow_basis=G))
    model.add_adapter("t2", cfg(arch, core))
    for i, n in enumerate(("t1", "t2")):
        randomize(model, n, seed=2 + i)
    with torch.no_grad():
        for key in model.plans["t1"].grown_tensors():
            p = model.sharelora_bank[bank_name(key)]
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.5)
    return model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_growth_starts_at_the_base_trains_only_the_new_task_and_leaves_earlier_tasks_bit_identical(arch, core):
    model = get_sharelora_model(BUILD[arch](), cfg(arch, core), adapter_name="t0")
    inputs = example_input(arch, batch=4)
    randomize(model, "t0", seed=1, basis=True)  # a trained basis and first task
    before = alone(model, arch, "t0", inputs)
    basis = {k: model.sharelora_bank[bank_name(k)].detach().clone() for k in model.plans["t0"].shared_tensors()}
    with torch.no_grad(), model.disable_adapter():
        base = run(model, arch, inputs)

    model.add_adapter("t1", cfg(arch, core, grow_basis=G))
    plan = model.plans["t1"]
    assert model.sharelora_configs["t1"].basis_growth == []
    assert {s.shape for s in plan.own_tensors().values() if s.role == "C"} == {
        (R + G, R + G) if core == "matrix" else (R + G,)}
    grown_keys = plan.grown_tensors()
    assert grown_keys and all(k.startswith("@default/") and f"grow_t1.lora_" in k for k in grown_keys)
    assert all(model.sharelora_bank[bank_name(k)].abs().sum() == 0 for k, s in grown_keys.items() if s.role == "B")
    assert model.basis_owner("default") == "t0"  # growing is not creating the basis
    torch.testing.assert_close(alone(model, arch, "t1", inputs), base, rtol=0, atol=0)  # starts at the base
    torch.testing.assert_close(alone(model, arch, "t0", inputs), before, rtol=0, atol=0)

    model.set_adapter("t1")  # trains its core, its new directions and head; the basis stays frozen
    trainable = {n.removeprefix("sharelora_bank.") for n, p in model.named_parameters() if p.requires_grad
                 and n.startswith("sharelora_bank.")}
    assert trainable == {bank_name(k) for k in plan.added_tensors()}
    train_steps(model, "t1", inputs)
    assert all(model.sharelora_bank[bank_name(k)].abs().sum() > 0 for k in grown_keys)  # the new B's learned
    assert all(torch.equal(model.sharelora_bank[bank_name(k)], v) for k, v in basis.items())
    torch.testing.assert_close(alone(model, arch, "t0", inputs), before, rtol=0, atol=0)  # bit-identical

    model.add_adapter("t2", cfg(arch, core))  # a later task reads the grown basis, trains only its core
    assert model.sharelora_configs["t2"].basis_growth == [["t1", G]]
    assert set(grown_keys) <= set(model.plans["t2"].shared_tensors()) and not model.plans["t2"].grown_tensors()
    t1_before = alone(model, arch, "t1", inputs)
    torch.testing.assert_close(alone(model, arch, "t2", inputs), base, rtol=0, atol=0)
    frozen = {k: model.sharelora_bank[bank_name(k)].detach().clone() for k in model.plans["t2"].shared_tensors()}
    train_steps(model, "t2", inputs)
    assert all(torch.equal(model.sharelora_bank[bank_name(k)], v) for k, v in frozen.items())
    assert any(model.sharelora_bank[bank_name(k)].abs().sum() > 0 for k in model.plans["t2"].own_tensors())
    torch.testing.assert_close(alone(model, arch, "t1", inputs), t1_before, rtol=0, atol=0)
    torch.testing.assert_close(alone(model, arch, "t0", inputs), before, rtol=0, atol=0)


@pytest.mark.parametrize("core,per", [("matrix", lambda k: k * k), ("diagonal", lambda k: k)])
def test_parameter_report_counts_the_new_directions_as_the_growing_task_adds_them(core, per):
    model = grown("llama", core)
    rep = model.parameter_report()
    d_out = D_OUT["llama"]
    basis = sum(R * D + R * d for d in d_out)  # share="AB": one A and one B per module type
    growth = sum(G * D + G * d for d in d_out)
    a = rep["adapters"]
    assert a["t0"]["own_parameters"] == 2 * L * per(R) and a["t0"]["shared_parameters"] == basis
    assert a["t1"]["grown_parameters"] == growth
    assert a["t1"]["own_parameters"] == 2 * L * per(R + G) + growth and a["t1"]["shared_parameters"] == basis
    assert a["t2"]["own_parameters"] == 2 * L * per(R + G) and a["t2"]["shared_parameters"] == basis + growth
    assert rep["task_shared_parameters"] == basis + growth
    assert rep["adapter_parameters"] == basis + growth + 2 * L * (per(R) + 2 * per(R + G))
    assert sum(g["parameters"] for g in model.plans["t2"].groups()) == basis + growth + 2 * L * per(R + G)


@pytest.mark.parametrize("arch", ARCHS)
def test_mixed_batch_merge_and_reference_formula_with_a_grown_basis(arch):
    model = grown(arch)
    inputs = example_input(arch, batch=5)
    names = ["t2", "t0", "t1", "__base__", "t1"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, n in enumerate(names):
        if n == "__base__":
            continue
        torch.testing.assert_close(mixed[i:i + 1], alone(model, arch, n, {k: v[i:i + 1] for k, v in inputs.items()}),
                                   **TOL)
    # the update of one module is s [B, B_1] C [A; A_1] (the reference formula), merged exactly
    layer = next(layer for _, layer in model.sharelora_layers())
    slot, bank = layer.slots["t2"], model.sharelora_bank
    t = slot.targets[0]
    (ga, gb), = t.grow_keys
    A = torch.cat([bank[bank_name(t.a_key)], bank[bank_name(ga)]])
    B = torch.cat([bank[bank_name(t.b_key)], bank[bank_name(gb)]], dim=1)
    C = bank[bank_name(t.c_key)]
    assert_close_fp32(layer.delta_weight(t, "t2"), slot.scaling * B @ C @ A)
    model.set_adapter("t1")
    with torch.no_grad():
        want = run(model, arch, inputs)
        model.merge()
        assert_close_fp32(run(model, arch, inputs), want)
        model.unmerge()


@pytest.mark.parametrize("arch", ARCHS)
def test_save_load_and_peft_export_of_a_grown_basis_are_exact(arch, tmp_path):
    from peft import PeftModel

    model = grown(arch)
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "adapter_config.json").read_text())["adapters"]
    assert saved["t1"]["grow_basis"] == G and saved["t2"]["basis_growth"] == [["t1", G]]
    assert "grow_basis" not in saved["t0"] and "basis_growth" not in saved["t0"]
    again = ShareLoraModel.from_pretrained(BUILD[arch](), tmp_path / "m")
    inputs = example_input(arch, batch=3)
    names = ["t2", "t0", "t1"]
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names=names).logits, again(**inputs, adapter_names=names).logits)
    one = ShareLoraModel.from_pretrained(BUILD[arch](), tmp_path / "m", adapter_name="t2")  # reads t1's block
    with torch.no_grad():
        assert torch.equal(one(**inputs).logits, alone(model, arch, "t2", inputs))
    for n in ("t1", "t2"):  # a rank-(r + G) LoRA in PEFT
        model.export_peft(tmp_path / n, adapter_name=n)
        pc = json.loads((tmp_path / n / "adapter_config.json").read_text())
        assert pc["r"] == (2 if arch == "gpt2" else 1) * (R + G)  # GPT-2: the q and v slices side by side
        peft_model = PeftModel.from_pretrained(BUILD[arch](), tmp_path / n).eval()
        with torch.no_grad():
            torch.testing.assert_close(peft_model(**inputs).logits, alone(model, arch, n, inputs), **TOL)


def test_growth_needs_task_cores_and_names_its_values():
    from sharelora import ShareLoraConfig

    with pytest.raises(ShareLoraError, match="only task cores read"):
        ShareLoraConfig(grow_basis=2)
    with pytest.raises(ShareLoraError, match="integer >= 0"):
        cfg("bert", grow_basis=-1)
    with pytest.raises(ShareLoraError, match="basis_growth must be"):
        cfg("bert", basis_growth=[["t1", 0]])


def test_basis_fit_is_the_share_of_the_gradient_the_basis_spans():
    """fit = sum ||Q_B^T G Q_A||^2 / sum ||G||^2 with G = dL/dW0: a basis that spans everything captures all of it,
    growth adds directions (so the grown basis captures at least as much), and the model is left as found."""
    model = grown("llama")
    inputs = example_input("llama", batch=4)

    def loss():
        return model(**inputs).logits.square().mean()

    model.set_adapter("t0")
    got = basis_fit(model, "t2", loss)
    assert 0.0 < got["fit"] < 1.0 and 0.0 < got["chance"] < 1.0 and got["directions"] == R + G  # a random basis
    assert set(got["modules"]) == {"model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.v_proj"}
    assert model.active_adapters == ["t0"] and not model.training
    assert all(p.grad is None for p in model.parameters())
    assert not any(layer.base_layer.weight.requires_grad for _, layer in model.sharelora_layers())
    before = basis_fit(model, "t1", loss, include_own_growth=False)  # what t1 found before it grew
    after = basis_fit(model, "t1", loss)
    assert before["directions"] == R and after["directions"] == R + G and after["fit"] > before["fit"]
    # by hand for one module: G = dL/dW0 of layer 0's q_proj, the basis of t2 there
    layer = model.base_model.model.layers[0].self_attn.q_proj
    W = layer.base_layer.weight
    W.requires_grad_(True)
    model.set_adapter("t2")
    (g,) = torch.autograd.grad(loss(), [W])
    W.requires_grad_(False)
    t = layer.slots["t2"].targets[0]
    A, B = layer.slots["t2"].A(model.sharelora_bank, bank_name(t.a_key)), layer.slots["t2"].B(model.sharelora_bank, 0)
    Qa, _ = torch.linalg.qr(A.detach().double().t())
    Qb, _ = torch.linalg.qr(B.detach().double())
    one = float((Qb.t() @ g.double() @ Qa).square().sum() / g.double().square().sum())
    per_layer = basis_fit(model, "t2", loss, layers=[0])
    assert per_layer["modules"]["model.layers.*.self_attn.q_proj"] == pytest.approx(one, rel=1e-6)
    # a basis that spans every direction (r = d) captures the whole gradient
    full = get_sharelora_model(BUILD["llama"](), cfg("llama", rank=D), adapter_name="t0")
    full.add_adapter("t1", cfg("llama", rank=D))
    randomize(full, "t0", seed=5, basis=True)
    every = basis_fit(full, "t1", lambda: full(**inputs).logits.square().mean())
    assert every["fit"] == pytest.approx(1.0, abs=1e-9) and every["chance"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("arch", ARCHS)
def test_orthonormalize_basis_keeps_the_growth_blocks_and_every_adapter_unchanged(arch):
    """Only the original r directions are orthonormalized; a wider core absorbs the factors in its leading r
    rows and columns, so the tasks that read growth blocks compute what they did."""
    model = grown(arch)
    inputs = example_input(arch, batch=3)
    before = {n: alone(model, arch, n, inputs) for n in ("t0", "t1", "t2")}
    blocks = {k: model.sharelora_bank[bank_name(k)].detach().clone() for k in model.plans["t1"].grown_tensors()}
    report = model.orthonormalize_basis()
    assert report["adapters"] == ["t0", "t1", "t2"] and report["conditioning"]["after"] == pytest.approx(1.0, abs=1e-5)
    for n, want in before.items():
        torch.testing.assert_close(alone(model, arch, n, inputs), want, **TOL)
    assert all(torch.equal(model.sharelora_bank[bank_name(k)], v) for k, v in blocks.items())
