"""Continuous batching for every attention layout the server batches: full attention (LLaMA, Qwen2),
sliding windows on every layer (Mistral-style ``sliding_window``), full then sliding layers (Qwen2 with
``use_sliding_window``), and sliding / full mixes (Gemma-2, Gemma-3).

The tiny models' window (``serve_tiny.WINDOW`` = 5 tokens) is shorter than most test prompts, and
generations cross it: the server's greedy tokens must equal ``model.generate``'s with the same
adapter, alone and in mixed batches whose rows join and leave mid-generation.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from serve_tiny import ARCHS, WINDOW, LiveServer, Offline, build_files, one_thread, watchdog

from sharelora.serve.model import ServedModel
from sharelora.serve.scheduler import SamplingParams, Scheduler
from sharelora.serve.settings import Settings

SLIDING = ["mistral", "qwen2-sliding", "gemma2", "gemma3"]
ADAPTERS = ["sql", "chat", "solo", "peft", None]  # None: the base model


@pytest.fixture(autouse=True)
def _bounded():
    with watchdog(240), one_thread():
        yield


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def files(arch, tmp_path_factory):
    return build_files(tmp_path_factory.mktemp(f"serve-{arch}"), arch)


@pytest.fixture(scope="module")
def offline(files):
    return Offline(files)


def load_served(files) -> ServedModel:
    served = ServedModel.load(str(files["model"]), device="cpu")
    served.add_adapter(served.read_adapter(files["multi"]))
    served.add_adapter(served.read_adapter(files["solo"], "solo"))
    served.add_adapter(served.read_adapter(files["peft"], "peft"))
    return served


def route(served, adapter):
    return served.resolve(adapter or served.name)


def prompts(n, seed=0, lo=2, hi=24):
    rng = random.Random(seed)
    return [[rng.randrange(7, 80) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def test_a_request_alone_equals_generate_across_the_window(files, offline):
    served = load_served(files)
    ps = [prompts(1, seed=s, lo=3 * WINDOW, hi=4 * WINDOW)[0] for s in range(3)] + [[9, 10]]
    with Scheduler(served, max_batch=1).start() as sched:
        for i, p in enumerate(ps):
            adapter = ADAPTERS[i % len(ADAPTERS)]
            got = sched.generate(p, route(served, adapter), SamplingParams(max_tokens=3 * WINDOW), timeout=60)
            assert got.token_ids == offline.generate(adapter, p, 3 * WINDOW), (i, adapter, len(p))


def test_mixed_batches_with_rows_joining_and_leaving_equal_generate(files, offline):
    served = load_served(files)
    ps = prompts(16, seed=1, lo=1, hi=5 * WINDOW)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(16)]
    lengths = [2 + (i * 5) % (3 * WINDOW) for i in range(16)]  # rows leave at different steps, others join
    requests = []
    with Scheduler(served, max_batch=5).start() as sched:
        from sharelora.serve.scheduler import GenerationRequest

        for i in range(16):  # all queued at once: the batch refills from the queue as rows finish
            events = []
            requests.append(events)
            sched.submit(GenerationRequest(ps[i], route(served, names[i]), SamplingParams(max_tokens=lengths[i]),
                                           events.append))
        t0 = time.monotonic()
        while not all(e and e[-1].finish_reason for e in requests) and time.monotonic() - t0 < 60:
            time.sleep(0.01)
        steps = sched.steps
    for i, events in enumerate(requests):
        assert events[-1].finish_reason in ("stop", "length"), events[-1]
        got = [t for e in events for t in e.token_ids]
        assert got == offline.generate(names[i], ps[i], lengths[i]), (i, names[i], len(ps[i]))
    assert steps < sum(lengths)  # the rows really decoded together


@pytest.mark.parametrize("arch", SLIDING, indirect=True)
def test_a_short_row_outlives_a_long_one_and_the_window_is_cut_to_it(arch, files, offline):
    """A long row (4 windows) and a one-token row start together; the long one leaves after two
    tokens, when the short one has fewer columns than the sliding layers hold: they keep its columns."""
    import threading

    served = load_served(files)
    long, short = prompts(1, seed=7, lo=4 * WINDOW, hi=4 * WINDOW)[0], [42]
    gate = threading.Event()
    with Scheduler(served, max_batch=2).start() as sched:
        sched.call(lambda: gate.wait(60))  # the worker waits until both are queued: they join in one step
        got = {}
        threads = [threading.Thread(target=lambda k, p, n, a: got.update({k: sched.generate(
            p, a, SamplingParams(max_tokens=n), timeout=60).token_ids}), args=args) for args in
            [("long", long, 2, "sql"), ("short", short, 3 * WINDOW, "chat")]]
        for t in threads:
            t.start()
        while sched.waiting < 2:
            time.sleep(0.005)
        gate.set()
        for t in threads:
            t.join(60)
    assert got["long"] == offline.generate("sql", long, 2)
    assert got["short"] == offline.generate("chat", short, 3 * WINDOW)


@pytest.mark.parametrize("arch", SLIDING, indirect=True)
def test_the_window_changes_these_generations(arch, files, offline):
    """Guard of the tests above: with the window lifted, the same weights generate other tokens for
    these prompts, so a scheduler that attended past the window would fail them."""
    ps = prompts(6, seed=1, lo=2 * WINDOW, hi=5 * WINDOW)
    windowed = [offline.generate("sql", p, 3 * WINDOW) for p in ps]
    lifted = Offline(files, sliding_window=10_000)
    assert [lifted.generate("sql", p, 3 * WINDOW) for p in ps] != windowed


@pytest.mark.parametrize("arch", ["gemma3", "mistral"], indirect=True)
def test_the_server_streams_and_answers_as_generate(arch, files, offline):
    with LiveServer(load_served(files), Settings(model=str(files["model"]), max_batch=4)) as srv:
        client = srv.client()
        prompt = "the restaurant is near the riverside and serves italian food for a fair price"
        assert len(offline.encode(prompt)) > 2 * WINDOW
        for adapter in ("sql", "peft"):
            whole = client.completions.create(model=adapter, prompt=prompt, max_tokens=3 * WINDOW, temperature=0)
            want = offline.generate(adapter, offline.encode(prompt), 3 * WINDOW)
            assert whole.choices[0].text == offline.text(want)
            chunks = list(client.completions.create(model=adapter, prompt=prompt, max_tokens=3 * WINDOW,
                                                    temperature=0, stream=True))
            assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_an_attention_the_server_cannot_batch_is_refused_naming_it(tmp_path):
    import transformers
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    from generation_tiny import tiny_tokenizer

    cfg = Llama4TextConfig(hidden_size=32, intermediate_size=48, intermediate_size_mlp=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=100,
                           attention_chunk_size=4, num_local_experts=1, max_position_embeddings=64)
    model = Llama4ForCausalLM(cfg)
    with pytest.raises(ValueError, match="chunked_attention") as e:
        ServedModel(model, tiny_tokenizer(), "tiny-llama4")
    assert "full_attention" in str(e.value) and "sliding_attention" in str(e.value)
    assert transformers.__version__  # the message names what is supported, the refusal names the feature
