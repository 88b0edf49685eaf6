"""E2E generation task: prompt masking, padding, decoding and metrics on known examples."""

import json
import math

import pytest
import torch
from generation_tiny import tiny_e2e, tiny_gpt2, tiny_llama, tiny_tokenizer

from sharelora import ShareLoraConfig, get_sharelora_model
from sharelora.tasks.generation import E2ETask, generate_texts, generation_metrics, group_by_mr
from sharelora.tasks.lm import IGNORE_INDEX, join_prompt_target


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# --- loss masking -------------------------------------------------------------------------------
def test_prompt_tokens_get_label_minus_100_and_target_tokens_keep_their_ids(tok):
    task = E2ETask(tiny_e2e(), tok)
    split = task.encode("train")
    ex = split.examples[0]
    prompt, target = task.format(ex)
    assert split.input_ids[0] == prompt + target
    assert split.labels[0][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert split.labels[0][len(prompt):] == target
    assert target[-1] == tok.eos_token_id  # the model learns to stop
    assert tok.decode(target[:-1]) == ex["target"]


def test_padding_is_masked_out_of_attention_and_loss(tok):
    task = E2ETask(tiny_e2e(), tok)
    split = task.encode("train")
    short, long = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))[:: len(split) - 1]
    batch = task.collate(split, [short, long])
    n = len(split.input_ids[short])
    assert batch["input_ids"].shape[1] == len(split.input_ids[long])
    assert batch["attention_mask"][0, n:].eq(0).all() and batch["labels"][0, n:].eq(IGNORE_INDEX).all()
    assert batch["input_ids"][0, n:].eq(tok.pad_token_id).all()


def test_loss_counts_only_target_tokens(tok):
    """A model that is certain of every target token has zero loss whatever it says about the prompt."""
    task = E2ETask(tiny_e2e(), tok)
    split = task.encode("train")
    batch = task.collate(split, [0, 1])
    vocab = len(tok)
    logits = torch.zeros(*batch["input_ids"].shape, vocab)
    logits[:, :-1, :] = -1e4
    for b in range(2):
        for i in range(batch["input_ids"].shape[1] - 1):
            nxt = batch["labels"][b, i + 1]
            if nxt != IGNORE_INDEX:
                logits[b, i, nxt] = 1e4
    assert task.loss(logits, batch["labels"]).item() == pytest.approx(0.0, abs=1e-4)
    # Uniform predictions: log(vocab) per target token, and "sum" / step_weight is the same mean.
    uniform = torch.zeros_like(logits)
    assert task.loss(uniform, batch["labels"]).item() == pytest.approx(math.log(vocab), rel=1e-5)
    total = task.loss(uniform, batch["labels"], reduction="sum").item()
    assert total / task.step_weight(split, [0, 1]) == pytest.approx(math.log(vocab), rel=1e-5)


def test_too_long_pairs_keep_the_end_of_the_prompt_and_the_start_of_the_target():
    ids, labels = join_prompt_target(list(range(10)), [100, 101, 102, 103], max_length=8)
    assert ids == [6, 7, 8, 9, 100, 101, 102, 103]
    assert labels == [IGNORE_INDEX] * 4 + [100, 101, 102, 103]
    ids, labels = join_prompt_target([1, 2], list(range(100, 120)), max_length=8)
    assert ids == [1, 2, 100, 101, 102, 103, 104, 105] and labels[:2] == [IGNORE_INDEX] * 2


def test_every_example_of_an_mr_shares_its_references():
    groups = group_by_mr(tiny_e2e().splits["dev"])
    assert [len(g["references"]) for g in groups] == [2, 1]


def test_no_mr_is_in_two_splits():
    splits = tiny_e2e().splits
    mrs = {s: {ex["mr"] for ex in rows} for s, rows in splits.items()}
    assert not (mrs["train"] & mrs["dev"]) and not (mrs["train"] & mrs["test"]) and not (mrs["dev"] & mrs["test"])


# --- metrics on known examples -------------------------------------------------------------------
def test_identical_hypothesis_and_reference_score_100():
    m = generation_metrics(["the cat sat on the mat ."], [["the cat sat on the mat ."]])
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0) and m["rougeL"] == pytest.approx(100.0)


