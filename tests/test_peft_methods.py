"""PEFT's VeRA / VB-LoRA as compare methods, and per-method settings in --methods (tiny BERT, seconds)."""

import json

import pytest
import torch
from training_tiny import tiny_bundle, tiny_data

from sharelora.training import TrainConfig, train
from sharelora.training.methods import MethodSpec, parse_methods

# tiny BERT: 2 layers, hidden 32; targets query, value: 4 maps 32 -> 32; head: classifier 32 -> 2
LAYERS, HIDDEN, TARGETS, HEAD = 2, 32, 4, 32 * 2 + 2


def config(tmp_path, name, **kw):
    values = dict(model="tiny-bert", dataset="tiny", epochs=1, max_steps=3, batch_size=8, log_every=1,
                  checkpoint_every=2, output_dir=str(tmp_path / name))
    values.update(kw)
    return TrainConfig(**values)


def peft_trainable(cfg, bundle):
    """PEFT's own count (get_nb_trainable_parameters, head included) for cfg on a fresh tiny model."""
    from sharelora.training.methods import prepare_model

    model = prepare_model(bundle.model, cfg.resolved())
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("method,options,adapter", [
    # VeRA: per target lambda_d (r) + lambda_b (d_out)
    ("peft-vera", {}, TARGETS * (16 + HIDDEN)),
    # VB-LoRA: bank num_vectors * L + per target logits r * num_vectors * (d_in + d_out) / L
    ("peft-vblora", {"num_vectors": 8, "vector_length": 16}, 8 * 16 + TARGETS * 2 * 8 * (HIDDEN + HIDDEN) // 16),
])
def test_a_peft_method_trains_and_counts_its_parameters(tmp_path, method, options, adapter):
    rank = 16 if method == "peft-vera" else 2
    cfg = config(tmp_path, method, method=method, rank=rank, method_options=options, lr=1e-2)
    results = train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)
    p = results["parameters"]
    assert p["adapter"] == adapter  # the hand formula
    assert p["head"] == HEAD and p["trainable"] == adapter + HEAD
    assert p["trainable"] == peft_trainable(cfg, tiny_bundle(tmp_path))  # PEFT's own count
    out = tmp_path / method
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert results["adapter_bytes"] > 4 * adapter  # fp32 weights (VeRA: plus its saved projections)
    assert results["steps"] == 3 and results["train_time_s"] > 0 and results["peak_rss_mb"] > 0
    assert json.loads((out / "results.json").read_text())["method"] == method
    # the head trained (PEFT's modules_to_save copy) and the adapter moved off its start
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in saved)
    if method == "peft-vera":
        assert any(k.endswith("vera_lambda_b") or "vera_lambda_b" in k for k in saved)
        b = [v for k, v in saved.items() if "vera_lambda_b" in k][0]
        assert (b - 1.0).abs().max() > 0  # lambda_b starts at ones


def test_peft_methods_use_peft_defaults_unless_given():
    lora, vera, vblora = parse_methods("lora,peft-vera,peft-vblora@num_vectors=64")
    base = TrainConfig(rank=8)
    assert lora.apply(base).rank == 8
    assert vera.apply(base).rank == 256 and vera.apply(base).method_options == {}
    cfg = vblora.apply(base)
    assert cfg.rank == 4 and cfg.method_options == {"num_vectors": 64}


def test_vblora_vector_length_that_does_not_divide_names_one_that_does(tmp_path):
    cfg = config(tmp_path, "bad", method="peft-vblora", rank=2)  # PEFT's default vector_length 256 vs hidden 32
    with pytest.raises(ValueError, match=r"vector_length 256 does not divide.*peft-vblora@vector_length=32"):
        train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)


