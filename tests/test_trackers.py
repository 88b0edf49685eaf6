"""--report-to: the records of log.jsonl and the run's config reach TensorBoard, W&B and MLflow (trackers.py)."""

import json
import math

import pytest

from training_tiny import tiny_bundle, tiny_data

from sharelora.extras import MissingExtraError
from sharelora.training import TrainConfig, train
from sharelora.training.trackers import hyperparameters, metrics, parse_report_to


def tiny_train(tmp_path, name="run", **kw):
    cfg = TrainConfig(model="tiny-bert", dataset="tiny", method="sharea", epochs=2, batch_size=8, log_every=2,
                      checkpoint_every=4, max_train_examples=16, output_dir=str(tmp_path / name), **kw)
    train(cfg, bundle=tiny_bundle(tmp_path), data=tiny_data(n_train=16, n_dev=8, n_test=8), progress=False)
    return tmp_path / name


def records(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def expected_scalars(out):
    """{tag: [(step, value)]} that the trackers must hold: log.jsonl's records, as trackers.py names them."""
    expected, last = {}, -1
    for record in records(out):
        step = record["step"]
        values = metrics(record)
        if step < last:
            values[f"{record['split']}/step"] = float(step)
            step = last
        last = step
        for tag, value in values.items():
            expected.setdefault(tag, []).append((step, value))
    return expected


def assert_same_scalars(actual, expected):
    assert set(actual) == set(expected), (sorted(actual), sorted(expected))
    for tag, points in expected.items():
        got = actual[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, a), (_, e) in zip(got, points):
            assert a == pytest.approx(e, rel=1e-6) or (math.isnan(a) and math.isnan(e)), tag


# --- naming ------------------------------------------------------------------------------------------------
def test_a_record_becomes_scalars_named_by_kind_split_and_task():
    assert metrics({"kind": "train", "step": 4, "stage": 0, "loss": 0.5, "lr": 1e-3, "grad_norm": None}) == \
        {"train/loss": 0.5, "train/lr": 1e-3}
    assert metrics({"kind": "eval", "split": "dev", "task": "sst", "step": 4, "accuracy": 0.75}) == \
        {"dev/sst/accuracy": 0.75}
    assert metrics({"kind": "test", "split": "test", "step": 2, "accuracy": 0.5, "loss": 0.7}) == \
        {"test/accuracy": 0.5, "test/loss": 0.7}
    assert metrics({"kind": "stage", "stage": 1, "task": "sst", "split": "test", "step": 8, "f1": 0.25}) == \
        {"stage/test/sst/stage": 1.0, "stage/test/sst/f1": 0.25}


def test_report_to_accepts_none_all_and_names_and_refuses_others():
    assert parse_report_to("none") == [] and parse_report_to([]) == []
    assert parse_report_to("tensorboard, wandb,tensorboard") == ["tensorboard", "wandb"]
    assert set(parse_report_to("all")) <= {"tensorboard", "wandb", "mlflow"}
    with pytest.raises(ValueError, match="choose none, all, or trackers among tensorboard, wandb, mlflow"):
        parse_report_to("comet")


def test_config_values_become_what_every_tracker_stores():
    assert hyperparameters({"rank": 8, "targets": ["query", "value"], "lr": None, "opts": {"b": 1}}) == \
        {"rank": 8, "targets": '["query", "value"]', "lr": None, "opts": '{"b": 1}'}


def test_a_tracker_that_is_not_installed_names_its_extra(monkeypatch):
    import sharelora.extras as extras

    monkeypatch.setattr(extras, "_installed", lambda module: module != "wandb")
    with pytest.raises(MissingExtraError, match=r"--report-to wandb needs wandb.*pip install 'sharelora\[wandb\]'"):
        TrainConfig(report_to=["wandb"]).validate()


# --- the trackers, read back -------------------------------------------------------------------------------
def test_tensorboard_event_files_hold_the_log_records_and_the_config(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    out = tiny_train(tmp_path, report_to=["tensorboard"])
    runs = EventMultiplexer().AddRunsFromDirectory(str(out / "tensorboard"))
    runs.Reload()
    scalars = {}
    for run, tags in runs.Runs().items():
        for tag in tags.get("scalars", []):
            scalars[tag] = [(e.step, e.value) for e in runs.Scalars(run, tag)]
    assert {"train/loss", "dev/accuracy", "test/accuracy"} <= set(scalars)
    assert_same_scalars(scalars, expected_scalars(out))
    hparams = next((out / "tensorboard").rglob("hparams.yml")).read_text()
    assert "method: sharea" in hparams and "rank: 8" in hparams


def test_a_resumed_run_purges_the_events_it_logs_again(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    cfg = dict(model="tiny-bert", dataset="tiny", method="sharea", epochs=2, batch_size=8, log_every=1,
               checkpoint_every=2, max_train_examples=16, output_dir=str(tmp_path / "run"), report_to=["tensorboard"])
    data, bundle = tiny_data(n_train=16, n_dev=8, n_test=8), tiny_bundle(tmp_path)
    train(TrainConfig(**cfg), bundle=bundle, data=data, progress=False, on_step=lambda step: step == 3)
    train(TrainConfig(**cfg), bundle=tiny_bundle(tmp_path), data=data, progress=False, resume=True)
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path / "run" / "tensorboard"))
    runs.Reload()
    run = next(r for r, tags in runs.Runs().items() if "train/loss" in tags.get("scalars", []))
    steps = [e.step for e in runs.Scalars(run, "train/loss")]
    assert steps == sorted(set(steps)) == [1, 2, 3, 4]  # step 3 of the interrupted run was logged again, once


def test_wandb_offline_run_holds_the_log_records(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    out = tiny_train(tmp_path, report_to=["wandb"])
    history, config = read_wandb_offline(out)
    expected = expected_scalars(out)
    logged = {}
    for step, row in history:
        for tag, value in row.items():
            if tag in expected:
                logged.setdefault(tag, []).append((step, value))
    assert_same_scalars(logged, expected)
    assert config["method"] == "sharea" and config["rank"] == 8


def wandb_records(path):
    """The protobuf records of a W&B transaction log (.wandb): a 7-byte header, then LevelDB's log format
    (32 KiB blocks of records: crc32c 4 bytes, length 2, type 1 = full / 2 first / 3 middle / 4 last)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending


def read_wandb_offline(out):
    """(history rows as (step, {key: value}), config) from the offline run's transaction log."""
    from wandb.proto import wandb_internal_pb2

    [path] = list(out.rglob("offline-run-*/*.wandb"))
    history, config = [], {}
    for data in wandb_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history.append((int(row.pop("_step")), {k: v for k, v in row.items() if not k.startswith("_")}))
        elif kind == "config":
            for item in record.config.update:
                config[item.key] = json.loads(item.value_json)
    return history, config


def test_mlflow_run_holds_the_log_records_and_the_config(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "sharelora-test")
    out = tiny_train(tmp_path, report_to=["mlflow"])
    import mlflow

    client = mlflow.tracking.MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("sharelora-test").experiment_id])
    expected = expected_scalars(out)
    assert set(run.data.metrics) == set(expected)
    logged = {tag: [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, tag),
                                                      key=lambda m: (m.step, m.timestamp))] for tag in expected}
    assert_same_scalars(logged, expected)
    assert run.data.params["method"] == "sharea" and run.data.params["rank"] == "8"
    assert run.info.status == "FINISHED"


