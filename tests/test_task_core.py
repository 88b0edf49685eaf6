"""Tasks that share A and B and own only a core: ``task_share="AB"`` with ``task_core="matrix" | "diagonal"``.

h = W0 x + (alpha / r) B_m C_{t,l,m} A_m dropout(x): init, counts, the reference computation, mixed batches,
continual training with zero forgetting, save/load, merge and the PEFT export.
"""

import copy

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraModel, get_sharelora_model
from sharelora.method.layers import bank_name

from conftest import assert_close_fp32, example_input, run, tiny_bert, tiny_gpt2, tiny_llama

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn.q", "c_attn.v"]}
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}
ARCHS = ["bert", "llama", "gpt2"]
CORES = ["matrix", "diagonal"]
R, L, D = 4, 3, 32  # rank, layers and hidden size of the tiny models; LLaMA's v_proj is 32 -> 16 (GQA)


def cfg(arch, core="matrix", **kw):
    kw.setdefault("rank", R)
    kw.setdefault("share", "AB")
    if arch == "bert":
        kw.setdefault("modules_to_save", ["classifier"])
    return ShareLoraConfig(target_modules=TARGETS[arch], task_share="AB", task_core=core, **kw)


def randomize(model, name, seed, basis=False):
    """Give adapter ``name``'s cores (and head; and the group's basis with ``basis``) values of their own."""
    g = torch.Generator().manual_seed(seed)
    keys = list(model.plans[name].own_tensors()) + (list(model.plans[name].shared_tensors()) if basis else [])
    with torch.no_grad():
        for key in keys:
            p = model.sharelora_bank[bank_name(key)]
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for path in model.saved_module_names(name):
            for p in model.base_model.get_submodule(path).modules_to_save[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def group(arch, core="matrix", names=("t0", "t1", "t2"), **kw):
    """A model holding task-core adapters ``names`` of one group, every core (and the basis) random."""
    model = get_sharelora_model(BUILD[arch](), cfg(arch, core, **kw), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg(arch, core, **kw))
    for i, n in enumerate(names):
        randomize(model, n, seed=10 + i, basis=i == 0)
    return model.eval()


def alone(model, arch, name, inputs):
    model.set_adapter(name)
    with torch.no_grad():
        return run(model, arch, inputs)


# --- config and plan ----------------------------------------------------------------------------------
def test_config_needs_a_core_with_shared_A_and_B_and_round_trips():
    with pytest.raises(ShareLoraError, match="task_core='matrix'"):
        ShareLoraConfig(task_share="AB")
    with pytest.raises(ShareLoraError, match="needs task_share='AB'"):
        ShareLoraConfig(task_share="A", task_core="matrix")
    with pytest.raises(ShareLoraError, match="task_core must be one of"):
        ShareLoraConfig(task_share="AB", task_core="full")
    with pytest.raises(ShareLoraError, match="HydraLoRA"):
        ShareLoraConfig(task_share="AB", task_core="matrix", heads=2, router=True)
    c = ShareLoraConfig(task_share="ba", task_core="Diagonal")
    assert (c.task_share, c.task_core) == ("AB", "diagonal")
    assert ShareLoraConfig.from_dict(c.to_dict()) == c
    # an adapter without cores writes no task_core field, so an earlier sharelora still reads it
    assert "task_core" not in ShareLoraConfig().to_dict()


@pytest.mark.parametrize("core,shape", [("matrix", (R, R)), ("diagonal", (R,))])
def test_adapters_of_a_group_read_one_A_and_one_B_and_own_a_core_per_target(core, shape):
    model = group("bert", core)
    plans = [model.plans[n] for n in ("t0", "t1", "t2")]
    for role in ("a_key", "b_key"):
        keys = [{getattr(t, role) for t in p.targets} for p in plans]
        assert keys[0] == keys[1] == keys[2] and len(keys[0]) == 2 and all(k.startswith("@default/") for k in keys[0])
    cores = [{t.c_key for t in p.targets} for p in plans]
    assert all(len(c) == 2 * L for c in cores) and not (cores[0] & cores[1])
    assert all(k.startswith("t1/") and k.endswith(".lora_C") for k in cores[1])
    assert {s.shape for s in plans[1].own_tensors().values()} == {shape}


def test_group_members_must_agree_on_the_core():
    model = get_sharelora_model(tiny_bert(), cfg("bert", "matrix"), adapter_name="t0")
    with pytest.raises(ShareLoraError, match="task_core"):
        model.add_adapter("t1", cfg("bert", "diagonal"))


# --- counts (SPEC: per extra task L r^2 (matrix) or L r (diagonal) per module type) -------------------------
@pytest.mark.parametrize("core,per_target", [("matrix", R * R), ("diagonal", R)])
@pytest.mark.parametrize("share", ["AB", "A", "none"])
def test_parameter_report_counts_exactly(core, per_target, share):
    T = 3
    model = group("llama", core, share=share)
    rep = model.parameter_report()
    d_out = {"q": D, "v": D // 2}  # GQA: v_proj 32 -> 16
    A = sum(R * D * (1 if share in ("A", "AB") else L) for _ in d_out)
    B = sum(R * d * (1 if share == "AB" else L) for d in d_out.values())
    own = 2 * L * per_target
    assert rep["task_shared_parameters"] == A + B
    assert rep["adapter_parameters"] == A + B + T * own
    for n in ("t0", "t1", "t2"):
        a = rep["adapters"][n]
        assert (a["own_parameters"], a["shared_parameters"], a["task_core"]) == (own, A + B, core)
        assert a["lora_equivalent_parameters"] == L * R * ((D + D) + (D + D // 2))
    assert rep["separate_lora_parameters"] == T * L * R * (2 * D + D + D // 2)
    assert sum(row["C_tensors"] for row in rep["groups"]) == 2 * L


def test_minilm_shaped_counts_match_spec():
    """SPEC's worked example: MiniLM (L = 6, d = 384, q + v, r = 8): LoRA 73,728 a task; cores 768 / 96."""
    from transformers import BertConfig, BertForSequenceClassification

    base = BertForSequenceClassification(BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                                                    intermediate_size=64, vocab_size=10, num_labels=2))
    model = get_sharelora_model(base, ShareLoraConfig(rank=8, share="AB", task_share="AB", task_core="matrix"), "t0")
    model.add_adapter("t1", ShareLoraConfig(rank=8, share="AB", task_share="AB", task_core="matrix"))
    model.add_adapter("d", ShareLoraConfig(rank=8, share="AB", task_share="AB", task_core="diagonal", task_group="g"))
    rep = model.parameter_report()["adapters"]
    assert rep["t1"]["lora_equivalent_parameters"] == 73_728
    assert rep["t1"]["own_parameters"] == 768 and rep["d"]["own_parameters"] == 96
    assert rep["t1"]["shared_parameters"] == 2 * 8 * (384 + 384)


# --- init and the reference computation ---------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_every_new_adapter_starts_exactly_at_the_base_model(arch, core):
    base = BUILD[arch]()
    x = example_input(arch)
    with torch.no_grad():
        want = run(base, arch, x)
    model = get_sharelora_model(copy.deepcopy(base), cfg(arch, core, modules_to_save=[]), adapter_name="t0")
    randomize(model, "t0", seed=1, basis=True)  # a trained basis and first task ...
    model.add_adapter("t1", cfg(arch, core, modules_to_save=[]))  # ... and a new task on it
    model.set_adapter("t1")
    with torch.no_grad():
        torch.testing.assert_close(run(model, arch, x), want, rtol=0, atol=0)


def test_the_basis_starts_as_loras_and_its_creator_with_an_identity_core():
    """basis_init "lora" (default): A random, B = 0; the creating adapter's core I, every later one's 0."""
    model = get_sharelora_model(tiny_llama(), cfg("llama"), adapter_name="t0")
    model.add_adapter("t1", cfg("llama"))
    eye = torch.eye(R)
    for name in ("t0", "t1"):
        for key, spec in model.plans[name].tensors.items():
            t = model.sharelora_bank[bank_name(key)]
            want = {"A": None, "B": torch.zeros_like(t), "C": eye if name == "t0" else torch.zeros_like(t)}[spec.role]
            assert t.abs().sum() > 0 if want is None else torch.equal(t, want), key
    diag = get_sharelora_model(tiny_llama(), cfg("llama", "diagonal"), adapter_name="t0")
    assert all(torch.equal(diag.sharelora_bank[bank_name(k)], torch.ones(R)) for k in diag.plans["t0"].own_tensors())
    # B = 0: the first gradient is B's (LoRA's); A's and the core's are zero until B moves
    model.set_adapter("t0")
    model(**example_input("llama")).logits.square().mean().backward()
    for key, spec in model.plans["t0"].tensors.items():
        g = model.sharelora_bank[bank_name(key)].grad
        assert (g.abs().sum() > 0) == (spec.role == "B"), key


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_the_adapter_that_creates_the_basis_is_exactly_a_sharelora_adapter(arch, core):
    """B I A = B A: with the same A and B it computes a task_share="none" ShareAB adapter's outputs and its
    gradients of A and B (so it trains as that LoRA does), at the start and on a trained B."""
    base = BUILD[arch]()
    model = get_sharelora_model(copy.deepcopy(base), cfg(arch, core, modules_to_save=[]), adapter_name="t0")
    plain = get_sharelora_model(copy.deepcopy(base), ShareLoraConfig(rank=R, share="AB", target_modules=TARGETS[arch]))
    by_local = {spec.local_key: model.sharelora_bank[bank_name(k)] for k, spec in model.plans["t0"].tensors.items()}
    pairs = [(by_local[spec.local_key], plain.sharelora_bank[bank_name(k)]) for k, spec in plain.plan.tensors.items()]
    x = example_input(arch, batch=3)
    with torch.no_grad():
        want = run(base, arch, x)
        for ours, theirs in pairs:
            theirs.copy_(ours)
        torch.testing.assert_close(run(model, arch, x), want, rtol=0, atol=0)  # B = 0: exactly the base model
        g = torch.Generator().manual_seed(3)
        for ours, theirs in pairs:  # a trained B (A as it is)
            if torch.count_nonzero(ours) == 0:
                ours.copy_(torch.randn(ours.shape, generator=g))
                theirs.copy_(ours)
    model.train(), plain.train()
    out, ref = run(model, arch, x), run(plain, arch, x)
    assert_close_fp32(out, ref)
    out.square().mean().backward()
    ref.square().mean().backward()
    for ours, theirs in pairs:
        assert theirs.grad.abs().sum() > 0
        assert_close_fp32(ours.grad, theirs.grad)


def test_random_basis_init_starts_the_basis_random_and_every_core_at_zero():
    """basis_init "random" (VeRA-like, the earlier default): A and B random, all cores 0; the cores get gradients."""
    model = get_sharelora_model(tiny_llama(), cfg("llama", basis_init="random"), adapter_name="t0")
    for key, spec in model.plans["t0"].tensors.items():
        t = model.sharelora_bank[bank_name(key)]
        assert (t.abs().sum() == 0) == (spec.role == "C"), key  # A, B random; the core zero
    x = example_input("llama")
    model(**x).logits.square().mean().backward()
    cores = [model.sharelora_bank[bank_name(k)] for k in model.plans["t0"].own_tensors()]
    assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores)
    assert cfg("llama", basis_init="random").to_dict()["basis_init"] == "random"
    assert "basis_init" not in cfg("llama").to_dict()  # the default is not written (older readers)
    with pytest.raises(ShareLoraError, match="basis_init must be one of"):
        cfg("llama", basis_init="svd")


def test_init_cores_lets_the_first_k_tasks_train_an_untrained_basis_jointly():
    """A joint stage: every basis task starts as the ShareLoRA adapter B A (core I, B = 0), still the base model,
    and its core, A and B all get gradients from a mixed batch; refused once the basis is trained."""
    names = ["t0", "t1", "t2", "later"]
    model = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg("bert"))
    x = example_input("bert", batch=4)
    with torch.no_grad():
        model.set_adapter("t0")
        with model.disable_adapter():
            base = run(model, "bert", x)
    model.init_cores(["t0", "t1", "t2"], trains_basis=True)
    cores = {n: [model.sharelora_bank[bank_name(k)] for k in model.plans[n].own_tensors()] for n in names}
    assert all(torch.equal(c, torch.eye(R)) for n in ("t1", "t2") for c in cores[n])
    assert all(c.abs().sum() == 0 for c in cores["later"])
    for n in names:  # every task exactly at the base model (the heads are still the base's copies)
        torch.testing.assert_close(alone(model, "bert", n, x), base, rtol=0, atol=0)
    model.set_adapter(["t0", "t1", "t2"], train_shared=True)
    model.train()
    basis = {k: model.sharelora_bank[bank_name(k)] for k in model.plans["t0"].shared_tensors()}
    rows = ["t0", "t1", "t2", "t1"]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(2):
        opt.zero_grad()
        model(**x, adapter_names=rows).logits.square().mean().backward()
        opt.step()
    for n in ("t0", "t1", "t2"):
        assert all(c.grad is not None and c.grad.abs().sum() > 0 for c in cores[n]), n
    assert all(b.grad.abs().sum() > 0 for b in basis.values())
    assert all(c.grad is None for c in cores["later"])
    with pytest.raises(ShareLoraError, match="not untrained"):
        model.init_cores(["later"], trains_basis=True)  # it would start at B A, not at the base model
    model.init_cores(["t1"], trains_basis=False)
    assert all(c.abs().sum() == 0 for c in cores["t1"])
    with pytest.raises(ShareLoraError, match="no task cores"):
        plain = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=R, target_modules=TARGETS["bert"]))
        plain.init_cores(["default"], trains_basis=True)
    vera = get_sharelora_model(tiny_bert(), cfg("bert", basis_init="random"), adapter_name="t0")
    with pytest.raises(ShareLoraError, match="not untrained"):
        vera.init_cores(["t0"], trains_basis=True)