def test_parse_methods_settings_labels_and_dirs():
    specs = parse_methods("lora@r=2,lora@r=8,sharea@r=16,lr=0.004,peft-vblora@r=4,num_vectors=256,vector_length=128,full")
    assert [s.label for s in specs] == ["lora@r=2", "lora@r=8", "sharea@r=16,lr=0.004",
                                        "peft-vblora@r=4,num_vectors=256,vector_length=128", "full"]
    assert specs[0].dirname == "lora-r2" and specs[-1].dirname == "full"
    cfg = specs[2].apply(TrainConfig(), full_lr=1e-4)
    assert (cfg.method, cfg.rank, cfg.lr) == ("sharea", 16, 0.004)
    assert specs[-1].apply(TrainConfig(), full_lr=1e-4).lr == 1e-4
    assert parse_methods(["lora", "peft-vera@r=1024"]) == [MethodSpec("lora"), MethodSpec("peft-vera", (("r", 1024),))]


@pytest.mark.parametrize("text,message", [
    ("lora,shareq", "unknown method(s) shareq"),
    ("lora@q=2", "lora has no setting 'q'; its settings are r, alpha, dropout, lr"),
    ("peft-vera@alpha=16", "peft-vera has no setting 'alpha'"),
    ("lora@r=two", "r must be an integer; e.g. lora@r=8"),
    ("lora@r=0", "r must be > 0"),
    ("lora@dropout=1.5", "dropout must be in [0, 1)"),
    ("lora@r=2,r=4", "sets r twice"),
    ("lora@r=2,sharea,lora@r=2", "lists lora@r=2 twice"),
    ("r=2,lora", "follows no method@setting"),
    ("lora@", "nothing after '@'"),
    ("full@r=8", "full has no setting 'r'; its settings are lr"),
])
def test_parse_methods_errors_name_the_fix(text, message):
    with pytest.raises(ValueError) as e:
        parse_methods(text)
    assert message in str(e.value)


def test_method_options_are_validated_before_the_model_is_wrapped(tmp_path):
    from sharelora.training.methods import prepare_model

    for cfg, message in ((TrainConfig(method="peft-vera", method_options={"num_vectors": 4}), "peft-vera has no option"),
                         (TrainConfig(method="lora", method_options={"num_vectors": 4}), "lora has no option"),
                         (TrainConfig(method="peft-vblora", method_options={"num_vectors": 8, "topk": 9}),
                          "topk 9 exceeds num_vectors 8")):
        with pytest.raises(ValueError, match=message):
            prepare_model(tiny_bundle(tmp_path).model, cfg.resolved())


def test_compare_makes_one_row_per_method_and_setting(tmp_path):
    from sharelora.training import compare as compare_mod

    calls = []

    def fake_run_one(cfg, isolate=True, progress=False, threads=None):
        calls.append((cfg.method, cfg.rank, cfg.seed, cfg.output_dir))
        return train(cfg, bundle=tiny_bundle(tmp_path, seed=cfg.seed), data=tiny_data(), progress=False, resume=True)

    base = config(tmp_path, "unused", max_steps=2)
    methods = "lora@r=2,lora@r=4,shareab@r=8,peft-vera@r=16,peft-vblora@r=2,vector_length=16,num_vectors=8"
    original = compare_mod.run_one
    compare_mod.run_one = fake_run_one
    try:
        summary = compare_mod.compare(base, parse_methods(methods), [0, 1], tmp_path / "cmp", command="test")
    finally:
        compare_mod.run_one = original
    assert calls[0][:3] == ("lora", 2, 0) and calls[1][:3] == ("lora", 4, 0) and calls[3][:3] == ("peft-vera", 16, 0)
    assert calls[0][3].endswith("cmp/lora-r2-s0") and len(calls) == 10
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["lora@r=2", "lora@r=4", "shareab@r=8", "peft-vera@r=16",
                          "peft-vblora@r=2,vector_length=16,num_vectors=8"]
    assert rows["lora@r=2"]["adapter_params"] == 2 * TARGETS * 2 * HIDDEN
    assert rows["lora@r=4"]["adapter_params"] == 2 * rows["lora@r=2"]["adapter_params"]
    assert rows["lora@r=4"]["fraction_of_lora"] == 1.0  # of LoRA at its own rank
    assert rows["shareab@r=8"]["fraction_of_lora"] == pytest.approx(2 * 2 * 8 * HIDDEN / (8 * TARGETS * 2 * HIDDEN))
    assert rows["peft-vera@r=16"]["adapter_params"] == TARGETS * (16 + HIDDEN)
    assert rows["peft-vera@r=16"]["fraction_of_lora"] is None and rows["peft-vera@r=16"]["base_method"] == "peft-vera"
    for r in rows.values():
        assert len(r["test_values"]) == 2 and r["adapter_bytes"] > 0 and r["peak_rss_mb"] > 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| peft-vera@r=16 |" in table and "| lora@r=2 |" in table
    # a rerun reads the finished runs back
    compare_mod.run_one = fake_run_one
    try:
        again = compare_mod.compare(base, methods, [0, 1], tmp_path / "cmp", command="test")
    finally:
        compare_mod.run_one = original
    assert [r["test_mean"] for r in again["rows"]] == [r["test_mean"] for r in summary["rows"]]


