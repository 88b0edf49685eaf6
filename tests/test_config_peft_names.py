"""ShareLoraConfig takes PEFT's argument names and PEFT LoraConfigs (issue 24: PEFT users type these)."""

import math

import pytest

from sharelora import ShareLoraConfig
from sharelora.method.errors import ShareLoraError


def test_peft_names_are_the_same_config_as_sharelora_names():
    peft_named = ShareLoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["query"])
    own = ShareLoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=["query"])
    assert peft_named == own
    assert (peft_named.r, peft_named.lora_alpha, peft_named.lora_dropout) == (4, 8, 0.1)


def test_peft_name_attributes_set_the_fields():
    cfg = ShareLoraConfig(target_modules=["query"])
    cfg.r, cfg.lora_alpha, cfg.lora_dropout = 2, 4.0, 0.2
    assert (cfg.rank, cfg.alpha, cfg.dropout) == (2, 4.0, 0.2)


def test_peft_named_config_round_trips_through_adapter_config_json(tmp_path):
    cfg = ShareLoraConfig(r=2, lora_alpha=6, share="AB", target_modules=["q_proj", "v_proj"])
    path = tmp_path / "adapter_config.json"
    path.write_text(cfg.to_json_string(), encoding="utf-8")
    assert ShareLoraConfig.from_json_file(path) == cfg


def test_json_with_peft_keys_is_read():
    cfg = ShareLoraConfig.from_dict({"r": 2, "lora_alpha": 4, "lora_dropout": 0.0, "target_modules": ["query"]})
    assert (cfg.rank, cfg.alpha) == (2, 4)


def test_both_names_with_different_values_are_refused():
    with pytest.raises(ShareLoraError, match="r=2 and rank=3 name the same setting"):
        ShareLoraConfig(r=2, rank=3)


def test_from_peft_lora_config_keeps_rank_scaling_dropout_and_targets():
    peft = pytest.importorskip("peft")
    lc = peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["v_proj", "q_proj"],
                         modules_to_save=["classifier"], layers_to_transform=[0, 1])
    cfg = ShareLoraConfig.from_peft(lc, share="A")
    assert (cfg.rank, cfg.alpha, cfg.dropout, cfg.share) == (16, 32.0, 0.05, "A")
    assert cfg.target_modules == ["q_proj", "v_proj"]
    assert cfg.modules_to_save == ["classifier"] and cfg.layers_to_transform == [0, 1]
    assert cfg.scaling == lc.lora_alpha / lc.r


def test_from_peft_rslora_keeps_the_update_scale():
    cfg = ShareLoraConfig.from_peft({"r": 16, "lora_alpha": 32, "use_rslora": True, "target_modules": ["q"]})
    assert math.isclose(cfg.scaling, 32 / math.sqrt(16))


def test_from_peft_refuses_what_sharelora_cannot_represent():
    base = {"r": 8, "lora_alpha": 16, "target_modules": ["q"]}
    for extra, name in [({"use_dora": True}, "use_dora"), ({"rank_pattern": {"q": 4}}, "rank_pattern"),
                        ({"bias": "all"}, "bias='all'"), ({"init_lora_weights": "pissa"}, "init_lora_weights")]:
        with pytest.raises(ShareLoraError, match=name):
            ShareLoraConfig.from_peft({**base, **extra})
    with pytest.raises(ShareLoraError, match="LoRA config"):
        ShareLoraConfig.from_peft({**base, "peft_type": "VERA"})
