"""Export to a standard PEFT LoRA directory that PEFT loads with identical logits, and import back."""

import copy
import json

import pytest
import torch

peft = pytest.importorskip("peft")
from safetensors import safe_open

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model

from conftest import BUILDERS, assert_close_fp32, example_input, run, tiny_bert, tiny_gpt2, tiny_llama

CASES = {
    "bert": (tiny_bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn.q", "c_attn.v"])),
    "llama": (tiny_llama, dict(target_modules=["q_proj", "k_proj", "v_proj"])),
}


def _train(model, arch):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    x = example_input(arch)
    opt.zero_grad()
    run(model, arch, x).square().mean().backward()
    opt.step()
    model.eval()


@pytest.mark.numerics
@pytest.mark.parametrize("arch", sorted(CASES))
@pytest.mark.parametrize("share,scope", [("none", "layers"), ("A", "layers"), ("AB", "layers"), ("A", "qkv")])
def test_peft_loads_the_export_with_identical_logits(arch, share, scope, tmp_path):
    build, kw = CASES[arch]
    if scope == "qkv" and arch == "gpt2":
        kw = dict(target_modules=["c_attn.q", "c_attn.k", "c_attn.v"])
    model = get_sharelora_model(build(), ShareLoraConfig(rank=4, alpha=8, share=share, scope=scope,
                                                         init_lora_weights=False, **kw))
    _train(model, arch)
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("base_model.model.") for k in keys)
    assert sum(k.endswith("lora_A.weight") for k in keys) == len(model.plan.targets_by_module())
    peft_model = peft.PeftModel.from_pretrained(build(), str(tmp_path)).eval()
    x = example_input(arch)
    with torch.no_grad():  # PEFT's ops vs ours (its own dropout / scaling / Conv1D transposes): other sum orders
        assert_close_fp32(run(peft_model, arch, x), run(model, arch, x))


def test_export_ranks_are_standard_for_serving(tmp_path):
    model = get_sharelora_model(tiny_gpt2(), ShareLoraConfig(rank=8, share="A", target_modules=["c_attn.q", "c_attn.v"]))
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["r"] == 16 and cfg["lora_alpha"] == 32 and cfg["fan_in_fan_out"] is True


@pytest.mark.numerics
@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_import_from_peft_gives_identical_logits(arch, tmp_path):
    build, kw = CASES[arch]
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=kw["target_modules"], init_lora_weights=False,
                           modules_to_save=kw.get("modules_to_save"))
    pm = peft.get_peft_model(build(), pcfg).eval()
    pm.save_pretrained(str(tmp_path))
    ours = ShareLoraModel.from_peft(build(), tmp_path)
    assert ours.sharelora_config.share == "none"
    x = example_input(arch)
    with torch.no_grad():
        assert_close_fp32(run(ours, arch, x), run(pm, arch, x))  # ours vs PEFT's ops, as above


def test_import_refuses_dora(tmp_path):
    from sharelora import ShareLoraError

    pm = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    pm.save_pretrained(str(tmp_path))
    with pytest.raises(ShareLoraError, match="use_dora"):
        ShareLoraModel.from_peft(tiny_llama(), tmp_path)


def test_disable_adapter_runs_the_original_head_as_peft_does():
    # PEFT's disable_adapter() runs ModulesToSaveWrapper's original module; ours must give the same outputs
    base = tiny_bert()
    x = example_input("bert")
    ours = get_sharelora_model(copy.deepcopy(base), ShareLoraConfig(rank=4, alpha=8, target_modules=["query", "value"],
                                                                    modules_to_save=["classifier"],
                                                                    init_lora_weights=False))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8,
                                                                       target_modules=["query", "value"],
                                                                       modules_to_save=["classifier"],
                                                                       init_lora_weights=False))
    with torch.no_grad():
        for head in (ours.base_model.classifier.modules_to_save["default"],
                     theirs.base_model.model.classifier.modules_to_save["default"]):
            for p in head.parameters():
                p.add_(1.0)  # a trained head: different from the base's
        ours.eval(), theirs.eval()
        with theirs.disable_adapter():
            peft_disabled = theirs(**x).logits
        with ours.disable_adapter():
            our_disabled = ours(**x).logits
        expected = base(**x).logits
    torch.testing.assert_close(peft_disabled, expected, rtol=0, atol=0)
    torch.testing.assert_close(our_disabled, peft_disabled, rtol=0, atol=0)
