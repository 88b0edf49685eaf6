"""Every exported adapter loads in PEFT, and back into ShareLoRA, with the model's outputs.

For each task type (SEQ_CLS with BERT's ``classifier``, RoBERTa's ``classifier.dense`` /
``out_proj`` and LLaMA's ``score``; CAUSAL_LM with LLaMA and GPT-2's fused ``c_attn`` slices;
TOKEN_CLS; QUESTION_ANS; a bare ``BertModel`` and a plain torch module, task type None) and each
kind of ``modules_to_save`` (none, the head by its leaf name or its full path, part of a head, a
module that is not a head): export, load with ``peft.PeftModel.from_pretrained`` into a fresh base
model, and with ``ShareLoraModel.from_peft``, and compare the outputs.

The fresh base model for a task whose head PEFT loads from the file (SEQ_CLS, TOKEN_CLS:
``classifier`` / ``score``; QUESTION_ANS: ``qa_outputs``) gets a newly drawn head, as
``AutoModelForSequenceClassification.from_pretrained`` gives an encoder each time: the outputs
still match only because the export carries the head the model computes with.
"""

import json
import warnings
from dataclasses import dataclass, field

import pytest
import torch

peft = pytest.importorskip("peft")
from peft.auto import MODEL_TYPE_TO_PEFT_MODEL_MAPPING
from safetensors import safe_open

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model

from conftest import TINY, assert_close_fp32, fp32_atol, tiny_bert, tiny_gpt2, tiny_llama, tiny_plain, tiny_roberta

# --- float32 tolerance ---------------------------------------------------------------------------
# ShareLoRA (x W0^T + (s x A^T) B^T with q/k/v down-projections in one product, and a head's LoRA
# merged into its weight on export) and PEFT (x W0^T + s (x A^T) B^T per module) compute the same
# real-number function in float32, summing in other orders: conftest's ``assert_close_fp32``
# bound, 16 sqrt(k) eps32 max|outputs| with k = 97 the longest sum here (1.9e-5 of the outputs'
# largest magnitude, which is 0.01 to 3 across these models), holds for any CPU and thread count.
# Measured over this matrix (AMD EPYC, 1 and 2 threads): each of ShareLoRA, PEFT and from_peft is
# within 5.4e-7 of max|outputs| of a float64 run, and PEFT or from_peft differ from ShareLoRA by at
# most 0.023 of the bound. Every case's adapter moves the outputs by more than 100 bounds (``_assert_adapter_matters``),
# and the fresh base's heads are drawn anew with std 1, so a lost LoRA update, a wrong scaling or a
# head that is missing from the file cannot pass.


def tiny_llama_seq(layers=3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=97, max_position_embeddings=64, bos_token_id=0,
                      eos_token_id=0, pad_token_id=0, num_labels=3)
    return LlamaForSequenceClassification(cfg).eval()


def _bert_config(layers=3, **kw):
    from transformers import BertConfig

    return BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=48,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **TINY, **kw)


def tiny_bert_token(layers=3):
    from transformers import BertForTokenClassification

    torch.manual_seed(0)
    return BertForTokenClassification(_bert_config(layers, num_labels=5)).eval()


def tiny_bert_qa(layers=3):
    from transformers import BertForQuestionAnswering

    torch.manual_seed(0)
    return BertForQuestionAnswering(_bert_config(layers)).eval()


def tiny_bert_bare(layers=3):
    from transformers import BertModel

    torch.manual_seed(0)
    return BertModel(_bert_config(layers)).eval()


@dataclass
class Arch:
    build: object
    task_type: str | None
    target_modules: object
    heads: list[str]  # paths of the modules PEFT loads from the file for this task type
    modules_to_save: list[list[str]] = field(default_factory=list)  # the variants tested besides none


ARCHS = {
    "bert-seq": Arch(tiny_bert, "SEQ_CLS", ["query", "value"], ["classifier"],
                     [["classifier"], ["pooler"], ["bert.pooler"]]),
    # all-linear adapts classifier.dense / out_proj unless saved: the export merges them into the head.
    "roberta-seq": Arch(tiny_roberta, "SEQ_CLS", "all-linear", ["classifier"],
                        [["classifier"], ["out_proj"], ["classifier.out_proj"], ["roberta.embeddings.LayerNorm"],
                         ["LayerNorm"]]),
    "llama-seq": Arch(tiny_llama_seq, "SEQ_CLS", "all-linear", ["score"], [["score"], ["norm"], ["model.norm"]]),
    "llama-causal": Arch(tiny_llama, "CAUSAL_LM", ["q_proj", "k_proj", "v_proj"], [],
                         [["lm_head"], ["norm"], ["model.norm"]]),
    "gpt2-causal": Arch(tiny_gpt2, "CAUSAL_LM", ["c_attn.q", "c_attn.v"], [],
                        [["lm_head"], ["ln_f"], ["transformer.ln_f"]]),
    "bert-token": Arch(tiny_bert_token, "TOKEN_CLS", ["query", "value"], ["classifier"],
                       [["classifier"], ["bert.embeddings.LayerNorm"]]),
    "bert-qa": Arch(tiny_bert_qa, "QUESTION_ANS", "all-linear", ["qa_outputs"],
                    [["qa_outputs"], ["bert.embeddings.LayerNorm"]]),
    "bert-bare": Arch(tiny_bert_bare, None, ["query", "value"], [], [["pooler"], ["embeddings.LayerNorm"]]),
    "plain": Arch(tiny_plain, None, ["q"], [], [["v"], ["2.v"]]),
}
CASES = [(a, m) for a, arch in ARCHS.items() for m in [[]] + arch.modules_to_save]


