"""`sharelora bench`: the correctness of what it compares (not its timings), on tiny configs."""

import json

import pytest
import torch

from sharelora.bench import BenchConfig, run_bench
from sharelora.cli.bench import main as bench_main
from sharelora.bench.measure import rotations
from sharelora.bench.methods import METHODS, AdapterSettings, FloorModel, prepare
from sharelora.bench.models import build_base, make_inputs, resolve_spec
from sharelora.bench.report import markdown

TINY = {
    "minilm": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=97,
                   max_position_embeddings=64),
    "smollm2": dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=48, vocab_size=97, max_position_embeddings=64),
}


def tiny(name):
    spec = resolve_spec(name, batch=2, seq=8, overrides=TINY[name])
    base, weights, _ = build_base(spec, "shape")
    return spec, base, make_inputs(spec, base.get_input_embeddings().num_embeddings)


@pytest.fixture(scope="module")
def tiny_results():
    cfg = BenchConfig(models=["minilm", "smollm2"], weights="shape", batch=2, seq=8, reps=2, warmup=1,
                      memory=False, threads=1, overrides={})
    results = {"models": []}
    for name in cfg.models:
        cfg.overrides = TINY[name]
        one = run_bench(BenchConfig(**{**cfg.__dict__, "models": [name]}), log=lambda _: None)
        results.setdefault("machine", one["machine"])
        results.setdefault("config", one["config"])
        results["models"] += one["models"]
    return results


def test_floor_has_exactly_one_trainable_scalar():
    spec, base, _ = tiny("minilm")
    p = prepare("floor", base, spec, AdapterSettings())
    trainable = [q for q in p.model.parameters() if q.requires_grad]
    assert len(trainable) == 1 and trainable[0].numel() == 1 and trainable[0].dim() == 0
    assert p.trainable == 1 == p.expected_trainable


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
def test_floor_backward_crosses_every_layer_down_to_layer_0(name):
    spec, base, batch = tiny(name)
    p = prepare("floor", base, spec, AdapterSettings())
    model: FloorModel = p.model
    layer0 = next(m for n, m in model.named_modules() if n.endswith("layers.0") or n.endswith("layer.0"))
    reached = []
    layer0.register_full_backward_hook(lambda m, gi, go: reached.append(True))
    p.loss(batch).backward()
    assert reached, "backward did not reach layer 0"
    assert model.scale.grad is not None and model.scale.grad.abs() > 0
    assert all(q.grad is None for q in model.base_model.parameters())  # no weight gradient is computed


@pytest.mark.parametrize("name", ["minilm", "smollm2"])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "floor"])
def test_trainable_parameters_are_what_the_plan_says(name, method):
    spec, base, _ = tiny(name)
    p = prepare(method, base, spec, AdapterSettings(rank=4))
    assert p.trainable == p.expected_trainable
    assert len({id(q) for q in p.params}) == len(p.params)  # the optimizer sees each tensor once
    assert sum(q.numel() for g in p.optimizer.param_groups for q in g["params"]) == p.trainable
    if method.startswith("sharelora"):
        assert p.expected_trainable == p.model.plan.num_parameters()


def test_methods_leave_the_shared_base_model_unchanged():
    spec, base, batch = tiny("minilm")
    before = {n: t.clone() for n, t in base.state_dict().items()}
    for m in METHODS:
        prepare(m, base, spec, AdapterSettings()).step(batch)
    assert type(base.bert.encoder.layer[0].attention.self.query) is torch.nn.Linear  # nothing injected into it
    for n, t in base.state_dict().items():
        torch.testing.assert_close(t, before[n], rtol=0, atol=0)


def test_tied_peft_lora_shares_one_A_per_module_type():
    spec, base, batch = tiny("minilm")
    p = prepare("peft-lora-tiedA", base, spec, AdapterSettings(rank=4))
    by_type = {}
    for name, module in p.model.named_modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            by_type.setdefault(name.rsplit(".", 1)[-1], []).append(module.lora_A["default"].weight)
    assert set(by_type) == set(spec.targets)
    for weights in by_type.values():
        assert len(weights) == 3 and all(w is weights[0] for w in weights)
    p.loss(batch).backward()
    assert all(w[0].grad is not None for w in by_type.values())
    # the optimizer sees it once
    assert sum(1 for q in p.params if any(q is w[0] for w in by_type.values())) == len(by_type)


def test_every_method_steps_on_the_same_inputs(tiny_results):
    for res in tiny_results["models"]:
        assert not res["errors"]
        assert {m["method"] for m in res["methods"]} == set(METHODS)
        assert all(m["inputs"] == [res["inputs"]] for m in res["methods"])


def test_interleaving_puts_every_method_in_every_position():
    orders = rotations(["a", "b", "c"], 3)
    assert orders == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]


