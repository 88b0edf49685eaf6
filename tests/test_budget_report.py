"""The parameter-budget study's choices (docs/studies/budget_report.py): LR on dev only, the Pareto front, `add`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "docs" / "studies"))
import budget_report as br  # noqa: E402


def run(label, lr, seed, dev, test, adapter=1000):
    return {"label": f"{label},lr={lr:g}", "config": {"lr": lr, "seed": seed},
            "dev": {"accuracy": dev, "mcc": 0.2}, "test": {"accuracy": test, "mcc": 0.1},
            "parameters": {"adapter": adapter, "trainable": adapter + 10}, "adapter_bytes": 4 * adapter,
            "train_time_s": 1.0, "peak_rss_mb": 1.0}


def test_lr_is_chosen_on_dev_never_on_test_and_ties_take_the_smaller_lr():
    runs = [run("lora@r=4", 0.002, 0, dev=0.70, test=0.90), run("lora@r=4", 0.006, 0, dev=0.75, test=0.10),
            run("vera@r=256", 0.002, 0, dev=0.50, test=0.10), run("vera@r=256", 0.02, 0, dev=0.50, test=0.90)]
    assert br.choose_runs(runs) == {"lora": 0.006, "vera": 0.002}


def test_next_lr_walks_the_grid_and_at_top_extends_only_methods_peaking_at_their_largest_lr(tmp_path):
    assert [br.next_lr(x) for x in (0.002, 0.006, 0.02, 0.06)] == [0.006, 0.02, 0.06, 0.2]
    probe = tmp_path / "probe.json"
    probe.write_text(json.dumps({"runs": [run("lora@r=4", 0.006, 0, 0.8, 0), run("lora@r=4", 0.02, 0, 0.5, 0),
                                          run("vera@r=256", 0.006, 0, 0.6, 0), run("vera@r=256", 0.02, 0, 0.7, 0)]}))
    assert br.at_top([probe]) == {"vera@r=256": 0.06}


def test_rows_average_the_chosen_lr_over_seeds_and_mark_the_front_of_the_means(tmp_path):
    runs = [run("a@r=1", 0.01, s, 0.6, t, adapter=100) for s, t in enumerate([0.60, 0.70, 0.80])]
    runs += [run("b@r=2", 0.01, s, 0.6, 0.65, adapter=200) for s in range(3)]  # below a: off the front
    runs += [run("c@r=8", 0.01, s, 0.6, 0.75, adapter=800) for s in range(3)]  # above a: on the front
    runs += [run("c@r=8", 0.03, s, 0.9, 0.99, adapter=800) for s in range(3)]  # another LR: not in the table
    path = tmp_path / "compare.json"
    path.write_text(json.dumps({"runs": runs}))
    table = br.rows(path, {"a": 0.01, "b": 0.01, "c": 0.01})
    assert [(r["label"], r["pareto"]) for r in table] == [("a@r=1", True), ("b@r=2", False), ("c@r=8", True)]
    assert table[0]["test_mean"] == pytest.approx(70.0) and table[0]["test_std"] == pytest.approx(10.0)
    assert table[2]["test_per_seed"] == pytest.approx([75.0] * 3)


def test_add_replaces_one_task_and_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(br, "majority_accuracy", lambda task, n: 50.0)  # no dataset download in a unit test
    prefix = tmp_path / "budget"
    old_sweep = tmp_path / "old.json"
    old_sweep.write_text(json.dumps({"runs": [run("x@r=1", 0.01, s, 0.5, 0.5) for s in range(3)]}))
    kept = {"lr": {"x": 0.01}, "probe": [], "header": {}, "rows": br.rows(old_sweep, {"x": 0.01})}
    prefix.with_suffix(".json").write_text(json.dumps({"tasks": {"old-task": kept}}))
    task = tmp_path / "new-task"
    task.mkdir()
    (task / "lr.json").write_text(json.dumps({"a": 0.01}))
    (task / "probe.json").write_text(json.dumps({"header": {"date": "probe"}, "runs": [run("a@r=1", 0.01, 0, 0.6, 0.6)]}))
    sweep = [run("a@r=1", 0.01, s, 0.6, 0.6 + s / 100) for s in range(3)]
    (task / "compare.json").write_text(json.dumps({"header": {"date": "sweep", "dataset": "new-task",
                                                              "examples": {"test": 400}}, "runs": sweep}))
    br.add(task, prefix)
    out = json.loads(prefix.with_suffix(".json").read_text())
    assert out["tasks"]["old-task"] == kept
    new = out["tasks"]["new-task"]
    assert new["majority_test_accuracy"] == 50.0 and [r["label"] for r in new["rows"]] == ["a@r=1"]
    assert (tmp_path / "budget-new-task.png").stat().st_size > 0
    md = prefix.with_suffix(".md").read_text()
    assert "### old-task" in md and "### new-task" in md
