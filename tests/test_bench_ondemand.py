"""The on-demand serving benchmark runs end to end on a tiny model (small counts) and reports what it says."""

from __future__ import annotations

import json

from serve_tiny import build_files, one_thread, watchdog


def test_the_on_demand_benchmark_runs_and_reports(tmp_path):
    from sharelora.serve import bench_ondemand

    files = build_files(tmp_path / "files")
    out = tmp_path / "bench.json"
    with watchdog(240), one_thread():
        assert bench_ondemand.main([
            "--model", str(files["model"]), "--sizes", "1,3", "--bound", "2", "--requests", "4", "--reps", "2",
            "--clients", "2", "--new-tokens", "3", "--score-prompts", "2", "--score-words", "6", "--load-ranks", "2,4",
            "--load-count", "3", "--step-rounds", "3", "--rank", "2", "--threads", "1", "--workdir", str(tmp_path / "work"), "--no-memory",
            "--json", str(out), "--markdown", str(tmp_path / "bench.md")]) == 0
    r = json.loads(out.read_text())
    by = {s["scenario"]: s for s in r["summary"]}
    assert set(by) == {"1 resident", "3 resident", "3 on demand, --max-adapters 2", "scoring: server",
                       "scoring: offline forward"}
    assert all(len(s["per_rep"]) == 2 for s in r["summary"])
    assert by["1 resident"]["vs_first"] == 1.0
    # Round-robin over 3 adapters with room for 2: the first round loads all 3 (evicting one) and every
    # later round must load at least one again; concurrent clients may share a load, so no more is certain.
    assert by["3 on demand, --max-adapters 2"]["loads"] >= 3 + 1
    assert by["3 on demand, --max-adapters 2"]["evictions"] >= 1 + 1
    assert by["3 resident"]["loads"] == 0  # loaded before timing
    assert r["checks"]["scoring_max_abs_diff"] < 1e-4
    assert list(r["forward_step"]) == ["1 resident", "3 resident"] and r["forward_step"]["3 resident"]["steps"] == 3
    assert r["memory"] == []  # --no-memory; the memory child is tested below
    assert [c["rank"] for c in r["cold_loads_by_size"]] == [2, 4]
    assert all(c["load"]["count"] == 3 for c in r["cold_loads_by_size"])
    assert "| 3 on demand, --max-adapters 2 |" in (tmp_path / "bench.md").read_text()


def test_the_memory_child_counts_the_shared_basis_once(tmp_path, capsys):
    from sharelora.serve import bench_ondemand
    from sharelora.serve.model import ServedModel

    files = build_files(tmp_path / "files")
    served = ServedModel.load(str(files["model"]), device="cpu")
    one = bench_ondemand.build_task_adapters(served.base, tmp_path / "root", ["a", "b", "c"], 2, ["q_proj", "v_proj"])
    assert one["peft_lora_bytes"] > one["own_bytes"]
    with one_thread():
        assert bench_ondemand.main(["--model", str(files["model"]), "--memory", "3", "--root", str(tmp_path / "root")]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["adapters"] == 3 and m["tensor_bytes"] == one["shared_bytes"] + 3 * one["own_bytes"]
