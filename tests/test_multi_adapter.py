"""Several adapters in one model: task sharing, mixed-task batches, continual tasks, HydraLoRA, format, PEFT."""

import copy

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraModel, get_sharelora_model
from sharelora.method.layers import bank_name

from conftest import example_input, run, tiny_bert, tiny_gpt2, tiny_llama

TARGETS = {"bert": ["query", "value"], "llama": ["q_proj", "v_proj"], "gpt2": ["c_attn.q", "c_attn.v"]}
BUILD = {"bert": tiny_bert, "llama": tiny_llama, "gpt2": tiny_gpt2}


def cfg(arch, **kw):
    kw.setdefault("rank", 4)
    kw.setdefault("share", "A")
    kw.setdefault("task_share", "A")
    kw.setdefault("init_lora_weights", False)  # random B: every adapter computes a different function
    if arch == "bert":
        kw.setdefault("modules_to_save", ["classifier"])
    return ShareLoraConfig(target_modules=TARGETS[arch], **kw)


def perturb(model, name, seed):
    """Give adapter ``name``'s own tensors (and head) values of their own, so adapters differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key in model.plans[name].own_tensors():
            p = model.sharelora_bank[bank_name(key)]
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for path in model.saved_module_names(name):
            for p in model.base_model.get_submodule(path).modules_to_save[name].parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def two_task_model(arch, names=("sql", "chat"), **kw):
    model = get_sharelora_model(BUILD[arch](), cfg(arch, **kw), adapter_name=names[0])
    for i, n in enumerate(names[1:], 1):
        model.add_adapter(n, cfg(arch, **kw))
    for i, n in enumerate(names):
        perturb(model, n, seed=10 + i)
    return model.eval()


# fp32 tolerance for "the same function computed over other rows / in another batched product": the
# routed path multiplies the same operands in another grouping (bmm instead of mm, a row subset), so
# results agree to a few ulps of the outputs (|logits| ~ 1 here); 1e-5 as the issue states.
TOL = dict(rtol=1e-5, atol=1e-5)


# --- task sharing -------------------------------------------------------------------------------------
def test_task_shared_adapters_read_one_A_per_module_type():
    model = two_task_model("bert")
    a_sql = {t.a_key for t in model.plans["sql"].targets}
    a_chat = {t.a_key for t in model.plans["chat"].targets}
    assert a_sql == a_chat and len(a_sql) == 2 and all(k.startswith("@default/") for k in a_sql)
    assert not {t.b_key for t in model.plans["sql"].targets} & {t.b_key for t in model.plans["chat"].targets}


def test_parameter_report_counts_each_tensor_once_as_spec_says():
    # SPEC: ShareA, A also shared by tasks: r d_in + T L r d_out per module type (+ heads apart)
    T, L, r, d = 3, 3, 4, 32
    model = two_task_model("bert", names=("a", "b", "c"))
    rep = model.parameter_report()
    assert rep["adapter_parameters"] == 2 * (r * d + T * L * r * d)
    assert rep["task_shared_parameters"] == 2 * r * d
    assert rep["separate_lora_parameters"] == T * 2 * L * r * (d + d)
    assert rep["separate_adapters_parameters"] == T * 2 * (r * d + L * r * d)
    assert rep["adapters"]["b"]["own_parameters"] == 2 * L * r * d
    assert rep["adapters"]["b"]["shared_parameters"] == 2 * r * d
    head = sum(p.numel() for p in tiny_bert().classifier.parameters())
    assert rep["adapters"]["b"]["modules_to_save_parameters"] == head


def test_shareab_with_task_shared_A_counts():
    T, r, d = 2, 4, 32
    model = two_task_model("bert", share="AB")
    assert model.parameter_report()["adapter_parameters"] == 2 * (r * d + T * r * d)


@pytest.mark.parametrize("field,value", [("rank", 8), ("share", "none"), ("layers_to_transform", [0, 1])])
def test_group_members_must_agree_on_the_shared_tensor(field, value):
    model = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name="sql")
    with pytest.raises(ShareLoraError, match=rf"'chat'.*{field}.*'sql'|'sql'.*{field}.*'chat'"):
        model.add_adapter("chat", cfg("bert", **{field: value}))
    assert model.adapter_names == ["sql"]


def test_group_members_must_agree_on_targets():
    model = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name="sql")
    with pytest.raises(ShareLoraError, match="target_modules.*'sql'"):
        model.add_adapter("chat", ShareLoraConfig(rank=4, share="A", task_share="A", target_modules=["query"]))


def test_other_task_groups_and_task_share_none_stay_independent():
    model = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name="sql")
    model.add_adapter("chat", cfg("bert", task_group="other", rank=8))
    model.add_adapter("solo", cfg("bert", task_share="none", rank=2))
    keys = [{t.a_key for t in model.plans[n].targets} for n in ("sql", "chat", "solo")]
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2])


def test_bad_adapter_names_are_refused():
    model = get_sharelora_model(tiny_bert(), cfg("bert"), adapter_name="sql")
    for bad in ("__base__", "a/b", "a.b", "@x", ""):
        with pytest.raises(ShareLoraError, match="adapter name"):
            model.add_adapter(bad, cfg("bert"))
    with pytest.raises(ShareLoraError, match="already exists"):
        model.add_adapter("sql", cfg("bert"))


# --- mixed-task batches -------------------------------------------------------------------------------
def alone(model, arch, name, inputs):
    with torch.no_grad():
        model.set_adapter(name)
        return run(model, arch, inputs)


@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_mixed_batch_equals_each_adapter_alone_on_its_rows(arch):
    model = two_task_model(arch, names=("sql", "chat", "code"))
    base = BUILD[arch]()
    inputs = example_input(arch, batch=6)
    names = ["sql", "chat", "__base__", "code", "sql", "chat"]
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=names).logits
    for i, n in enumerate(names):
        row = {k: v[i:i + 1] for k, v in inputs.items()}
        if n == "__base__":  # no adapter and the base model's own (untrained) head
            with torch.no_grad():
                want = base(**row).logits
        else:
            want = alone(model, arch, n, row)
        torch.testing.assert_close(mixed[i:i + 1], want, **TOL)


def test_base_rows_use_the_original_head_and_no_adapter():
    base = tiny_bert()
    model = two_task_model("bert")
    inputs = example_input("bert", batch=3)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["sql", "__base__", "chat"]).logits
        want = base(**inputs).logits
    torch.testing.assert_close(mixed[1], want[1], **TOL)
    assert not torch.allclose(mixed[0], want[0], atol=1e-3)


def test_all_rows_of_one_adapter_take_the_single_adapter_path_and_agree():
    model = two_task_model("llama")
    inputs = example_input("llama", batch=3)
    with torch.no_grad():
        routed = model(**inputs, adapter_names=["chat"] * 3).logits
        model.set_adapter("chat")
        plain = model(**inputs).logits
    torch.testing.assert_close(routed, plain, rtol=0, atol=0)


def test_adapter_names_are_validated():
    model = two_task_model("llama")
    inputs = example_input("llama", batch=2)
    with pytest.raises(ShareLoraError, match="unknown adapters"):
        model(**inputs, adapter_names=["sql", "nope"])
    with pytest.raises(ShareLoraError, match="one adapter name per row"):
        model(**inputs, adapter_names=["sql", "chat", "sql"])


def test_gradients_reach_only_the_adapters_a_mixed_batch_uses():
    model = two_task_model("llama", names=("sql", "chat", "idle"))
    model.set_adapter(["sql", "chat", "idle"])
    model.train()
    inputs = example_input("llama", batch=4)
    model(**inputs, adapter_names=["sql", "chat", "__base__", "chat"]).logits.square().mean().backward()
    for name in ("sql", "chat"):
        assert all(model.sharelora_bank[bank_name(k)].grad is not None for k in model.plans[name].own_tensors())
    assert all(model.sharelora_bank[bank_name(k)].grad is None for k in model.plans["idle"].own_tensors())
    shared = [model.sharelora_bank[bank_name(k)] for k in model.plans["sql"].shared_tensors()]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in shared)


def test_shared_A_gradient_is_the_sum_over_the_tasks_using_it():
    model = two_task_model("llama")
    model.set_adapter(["sql", "chat"])
    model.train()
    inputs = example_input("llama", batch=2)
    shared = [model.sharelora_bank[bank_name(k)] for k in model.plans["sql"].shared_tensors()]

    def grads(names, rows):
        for p in model.parameters():
            p.grad = None
        sub = {k: v[rows] for k, v in inputs.items()}
        model(**sub, adapter_names=names).logits.sum().backward()
        return [p.grad.clone() for p in shared]

    both = grads(["sql", "chat"], slice(0, 2))
    one = grads(["sql"], slice(0, 1))
    two = grads(["chat"], slice(1, 2))
    for g, a, b in zip(both, one, two):
        # the same sums in another order: tolerance relative to the gradient's scale
        torch.testing.assert_close(g, a + b, rtol=1e-4, atol=1e-5 * float(g.abs().max()))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_with_adapter_names_equals_each_adapter_alone(arch):
    model = two_task_model(arch)
    prompts = example_input(arch, batch=3, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        mixed = model.generate(**prompts, adapter_names=["chat", "sql", "__base__"], **kw)
        for i, n in enumerate(["chat", "sql"]):
            model.set_adapter(n)
            one = model.generate(**{k: v[i:i + 1] for k, v in prompts.items()}, **kw)
            assert torch.equal(mixed[i:i + 1], one)
        with model.disable_adapter():
            base = model.generate(**{k: v[2:3] for k, v in prompts.items()}, **kw)
    assert torch.equal(mixed[2:3], base)


def test_several_active_adapters_add_their_updates():
    model = two_task_model("llama")
    inputs = example_input("llama")
    with torch.no_grad():
        with model.disable_adapter():
            base = model(**inputs).logits
        model.set_adapter(["sql", "chat"])
        both = model(**inputs).logits
        model.merge()
        merged = model(**inputs).logits
        model.unmerge()
    # merged W0 + D_sql + D_chat vs unmerged: summation order only; |logits| ~ 1
    torch.testing.assert_close(merged, both, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(both, base, atol=1e-3)


# --- continual tasks ----------------------------------------------------------------------------------
def train_steps(model, name, inputs, steps=3, train_shared=True):
    model.set_adapter(name, train_shared=train_shared)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(**inputs).logits.square().mean().backward()
        opt.step()
    model.eval()


def test_continual_task_with_frozen_shared_tensors_leaves_earlier_adapters_bit_identical():
    model = two_task_model("bert")
    inputs = example_input("bert", batch=4)
    with torch.no_grad():
        model.set_adapter("sql")
        before = model(**inputs).logits.clone()
    shared_before = {k: model.sharelora_bank[bank_name(k)].clone() for k in model.plans["sql"].shared_tensors()}
    train_steps(model, "chat", inputs, train_shared=False)
    with torch.no_grad():
        model.set_adapter("sql")
        after = model(**inputs).logits
    assert torch.equal(before, after)
    assert all(torch.equal(v, model.sharelora_bank[bank_name(k)]) for k, v in shared_before.items())


def test_joint_training_updates_the_shared_tensor():
    model = two_task_model("bert")
    inputs = example_input("bert", batch=4)
    key = next(iter(model.plans["sql"].shared_tensors()))
    before = model.sharelora_bank[bank_name(key)].clone()
    train_steps(model, "chat", inputs, train_shared=True)
    assert not torch.equal(before, model.sharelora_bank[bank_name(key)])


def test_set_adapter_makes_only_the_active_adapter_trainable():
    model = two_task_model("bert")
    model.set_adapter("chat", train_shared=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    own = {f"sharelora_bank.{bank_name(k)}" for k in model.plans["chat"].own_tensors()}
    assert own <= trainable
    assert not any("@default" in n for n in trainable)
    assert not any(n.startswith("sharelora_bank.sql") for n in trainable)
    assert any("modules_to_save.chat" in n for n in trainable)
    assert not any("modules_to_save.sql" in n or "original_module" in n for n in trainable)


# --- HydraLoRA ----------------------------------------------------------------------------------------
def hydra_cfg(**kw):
    return ShareLoraConfig(rank=4, share="A", heads=3, router=True, target_modules=["q_proj", "v_proj"], **kw)


def test_hydra_starts_at_the_base_model_and_learns():
    base = tiny_llama()
    model = get_sharelora_model(copy.deepcopy(base), hydra_cfg())
    inputs = example_input("llama")
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)
    train_steps(model, "default", inputs)
    with torch.no_grad():
        assert not torch.allclose(model(**inputs).logits, base(**inputs).logits, atol=1e-4)


def test_hydra_counts_heads_and_router():
    model = get_sharelora_model(tiny_llama(), hydra_cfg())
    L, r, K, d = 3, 4, 3, 32
    # per module type: one shared A (r d_in), per layer K B heads (d_out K r) and a router (K d_in)
    q = r * d + L * (32 * K * r + K * d)
    v = r * d + L * (16 * K * r + K * d)
    assert model.parameter_report()["adapter_parameters"] == q + v


def test_hydra_top_k_mixes_the_chosen_heads_only():
    model = get_sharelora_model(tiny_llama(), hydra_cfg(router_top_k=1, init_lora_weights=False))
    layer = dict(model.sharelora_layers())["model.layers.0.self_attn.q_proj"]
    slot = layer.slots["default"]
    x = torch.randn(5, 32)
    bank = model.sharelora_bank
    (a, b), rk = slot.keys[0], slot.r_keys[0]
    w = torch.softmax(x @ bank[rk].T, -1)
    top = w.argmax(-1)
    u = x @ bank[a].T
    Bh = bank[b].view(32, 3, 4)
    want = torch.stack([Bh[:, top[i]] @ u[i] for i in range(5)]) * slot.scaling
    with torch.no_grad():
        torch.testing.assert_close(layer._hydra(slot, x), want, rtol=1e-5, atol=1e-6)


def test_hydra_merge_and_export_refuse_and_save_load_is_exact(tmp_path):
    model = get_sharelora_model(tiny_llama(), hydra_cfg(init_lora_weights=False)).eval()
    with pytest.raises(ShareLoraError, match="HydraLoRA"):
        model.merge()
    with pytest.raises(ShareLoraError, match="HydraLoRA"):
        model.export_peft(tmp_path / "peft")
    model.save_pretrained(tmp_path / "h")
    inputs = example_input("llama")
    again = ShareLoraModel.from_pretrained(tiny_llama(), tmp_path / "h")
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, again(**inputs).logits)


def test_hydra_needs_router_and_whole_modules():
    with pytest.raises(ShareLoraError, match="router=True"):
        ShareLoraConfig(heads=2)
    with pytest.raises(ShareLoraError, match="whole"):
        get_sharelora_model(tiny_gpt2(), ShareLoraConfig(heads=2, router=True, target_modules=["c_attn.q"]))


def test_hydra_adapter_in_a_mixed_batch():
    model = get_sharelora_model(tiny_llama(), hydra_cfg(init_lora_weights=False), adapter_name="hydra")
    model.add_adapter("plain", ShareLoraConfig(rank=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    model.eval()
    inputs = example_input("llama", batch=2)
    with torch.no_grad():
        mixed = model(**inputs, adapter_names=["hydra", "plain"]).logits
        for i, n in enumerate(["hydra", "plain"]):
            model.set_adapter(n)
            torch.testing.assert_close(mixed[i:i + 1], model(**{k: v[i:i + 1] for k, v in inputs.items()}).logits,
                                       **TOL)


# --- format ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_save_and_load_all_adapters_is_exact(arch, tmp_path):
    model = two_task_model(arch)
    model.save_pretrained(tmp_path / "multi")
    again = ShareLoraModel.from_pretrained(BUILD[arch](), tmp_path / "multi")
    assert again.adapter_names == ["sql", "chat"]
    inputs = example_input(arch, batch=2)
    with torch.no_grad():
        assert torch.equal(model(**inputs, adapter_names=["sql", "chat"]).logits,
                           again(**inputs, adapter_names=["sql", "chat"]).logits)


def test_each_task_shared_tensor_is_stored_once(tmp_path):
    from safetensors import safe_open

    model = two_task_model("bert", names=("a", "b", "c"))
    model.save_pretrained(tmp_path / "m")
    with safe_open(str(tmp_path / "m" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert sum(k.startswith("@default/") for k in keys) == 2
    lora = [k for k in keys if "modules_to_save" not in k]
    assert len(lora) == 2 + 3 * 2 * 3  # 2 shared A's + 3 tasks x 2 module types x 3 layers of B


def test_load_one_adapter_alone(tmp_path):
    model = two_task_model("bert")
    model.save_pretrained(tmp_path / "m")
    one = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "m", adapter_name="chat")
    assert one.adapter_names == ["chat"]
    inputs = example_input("bert")
    with torch.no_grad():
        model.set_adapter("chat")
        assert torch.equal(one(**inputs).logits, model(**inputs).logits)
    with pytest.raises(ShareLoraError, match="no adapter.*'nope'"):
        ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "m", adapter_name="nope")


def test_single_adapter_format_is_unchanged_for_one_default_adapter(tmp_path):
    model = get_sharelora_model(tiny_bert(), ShareLoraConfig(rank=4, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path / "one")
    from sharelora.method import checkpoint

    assert not checkpoint.is_multi_adapter(tmp_path / "one")
    again = ShareLoraModel.from_pretrained(tiny_bert(), tmp_path / "one", adapter_name="renamed")
    assert again.adapter_names == ["renamed"]


def test_load_adapter_adds_to_an_existing_model(tmp_path):
    model = two_task_model("llama")
    model.save_pretrained(tmp_path / "m", selected_adapters=["chat"])
    other = get_sharelora_model(tiny_llama(), cfg("llama"), adapter_name="sql")
    with torch.no_grad():
        other.sharelora_bank.update({k: v for k, v in model.sharelora_bank.items() if k.startswith("@")})
    assert other.load_adapter(tmp_path / "m") == ["chat"]
    inputs = example_input("llama")
    with torch.no_grad():
        model.set_adapter("chat")
        other.set_adapter("chat")
        assert torch.equal(model(**inputs).logits, other(**inputs).logits)


def test_delete_adapter_removes_its_tensors_and_keeps_the_group_tensor():
    model = two_task_model("bert")
    own = [bank_name(k) for k in model.plans["chat"].own_tensors()]
    model.delete_adapter("chat")
    assert model.adapter_names == ["sql"] and model.active_adapter == "sql"
    assert not any(k in model.sharelora_bank for k in own)
    assert all(bank_name(k) in model.sharelora_bank for k in model.plans["sql"].shared_tensors())
    assert "chat" not in model.base_model.classifier.modules_to_save
    with pytest.raises(ShareLoraError, match="only adapter"):
        model.delete_adapter("sql")


# --- PEFT ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["bert", "llama", "gpt2"])
def test_export_one_task_to_peft_is_exact(arch, tmp_path):
    from peft import PeftModel

    model = two_task_model(arch)
    model.export_peft(tmp_path / "chat", adapter_name="chat")
    peft_model = PeftModel.from_pretrained(BUILD[arch](), tmp_path / "chat").eval()
    inputs = example_input(arch)
    with torch.no_grad():
        model.set_adapter("chat")
        torch.testing.assert_close(peft_model(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_export_several_tasks_for_peft_load_adapter(tmp_path):
    from peft import PeftModel

    model = two_task_model("llama")
    model.export_peft(tmp_path / "all", adapter_name=["sql", "chat"])
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "all" / "sql", adapter_name="sql")
    peft_model.load_adapter(tmp_path / "all" / "chat", adapter_name="chat")
    peft_model.eval()
    inputs = example_input("llama")
    with torch.no_grad():
        for n in ("sql", "chat"):
            peft_model.set_adapter(n)
            model.set_adapter(n)
            torch.testing.assert_close(peft_model(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_from_peft_imports_several_adapters(tmp_path):
    from peft import LoraConfig, get_peft_model

    inputs = example_input("llama")
    want = {}
    for i, n in enumerate(("one", "two")):
        torch.manual_seed(i)
        pm = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        pm.save_pretrained(tmp_path / n)
        with torch.no_grad():
            want[n] = pm.eval()(**inputs).logits
    model = ShareLoraModel.from_peft(tiny_llama(), {n: tmp_path / n for n in want})
    assert model.adapter_names == ["one", "two"]
    with torch.no_grad():
        for n in want:
            model.set_adapter(n)
            torch.testing.assert_close(model(**inputs).logits, want[n], rtol=1e-5, atol=1e-5)


# --- compression ----------------------------------------------------------------------------------------
def _separate_loras(tmp_path, n=3):
    dirs = {}
    for i in range(n):
        m = get_sharelora_model(tiny_llama(), ShareLoraConfig(rank=2, share="none", target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
        perturb(m, "default", seed=100 + i)
        m.save_pretrained(tmp_path / f"t{i}")
        dirs[f"t{i}"] = tmp_path / f"t{i}"
    return dirs


@pytest.mark.parametrize("basis", ["update", "A"])
def test_compression_is_exact_when_the_rank_covers_the_stack(tmp_path, basis):
    from sharelora.method.compress import compress_adapters

    dirs = _separate_loras(tmp_path)
    # across layers: the stack of one module type holds 3 tasks x 3 layers x rank 2 = 18 rows <= d_in 32
    model, report = compress_adapters(tiny_llama(), dirs, rank=18, share="A", basis=basis)
    inputs = example_input("llama")
    for name, d in dirs.items():
        assert report["tasks"][name]["max_error"] < 1e-6
        ref = ShareLoraModel.from_pretrained(tiny_llama(), d)
        with torch.no_grad():
            model.set_adapter(name)
            torch.testing.assert_close(model(**inputs).logits, ref(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_compression_error_falls_with_rank_and_tasks_export_to_peft(tmp_path):
    from peft import PeftModel

    from sharelora.method.compress import compress_adapters

    dirs = _separate_loras(tmp_path)
    errors = []
    for k in (2, 6, 12):
        model, report = compress_adapters(tiny_llama(), dirs, rank=k, share="A")
        errors.append(max(t["mean_error"] for t in report["tasks"].values()))
        assert report["parameters"] == model.parameter_report()["adapter_parameters"]
    assert errors[0] > errors[1] > errors[2] > 0
    model.export_peft(tmp_path / "p", adapter_name="t1")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "p").eval()
    inputs = example_input("llama")
    with torch.no_grad():
        model.set_adapter("t1")
        torch.testing.assert_close(peft_model(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_compression_per_layer_and_shareab(tmp_path):
    from sharelora.method.compress import compress_adapters

    dirs = _separate_loras(tmp_path, n=2)
    model, report = compress_adapters(tiny_llama(), dirs, rank=4, share="A", across_layers=False)
    assert all(t["max_error"] < 1e-6 for t in report["tasks"].values())  # 2 tasks x rank 2 per module
    model, report = compress_adapters(tiny_llama(), dirs, rank=12, share="AB")
    assert all(0 < t["mean_error"] < 1 for t in report["tasks"].values())  # one B for 3 layers: lossy
    with pytest.raises(ShareLoraError, match="across_layers"):
        compress_adapters(tiny_llama(), dirs, rank=4, share="AB", across_layers=False)


def test_the_multi_task_example_runs():
    import subprocess
    import sys
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "examples" / "multi_task.py"
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "mixed-batch logits (4, 2)" in out.stdout and "exported topic to PEFT" in out.stdout
