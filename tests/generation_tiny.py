"""Tiny word-level tokenizer, tiny random causal LMs and tiny E2E / instruction / MMLU data.

Everything is built in memory from configs, so the generation tests run in seconds without any
download. The tokenizer splits on whitespace and punctuation and lowercases, so " A" is one
token (as in real BPE vocabularies) and decoded text is the tokens joined by spaces.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SPECIAL = ["<pad>", "<unk>", "<eos>", "<bos>", "<|user|>", "<|assistant|>", "<|end|>"]
WORDS = (
    "meaning representation description : , . name eattype area food pricerange near customer rating "
    "blue spice pub riverside city centre cheap high moderate italian french the a is an in of and with "
    "located serves it restaurant coffee shop family friendly not 5 out 1 3 "
    "translate to french summarize write answer question yes no hello world bonjour le monde "
    "the following are multiple choice questions with answers about physics algebra "
    "what 2 4 6 8 ? a b c d answer"
).split()
VOCAB = SPECIAL + sorted(set(WORDS))

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} <|end|>"
    "{% else %}<|assistant|> {{ m['content'] }} <|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_tokenizer(chat_template: bool = False, bos: bool = False):
    """A word-level PreTrainedTokenizerFast over VOCAB (eos "<eos>", pad "<pad>", unk "<unk>")."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", additional_special_tokens=["<|user|>", "<|assistant|>", "<|end|>"])
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(layers=2, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=len(VOCAB), max_position_embeddings=256, bos_token_id=3,
                      eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers=2, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=len(VOCAB), n_positions=256, bos_token_id=3,
                     eos_token_id=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@dataclass
class TinyTaskData:
    """Same fields as sharelora.sources.TaskData."""

    name: str
    task_type: str
    splits: dict[str, list[dict]]
    label_names: list[str] = field(default_factory=list)
    text_fields: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TinyBundle:
    """Same fields as sharelora.sources.ModelBundle."""

    model: Any
    tokenizer: Any
    name: str = "tiny-llama"
    pretrained: bool = False
    info: dict[str, Any] = field(default_factory=dict)


MRS = [
    ("name: blue spice, eattype: pub, area: riverside",
     ["blue spice is a pub in the riverside area .", "the blue spice pub is located in riverside ."]),
    ("name: blue spice, food: italian, pricerange: cheap",
     ["blue spice serves cheap italian food ."]),
    ("name: the restaurant, area: city centre, familyfriendly: yes",
     ["the restaurant is family friendly and located in the city centre .",
      "in the city centre the restaurant is family friendly ."]),
    ("name: coffee shop, food: french, near: blue spice",
     ["the coffee shop serves french food near blue spice ."]),
    ("name: the pub, customer rating: high, area: riverside",
     ["the pub in riverside has a high customer rating ."]),
    ("name: blue spice, pricerange: high, eattype: restaurant",
     ["blue spice is a high pricerange restaurant .", "blue spice is a restaurant with high pricerange ."]),
]


def tiny_e2e() -> TinyTaskData:
    """Six MRs: two for train, two for dev, two for test (so no MR is in two splits)."""

    def rows(mrs):
        return [{"mr": mr, "target": t, "references": list(refs)} for mr, refs in mrs for t in refs]

    return TinyTaskData("tiny-e2e", "generation", {"train": rows(MRS[:2]), "dev": rows(MRS[2:4]),
                                                   "test": rows(MRS[4:])}, text_fields=("mr", "target"))


def tiny_instructions() -> TinyTaskData:
    ex = [
        {"instruction": "translate to french", "input": "hello world", "output": "bonjour le monde", "task": "t1"},
        {"instruction": "answer yes or no", "input": "is blue spice a pub ?", "output": "yes", "task": "t2"},
        {"instruction": "write a description", "input": "", "output": "the pub is cheap .", "task": "t3"},
        {"instruction": "translate to french", "input": "the world", "output": "le monde", "task": "t1"},
    ]
    return TinyTaskData("tiny-instructions", "instruction", {"train": ex[:2], "dev": ex[2:], "test": ex[2:]})


def tiny_mmlu() -> TinyTaskData:
    def q(text, answer, subject):
        return {"question": text, "choices": ["2", "4", "6", "8"], "answer": answer, "subject": subject}

    test = [q("what is 2 and 2 ?", 1, "algebra"), q("what is 4 and 4 ?", 3, "algebra"),
            q("what is 2 and 4 ?", 2, "algebra"), q("what is a ?", 0, "physics"), q("what is b ?", 1, "physics")]
    dev = [q(f"what is {a} ?", i % 4, s) for s in ("algebra", "physics") for i, a in enumerate(["2", "4", "6"])]
    return TinyTaskData("tiny-mmlu", "multiple-choice", {"train": [], "dev": dev, "test": test})
