"""What loading a model says about weights its checkpoint lacks (a new classification head).

transformers prints a LOAD REPORT table for them; sharelora prints one line instead, and nothing
when the head is then loaded from an adapter that saved it.
"""

import logging

import pytest
from training_tiny import tiny_data, tiny_tokenizer

from sharelora.sources import load_model
from sharelora.training import TrainConfig, load_trained_model, train


@pytest.fixture(scope="module")
def headless_bert(tmp_path_factory):
    """A tiny BERT saved without a classification head (as sentence encoders such as MiniLM ship)."""
    from training_tiny import tiny_bert

    directory = tmp_path_factory.mktemp("headless-bert")
    tiny_bert().bert.save_pretrained(directory)
    tiny_tokenizer(directory).save_pretrained(directory)
    return str(directory)


@pytest.fixture
def load_reports():
    """The LOAD REPORTs transformers logs (its logger writes to the stream it found at import, not to capfd)."""
    reports = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "LOAD REPORT" in record.getMessage():
                reports.append(record.getMessage())

    handler = Collect()
    logging.getLogger("transformers").addHandler(handler)
    yield reports
    logging.getLogger("transformers").removeHandler(handler)


def tiny_run(model_dir, out, **kw):
    cfg = TrainConfig(model=model_dir, dataset="tiny", method="lora", max_steps=1, batch_size=8, max_length=16,
                      eval_batch_size=16, output_dir=str(out), **kw)
    train(cfg, data=tiny_data(n_train=8, n_dev=4, n_test=4), progress=False)
    return out


def test_a_new_head_is_one_line_not_transformers_report(headless_bert, capfd, load_reports):
    bundle = load_model(headless_bert, task="classification", num_labels=2)
    err = capfd.readouterr().err
    assert bundle.info["new_weights"] == ["classifier.bias", "classifier.weight"]
    assert load_reports == []
    lines = [line for line in err.splitlines() if "initialised randomly" in line]
    assert lines == [f"sharelora: {headless_bert}: not in the checkpoint, initialised randomly: "
                     "classifier.bias, classifier.weight (the new task head)"]


def test_loading_an_adapter_that_saved_the_head_says_nothing_about_it(headless_bert, tmp_path, capfd, load_reports):
    run = tiny_run(headless_bert, tmp_path / "run")
    capfd.readouterr()
    load_trained_model(run)
    assert "initialised randomly" not in capfd.readouterr().err
    assert load_reports == []


def test_a_head_the_adapter_did_not_save_is_still_reported(headless_bert, tmp_path, capfd):
    run = tiny_run(headless_bert, tmp_path / "run", modules_to_save=[])
    capfd.readouterr()
    load_trained_model(run)
    err = capfd.readouterr().err
    assert "classifier.bias, classifier.weight (the new task head)" in err and "stay random" in err


def test_loading_prints_no_weight_loading_progress_bar(headless_bert, capfd):
    from transformers.utils import logging as hf_logging

    load_model(headless_bert, task="classification", num_labels=2)
    assert "Loading weights" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # transformers' switch is back as it was


def test_loading_leaves_progress_bars_off_when_the_user_turned_them_off(headless_bert):
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        load_model(headless_bert, task="classification", num_labels=2)
        assert not hf_logging.is_progress_bar_enabled() and hub_utils.are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()