@pytest.mark.numerics
@pytest.mark.parametrize("core", CORES)
def test_layer_output_is_the_reference_formula(core):
    """One adapted module: W0 x + b + (alpha / r) B C A x (B diag(c) A), by plain ops on the tensors."""
    model = group("llama", core, alpha=6.0)
    layer = model.base_model.model.layers[1].self_attn.v_proj
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    bank = model.sharelora_bank
    for name in ("t1", "t2"):
        t = model.plans[name].targets[3]
        assert t.module_name.endswith("layers.1.self_attn.v_proj")
        A, B, C = (bank[bank_name(k)].detach() for k in (t.a_key, t.b_key, t.c_key))
        C = C if core == "matrix" else torch.diag(C)
        W0 = layer.base_layer.weight
        want = x @ W0.T + (6.0 / R) * x @ A.T @ C.T @ B.T
        model.set_adapter(name)
        with torch.no_grad():
            assert_close_fp32(layer(x), want, k=D)
            assert_close_fp32(layer.delta_weight(t, name), (6.0 / R) * B @ C @ A, k=D)
    # two active adapters add their updates: W0 x + s B (C_1 + C_2) A x
    cores = [bank[bank_name(model.plans[n].targets[3].c_key)].detach() for n in ("t1", "t2")]
    C12 = sum(c if core == "matrix" else torch.diag(c) for c in cores)
    model.set_adapter(["t1", "t2"])
    with torch.no_grad():
        assert_close_fp32(layer(x), x @ layer.base_layer.weight.T + (6.0 / R) * x @ A.T @ C12.T @ B.T, k=D)