def _inputs(arch_name):
    g = torch.Generator().manual_seed(1)
    if arch_name == "plain":
        return {"x": torch.randn(2, 7, 16, generator=g)}
    ids = torch.randint(3, 97, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _run(model, arch_name, x) -> torch.Tensor:
    out = model(x["x"]) if arch_name == "plain" else model(**x)
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "start_logits", None) is not None:  # question answering
        return torch.stack([out.start_logits, out.end_logits])
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def outputs(model, arch_name) -> torch.Tensor:
    with torch.no_grad():
        return _run(model, arch_name, _inputs(arch_name))


def adapted(arch_name, modules_to_save):
    """A ShareLoRA model with random B after one SGD step, so every saved module differs from the base."""
    arch = ARCHS[arch_name]
    model = get_sharelora_model(arch.build(), ShareLoraConfig(
        rank=4, alpha=8, share="A", target_modules=arch.target_modules, modules_to_save=modules_to_save,
        init_lora_weights=False))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.3)
    _run(model, arch_name, _inputs(arch_name)).square().mean().backward()
    opt.step()
    return model.eval()


def fresh_base(arch_name):
    """The same base model, with a newly drawn head where PEFT loads the head from the adapter file."""
    base = ARCHS[arch_name].build()
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for path in ARCHS[arch_name].heads:
            for p in base.get_submodule(path).parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return base


def _assert_adapter_matters(arch_name, reference):
    change = (reference - outputs(ARCHS[arch_name].build(), arch_name)).abs().max().item()
    assert change > 100 * fp32_atol(reference), "the adapter barely changes the outputs: the test would be weak"


def _file_keys(d):
    with safe_open(str(d / "adapter_model.safetensors"), "pt") as f:
        return list(f.keys())


# --- the matrix ----------------------------------------------------------------------------------

@pytest.mark.numerics
@pytest.mark.parametrize("arch_name,modules_to_save", CASES, ids=[f"{a}-{'+'.join(m) or 'none'}" for a, m in CASES])
def test_export_loads_in_peft_and_back_with_the_same_outputs(arch_name, modules_to_save, tmp_path):
    arch = ARCHS[arch_name]
    model = adapted(arch_name, modules_to_save)
    reference = outputs(model, arch_name)
    _assert_adapter_matters(arch_name, reference)

    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == arch.task_type
    expected_saved = sorted({*arch.heads, *model.modules_to_save_names})
    expected_saved = [p for p in expected_saved if not any(p.startswith(h + ".") for h in arch.heads)]
    assert (cfg["modules_to_save"] or []) == expected_saved
    keys = _file_keys(tmp_path)
    assert all(k.startswith("base_model.model.") for k in keys)
    saved_keys = [k for k in keys if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
    assert all(any(k.startswith(f"base_model.model.{p}.") for p in expected_saved) for k in saved_keys)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(fresh_base(arch_name), str(tmp_path)).eval()
    assert not [w for w in caught if "missing adapter keys" in str(w.message)]
    assert type(loaded) is MODEL_TYPE_TO_PEFT_MODEL_MAPPING.get(arch.task_type, peft.PeftModel)
    # The file holds exactly what PEFT itself would save for the model it built from the config.
    assert set(keys) == set(peft.get_peft_model_state_dict(loaded))
    assert_close_fp32(outputs(loaded, arch_name), reference, what="PEFT")

    back = ShareLoraModel.from_peft(fresh_base(arch_name), tmp_path)
    assert back.modules_to_save_names == expected_saved
    assert_close_fp32(outputs(back, arch_name), reference, what="from_peft")


# --- the rules the matrix relies on, one at a time -----------------------------------------------

def test_seq_cls_export_carries_the_head_it_did_not_train(tmp_path):
    """RoBERTa with the head outside modules_to_save: PEFT wraps ``classifier`` and reads its weights."""
    model = adapted("roberta-seq", [])
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    keys = set(_file_keys(tmp_path))
    for name in ("dense.weight", "dense.bias", "out_proj.weight", "out_proj.bias"):
        assert f"base_model.model.classifier.{name}" in keys
    # The adapter's LoRA on classifier.dense (all-linear) is in the head's weight, not a PEFT LoRA
    # inside a module PEFT trains in full.
    assert not any(k.startswith("base_model.model.classifier.") and ".lora_" in k for k in keys)


def test_causal_lm_export_without_modules_to_save_holds_lora_tensors_only(tmp_path):
    """What vLLM / LoRAX read: standard per-layer lora_A / lora_B keys and nothing else."""
    model = adapted("llama-causal", [])
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM" and cfg["modules_to_save"] is None
    keys = _file_keys(tmp_path)
    assert len(keys) == 2 * 3 * 3  # (A, B) x 3 layers x q/k/v
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in keys)


