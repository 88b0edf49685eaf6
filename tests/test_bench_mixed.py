"""`sharelora bench --section mixed`: the mixed-batch bench runs, checks what it times, and counts memory."""

import json

import pytest
import torch

from sharelora.cli.bench import main as bench_main
from sharelora.bench.mixed import MixedConfig, build_sharelora, check_mixed, markdown, round_robin, run_mixed
from sharelora.bench.models import build_base, make_inputs, resolve_spec

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            vocab_size=97, max_position_embeddings=64)


def tiny_config(**kw):
    kw = {"overrides": TINY, "batch": 4, "seq": 8, "adapters": (1, 2), "reps": 2, "warmup": 1, "threads": 1,
          "device": "cpu", **kw}
    return MixedConfig(**kw)


@pytest.fixture(scope="module")
def results():
    return run_mixed(tiny_config(), log=lambda _: None)


def test_rows_are_assigned_round_robin():
    assert round_robin(1, 3) == ["t0", "t0", "t0"]
    assert round_robin(2, 5) == ["t0", "t1", "t0", "t1", "t0"]


def test_every_count_of_adapters_is_checked_against_each_adapter_alone(results):
    assert [c["adapters"] for c in results["checks"]] == [1, 2]
    for c in results["checks"]:
        assert c["sharelora_max_rel_diff_to_alone"] < 1e-4 and c["peft_max_rel_diff_to_alone"] < 1e-4
        assert c["sharelora_vs_peft_max_rel_diff"] < 1e-4
    # with two adapters the rows really differ, so a wrongly routed row would be seen
    assert results["checks"][1]["sharelora_rel_diff_between_adapters"] > 1e-2


def test_every_variant_is_timed_interleaved_and_paired_to_its_own_single_adapter(results):
    variants = {r["variant"] for r in results["rows"]}
    assert variants == {f"{lib}/{v}" for lib in ("sharelora", "core", "peft") for v in ("single", "names", "mixed-2")}
    assert set(results["samples_s"]) == variants | {"base"}
    assert all(len(s) == 2 for s in results["samples_s"].values())
    single = next(r for r in results["rows"] if r["variant"] == "sharelora/single")
    assert single["ratio_to_single"]["median"] == 1.0


def test_memory_is_base_plus_n_own_plus_shared_once(results):
    mem = results["memory"]
    r, d, d_kv, layers = 8, TINY["hidden_size"], 16, TINY["num_hidden_layers"]  # GQA: v_proj is 32 -> 16
    assert mem["sharelora_shared_bytes"] == 4 * (r * d + r * d)  # one A per module type (q, v)
    assert mem["sharelora_own_bytes"] == 4 * layers * (d * r + d_kv * r)  # each layer's B_q, B_v
    assert mem["peft_own_bytes"] == 4 * layers * (2 * r * d + d * r + d_kv * r)
    two = mem["rows"][1]
    own, shared = mem["sharelora_own_bytes"], mem["sharelora_shared_bytes"]
    assert two["sharelora_total_bytes"] == mem["base_bytes"] + shared + 2 * own
    assert two["peft_total_bytes"] == mem["base_bytes"] + 2 * mem["peft_own_bytes"]
    # task cores: one A and one B per module type for every task; a task owns an r x r core per layer and module
    assert mem["core_shared_bytes"] == 4 * (r * d + d * r + r * d + d_kv * r)
    assert mem["core_own_bytes"] == 4 * layers * 2 * r * r
    assert two["core_total_bytes"] == mem["base_bytes"] + mem["core_shared_bytes"] + 2 * mem["core_own_bytes"]


def test_task_cores_are_checked_against_each_adapter_alone_and_timed(results):
    for c in results["checks"]:
        assert c["core_max_rel_diff_to_alone"] < 1e-4
    assert results["checks"][1]["core_rel_diff_between_adapters"] > 1e-2
    mixed = next(r for r in results["rows"] if r["variant"] == "core/mixed-2")
    assert mixed["ratio_to_peft"]["median"] > 0 and len(results["samples_s"]["core/mixed-2"]) == 2


def test_many_adapters_are_checked_on_an_even_spread_and_against_peft_on_every_row():
    from sharelora.bench.mixed import checked_adapters

    assert checked_adapters(5, 64) == [0, 1, 2, 3, 4]
    spread = checked_adapters(1024, 64)
    assert len(spread) == 64 and spread[0] == 0 and spread[-1] == 1023
    out = run_mixed(tiny_config(batch=8, adapters=(8,), libraries=("core", "core-diag", "peft"), check_limit=3),
                    log=lambda _: None)
    check = out["checks"][0]
    assert check["checked_alone"] == 3 and check["core_vs_peft_max_rel_diff"] < 1e-4
    assert check["core-diag_max_rel_diff_to_alone"] < 1e-4
    assert "adapters run alone: 3 of 8" in markdown(out) and "core's mixed output = PEFT's" in markdown(out)


def test_report_and_machine_are_recorded(results):
    assert results["machine"]["torch_threads"] == 1 and "peft" in results["machine"]
    table = markdown(results)
    assert "| sharelora | 2 | adapter_names round-robin over 2 |" in table and "| base | 0 |" in table


def test_a_wrong_mixed_output_is_caught():
    class Wrong(torch.nn.Module):  # routes every row to t0 whatever adapter_names says
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, adapter_names=None, **inputs):
            return self.model(**inputs)

        def set_adapter(self, name):
            self.model.set_adapter(name)

    spec = resolve_spec("smollm2", batch=4, seq=8, overrides=TINY)
    base, _, _ = build_base(spec, "shape")
    model = build_sharelora(base.eval(), spec.targets, tiny_config(), 2)
    inputs = {k: v for k, v in make_inputs(spec, 97).items() if k != "labels"}
    with pytest.raises(AssertionError, match="differ from that adapter alone"):
        check_mixed({"sharelora": Wrong(model)}, inputs, 2)


def test_command_line_section_mixed(tmp_path):
    shape = ",".join(f"{k}={v}" for k, v in TINY.items())
    code = bench_main(["--section", "mixed", "--shape", shape, "--batch", "2", "--seq", "4", "--adapters", "1,2",
                       "--reps", "1", "--warmup", "0", "--threads", "1", "--device", "cpu",
                       "--json", str(tmp_path / "m.json"), "--markdown", str(tmp_path / "m.md")])
    assert code == 0
    data = json.loads((tmp_path / "m.json").read_text())
    assert data["command"].startswith("sharelora bench --section mixed") and data["section"] == "mixed"
    assert "× one adapter (same library)" in (tmp_path / "m.md").read_text()


def test_more_adapters_than_rows_is_refused():
    with pytest.raises(ValueError, match="batch of at least"):
        tiny_config(adapters=(1, 8)).validate()
    with pytest.raises(ValueError, match="libraries must be some of"):
        tiny_config(libraries=("lora",)).validate()


def test_peft_is_run_only_up_to_its_cap_of_adapters():
    out = run_mixed(tiny_config(adapters=(1, 4), libraries=("core", "peft"), peft_max_adapters=2), log=lambda _: None)
    assert {r["variant"] for r in out["rows"] if r["library"] == "peft"} == {"peft/single", "peft/names"}
    assert "peft_max_rel_diff_to_alone" not in out["checks"][1] and "core_max_rel_diff_to_alone" in out["checks"][1]
    assert "holds 2 adapters" in out["peft_note"] and "holds 2 adapters" in markdown(out)
    assert out["memory"]["peft_held_bytes"] == 2 * out["memory"]["peft_own_bytes"]