def test_a_multitask_run_reports_each_task_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from training_tiny import tiny_bert, tiny_tokenizer, write_csv

    from sharelora.training.multitask import MultiTaskConfig, train_multitask

    model_dir = tmp_path / "tiny-bert"
    tiny_bert().bert.save_pretrained(model_dir)
    tiny_tokenizer(model_dir).save_pretrained(model_dir)
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / name).mkdir()
        for split, rows in tiny_data(n_train=8, n_dev=8, n_test=8, seed=seed).splits.items():
            write_csv(tmp_path / name / f"{split}.csv", rows)
    out = tmp_path / "mt"
    train_multitask(MultiTaskConfig(model=str(model_dir), tasks=[f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"],
                                    epochs=1, batch_size=8, log_every=1, output_dir=str(out),
                                    report_to=["tensorboard"]), progress=False)
    runs = EventMultiplexer().AddRunsFromDirectory(str(out / "tensorboard"))
    runs.Reload()
    scalars = {tag: [(e.step, e.value) for e in runs.Scalars(run, tag)]
               for run, tags in runs.Runs().items() for tag in tags.get("scalars", [])}
    assert {"dev/a/accuracy", "dev/b/accuracy", "stage/test/a/accuracy", "stage/test/b/accuracy"} <= set(scalars)
    assert_same_scalars(scalars, expected_scalars(out))
