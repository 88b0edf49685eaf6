"""The classification task: tokenization, collation, label checks and metrics on known examples."""

import math

import pytest
import torch
from training_tiny import tiny_data, tiny_tokenizer

from sharelora.tasks import ClassificationTask, classification_metrics, label_space, regression_metrics


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def test_encode_keeps_every_example_and_truncates_to_max_length(tokenizer):
    data = tiny_data(n_train=10)
    data.splits["train"][0]["text"] = " ".join(["movie"] * 100)
    task = ClassificationTask(data, tokenizer, max_length=12)
    split = task.encode("train")
    assert len(split) == 10
    assert max(len(ids) for ids in split.input_ids) == 12
    assert split.labels == [ex["label"] for ex in data.splits["train"]]


def test_encode_limit_takes_the_first_examples(tokenizer):
    task = ClassificationTask(tiny_data(n_train=10), tokenizer)
    assert len(task.encode("train", limit=4)) == 4


def test_collate_pads_right_and_masks_padding(tokenizer):
    data = tiny_data()
    data.splits["train"][0]["text"] = "good"
    data.splits["train"][1]["text"] = "the movie was very bad"
    task = ClassificationTask(data, tokenizer)
    split = task.encode("train")
    batch = task.collate(split, [0, 1])
    assert batch["input_ids"].shape == (2, 7)  # [CLS] + 5 words + [SEP]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][0, 3:].eq(tokenizer.pad_token_id).all()
    assert batch["labels"].tolist() == [0, 1] and batch["labels"].dtype == torch.long


def test_pairs_get_segment_ids(tokenizer):
    task = ClassificationTask(tiny_data(pairs=True), tokenizer)
    batch = task.collate(task.encode("train"), [0, 1])
    assert set(batch["token_type_ids"][batch["attention_mask"].bool()].tolist()) == {0, 1}


def test_regression_has_one_output_and_float_labels(tokenizer):
    task = ClassificationTask(tiny_data(regression=True), tokenizer)
    assert task.num_labels == 1 and task.primary_metric == "pearson"
    batch = task.collate(task.encode("train"), [0, 1])
    assert batch["labels"].dtype == torch.float32
    loss = task.loss(torch.tensor([[0.0], [5.0]]), batch["labels"])
    assert loss.item() == pytest.approx(0.0)


def test_label_names_give_the_number_of_classes():
    data = tiny_data()
    data.label_names = ["a", "b", "c"]
    assert label_space(data) == (["a", "b", "c"], 3)


def test_missing_label_names_are_inferred_from_training_labels():
    data = tiny_data()
    data.label_names = []
    assert label_space(data) == (["0", "1"], 2)


def test_label_outside_the_classes_is_an_error_naming_the_classes(tokenizer):
    data = tiny_data()
    data.splits["dev"][3]["label"] = 7
    task = ClassificationTask(data, tokenizer)
    with pytest.raises(ValueError, match=r"example 3 of split 'dev' has label 7, outside 0\.\.1"):
        task.encode("dev")


def test_string_label_is_an_error(tokenizer):
    data = tiny_data()
    data.splits["train"][0]["label"] = "positive"
    with pytest.raises(ValueError, match="must be class ids"):
        ClassificationTask(data, tokenizer).encode("train")


def test_missing_text_names_the_column_option(tokenizer):
    data = tiny_data()
    data.splits["train"][1] = {"sentence": "good", "label": 1}
    with pytest.raises(ValueError, match="--text-column"):
        ClassificationTask(data, tokenizer).encode("train")


def test_missing_dev_split_is_an_error(tokenizer):
    data = tiny_data()
    data.splits["dev"] = []
    with pytest.raises(ValueError, match="no 'dev' examples"):
        ClassificationTask(data, tokenizer)


def test_binary_metrics_on_a_known_example():
    m = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], num_labels=2)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.8)  # positive class: precision 2/3, recall 1
    assert m["mcc"] == pytest.approx(2 / math.sqrt(12))


def test_multiclass_f1_is_the_macro_average():
    m = classification_metrics([0, 1, 2, 2], [0, 1, 1, 2], num_labels=3)
    assert m["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["f1"] == m["f1_macro"]


def test_regression_metrics_on_known_examples():
    assert regression_metrics([1, 2, 3], [2, 4, 6])["pearson"] == pytest.approx(1.0)
    assert regression_metrics([1, 2, 3], [3, 2, 1])["spearman"] == pytest.approx(-1.0)
    constant = regression_metrics([1, 1, 1], [1, 2, 3])
    assert constant["pearson"] == 0.0 and constant["mse"] == pytest.approx(5 / 3)