def test_results_are_json_and_the_table_has_a_row_per_method(tiny_results):
    again = json.loads(json.dumps(tiny_results))
    from sharelora.method import cpu_kernel

    kernel = again["machine"]["cpu_dropout_kernel"]
    assert kernel == ("compiled kernel" if cpu_kernel.get() is not None else "torch operators (kernel not built)")
    assert f"CPU dropout mask: {kernel}" in markdown(tiny_results)
    for res in again["models"]:
        for row in res["methods"]:
            assert row["step_s"]["median"] > 0 and row["step_s"]["n"] == 2
            assert row["ratio_to_floor"]["n"] == 2
            if row["method"] == "floor":
                assert row["ratio_to_floor"]["median"] == 1.0
            if row["method"] in ("sharelora-A", "peft-lora"):
                assert row["inference"]["merged_ratio_to_base"]["median"] > 0
        shared = next(r for r in res["methods"] if r["method"] == "sharelora-A")
        peft = next(r for r in res["methods"] if r["method"] == "peft-lora")
        # optimizer state is proportional to the trainable count: AdamW keeps two moments per parameter
        assert shared["optimizer_state_bytes"] < peft["optimizer_state_bytes"]
        assert 2 * 4 * shared["trainable_parameters"] <= shared["optimizer_state_bytes"] < 2 * 4 * shared["trainable_parameters"] + 1024
        # the adapter file holds each tensor once: params x 4 bytes + a small header
        assert 0 < shared["adapter_file_bytes"] - shared["adapter_expected_bytes"] < 4096
    table = markdown(again)
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    header = lines[0].count("|")
    assert all(ln.count("|") == header for ln in lines)
    assert len(lines) == 2 * (2 + len(METHODS))  # header + rule + one row per method, per model


def test_memory_is_measured_in_a_fresh_process():
    from dataclasses import asdict

    from sharelora.bench.memory import measure_in_subprocess

    spec, _, _ = tiny("minilm")
    job = {"spec": spec.to_dict(), "method": "sharelora-A", "weights": "shape", "settings": asdict(AdapterSettings()),
           "steps": 1, "device": "cpu", "threads": 1, "seed": 0}
    out = measure_in_subprocess(job)
    assert "error" not in out, out
    assert out["peak_rss_bytes"] >= out["rss_after_build_bytes"] > 0


def test_command_line_writes_json_and_markdown(tmp_path, capsys):
    shape = ",".join(f"{k}={v}" for k, v in TINY["minilm"].items())
    code = bench_main(["--models", "minilm", "--weights", "shape", "--shape", shape, "--batch", "2", "--seq", "8",
                       "--methods", "floor,sharelora-A,peft-lora", "--reps", "2", "--warmup", "1", "--no-memory",
                       "--threads", "1", "--json", str(tmp_path / "b.json"), "--markdown", str(tmp_path / "b.md")])
    assert code == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["command"].startswith("sharelora bench --models minilm")
    assert data["machine"]["torch_threads"] == 1
    assert "| sharelora-A |" in (tmp_path / "b.md").read_text()
    assert "| peft-lora |" in capsys.readouterr().out


def test_any_model_directory_can_be_benchmarked_by_shape(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(**TINY["smollm2"], architectures=["LlamaForCausalLM"]).save_pretrained(tmp_path)
    spec = resolve_spec(str(tmp_path), targets=["q_proj", "v_proj"], batch=2, seq=8)
    assert spec.task == "causal-lm" and spec.qkv_targets == ("q_proj", "k_proj", "v_proj")
    base, weights, _ = build_base(spec, "shape")
    assert weights == "shape" and base.config.hidden_size == 32
    p = prepare("sharelora-A", base, spec, AdapterSettings(rank=2))
    p.step(make_inputs(spec, 97))
    assert p.trainable == p.expected_trainable


def test_block_microscope_compares_sharelora_with_the_frozen_block_on_the_same_weights(capsys):
    from sharelora.bench import block

    models = block.build(hidden=16, kv=8, blocks=2, rank=2, dropout=0.1)
    assert list(models) == ["floor", "sharelora-A p=0.1", "sharelora-A p=0"]
    floor = models["floor"]
    assert not any(p.requires_grad for p in floor.parameters())
    for name in ("sharelora-A p=0.1", "sharelora-A p=0"):
        adapted = models[name]
        # one A per module type (q, v) shared by both blocks, one B per module
        assert adapted.parameter_report()["trainable_parameters"] == 2 * 2 * 16 + 2 * (2 * 16 + 8 * 2)
        for i in range(2):
            for proj in ("q_proj", "k_proj", "v_proj"):
                base = getattr(floor.layers[i], proj).weight
                layer = getattr(adapted.base_model.layers[i], proj)
                assert torch.equal(getattr(layer, "base_layer", layer).weight, base)
    result = block.measure(models, tokens=3, reps=2, warmup=1)
    assert result["blocks"] == 2 and result["methods"]["floor"]["added_us_per_block"] == 0.0
    assert all(r["us_per_block"] > 0 for r in result["methods"].values())
    assert block.main(["--hidden", "16", "--kv", "8", "--tokens", "2", "--blocks", "1", "--reps", "1", "--rank", "2"]) == 0
    out = capsys.readouterr().out
    assert "| sharelora-A p=0.1 |" in out and json.loads(out.strip().splitlines()[-1])["tokens"] == 2
    with pytest.raises(SystemExit):
        block.main(["--tokens", "0"])