@pytest.mark.parametrize("arch_name", ["bert-bare", "plain"])
def test_a_model_without_a_task_gets_task_type_none_and_peft_auto_mapping(arch_name, tmp_path):
    model = adapted(arch_name, [])
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    base = ARCHS[arch_name].build()
    assert cfg["task_type"] is None
    assert cfg["auto_mapping"] == {"base_model_class": type(base).__name__, "parent_library": type(base).__module__}


@pytest.mark.numerics
@pytest.mark.parametrize("arch_name,auto_class", [
    ("bert-seq", "AutoPeftModelForSequenceClassification"), ("llama-causal", "AutoPeftModelForCausalLM"),
    ("bert-token", "AutoPeftModelForTokenClassification"), ("bert-qa", "AutoPeftModelForQuestionAnswering"),
    ("bert-bare", "AutoPeftModel"),
])
def test_auto_peft_model_builds_the_base_the_task_type_names(arch_name, auto_class, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base_dir = tmp_path / "base"
    ARCHS[arch_name].build().save_pretrained(base_dir)
    base = type(ARCHS[arch_name].build()).from_pretrained(base_dir).eval()
    model = get_sharelora_model(base, ShareLoraConfig(rank=4, alpha=8, target_modules=["query", "value"]
                                                      if "bert" in arch_name else ["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    model.export_peft(tmp_path / "peft")
    loaded = getattr(peft, auto_class).from_pretrained(str(tmp_path / "peft")).eval()
    assert type(loaded.get_base_model()) is type(base)
    assert_close_fp32(outputs(loaded, arch_name), outputs(model, arch_name), what=auto_class)


@pytest.mark.numerics
def test_from_peft_imports_modules_of_different_ranks(tmp_path):
    """GPT-2 q/v slices (rank 2r on c_attn) with mlp.c_fc (rank r): the export has a rank_pattern."""
    model = get_sharelora_model(tiny_gpt2(), ShareLoraConfig(rank=4, alpha=8, share="A", init_lora_weights=False,
                                                             target_modules=["c_attn.q", "c_attn.v", "c_fc"]))
    model.export_peft(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and {cfg["r"], *cfg["rank_pattern"].values()} == {4, 8}
    reference = outputs(model, "gpt2-causal")
    loaded = peft.PeftModel.from_pretrained(tiny_gpt2(), str(tmp_path)).eval()
    assert_close_fp32(outputs(loaded, "gpt2-causal"), reference, what="PEFT")
    back = ShareLoraModel.from_peft(tiny_gpt2(), tmp_path)
    assert back.sharelora_config.rank == 8
    assert_close_fp32(outputs(back, "gpt2-causal"), reference, what="from_peft")


def test_an_adapter_entirely_inside_the_head_is_refused_with_the_reason(tmp_path):
    from sharelora import ShareLoraError

    model = get_sharelora_model(tiny_roberta(), ShareLoraConfig(rank=4, target_modules=["out_proj"]))
    with pytest.raises(ShareLoraError, match="modules_to_save"):
        model.export_peft(tmp_path)


@pytest.mark.numerics
def test_an_adapter_exports_the_head_it_computes_with_whichever_adapter_is_active(tmp_path):
    """"b" trains its own copy of the head; "default" runs the original head with its LoRA in it.

    Each export carries the head its adapter computes with, whichever adapter is active."""
    model = adapted("roberta-seq", [])  # "default": all-linear, LoRA on classifier.dense / out_proj
    model.add_adapter("b", ShareLoraConfig(rank=4, alpha=8, target_modules=["query", "value"],
                                           modules_to_save=["classifier"], init_lora_weights=False))
    for name, other in (("default", "b"), ("b", "default")):
        model.set_adapter(name)
        reference = outputs(model, "roberta-seq")
        model.set_adapter(other)  # the export reads the adapter it is asked for, not the active one
        model.export_peft(tmp_path / name, adapter_name=name)
        loaded = peft.PeftModel.from_pretrained(fresh_base("roberta-seq"), str(tmp_path / name)).eval()
        assert_close_fp32(outputs(loaded, "roberta-seq"), reference, what=f"PEFT {name}")


@pytest.mark.numerics
def test_a_merged_model_exports_the_same_adapter(tmp_path):
    """merge() folds B A into W0 (the head's too); the export still writes W0 + s B A once."""
    model = adapted("llama-seq", [])  # all-linear: score is adapted and PEFT loads it in full
    reference = outputs(model, "llama-seq")
    model.merge()
    model.export_peft(tmp_path)
    loaded = peft.PeftModel.from_pretrained(fresh_base("llama-seq"), str(tmp_path)).eval()
    assert_close_fp32(outputs(loaded, "llama-seq"), reference, what="PEFT of a merged model")
