"""Tiny random-init models built from configs, so the method's tests run in seconds; one fp32 tolerance."""

import math

import pytest
import torch
from torch import nn

TINY = dict(vocab_size=97, max_position_embeddings=64)

# --- comparing two fp32 computations of the same math -------------------------------------------
EPS32 = torch.finfo(torch.float32).eps  # 2**-23 ~ 1.19e-7
TINY_K = 97  # the longest sum in the tiny models: the vocabulary (LM heads); hidden 32, FFN 48, 14 tokens
FP32_C = 16.0


def fp32_atol(expected: torch.Tensor, *, k: int = TINY_K, c: float = FP32_C) -> float:
    """c * sqrt(k) * eps32 * max|expected|: see :func:`assert_close_fp32`."""
    return c * math.sqrt(k) * EPS32 * expected.detach().abs().max().item() if expected.numel() else 0.0


def assert_close_fp32(actual: torch.Tensor, expected: torch.Tensor, *, k: int = TINY_K, c: float = FP32_C,
                      what: str = ""):
    """``actual`` equals ``expected`` up to the rounding of fp32 sums taken in another order.

    Two fp32 evaluations of the same math that sum in another order (a fused kernel vs plain ops,
    merged vs unmerged weights, PEFT vs ours, compiled vs eager, 1 vs 2 threads, AVX2 vs AVX-512
    blocking, Intel vs AMD) differ per rounding stage by ~ sqrt(k) * eps32 * |terms|, k the length
    of the sums (dot products over features, sums over tokens); the stages of a forward and a
    backward through a few layers add up, which c covers with a margin. The scale is the tensor's,
    not each element's: an element that is small because its terms cancel carries the absolute
    error of those terms (on AMD a gradient element of 0.04 in a tensor whose largest is 25 was
    6.6e-6 off: 2 eps32 of 25, but 1.6e-4 of itself). So one absolute bound per tensor, no rtol:

        atol = c * sqrt(k) * eps32 * max|expected|,  c = 16  (1.9e-5 of max|expected| at k = 97)

    Measured here (AMD EPYC; 1 and 2 threads; with and without the compiled dropout kernel) the
    differences use at most 0.11 of it. Bugs are far past it: on the dropout layer test a missing
    1/(1-p) is 5e4 bounds, one flipped mask bit 4e3, a scaling 0.1% off 150.
    """
    assert expected.dtype == torch.float32 and actual.dtype == torch.float32, (actual.dtype, expected.dtype)
    atol = fp32_atol(expected, k=k, c=c)
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0

    def message(default: str) -> str:
        used = (actual.detach() - expected.detach()).abs().max().item() / atol if atol else float("inf")
        return (f"{what + ': ' if what else ''}{default}\nbound: {c:g} * sqrt({k}) * eps32 * max|expected| "
                f"({scale:.3g}) = {atol:.3g}; the difference is {used:.3g} of it")

    torch.testing.assert_close(actual, expected, rtol=0.0, atol=atol, msg=message)


def assert_close_after_adamw(actual: dict, expected: dict, *, lr: float, steps: int, per_step: float = 1e-3):
    """Two AdamW runs whose gradients differ only by fp32 rounding (micro-batches vs one batch) reach
    the same weights, up to ``per_step`` of AdamW's largest travel, ``lr * steps``.

    AdamW moves an element by lr * m/(sqrt(v) + eps) ~ lr a step, whatever its gradient's scale, so
    a gradient rounded ~1e-6 of its tensor's scale apart moves an element whose own gradient is
    small (cancelling terms) by a different fraction of lr: the difference scales with the travel,
    not with the weights (|B| ~ 0.005, |A| ~ 0.2). Bound: atol = 1e-3 * lr * steps, rtol 0; measured
    (AMD EPYC, 1 and 2 threads) up to 0.05 of it. A micro-batch dropped, stepped on its own or left
    in the next step turns a step's gradient by O(1), so its update by O(lr): ~1000 bounds' worth.
    Not covered: an element whose first gradient is itself below the rounding (~1e-6 of the largest)
    may flip sign there (2 lr apart); ~1e-3 odds at these sizes.
    """
    assert actual.keys() == expected.keys()
    atol = per_step * lr * steps
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=0.0, atol=atol,
                                   msg=lambda m, k=k: f"{k}: {m}\nbound: {per_step:g} * lr {lr:g} * {steps} steps")


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
        # inductor fuses and reorders the sums (its own layer norm, softmax and matmul tilings)
        assert_close_fp32(run(compiled, name, x), eager)
    run(compiled, name, x).sum().backward()
    assert all(p.grad is not None for p in model.sharelora_bank.values())


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    return request.param
