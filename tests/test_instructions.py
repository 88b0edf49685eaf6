"""Instruction task: the chat template is applied, only the reply is learned, held-out loss by subtask."""

import math

import pytest
from generation_tiny import tiny_instructions, tiny_llama, tiny_tokenizer

from sharelora.tasks.instructions import InstructionTask, user_message
from sharelora.tasks.lm import IGNORE_INDEX


def test_chat_template_is_applied_and_only_the_reply_is_a_target():
    tok = tiny_tokenizer(chat_template=True)
    task = InstructionTask(tiny_instructions(), tok)
    assert task.use_chat_template
    split = task.encode("train")
    ex = split.examples[0]
    full = tok.apply_chat_template(
        [{"role": "user", "content": user_message(ex)}, {"role": "assistant", "content": ex["output"]}],
        tokenize=True)["input_ids"]
    assert split.input_ids[0] == full
    targets = [t for t in split.labels[0] if t != IGNORE_INDEX]
    assert tok.decode(targets) == "bonjour le monde <|end|>"  # the reply and its end-of-turn token
    prompt_len = split.labels[0].index(targets[0])
    assert tok.decode(split.input_ids[0][:prompt_len]) == "<|user|> translate to french hello world <|end|> <|assistant|>"


def test_user_turn_is_the_instruction_then_the_input():
    assert user_message({"instruction": "Translate.", "input": "Hello"}) == "Translate.\n\nHello"
    assert user_message({"instruction": "Write a poem.", "input": ""}) == "Write a poem."


def test_without_a_chat_template_the_plain_format_is_used():
    tok = tiny_tokenizer(chat_template=False)
    task = InstructionTask(tiny_instructions(), tok)
    assert not task.use_chat_template
    prompt, target = task.format(tiny_instructions().splits["train"][0])
    assert target[-1] == tok.eos_token_id
    assert tok.decode(target[:-1]) == "bonjour le monde"


def test_asking_for_a_chat_template_the_tokenizer_lacks_is_an_error():
    with pytest.raises(ValueError, match="no chat template"):
        InstructionTask(tiny_instructions(), tiny_tokenizer(), use_chat_template=True)


def test_held_out_loss_is_per_target_token_and_reported_per_subtask():
    tok = tiny_tokenizer(chat_template=True)
    task = InstructionTask(tiny_instructions(), tok)
    model = tiny_llama()
    test = task.evaluate(model, task.encode("test"))
    dev = task.evaluate(model, task.encode("dev"))
    assert task.primary_metric == "loss" and not task.greater_is_better
    assert test["perplexity"] == pytest.approx(math.exp(test["loss"]))
    assert set(test["loss_by_subtask"]) == {"t1", "t3"} and "loss_by_subtask" not in dev
    # A random model is close to uniform over the vocabulary.
    assert abs(test["loss"] - math.log(len(tok))) < 1.0
    tokens = test["target_tokens"]
    weighted = sum(v * n for v, n in zip(test["loss_by_subtask"].values(), [3, 6]))  # t1: 2+1, t3: 5+1 tokens
    assert tokens == 9 and weighted / tokens == pytest.approx(test["loss"], rel=1e-5)
