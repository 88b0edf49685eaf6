"""The sharing plan: which targets exist, which tensor each reads, and how many parameters that is."""

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraError, build_plan, get_sharelora_model

from conftest import BUILDERS, tiny_bert, tiny_gpt2, tiny_llama, tiny_plain


def spec_formula(share, L, shapes, r):
    """SPEC.md's parameter counts for module types with (d_in, d_out) adapted in L layers."""
    total = 0
    for d_in, d_out in shapes:
        total += {"none": L * r * (d_in + d_out), "A": r * d_in + L * r * d_out,
                  "B": L * r * d_in + r * d_out, "AB": r * (d_in + d_out)}[share]
    return total


@pytest.mark.parametrize("share,expected", [("none", 294_912), ("A", 159_744), ("B", 159_744), ("AB", 24_576)])
def test_roberta_base_counts_match_the_paper(share, expected):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    with torch.device("meta"):
        model = RobertaForSequenceClassification(RobertaConfig())
    plan = build_plan(model, ShareLoraConfig(rank=8, share=share, target_modules=["query", "value"]))
    assert plan.num_parameters() == expected
    assert plan.lora_equivalent() == 294_912


def test_roberta_large_counts():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    with torch.device("meta"):
        model = RobertaForSequenceClassification(RobertaConfig(hidden_size=1024, num_hidden_layers=24,
                                                               num_attention_heads=16, intermediate_size=4096))
    counts = {s: build_plan(model, ShareLoraConfig(rank=8, share=s, target_modules=["query", "value"])).num_parameters()
              for s in ("none", "A", "AB")}
    assert counts == {"none": 786_432, "A": 409_600, "AB": 32_768}


@pytest.mark.parametrize("share", ["none", "A", "B", "AB"])
def test_llama_gqa_counts_follow_formula(share):
    plan = build_plan(tiny_llama(), ShareLoraConfig(rank=4, share=share, target_modules=["q_proj", "k_proj", "v_proj"]))
    assert plan.num_parameters() == spec_formula(share, 3, [(32, 32), (32, 16), (32, 16)], 4)


@pytest.mark.parametrize("share", ["none", "A", "B", "AB"])
def test_gpt2_fused_slices_counts_follow_formula(share):
    plan = build_plan(tiny_gpt2(), ShareLoraConfig(rank=4, share=share, target_modules=["c_attn.q", "c_attn.v"]))
    assert plan.num_parameters() == spec_formula(share, 3, [(32, 32), (32, 32)], 4)
    assert {t.slice_name for t in plan.targets} == {"q", "v"}
    assert sorted({t.out_start for t in plan.targets}) == [0, 64]


def test_share_a_uses_one_a_per_module_type():
    plan = build_plan(tiny_bert(), ShareLoraConfig(rank=4, share="A", target_modules=["query", "value"]))
    a_keys = {t.a_key for t in plan.targets}
    assert a_keys == {"bert.encoder.layer.*.attention.self.query.lora_A", "bert.encoder.layer.*.attention.self.value.lora_A"}
    assert len({t.b_key for t in plan.targets}) == 6
    assert plan.tensors["bert.encoder.layer.*.attention.self.query.lora_A"].users == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(3)]


