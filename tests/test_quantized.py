"""ShareLoRA on a bitsandbytes-quantized base (QLoRA): wrap, train, merge (dequantized), export to PEFT (issue 13)."""

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraError, ShareLoraModel, get_sharelora_model
from sharelora.method.quantized import keep_trainable, quantization_of

from generation_tiny import VOCAB

bnb = pytest.importorskip("bitsandbytes")

TARGETS = ["q_proj", "v_proj", "down_proj"]  # square, GQA (d_out 32) and a wide-input map
IDS = torch.tensor([[3, 10, 11, 12, 13, 14, 15, 16], [3, 20, 21, 22, 23, 24, 25, 26]])


def small_llama():
    """A 2-layer LLaMA, hidden 64: bitsandbytes' 4-bit blocks hold 64 weights, and its CPU kernels want
    whole blocks along a row (generation_tiny's hidden 32 is too narrow for them)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=len(VOCAB), max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("small-llama")
    small_llama().save_pretrained(out)
    return out


def load(llama_dir, kind=None, compute_dtype=torch.float32):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if kind is None:
        return AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    q = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
         if kind == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    return AutoModelForCausalLM.from_pretrained(llama_dir, quantization_config=q, device_map="cpu",
                                                dtype=torch.float32).eval()


def adapted(base, seed=0):
    """ShareA on TARGETS with a non-zero B, so the update shows in every output (the same A and B each call)."""
    torch.manual_seed(seed)
    model = get_sharelora_model(base, ShareLoraConfig(rank=4, alpha=8, share="A", target_modules=TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.sharelora_bank.items():
            if k.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_quantized_layers_are_wrapped_with_their_true_shapes(llama_dir, kind):
    base = load(llama_dir, kind)
    keep_trainable(base)  # the kernel the wrapped model runs (bitsandbytes' CPU inference one computes in bf16)
    reference = logits(base)
    model = get_sharelora_model(base, ShareLoraConfig(rank=4, share="A", target_modules=TARGETS))
    layers = dict(model.sharelora_layers())
    assert len(layers) == 3 * 2 and all(layer.quantized == kind for layer in layers.values())
    v = layers["model.layers.0.self_attn.v_proj"]
    assert (v._d_out_total, v.base_layer.in_features) == (32, 64)  # not the packed storage's shape
    shapes = {g["module_type"].rsplit(".", 1)[-1]: (g["d_in"], g["d_out"]) for g in model.parameter_report()["groups"]}
    assert shapes == {"q_proj": (64, 64), "v_proj": (64, 32), "down_proj": (128, 64)}
    assert torch.equal(logits(model), reference)  # B = 0: the base model's outputs, bit for bit


def test_training_on_a_4bit_base_moves_the_adapter_only(llama_dir):
    model = get_sharelora_model(load(llama_dir, "4bit"), ShareLoraConfig(rank=4, share="A", target_modules=TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    assert not any(p.requires_grad for p in model.base_model.parameters())
    before = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(not torch.equal(v, before[k]) for k, v in model.adapter_state_dict().items())
    for n, p in model.base_model.named_parameters():  # the packed 4-bit codes and every other weight
        assert torch.equal(p, frozen[n]), n


def test_an_evaluation_leaves_a_4bit_base_differentiable(llama_dir):
    """bitsandbytes repacks a 4-bit weight for its AVX512-BF16 CPU kernel at the first no-grad eval
    forward and then computes that layer outside autograd (quantized.keep_trainable); after an
    evaluation the adapters below it would get no gradient. (Where the CPU lacks AVX512-BF16 there
    is no repacking; the flag check still holds.)"""
    def gradients(evaluate_first):
        model = adapted(load(llama_dir, "4bit"))
        if evaluate_first:
            logits(model)  # eval mode, no grad: where bitsandbytes would repack
        model.train()
        model(input_ids=IDS, labels=IDS).loss.backward()
        return {k: p.grad for k, p in model.sharelora_bank.items()}, model

    plain, _ = gradients(False)
    after_eval, model = gradients(True)
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    for k, g in plain.items():
        assert after_eval[k] is not None and torch.equal(after_eval[k], g), k


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_merge_on_a_quantized_base_is_refused_and_names_the_fix(llama_dir, kind):
    model = adapted(load(llama_dir, kind))
    before = logits(model)
    with pytest.raises(ShareLoraError, match=r"bitsandbytes.*merge_and_unload\(dequantize=True\)"):
        model.merge()
    with pytest.raises(ShareLoraError, match=r"dequantize=True"):
        model.merge_and_unload()
    assert not any(layer.merged for _, layer in model.sharelora_layers())
    assert torch.equal(logits(model), before)


def test_merge_and_unload_dequantize_gives_a_float_model_with_the_4bit_models_outputs(llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = adapted(load(llama_dir, "4bit"))
    unmerged = logits(model)
    float_adapted = logits(adapted(load(llama_dir)))  # the same adapter on the unquantized weights
    merged = model.merge_and_unload(dequantize=True)
    assert not any(quantization_of(m) for m in merged.modules())
    assert not getattr(merged, "is_loaded_in_4bit", False) and not getattr(merged, "is_quantized", False)
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32  # the embeddings' dtype
    out = logits(merged)
    # The 4-bit layer multiplies by exactly the dequantized weight: only fp32 rounding remains,
    # while the quantization error itself (the float base vs the 4-bit one) is far larger.
    quantization_error = (float_adapted - unmerged).abs().max().item()
    assert (out - unmerged).abs().max().item() <= 1e-5 * unmerged.abs().max().item() < quantization_error / 100
    merged.save_pretrained(tmp_path)  # a plain float model: saves and loads without bitsandbytes settings
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert getattr(again.config, "quantization_config", None) is None
    torch.testing.assert_close(logits(again), out, rtol=0, atol=0)


def test_merge_and_unload_dequantize_8bit_matches_within_the_quantization_error(llama_dir):
    model = adapted(load(llama_dir, "8bit"))
    unmerged = logits(model)
    float_adapted = logits(adapted(load(llama_dir)))
    merged = model.merge_and_unload(dequantize=True, dtype=torch.float32)
    assert not any(quantization_of(m) for m in merged.modules())
    out = logits(merged)
    # LLM.int8() also rounds the activations to int8, which the float model does not: the merged
    # outputs are as far from the 8-bit model's as the float model's are (here about 1x), not closer.
    quantization_error = (float_adapted - unmerged).abs().max().item()
    assert (out - unmerged).abs().max().item() <= 2 * quantization_error
    assert (out - float_adapted).abs().max().item() <= 2 * quantization_error


def test_dequantize_to_bf16_halves_the_merged_model(llama_dir):
    merged = adapted(load(llama_dir, "4bit")).merge_and_unload(dequantize=True, dtype=torch.bfloat16)
    assert merged.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16  # not adapted, dequantized too
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_export_peft_on_a_4bit_base_loads_in_peft_with_the_same_logits(llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = adapted(load(llama_dir, "4bit"))
    ours = logits(model)
    model.export_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(load(llama_dir, "4bit"), str(tmp_path)).eval()
    # bitsandbytes' CPU inference kernel (AVX512-BF16) would run PEFT's model with bf16 scales; ours is
    # kept off it (quantized.keep_trainable), so the comparison keeps PEFT's off it as well
    keep_trainable(loaded)
    assert type(loaded.base_model.model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"  # PEFT's bnb LoRA
    theirs = logits(loaded)
    assert (theirs - ours).abs().max().item() <= 1e-5 * ours.abs().max().item()
    assert (ours - logits(load(llama_dir, "4bit"))).abs().max().item() > 1e-2  # the adapter matters here


def test_transformers_accepts_a_sharelora_model_on_a_quantized_base_for_training(llama_dir):
    from transformers.trainer_utils import validate_quantization_for_training

    base = load(llama_dir, "4bit")
    with pytest.raises(ValueError, match="purely quantized"):
        validate_quantization_for_training(base)
    validate_quantization_for_training(get_sharelora_model(base, ShareLoraConfig(rank=4, target_modules=TARGETS)))


def test_a_saved_adapter_of_a_4bit_run_loads_on_the_4bit_base(llama_dir, tmp_path):
    model = adapted(load(llama_dir, "4bit"))
    model.save_pretrained(tmp_path)
    again = ShareLoraModel.from_pretrained(load(llama_dir, "4bit"), tmp_path)
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_sft_trainer_trains_a_sharelora_model_on_a_4bit_base(llama_dir, tmp_path):
    pytest.importorskip("trl")
    from datasets import Dataset
    from safetensors import safe_open
    from trl import SFTConfig, SFTTrainer

    from generation_tiny import tiny_tokenizer

    model = get_sharelora_model(load(llama_dir, "4bit"), ShareLoraConfig(rank=4, share="A", target_modules=TARGETS))
    frozen = {n: p.detach().clone() for n, p in model.base_model.named_parameters()}
    data = Dataset.from_list([{"text": "translate to french hello world bonjour le monde"}] * 8)
    args = SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2,
                     report_to=[], use_cpu=True, save_steps=2)  # TRL's defaults otherwise: checkpointing, bf16
    SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tiny_tokenizer()).train()
    b = [p for k, p in model.sharelora_bank.items() if k.endswith("lora_B")]
    assert all(p.abs().sum() > 0 for p in b)  # B starts at 0
    for n, p in model.base_model.named_parameters():
        assert torch.equal(p, frozen[n]), n
    with safe_open(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(model.adapter_state_dict())  # the adapter only, no 4-bit weight
