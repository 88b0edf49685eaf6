"""MMLU scoring: prompt format, answer-letter log-likelihood on a toy model, prefix cache, subsets."""

import math

import pytest
import torch
from conftest import assert_close_fp32
from generation_tiny import tiny_gpt2, tiny_llama, tiny_mmlu, tiny_tokenizer
from torch import nn

from sharelora.tasks.mmlu import (
    answer_index,
    evaluate_mmlu,
    format_question,
    last_token_logprobs,
    letter_token_ids,
    subject_prefix,
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


class FixedNextToken(nn.Module):
    """A toy LM whose next-token distribution is the same everywhere: P(A)=.1, P(B)=.4, P(C)=.2, P(D)=.1,
    the remaining 0.2 spread evenly over every other token."""

    def __init__(self, vocab: int, letters: list[int]):
        super().__init__()
        p = torch.full((vocab,), 0.2 / (vocab - 4))
        for i, prob in zip(letters, [0.1, 0.4, 0.2, 0.1]):
            p[i] = prob
        self.register_buffer("logp", p.log())

    def forward(self, input_ids, attention_mask=None, **kwargs):
        return self.logp.expand(*input_ids.shape, -1)


def test_question_format_ends_with_answer_and_lists_the_choices():
    q = {"question": "What is 2 + 2?", "choices": ["1", "2", "4", "8"], "answer": 2, "subject": "x"}
    assert format_question(q) == "What is 2 + 2?\nA. 1\nB. 2\nC. 4\nD. 8\nAnswer:"
    assert format_question(q, with_answer=True).endswith("Answer: C\n\n")
    prefix = subject_prefix("high_school_physics", [q])
    assert prefix.startswith("The following are multiple choice questions (with answers) about high school physics.\n\n")


@pytest.mark.parametrize("answer,index", [(2, 2), ("C", 2), ("c", 2), ("2", 2), (0, 0)])
def test_answers_are_read_as_ints_digits_or_letters(answer, index):
    assert answer_index({"answer": answer}) == index


def test_a_malformed_answer_is_an_error():
    with pytest.raises(ValueError, match="not one of 0-3 or A-D"):
        answer_index({"answer": "answer", "question": "q"})


def test_answer_letters_are_single_tokens(tok):
    ids = letter_token_ids(tok)
    assert [tok.decode([i]) for i in ids] == ["a", "b", "c", "d"]  # the tiny tokenizer lowercases


@pytest.mark.parametrize("shots", [0, 2])
def test_scores_on_a_toy_model_whose_answer_likelihoods_are_known(tok, shots):
    model = FixedNextToken(len(tok), letter_token_ids(tok))
    data = tiny_mmlu()
    r = evaluate_mmlu(model, tok, data, shots=shots, use_prefix_cache=False)
    # The toy model always answers B. algebra answers: B, D, C -> 1/3; physics: A, B -> 1/2.
    assert r["per_subject"]["algebra"]["accuracy"] == pytest.approx(1 / 3)
    assert r["per_subject"]["physics"]["accuracy"] == pytest.approx(1 / 2)
    assert r["accuracy_macro"] == pytest.approx((1 / 3 + 1 / 2) / 2)
    assert r["accuracy_micro"] == pytest.approx(2 / 5)
    gold_p = [0.4, 0.1, 0.2, 0.1, 0.4]
    # vs exact values: the toy's fp32 log-probabilities are each off by ~eps32; rel 1e-5 is ~80 eps32
    assert r["answer_logprob"] == pytest.approx(sum(map(math.log, gold_p)) / 5, rel=1e-5)
    assert r["answer_logprob_norm"] == pytest.approx(sum(math.log(p / 0.8) for p in gold_p) / 5, rel=1e-5)
    assert r["letter_mass"] == pytest.approx(0.8, rel=1e-5)
    assert r["questions"] == 5 and r["subjects"] == 2 and r["shots"] == shots


@pytest.mark.numerics
@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_prefix_cache_gives_the_same_logprobs_as_full_prompts(tok, build):
    model = build()
    prefix = tok(subject_prefix("algebra", tiny_mmlu().splits["dev"][:2]))["input_ids"]
    suffixes = [tok(format_question(q), add_special_tokens=False)["input_ids"] for q in tiny_mmlu().splits["test"]]
    cached = last_token_logprobs(model, prefix, suffixes, batch_size=3, use_prefix_cache=True)
    full = last_token_logprobs(model, prefix, suffixes, batch_size=3, use_prefix_cache=False)
    assert cached.shape == (5, len(tok))
    # attention over a cached prefix vs the whole prompt at once: the same sums in other blockings; the
    # scale is |log p| ~ log(vocab), an upper bound on the logits' own (~0.1) and the log-sum-exp's
    assert_close_fp32(cached, full, k=len(prefix) + max(map(len, suffixes)))  # attention sums over the prompt


def test_subset_of_subjects_and_questions(tok):
    model = FixedNextToken(len(tok), letter_token_ids(tok))
    r = evaluate_mmlu(model, tok, tiny_mmlu(), subjects=["algebra"], max_per_subject=2)
    assert r["questions"] == 2 and list(r["per_subject"]) == ["algebra"]


def test_unknown_subject_names_the_known_ones(tok):
    with pytest.raises(ValueError, match="known: algebra, physics"):
        evaluate_mmlu(tiny_llama(), tok, tiny_mmlu(), subjects=["astronomy"])


def test_more_shots_than_the_pool_holds_is_an_error(tok):
    with pytest.raises(ValueError, match="few-shot example"):
        evaluate_mmlu(tiny_llama(), tok, tiny_mmlu(), shots=5)
