"""The training loop, CLI and studies on the generation tasks, with tiny random causal LMs."""

import json

import pytest
import torch
from conftest import assert_close_after_adamw
from generation_tiny import TinyBundle, tiny_e2e, tiny_gpt2, tiny_instructions, tiny_llama, tiny_mmlu, tiny_tokenizer
from safetensors.torch import load_file

from sharelora.tasks.build import default_targets, task_name
from sharelora.training.config import task_config
from sharelora.training import train


def e2e_config(tmp_path, name="run", **kw):
    values = dict(model="tiny-llama", method="sharea", max_steps=None, epochs=2, batch_size=4, log_every=1,
                  checkpoint_every=2, max_length=48, eval_batch_size=4, output_dir=str(tmp_path / name),
                  task_options={"num_beams": 2, "max_new_tokens": 4})
    values.update(kw)
    return task_config("e2e", **values)


def run_e2e(tmp_path, name="run", build=tiny_llama, **kw):
    bundle = TinyBundle(build(), tiny_tokenizer(), name=build.__name__)
    return train(e2e_config(tmp_path, name, **kw), bundle=bundle, data=tiny_e2e(), progress=False)


def test_an_e2e_run_writes_scores_samples_and_a_causal_lm_adapter(tmp_path):
    r = run_e2e(tmp_path)
    assert r["task"] == "e2e" and r["metric"] == "bleu" and r["greater_is_better"]
    assert {"bleu", "rougeL", "chrf", "loss"} <= set(r["test"]) and r["test"]["num_beams"] == 2
    assert r["config"]["targets"] == ["q_proj", "v_proj"]  # "auto" resolved for LLaMA
    # ShareA on 2 layers, r = 8: one A per module type (32 in), a B per layer (q: 32 out, v: 16 out).
    assert r["parameters"]["adapter"] == 8 * 32 * 2 + 2 * 8 * (32 + 16)
    run_dir = tmp_path / "run"
    assert (run_dir / "samples-test.jsonl").is_file() and (run_dir / "samples-dev.jsonl").is_file()
    info = json.loads((run_dir / "adapter" / "run_info.json").read_text())
    assert info["model_task"] == "causal-lm" and info["task"] == "e2e"
    kinds = [json.loads(line)["kind"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert kinds.count("eval") == 2 and kinds[-1] == "test"


def test_gpt2_fused_slices_train_and_the_run_is_marked_not_pretrained(tmp_path):
    r = run_e2e(tmp_path, build=tiny_gpt2, max_steps=2)
    assert r["config"]["targets"] == ["c_attn.q", "c_attn.v"]
    assert r["pretrained"] is False
    assert r["parameters"]["adapter"] == 2 * 8 * 32 + 2 * 2 * 8 * 32  # one A per slice, a B per layer and slice


@pytest.mark.numerics
def test_step_loss_is_the_token_mean_whatever_the_micro_batching(tmp_path):
    one = run_e2e(tmp_path, "a", dropout=0.0, epochs=1)
    run_e2e(tmp_path, "b", dropout=0.0, epochs=1, grad_accum=4)
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    # micro-batches of unequal token counts: a mean of their means would move the weights by O(lr)
    assert_close_after_adamw(b, a, lr=one["config"]["lr"], steps=one["steps"])


def test_a_resumed_e2e_run_equals_the_uninterrupted_one(tmp_path):
    kw = dict(batch_size=1, max_steps=5)  # 3 steps per epoch: the stop falls inside the first epoch
    full = run_e2e(tmp_path, "a", **kw)
    stopped = train(e2e_config(tmp_path, "b", **kw), bundle=TinyBundle(tiny_llama(), tiny_tokenizer()),
                    data=tiny_e2e(), progress=False, on_step=lambda step: step == 2)
    assert stopped["status"] == "interrupted"
    resumed = train(e2e_config(tmp_path, "b", **kw), bundle=TinyBundle(tiny_llama(), tiny_tokenizer()),
                    data=tiny_e2e(), progress=False, resume=True)
    assert resumed["test"] == full["test"] and resumed["dev"] == full["dev"]
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_instruction_runs_keep_the_checkpoint_with_the_lowest_dev_loss(tmp_path):
    cfg = task_config("instructions", model="tiny-llama", method="lora", epochs=4, max_steps=None, batch_size=2,
                      max_length=64, lr=5e-3, log_every=1, output_dir=str(tmp_path / "i"))
    r = train(cfg, bundle=TinyBundle(tiny_llama(), tiny_tokenizer(chat_template=True)), data=tiny_instructions(),
              progress=False)
    devs = [json.loads(line) for line in (tmp_path / "i" / "log.jsonl").read_text().splitlines()]
    dev_losses = [d["loss"] for d in devs if d["kind"] == "eval"]
    assert r["metric"] == "loss" and not r["greater_is_better"]
    assert r["dev"]["loss"] == min(dev_losses)
    assert "loss_by_subtask" in r["test"]


def test_default_targets_are_the_query_and_value_projections():
    assert default_targets(tiny_llama()) == ["q_proj", "v_proj"]
    assert default_targets(tiny_gpt2()) == ["c_attn.q", "c_attn.v"]


def test_mmlu_is_not_a_training_task():
    with pytest.raises(ValueError, match="eval --task mmlu"):
        task_name("auto", tiny_mmlu())


def test_task_and_dataset_must_agree():
    with pytest.raises(ValueError, match="cannot train on dataset 'tiny-e2e'"):
        task_name("instructions", tiny_e2e())


def test_cli_task_presets_and_decoding_options():
    from sharelora.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "--task", "e2e", "--method", "lora", "--num-beams", "2", "--seed", "3"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.dataset, cfg.task, cfg.method, cfg.seed) == ("smollm2", "e2e", "e2e", "lora", 3)
    assert cfg.targets == ["auto"] and cfg.batch_size == 8 and cfg.task_options == {"num_beams": 2}
    args = build_parser().parse_args(["train", "--task", "instructions", "--model", "gpt2-random", "--max-steps", "10"])
    cfg = config_from_args(args)
    assert (cfg.model, cfg.dataset, cfg.max_steps) == ("gpt2-random", "natural-instructions", 10)
    plain = config_from_args(build_parser().parse_args(["train"]))
    assert (plain.model, plain.dataset, plain.task) == ("minilm", "rotten-tomatoes", "auto")


def test_cli_eval_mmlu_needs_an_adapter_or_a_model():
    from sharelora.cli import main

    assert main(["eval", "--task", "mmlu"]) == 2


def save_tiny_causal_lm(directory):
    model, tok = tiny_llama(), tiny_tokenizer(chat_template=True)
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def test_transfer_study_reports_retention_per_method(tmp_path):
    from sharelora.training.studies import transfer_study

    model_dir = save_tiny_causal_lm(tmp_path / "m")
    s = transfer_study(methods=["lora", "sharea"], seeds=[0], first_steps=2, second_steps=2, eval_examples=4,
                       model=model_dir, batch_size=2, output_dir=tmp_path / "t",
                       datasets={"e2e": tiny_e2e(), "instructions": tiny_instructions()})
    assert [r["method"] for r in s["runs"]] == ["lora", "sharea"]
    for r in s["runs"]:
        assert {"e2e_loss", "instructions_loss", "e2e_bleu"} <= set(r["after_second"])
        assert r["forgetting"] == pytest.approx(r["after_second"]["e2e_loss"] - r["after_first"]["e2e_loss"])
    assert "| lora |" in (tmp_path / "t" / "transfer.md").read_text()


def test_overfit_study_records_train_and_dev_loss_every_epoch(tmp_path):
    from sharelora.training.studies import overfit_study

    model_dir = save_tiny_causal_lm(tmp_path / "m")
    s = overfit_study(methods=["sharea"], seeds=[0], train_examples=3, epochs=3, eval_examples=4, model=model_dir,
                      batch_size=2, lr=1e-2, output_dir=tmp_path / "o", data=tiny_e2e())
    curve = s["runs"][0]["curve"]
    assert [c["epoch"] for c in curve] == [0, 1, 2, 3]
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]  # it learns its small training set
    assert (tmp_path / "o" / "overfit.png").is_file()


def fake_result(method, seed, bleu, adapter):
    return {"method": method, "config": {"seed": seed}, "parameters": {"adapter": adapter}, "adapter_bytes": 4 * adapter,
            "train_time_s": 10.0, "peak_rss_mb": 100.0, "optimizer_state_mb": 1.0, "steps": 5,
            "test": {"bleu": bleu, "rougeL": 50.0, "chrf": 40.0, "loss": 1.5}, "dev": {"bleu": bleu - 1}}


def test_generation_table_reports_scores_on_their_own_scale_with_seed_spread():
    from sharelora.training.compare_generation import aggregate, markdown_table

    runs = [fake_result("lora", 0, 30.0, 1000), fake_result("lora", 1, 32.0, 1000), fake_result("sharea", 0, 31.0, 500)]
    rows = aggregate("e2e", runs, with_mmlu=False)
    table = markdown_table("e2e", rows, with_mmlu=False)
    assert "| lora | 1,000 | 100.0% |" in table and "| 31.00 ± 1.41 |" in table  # BLEU stays 0-100
    assert "| sharea | 500 | 50.0% |" in table and "| 31.00 |" in table
