"""Tiny random-init models built from configs, so the method's tests run in seconds."""

import pytest
import torch
from torch import nn

TINY = dict(vocab_size=97, max_position_embeddings=64)


def tiny_bert(num_labels=3, layers=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                     num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY)
    return BertForSequenceClassification(cfg).eval()


def tiny_roberta(layers=3):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(0)
    cfg = RobertaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        pad_token_id=1, **TINY)
    return RobertaForSequenceClassification(cfg).eval()


def tiny_gpt2(layers=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, vocab_size=97, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(layers=3):
    """LLaMA with grouped-query attention: q_proj 32->32, k_proj / v_proj 32->16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=97, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.q(x)) * self.v(x)


def tiny_plain(layers=3):
    torch.manual_seed(0)
    return nn.Sequential(*[Block() for _ in range(layers)]).eval()


BUILDERS = {
    "bert": (tiny_bert, ["query", "value"]),
    "roberta": (tiny_roberta, ["query", "value"]),
    "gpt2": (tiny_gpt2, ["c_attn.q", "c_attn.v"]),
    "llama": (tiny_llama, ["q_proj", "v_proj"]),
    "plain": (tiny_plain, ["q", "v"]),
}


def example_input(name, batch=2, seq=7):
    g = torch.Generator().manual_seed(1)
    if name == "plain":
        return {"x": torch.randn(batch, seq, 16, generator=g)}
    ids = torch.randint(3, 97, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run(model, name, inputs):
    out = model(inputs["x"]) if name == "plain" else model(**inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


def assert_compile_matches_eager(model, name):
    """torch.compile(model) gives the eager outputs, and its backward reaches every adapter tensor."""
    x = example_input(name)
    with torch.no_grad():
        eager = run(model, name, x)
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(run(compiled, name, x), eager, rtol=1e-4, atol=1e-5)
    run(compiled, name, x).sum().backward()
    assert all(p.grad is not None for p in model.sharelora_bank.values())


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param