def test_cli_compare_rejects_a_bad_setting(capsys, tmp_path):
    from sharelora.cli import main

    assert main(["compare", "--methods", "lora@r=2,peft-vera@num_vectors=3", "--output-dir", str(tmp_path)]) == 2
    assert "peft-vera has no setting 'num_vectors'" in capsys.readouterr().err


def test_a_peft_run_reloads_with_its_dev_metrics(tmp_path, monkeypatch):
    from sharelora.tasks import ClassificationTask
    from sharelora.training import evaluate
    from sharelora.training.evaluate import load_trained_model

    cfg = config(tmp_path, "vera", method="peft-vera", rank=16, lr=1e-2)
    results = train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)
    bundle = tiny_bundle(tmp_path)
    torch.nn.init.normal_(bundle.model.classifier.weight, std=1.0)  # the trained head must come from the adapter
    monkeypatch.setattr("sharelora.sources.load_model", lambda *a, **k: bundle)
    model, _, info = load_trained_model(tmp_path / "vera")
    task = ClassificationTask(tiny_data(), bundle.tokenizer, max_length=64)
    dev = evaluate(model, task, task.encode("dev"))
    assert info["method"] == "peft-vera"
    assert dev["loss"] == pytest.approx(results["dev"]["loss"], rel=1e-5)


def test_merge_folds_a_peft_run_and_export_peft_says_it_is_peft_already(tmp_path, monkeypatch, capsys):
    from transformers import AutoModelForSequenceClassification

    from sharelora.cli import main
    from sharelora.training.evaluate import load_trained_model

    cfg = config(tmp_path, "vera", method="peft-vera", rank=16, lr=1e-2)
    train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)
    monkeypatch.setattr("sharelora.sources.load_model", lambda *a, **k: tiny_bundle(tmp_path))
    assert main(["export-peft", str(tmp_path / "vera"), str(tmp_path / "peft")]) == 2
    assert "already a PEFT directory" in capsys.readouterr().err
    assert main(["merge", str(tmp_path / "vera"), str(tmp_path / "merged")]) == 0
    unmerged, _, _ = load_trained_model(tmp_path / "vera")
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    with torch.no_grad():
        want = unmerged(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5), (got, want)


def test_compare_threads_reach_every_isolated_run(tmp_path, monkeypatch):
    from sharelora.training import compare as compare_module

    seen = []

    class Stop(Exception):
        pass

    def fake_run_one(cfg, isolate=True, progress=False, threads=None):
        seen.append(threads)
        raise Stop

    monkeypatch.setattr(compare_module, "run_one", fake_run_one)
    with pytest.raises(Stop):
        compare_module.compare(config(tmp_path, "c"), ["lora"], [0], tmp_path / "c", threads=1)
    with pytest.raises(Stop):
        compare_module.compare(config(tmp_path, "d"), ["lora"], [0], tmp_path / "d", jobs=2)
    assert seen == [1, max(1, (__import__("os").cpu_count() or 1) // 2)]
    with pytest.raises(ValueError, match="--in-process"):
        compare_module.compare(config(tmp_path, "e"), ["lora"], [0], tmp_path / "e", threads=1, isolate=False)