@pytest.mark.numerics
def test_fused_slices_each_apply_their_own_core():
    """GPT-2's c_attn: the q and v slices' updates land in their output columns, each with its own core."""
    model = group("gpt2")
    layer = model.base_model.transformer.h[0].attn.c_attn
    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))
    bank = model.sharelora_bank
    model.set_adapter("t2")
    want = layer.base_layer(x)
    for t in model.plans["t2"].targets[:2]:
        assert t.module_name.endswith("h.0.attn.c_attn")
        A, B, C = (bank[bank_name(k)].detach() for k in (t.a_key, t.b_key, t.c_key))
        want[..., t.out_start:t.out_start + t.d_out] += (16.0 / R) * x @ A.T @ C.T @ B.T
    with torch.no_grad():
        assert_close_fp32(layer(x), want, k=D)


# --- mixed-task batches ---------------------------------------------------------------------------------
# fp32: the routed path multiplies the same operands in another grouping (bmm over rows, a row subset).
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_mixed_batch_equals_each_adapter_alone_on_its_rows(arch, core):
    model = group(arch, core)
    base = BUILD[arch]()
    inputs = example_input(arch, batch=6)
    names = ["t1", "t0", "__base__", "t2", "t1", "t0"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if n == "__base__":
            with torch.no_grad():
                want = base(**row).logits
        else:
            want = alone(model, arch, n, row)
        torch.testing.assert_close(mixed[i:i + 1], want, **TOL)


def test_mixed_batch_with_other_adapters_in_the_model():
    """Core adapters beside a ShareA task group and a plain LoRA: each row still gets its own adapter."""
    model = group("llama")
    model.add_adapter("a", ShareLoraConfig(rank=2, share="A", task_share="A", target_modules=["q_proj", "v_proj"],
                                           task_group="other", init_lora_weights=False))
    model.add_adapter("lora", ShareLoraConfig(rank=3, share="none", target_modules=["q_proj"], init_lora_weights=False))
    model.add_adapter("d", cfg("llama", "diagonal", task_group="diag"))
    randomize(model, "d", seed=5, basis=True)
    inputs = example_input("llama", batch=6)
    names = ["a", "t1", "lora", "d", "t0", "__base__"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, n in enumerate(names[:5]):
        torch.testing.assert_close(mixed[i:i + 1], alone(model, "llama", n, {k: v[i:i + 1] for k, v in inputs.items()}),
                                   **TOL)


def test_the_cost_of_a_mixed_batch_does_not_depend_on_the_number_of_tasks():
    """FLOPs of one forward with 2 or 24 distinct tasks among 24 rows are the same: A and B are applied once
    for the batch, and only the (rows, T, r) x (r, r) core products are per row (matrix products counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    names = [f"t{i}" for i in range(24)]
    model = group("llama", names=tuple(names))
    inputs = example_input("llama", batch=24)

    def flops(adapter_names):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(**inputs, adapter_names=adapter_names)
        return counter.get_total_flops()

    every = flops(names)
    assert flops([names[i % 2] for i in range(24)]) == every
    # over the base model: per adapted module x A^T, u C^T and v B^T once for all n T tokens
    tokens = inputs["input_ids"].numel()
    per_layer = sum(2 * tokens * (D * R + R * R + R * d_out) for d_out in (D, D // 2))
    assert every - flops(["__base__"] * 24) == L * per_layer


def test_mixed_batch_gradients_equal_each_adapters_gradient_on_its_rows():
    model = group("llama")
    model.set_adapter(["t0", "t1", "t2"], train_shared=True)
    inputs = example_input("llama", batch=4)
    names = ["t1", "t2", "t1", "t0"]
    model(**inputs, adapter_names=names).logits.square().sum().backward()
    mixed = {k: p.grad.clone() for k, p in model.sharelora_bank.items()}
    model.zero_grad()
    for n in ("t0", "t1", "t2"):  # each alone on its rows; the gradients add up
        rows = torch.tensor([i for i, m in enumerate(names) if m == n])
        model.set_adapter(n, train_shared=True)
        model(**{k: v[rows] for k, v in inputs.items()}).logits.square().sum().backward()
    for k, p in model.sharelora_bank.items():
        assert_close_fp32(mixed[k], p.grad, what=k)


# --- continual: exactly zero forgetting --------------------------------------------------------------------
def train_steps(model, name, inputs, steps=3, **kw):
    model.set_adapter(name, **kw)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(**inputs).logits.square().mean().backward()
        opt.step()
    model.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_the_first_adapter_trains_the_basis_and_a_later_one_only_its_core_and_head(arch, core):
    model = get_sharelora_model(BUILD[arch](), cfg(arch, core), adapter_name="first")
    inputs = example_input(arch, batch=4)
    basis = {k: model.sharelora_bank[bank_name(k)] for k in model.plans["first"].shared_tensors()}
    start = {k: v.clone() for k, v in basis.items()}
    train_steps(model, "first", inputs)  # default: the group's first adapter trains the basis
    assert model.basis_owner("default") == "first"
    assert all(not torch.equal(start[k], v) for k, v in basis.items())

    with torch.no_grad():
        model.set_adapter("first")
        before = model(**inputs).logits.clone()
    trained_basis = {k: v.clone() for k, v in basis.items()}
    model.add_adapter("later", cfg(arch, core))
    model.set_adapter("later")  # default: its core and head only
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"sharelora_bank.{bank_name(k)}" for k in model.plans["later"].own_tensors()} | {
        n for n in trainable if ".modules_to_save.later." in n}
    train_steps(model, "later", inputs)
    cores = [model.sharelora_bank[bank_name(k)] for k in model.plans["later"].own_tensors()]
    assert all(c.abs().sum() > 0 for c in cores)  # the zero core learned on the trained basis
    assert all(torch.equal(trained_basis[k], v) for k, v in basis.items())
    with torch.no_grad():
        model.set_adapter("first")
        assert torch.equal(model(**inputs).logits, before)  # bit-identical: zero forgetting
        mixed = model(**inputs, adapter_names=["first", "later", "first", "later"]).logits
    torch.testing.assert_close(mixed[::2], before[::2], **TOL)


def test_train_shared_overrides_the_default_and_joint_training_includes_the_owner():
    model = group("bert")
    model.set_adapter("t1", train_shared=True)
    assert all(model.sharelora_bank[bank_name(k)].requires_grad for k in model.plans["t1"].shared_tensors())
    model.set_adapter(["t1", "t2"])  # the owner t0 is not active: the basis is frozen
    assert not any(model.sharelora_bank[bank_name(k)].requires_grad for k in model.plans["t1"].shared_tensors())
    model.set_adapter(["t0", "t1"])  # jointly on the first k tasks: the basis trains with their cores
    assert all(model.sharelora_bank[bank_name(k)].requires_grad for k in model.plans["t1"].shared_tensors())
    model.set_adapter("t0", train_shared=False)
    assert not any(model.sharelora_bank[bank_name(k)].requires_grad for k in model.plans["t0"].shared_tensors())
    model.delete_adapter("t0")
    assert model.basis_owner("default") is None
    model.set_adapter("t1")
    assert not any(model.sharelora_bank[bank_name(k)].requires_grad for k in model.plans["t1"].shared_tensors())


def test_a_later_task_loaded_alone_does_not_train_the_basis(tmp_path):
    model = group("bert")
    model.save_pretrained(tmp_path / "m")
    every = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "m", is_trainable=True)
    assert every.basis_owner("default") == "t0"
    later = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "m", adapter_name="t2", is_trainable=True)
    assert later.basis_owner("default") is None
    later.set_adapter("t2")
    assert not any(later.sharelora_bank[bank_name(k)].requires_grad for k in later.plans["t2"].shared_tensors())
    assert all(later.sharelora_bank[bank_name(k)].requires_grad for k in later.plans["t2"].own_tensors())


# --- format, merge, PEFT ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_save_and_load_round_trip_is_exact_and_stores_each_shared_tensor_once(arch, core, tmp_path):
    from safetensors import safe_open

    model = group(arch, core)
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "adapter_model.safetensors"), "pt") as f:
        keys = [k for k in f.keys() if "modules_to_save" not in k]
    assert sorted(k for k in keys if k.startswith("@")) == sorted(
        {t.a_key for t in model.plans["t0"].targets} | {t.b_key for t in model.plans["t0"].targets})
    assert len(keys) == 4 + 3 * 2 * L  # one A and one B per module type; a core per task and target
    again = ShareLoraModel.from_pretrained(BUILD[arch](), tmp_path / "m")
    assert again.adapter_names == ["t0", "t1", "t2"] and again.sharelora_configs["t1"].task_core == core
    inputs = example_input(arch, batch=3)
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names=["t2", "t0", "t1"]).logits,
                           again(**inputs, adapter_names=["t2", "t0", "t1"]).logits)


def test_load_one_task_alone_reads_its_core_and_the_basis(tmp_path):
    model = group("llama")
    model.save_pretrained(tmp_path / "m")
    one = ShareLoraModel.from_pretrained(tiny_llama(), tmp_path / "m", adapter_name="t1")
    inputs = example_input("llama")
    with torch.no_grad():
        assert torch.equal(one(**inputs).logits, alone(model, "llama", "t1", inputs))
    assert len(one.sharelora_bank) == 4 + 2 * L


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_merge_equals_the_unmerged_model_and_unmerge_restores_it(arch, core):
    model = group(arch, core)
    inputs = example_input(arch)
    model.set_adapter("t1")
    with torch.no_grad():
        want = run(model, arch, inputs)
        model.merge()
        assert_close_fp32(run(model, arch, inputs), want)
        model.unmerge()
        assert_close_fp32(run(model, arch, inputs), want)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("core", CORES)
def test_export_to_peft_is_a_standard_rank_r_lora_with_the_same_outputs(arch, core, tmp_path):
    import json

    from peft import PeftModel

    model = group(arch, core)
    model.export_peft(tmp_path / "t2", adapter_name="t2")
    pc = json.loads((tmp_path / "t2" / "adapter_config.json").read_text())
    assert pc["peft_type"] == "LORA" and pc["r"] == (2 * R if arch == "gpt2" else R)  # GPT-2: q and v slices
    peft_model = PeftModel.from_pretrained(BUILD[arch](), tmp_path / "t2").eval()
    inputs = example_input(arch)
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, alone(model, arch, "t2", inputs), **TOL)


# --- compress into cores -------------------------------------------------------------------------------
def separate_loras(tmp_path, n=2, rank=2):
    """n plain LoRAs (rank 2 on q_proj, v_proj of tiny LLaMA), each with random A and B."""
    dirs = {}
    for i in range(n):
        m = get_sharelora_model(tiny_llama(), ShareLoraConfig(rank=rank, share="none", target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for p in m.sharelora_bank.values():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        m.save_pretrained(tmp_path / f"t{i}")
        dirs[f"t{i}"] = tmp_path / f"t{i}"
    return dirs


def reference_outputs(dirs, inputs):
    out = {}
    for name, d in dirs.items():
        with torch.no_grad():
            out[name] = ShareLoraModel.from_pretrained(tiny_llama(), d)(**inputs).logits
    return out


@pytest.mark.parametrize("share,across", [("AB", True), ("A", True), ("A", False)])
def test_compression_into_cores_is_exact_when_the_rank_covers_the_stacks(tmp_path, share, across):
    from sharelora.method.compress import compress_adapters

    dirs = separate_loras(tmp_path)
    # both stacks of a module type: 2 tasks x 3 layers x rank 2 = 12 <= min(d_in 32, d_out 16)
    model, report = compress_adapters(tiny_llama(), dirs, rank=12, share=share, across_layers=across,
                                      task_core="matrix")
    assert report["task_core"] == "matrix" and report["relative_error_total"] < 1e-6
    assert {model.sharelora_configs[n].task_share for n in dirs} == {"AB"}
    inputs = example_input("llama")
    want = reference_outputs(dirs, inputs)
    for name in dirs:
        assert report["tasks"][name]["max_error"] < 1e-6
        torch.testing.assert_close(alone(model, "llama", name, inputs), want[name], **TOL)
    rep = model.parameter_report()
    assert report["parameters_per_task"] == rep["adapters"]["t1"]["own_parameters"] == 2 * L * 12 * 12
    assert report["parameters"] == rep["adapter_parameters"]


def test_compression_into_cores_error_falls_with_rank_and_sweeps_improve_on_hosvd(tmp_path):
    from sharelora.method.compress import compress_adapters

    dirs = separate_loras(tmp_path, n=3)
    errors = []
    for k in (2, 6, 10):
        model, report = compress_adapters(tiny_llama(), dirs, rank=k, share="AB", task_core="matrix")
        errors.append(report["relative_error_total"])
        assert report["relative_error_total"] <= report["relative_error_hosvd"] + 1e-12
        assert all(0 < t["mean_error"] < 1 for t in report["tasks"].values())
    assert errors[0] > errors[1] > errors[2] > 0
    # the per-task errors are those of the model: each task's update is B C A of the fitted tensors
    t = model.plans["t1"].targets[0]
    layer = model.base_model.get_submodule(t.module_name)
    src = ShareLoraModel.from_pretrained(tiny_llama(), dirs["t1"])
    D = src.base_model.get_submodule(t.module_name).delta_weight(src.plans["default"].targets[0], "default")
    got = layer.delta_weight(t, "t1")
    err = (torch.linalg.matrix_norm(got - D) / torch.linalg.matrix_norm(D)).item()
    assert err == pytest.approx(report["tasks"]["t1"]["modules"][t.module_name], rel=1e-4)


def test_compression_into_diagonal_cores_and_export_to_peft(tmp_path):
    from peft import PeftModel

    from sharelora.method.compress import compress_adapters

    dirs = separate_loras(tmp_path, n=1, rank=2)
    model, report = compress_adapters(tiny_llama(), dirs, rank=2, share="A", across_layers=False, task_core="diagonal")
    # one rank-2 task per module: its SVD basis diagonalises it, so diagonal cores are exact too
    assert report["tasks"]["t0"]["max_error"] < 1e-6
    model.export_peft(tmp_path / "p", adapter_name="t0")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    inputs = example_input("llama")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, reference_outputs(dirs, inputs)["t0"], **TOL)


def test_compression_into_cores_refuses_a_rank_beyond_d_out(tmp_path):
    from sharelora.method.compress import compress_adapters

    dirs = separate_loras(tmp_path, n=1)
    with pytest.raises(ShareLoraError, match="d_out=16.*rank <= 16"):
        compress_adapters(tiny_llama(), dirs, rank=17, share="AB", task_core="matrix")
    with pytest.raises(ShareLoraError, match="basis='update'"):
        compress_adapters(tiny_llama(), dirs, rank=4, share="AB", task_core="matrix", basis="A")


def test_a_single_default_core_adapter_saves_in_the_single_adapter_format(tmp_path):
    from sharelora.method import checkpoint

    model = get_sharelora_model(tiny_llama(), cfg("llama", "diagonal"))
    randomize(model, "default", seed=4, basis=True)
    model.save_pretrained(tmp_path / "one")
    assert not checkpoint.is_multi_adapter(tmp_path / "one")
    config, tensors = checkpoint.load_adapter(tmp_path / "one")
    assert config.task_core == "diagonal" and sum(k.endswith(".lora_C") for k in tensors) == 2 * L
    again = ShareLoraModel.from_pretrained(tiny_llama(), tmp_path / "one", is_trainable=True)
    assert again.basis_owner("default") == "default"
    inputs = example_input("llama")
    with torch.no_grad():
        assert torch.equal(again(**inputs).logits, model(**inputs).logits)


# --- orthonormalizing a trained basis ----------------------------------------------------------------------------
def ill_conditioned(model, group_name="default"):
    """Scale every shared B's columns (and A's rows) by 1.6 ... 0.03, as a trained basis's spectrum falls."""
    scale = torch.tensor([1.6, 0.4, 0.16, 0.03])
    with torch.no_grad():
        for key, spec in model.plans[model.adapter_names[0]].basis_tensors().items():
            p = model.sharelora_bank[bank_name(key)]
            p.mul_(scale if spec.role == "B" else scale.flip(0).unsqueeze(1) * 5)
    return model


def basis_state(model):
    return {k: t.detach().clone() for k, t in model.multi_adapter_state_dict().items()}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("share", ["A", "AB"])
def test_orthonormalize_basis_conditions_it_and_leaves_every_adapter_unchanged(arch, share, tmp_path):
    model = ill_conditioned(group(arch, share=share))
    inputs = example_input(arch, batch=3)
    names = ["t0", "t1", "t2"]
    before = {n: alone(model, arch, n, inputs) for n in names}
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["t2", "t0", "t1"]).logits
    old = basis_state(model)
    report = model.orthonormalize_basis(group="default")
    new = basis_state(model)
    assert report["adapters"] == names and report["cores"] == 3 * len(model.plans["t0"].targets)
    assert report["conditioning"]["before"] > 40 and report["conditioning"]["after"] == pytest.approx(1.0, abs=1e-5)
    for n in names:
        torch.testing.assert_close(alone(model, arch, n, inputs), before[n], **TOL)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, adapter_names=["t2", "t0", "t1"]).logits, mixed, **TOL)
    shared = [k for k in old if k.startswith("@")]
    assert len(shared) == report["A"] + report["B"] and (share == "AB" or report["B"] == L * 2)
    for key in shared:
        was, now = old[key].double(), new[key].double()
        k = now.shape[0] if key.endswith("lora_A") else now.shape[1]
        gram = now @ now.T if key.endswith("lora_A") else now.T @ now  # A's rows, B's columns
        c2 = was.square().sum() / k  # each direction gets the tensor's mean square: c = ||.||_F / sqrt(k)
        torch.testing.assert_close(gram, c2 * torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-5 * float(c2))
        overlap = (now @ was.T) if key.endswith("lora_A") else (now.T @ was)  # c L^T / c R: signs fixed, diagonal > 0
        assert (torch.diagonal(overlap) > 0).all()
    cores = [k for k in old if "lora_C" in k]
    assert cores and all(not torch.equal(old[k], new[k]) for k in cores)  # every core absorbed its factors
    # save / load stay exact, and the PEFT export computes the same
    model.save_pretrained(tmp_path / "m")
    again = ShareLoraModel.from_pretrained(BUILD[arch](), tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(again(**inputs, adapter_names=["t2", "t0", "t1"]).logits,
                           model(**inputs, adapter_names=["t2", "t0", "t1"]).logits)
    from peft import PeftModel

    model.export_peft(tmp_path / "t1", adapter_name="t1")
    peft_model = PeftModel.from_pretrained(BUILD[arch](), tmp_path / "t1").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(**inputs).logits, before["t1"], **TOL)


def test_orthonormalize_basis_refuses_what_it_cannot_reparametrize():
    with pytest.raises(ShareLoraError, match="diagonal cores.*task_core='matrix'"):
        group("bert", "diagonal").orthonormalize_basis()
    fresh = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name="t0")  # basis_init lora: B = 0
    with pytest.raises(ShareLoraError, match="untrained basis.*train the basis first"):
        fresh.orthonormalize_basis()
    with pytest.raises(ShareLoraError, match="no task-core adapter.*groups with task cores: \\['default'\\]"):
        group("bert").orthonormalize_basis(group="other")
    merged = group("bert")
    merged.set_adapter("t1")
    merged.merge()
    with pytest.raises(ShareLoraError, match="call unmerge"):
        merged.orthonormalize_basis()
    plain = get_sharelora_model(tiny_bert(), ShareLoraConfig(target_modules=["query"], rank=R))
    with pytest.raises(ShareLoraError, match="no task-core adapter"):
        plain.orthonormalize_basis()