def test_bleu_and_rouge_l_on_a_hand_computed_case():
    # Clipped n-gram precisions 5/6, 3/5, 2/4, 1/3; equal lengths (no brevity penalty):
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = (1/12) ** (1/4). LCS = "the cat sat on mat": 5 of 6 words.
    m = generation_metrics(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert m["bleu"] == pytest.approx(100 * (1 / 12) ** 0.25, abs=1e-6)
    assert m["rougeL"] == pytest.approx(100 * 5 / 6)


def test_all_references_of_an_mr_count():
    one = generation_metrics(["blue spice is a pub ."], [["the pub blue spice is cheap ."]])
    two = generation_metrics(["blue spice is a pub ."], [["the pub blue spice is cheap .", "blue spice is a pub ."]])
    assert two["bleu"] == pytest.approx(100.0) and two["rougeL"] == pytest.approx(100.0)
    assert one["bleu"] < 100 and one["rougeL"] < 100


def test_mrs_may_have_different_numbers_of_references():
    m = generation_metrics(["a b c d", "e f g h"], [["a b c d", "x y"], ["e f g h"]])
    assert m["bleu"] == pytest.approx(100.0)


def test_metrics_refuse_mismatched_lengths():
    with pytest.raises(ValueError, match="equally many"):
        generation_metrics(["a"], [["a"], ["b"]])


# --- decoding --------------------------------------------------------------------------------------
def reference_greedy(model, prompt, steps, eos):
    """Greedy decoding written out: no cache, no padding, one argmax per step."""
    ids = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == eos:
                break
            ids.append(nxt)
            out.append(nxt)
    return out


# argmax of fp32 logits from two code paths: exact, as the smallest top-2 gap of these greedy steps is
# 1.4e-3 (llama; gpt2 4.6e-3), ~10^4 times the rounding of logits of |.| < 0.7
@pytest.mark.numerics
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_beam_search_at_beam_1_is_greedy_decoding(tok, build):
    model = build()
    prompts = [tok("name : blue spice , area : riverside description :")["input_ids"],
               tok("name : the pub description :")["input_ids"]]
    beam1 = generate_texts(model, tok, prompts, num_beams=1, max_new_tokens=6, batch_size=2, stop_at_newline=False)
    assert all(beam1)  # the random model does not stop at once, so the comparison has tokens to compare
    for prompt, text in zip(prompts, beam1):
        assert text == tok.decode(reference_greedy(model, prompt, 6, tok.eos_token_id), skip_special_tokens=True)


@pytest.mark.numerics  # as above: padded batches and single prompts sum in other orders
@pytest.mark.parametrize("beams", [1, 3])
def test_batched_left_padded_decoding_equals_one_prompt_at_a_time(tok, beams):
    model = tiny_llama()
    prompts = [tok(t)["input_ids"] for t in ["name : blue spice", "name : the pub , area : city centre , food : french",
                                             "a"]]
    batched = generate_texts(model, tok, prompts, num_beams=beams, max_new_tokens=5, batch_size=3)
    single = [generate_texts(model, tok, [p], num_beams=beams, max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_decoding_goes_through_a_sharelora_model_on_gpt2_fused_slices(tok):
    model = get_sharelora_model(tiny_gpt2(), ShareLoraConfig(rank=2, share="A", target_modules=["c_attn.q", "c_attn.v"]))
    out = generate_texts(model, tok, [tok("name : blue spice")["input_ids"]], num_beams=2, max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)


def test_evaluation_decodes_each_mr_once_and_saves_samples(tok, tmp_path):
    task = E2ETask(tiny_e2e(), tok, num_beams=2, max_new_tokens=4, samples_dir=tmp_path)
    metrics = task.evaluate(tiny_llama(), task.encode("test"), batch_size=4)
    assert metrics["mrs"] == 2 and metrics["num_beams"] == 2
    assert {"bleu", "rougeL", "chrf", "loss", "perplexity"} <= set(metrics)
    rows = [json.loads(line) for line in (tmp_path / "samples-test.jsonl").read_text().splitlines()]
    assert [r["mr"] for r in rows] == [g["mr"] for g in group_by_mr(tiny_e2e().splits["test"])]
    assert all({"prediction", "references"} <= set(r) for r in rows)


def test_dev_evaluation_is_greedy_and_can_be_limited_to_a_few_mrs(tok):
    task = E2ETask(tiny_e2e(), tok, num_beams=4, dev_num_beams=1, max_dev_mrs=1, max_new_tokens=3)
    metrics = task.evaluate(tiny_llama(), task.encode("dev"))
    assert metrics["mrs"] == 1 and metrics["num_beams"] == 1
