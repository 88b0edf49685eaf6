"""The training loop on a tiny random BERT: outputs, determinism, resume and error paths."""

import json

import pytest
import torch
from safetensors.torch import load_file
from conftest import assert_close_after_adamw, assert_close_fp32
from training_tiny import tiny_bundle, tiny_data

from sharelora import ShareLoraModel
from sharelora.training import RunExistsError, TrainConfig, evaluate, train
from sharelora.training.loop import epoch_order, lr_at


def config(tmp_path, name="run", **kw):
    values = dict(model="tiny-bert", dataset="tiny", method="sharea", epochs=2, batch_size=8, log_every=2,
                  checkpoint_every=4, output_dir=str(tmp_path / name))
    values.update(kw)
    return TrainConfig(**values)


def run(tmp_path, name="run", **kw):
    return train(config(tmp_path, name, **kw), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)


def adapter_tensors(tmp_path, name):
    return load_file(tmp_path / name / "adapter" / "adapter_model.safetensors")


def train_losses(tmp_path, name):
    lines = (tmp_path / name / "log.jsonl").read_text().splitlines()
    return [(r["kind"], r["step"], r["loss"]) for r in map(json.loads, lines)]


def test_a_run_writes_results_log_plot_and_adapter(tmp_path):
    results = run(tmp_path)
    out = tmp_path / "run"
    for name in ("results.json", "log.jsonl", "curves.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/run_info.json"):
        assert (out / name).is_file(), name
    assert not (out / "state").exists()  # the resume checkpoint is removed once the run finished
    saved = json.loads((out / "results.json").read_text())
    assert saved["status"] == "finished" and saved["steps"] == 2 * 6
    assert saved["parameters"]["adapter"] == results["parameters"]["report"]["adapter_parameters"]
    assert saved["parameters"]["trainable"] > saved["parameters"]["adapter"]  # the head is trained too
    assert 0.0 <= saved["test"]["accuracy"] <= 1.0 and saved["peak_rss_mb"] > 0 and saved["train_time_s"] > 0
    kinds = [json.loads(line)["kind"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert kinds.count("eval") == 2 and kinds.count("test") == 1


def test_saved_adapter_reproduces_the_best_dev_metrics(tmp_path):
    from sharelora.tasks import ClassificationTask

    results = run(tmp_path)
    bundle = tiny_bundle(tmp_path)
    torch.nn.init.normal_(bundle.model.classifier.weight, std=1.0)  # the trained head must come from the adapter
    model = ShareLoraModel.from_pretrained(bundle.model, tmp_path / "run" / "adapter")
    task = ClassificationTask(tiny_data(), bundle.tokenizer, max_length=64)
    dev = evaluate(model, task, task.encode("dev"))
    assert dev["accuracy"] == results["dev"]["accuracy"]
    assert dev["loss"] == results["dev"]["loss"]  # the same ops on the saved weights: equal, not close


def test_training_changes_the_adapter(tmp_path):
    run(tmp_path)
    b = [t for k, t in adapter_tensors(tmp_path, "run").items() if "lora_B" in k]
    assert b and all(t.abs().sum() > 0 for t in b)  # B starts at zero


def test_same_seed_gives_identical_weights(tmp_path):
    run(tmp_path, "a")
    run(tmp_path, "b")
    a, b = adapter_tensors(tmp_path, "a"), adapter_tensors(tmp_path, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_after_a_stop_equals_the_uninterrupted_run(tmp_path):
    full = run(tmp_path, "a")
    stopped = train(config(tmp_path, "b"), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False,
                    on_step=lambda step: step == 5)
    assert stopped["status"] == "interrupted" and stopped["step"] == 5
    resumed = train(config(tmp_path, "b"), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False, resume=True)
    assert resumed["resumed"] == 1
    assert resumed["dev"] == full["dev"] and resumed["test"] == full["test"]
    a, b = adapter_tensors(tmp_path, "a"), adapter_tensors(tmp_path, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path, "a") == train_losses(tmp_path, "b")


def test_resume_after_a_kill_repeats_the_steps_since_the_last_checkpoint_identically(tmp_path):
    class Killed(Exception):
        pass

    def kill(step):
        if step == 7:  # checkpoints were written at step 4 and 6 (epoch end)
            raise Killed

    full = run(tmp_path, "a", grad_accum=2)
    with pytest.raises(Killed):
        train(config(tmp_path, "b", grad_accum=2), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False,
              on_step=kill)
    resumed = train(config(tmp_path, "b", grad_accum=2), bundle=tiny_bundle(tmp_path), data=tiny_data(),
                    progress=False, resume=True)
    assert resumed["test"] == full["test"]
    a, b = adapter_tensors(tmp_path, "a"), adapter_tensors(tmp_path, "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert train_losses(tmp_path, "a") == train_losses(tmp_path, "b")  # no duplicated records


def test_resume_with_other_settings_is_refused(tmp_path):
    train(config(tmp_path), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False, on_step=lambda s: s == 3)
    with pytest.raises(ValueError, match=r"different settings \['lr'\]"):
        train(config(tmp_path, lr=1e-2), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False, resume=True)


def test_existing_run_needs_resume_or_overwrite(tmp_path):
    run(tmp_path)
    with pytest.raises(RunExistsError, match="--resume .* --overwrite"):
        run(tmp_path)
    again = train(config(tmp_path), bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False, resume=True)
    assert again["status"] == "finished"  # a finished run is read back


def test_full_fine_tuning_trains_every_weight_and_saves_a_model(tmp_path):
    results = run(tmp_path, method="full", lr=1e-3)
    p = results["parameters"]
    assert p["trainable"] == p["total"] == p["adapter"]
    assert (tmp_path / "run" / "adapter" / "config.json").is_file()
    assert (tmp_path / "run" / "adapter" / "tokenizer.json").is_file()


@pytest.mark.parametrize("method, share", [("lora", "none"), ("shareb", "B"), ("shareab", "AB")])
def test_methods_map_to_their_sharing(tmp_path, method, share):
    results = run(tmp_path, method=method, epochs=1, max_steps=2)
    assert results["parameters"]["report"]["share"] == share


def test_sharea_qkv_shares_one_a_across_query_key_value(tmp_path):
    results = run(tmp_path, method="sharea-qkv", epochs=1, max_steps=2)
    report = results["parameters"]["report"]
    assert report["scope"] == "qkv" and report["targets"] == 3 * 2  # 2 layers x (q, k, v)
    assert results["config"]["targets"] == ["query", "key", "value"]


@pytest.mark.numerics
def test_grad_accumulation_matches_one_big_batch(tmp_path):
    kw = dict(dropout=0.0, epochs=1)
    bundle_a, bundle_b = tiny_bundle(tmp_path), tiny_bundle(tmp_path)
    for bundle in (bundle_a, bundle_b):
        bundle.model.config.hidden_dropout_prob = 0.0
        for m in bundle.model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    one = train(config(tmp_path, "a", **kw), bundle=bundle_a, data=tiny_data(), progress=False)
    train(config(tmp_path, "b", grad_accum=4, **kw), bundle=bundle_b, data=tiny_data(), progress=False)
    a, b = adapter_tensors(tmp_path, "a"), adapter_tensors(tmp_path, "b")
    assert_close_after_adamw(b, a, lr=one["config"]["lr"], steps=one["steps"])  # 4 sums vs 1: rounding


def test_unknown_method_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'loraa'; choose one of full, lora, sharea"):
        run(tmp_path, method="loraa")


def test_target_that_matches_nothing_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="q_proj"):
        run(tmp_path, targets=["q_proj"])


def test_batch_size_must_divide_into_micro_batches(tmp_path):
    with pytest.raises(ValueError, match="multiple of 3"):
        run(tmp_path, batch_size=8, grad_accum=3)


def test_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, 1.0, warmup_steps=2, total_steps=10) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0] and lrs[-1] == pytest.approx(1 / 8)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(20, 0, 1) == epoch_order(20, 0, 1)
    assert epoch_order(20, 0, 1) != epoch_order(20, 0, 2)
    assert sorted(epoch_order(20, 3, 0)) == list(range(20))


def test_compare_writes_a_table_with_every_method(tmp_path):
    from sharelora.training import compare as compare_mod

    calls = []

    def fake_run_one(cfg, isolate=True, progress=False, threads=None):
        calls.append((cfg.method, cfg.seed, cfg.lr))
        return train(cfg, bundle=tiny_bundle(tmp_path, seed=cfg.seed), data=tiny_data(), progress=False, resume=True)

    base = config(tmp_path, epochs=1, max_steps=2)
    original = compare_mod.run_one
    compare_mod.run_one = fake_run_one
    try:
        summary = compare_mod.compare(base, ["full", "lora", "sharea"], [0, 1], tmp_path / "cmp", full_lr=1e-4,
                                      command="sharelora compare ...")
    finally:
        compare_mod.run_one = original
    # seed-major: a comparison stopped early has the same seeds for every method
    assert [(m, s) for m, s, _ in calls] == [("full", 0), ("lora", 0), ("sharea", 0), ("full", 1), ("lora", 1), ("sharea", 1)]
    assert calls[0][2] == 1e-4 and calls[1][2] is None  # full FT gets its own learning rate
    assert [r["method"] for r in summary["runs"]] == ["full", "full", "lora", "lora", "sharea", "sharea"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["lora"]["fraction_of_lora"] == 1.0 and rows["sharea"]["fraction_of_lora"] < 1.0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| sharea |" in table and "±" in table
    assert (tmp_path / "cmp" / "compare.png").is_file() and (tmp_path / "cmp" / "compare.json").is_file()


@pytest.mark.numerics
def test_training_optimizer_is_fused_adamw_and_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    from sharelora.training.optim import adamw

    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = adamw([p], lr=0.1)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    reference = torch.optim.AdamW([q := torch.nn.Parameter(p.detach().clone())], lr=0.1)
    for o, t in ((opt, p), (reference, q)):
        t.grad = torch.ones_like(t)
        o.step()
    # the same update as the default implementation: one AdamW formula, its operations in another order
    # (the fused kernel's vectorised loop); no sums, so k = 1
    assert_close_fp32(p.detach(), q.detach(), k=1)
    assert not adamw([p], lr=0.1, foreach=True).defaults["fused"]  # the caller's choice is kept

    class NoFused(torch.optim.AdamW):  # what torch does for a device without the fused kernel
        def __init__(self, params, fused=None, **kw):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
            super().__init__(params, fused=fused, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    assert not adamw([p], lr=0.1).defaults["fused"]


def test_every_sharelora_option_reaches_the_adapter_from_the_command_line(tmp_path):
    from sharelora.cli import build_parser, config_from_args

    regex = r".*attention\.self\.(query|value)"
    args = build_parser().parse_args([
        "train", "--method", "sharea", "--share", "B", "--scope", "layers", "--share-block-size", "1",
        "--layers-to-transform", "1", "--dropout-mask", "module", "--target-modules", regex,
        "--method-option", "adapter_dtype=float64", "--epochs", "1", "--output-dir", str(tmp_path / "run")])
    cfg = config_from_args(args)
    assert cfg.targets == regex and cfg.method_options == {
        "share": "B", "scope": "layers", "share_block_size": 1, "layers_to_transform": [1], "dropout_mask": "module",
        "adapter_dtype": "float64"}
    assert "-share_block_size1" in cfg.name and "-layers_to_transform1" in cfg.name  # its own run directory
    train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(), progress=False)
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert {k: saved[k] for k in ("share", "share_block_size", "layers_to_transform", "dropout_mask", "target_modules",
                                  "adapter_dtype")} == {"share": "B", "share_block_size": 1, "layers_to_transform": [1],
                                                        "dropout_mask": "module", "target_modules": regex,
                                                        "adapter_dtype": "float64"}
    weights = adapter_tensors(tmp_path, "run")
    assert any("layer.1" in k for k in weights) and not any("layer.0" in k for k in weights)


def test_targets_take_names_a_regex_or_all_linear():
    from sharelora.cli.common import target_modules

    assert target_modules("query,value") == ["query", "value"]
    assert target_modules("c_attn.q,c_attn.v") == ["c_attn.q", "c_attn.v"]  # a dot is a name, not a regex
    assert target_modules("all-linear") == "all-linear"
    assert target_modules(r".*\.(q|v)_proj") == r".*\.(q|v)_proj"


def test_an_unknown_method_option_names_the_method_options():
    with pytest.raises(ValueError, match=r"sharea has no option\(s\) \[.bogus.\]; its options are .*share_block_size"):
        TrainConfig(method="sharea", method_options={"bogus": 1}).resolved()
    with pytest.raises(ValueError, match="share_block_size must be a positive integer"):
        TrainConfig(method="sharea", method_options={"share_block_size": 0}).resolved()


def test_compare_entries_take_sharelora_options():
    from sharelora.training.methods import parse_methods

    spec, = parse_methods("sharea@r=4,share_block_size=2,dropout_mask=module")
    cfg = spec.apply(TrainConfig(method_options={"scope": "layers"}))
    assert (cfg.rank, cfg.method_options) == (4, {"scope": "layers", "share_block_size": 2, "dropout_mask": "module"})
    assert spec.dirname == "sharea-r4-share_block_size2-dropout_maskmodule"