def test_qkv_scope_shares_one_a_across_q_k_v_of_all_layers():
    plan = build_plan(tiny_llama(), ShareLoraConfig(rank=4, share="A", scope="qkv",
                                                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    a_keys = {t.a_key for t in plan.targets if not t.name.endswith("o_proj")}
    assert a_keys == {"model.layers.*.self_attn.{k_proj,q_proj,v_proj}.lora_A"}
    # o_proj reads the attention output, not x: it keeps a per-type A
    assert {t.a_key for t in plan.targets if t.name.endswith("o_proj")} == {"model.layers.*.self_attn.o_proj.lora_A"}


def test_qkv_share_b_across_gqa_shapes_is_an_error_naming_modules_and_shapes():
    with pytest.raises(ShareLoraError) as e:
        build_plan(tiny_llama(), ShareLoraConfig(rank=4, share="B", scope="qkv", target_modules=["q_proj", "k_proj"]))
    msg = str(e.value)
    assert "d_out" in msg and "q_proj 32->32" in msg and "k_proj 32->16" in msg


def test_layers_scope_splits_a_type_whose_layers_differ_in_shape():
    model = tiny_plain()
    model[1].q = torch.nn.Linear(16, 8)  # layer 1's q maps 16 -> 8
    model[1].v = torch.nn.Linear(8, 16)
    plan = build_plan(model, ShareLoraConfig(rank=2, share="B", target_modules=["q"]))
    assert sorted(plan.tensors[k].shape for k in {t.b_key for t in plan.targets}) == [(8, 2), (16, 2)]


def test_share_block_size_shares_within_blocks_of_consecutive_layers():
    model = tiny_bert(layers=4)
    plan = build_plan(model, ShareLoraConfig(rank=2, share="A", target_modules=["query"], share_block_size=2))
    assert sorted({t.a_key for t in plan.targets}) == [
        "bert.encoder.layer.0-1.attention.self.query.lora_A", "bert.encoder.layer.2-3.attention.self.query.lora_A"]


def test_layers_to_transform_restricts_targets():
    plan = build_plan(tiny_bert(), ShareLoraConfig(rank=2, target_modules=["query"], layers_to_transform=[0, 2]))
    assert [t.layer for t in plan.targets] == [0, 2]


def test_regex_targets_full_match_module_paths():
    plan = build_plan(tiny_bert(), ShareLoraConfig(rank=2, target_modules=r".*layer\.[01]\.attention\.self\.(query|key)"))
    assert len(plan.targets) == 4


def test_all_linear_excludes_output_head_and_modules_to_save():
    names = {t.module_name for t in build_plan(tiny_llama(), ShareLoraConfig(rank=2, target_modules="all-linear")).targets}
    assert "lm_head" not in names and len(names) == 3 * 7
    bert = {t.module_name for t in build_plan(tiny_bert(), ShareLoraConfig(
        rank=2, target_modules="all-linear", modules_to_save=["classifier"])).targets}
    assert "classifier" not in bert and "bert.pooler.dense" in bert


def test_unknown_target_error_lists_adaptable_modules():
    with pytest.raises(ShareLoraError, match=r"\['q_proj'\] matched no linear module.*query, value"):
        build_plan(tiny_bert(), ShareLoraConfig(target_modules=["q_proj"]))


def test_partly_unknown_targets_are_an_error_too():
    with pytest.raises(ShareLoraError, match=r"\['qproj'\] matched no linear module"):
        build_plan(tiny_bert(), ShareLoraConfig(target_modules=["query", "qproj"]))


def test_targeting_a_fused_module_whole_and_by_slice_is_an_error():
    with pytest.raises(ShareLoraError, match="both whole and by slices"):
        build_plan(tiny_gpt2(), ShareLoraConfig(target_modules=["c_attn", "c_attn.q"]))


def test_plain_sequential_of_linears_shares_across_positions():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    plan = build_plan(model, ShareLoraConfig(rank=2, share="A", target_modules=r"\d+"))
    assert len({t.a_key for t in plan.targets}) == 1 and len(plan.targets) == 2


@pytest.mark.parametrize("bad", [dict(rank=0), dict(share="C"), dict(scope="heads"), dict(dropout=1.0),
                                 dict(target_modules=[]), dict(share_block_size=0)])
def test_config_rejects_bad_values_with_a_clear_error(bad):
    with pytest.raises(ShareLoraError):
        ShareLoraConfig(**bad)


def test_config_round_trips_through_json(tmp_path):
    cfg = ShareLoraConfig(rank=4, alpha=8, dropout=0.1, share="AB", scope="qkv", target_modules=["q_proj"],
                          modules_to_save=["score"], layers_to_transform=[0, 1], share_block_size=2)
    (tmp_path / "c.json").write_text(cfg.to_json_string())
    assert ShareLoraConfig.from_json_file(tmp_path / "c.json") == cfg


def test_every_architecture_builds_a_plan(arch):
    build, targets = BUILDERS[arch]
    model = get_sharelora_model(build(), ShareLoraConfig(rank=2, share="A", target_modules=targets))
    assert model.parameter_report()["adapter_parameters"] == model.plan.num_parameters()
