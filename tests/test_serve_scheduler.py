"""The scheduler without a socket: continuous batching across adapters, exactness, failures, adapters."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from serve_tiny import files, offline, one_thread, watchdog  # noqa: F401 (fixtures)

from sharelora.serve.errors import BadRequest
from sharelora.serve.model import ServedModel
from sharelora.serve.batch_cache import BatchCache
from sharelora.serve.scheduler import QueueFull, SamplingParams, Scheduler, _Text, sample

ADAPTERS = ["sql", "chat", "solo", "peft", None]  # None: the base model


@pytest.fixture(autouse=True)
def _bounded():
    with watchdog(240), one_thread():
        yield


def load_served(files) -> ServedModel:
    served = ServedModel.load(str(files["model"]), device="cpu")
    served.add_adapter(served.read_adapter(files["multi"]))
    served.add_adapter(served.read_adapter(files["solo"], "solo"))
    served.add_adapter(served.read_adapter(files["peft"], "peft"))
    return served


@pytest.fixture
def served(files):
    return load_served(files)


def route(served, adapter):
    return served.resolve(adapter or served.name)


def prompts(n, seed=0, lo=2, hi=24):
    rng = random.Random(seed)
    return [[rng.randrange(7, 80) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def concurrently(fn, n):
    results, errors = [None] * n, []

    def work(i):
        try:
            results[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


# --- exactness ------------------------------------------------------------------------------------------
def test_mixed_batches_are_token_identical_to_offline_generate(served, offline):
    ps = prompts(20)
    names = [ADAPTERS[i % len(ADAPTERS)] for i in range(20)]
    lengths = [4 + (i * 7) % 17 for i in range(20)]  # rows leave and join at different steps
    with Scheduler(served, max_batch=6).start() as sched:
        got = concurrently(lambda i: sched.generate(ps[i], route(served, names[i]),
                                                    SamplingParams(max_tokens=lengths[i]), timeout=60), 20)
    for i in range(20):
        want = offline.generate(names[i], ps[i], lengths[i])
        assert got[i].token_ids == want, (i, names[i])
        assert got[i].text == offline.text(want)


def test_continuous_batching_runs_requests_together(served):
    ps = prompts(12, seed=1)
    gate = threading.Event()

    def open_when_all_wait():  # the 12 clients' threads start at their own pace on a busy CPU
        deadline = time.monotonic() + 60
        while sched.waiting < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        gate.set()

    with Scheduler(served, max_batch=4).start() as sched:
        sched.call(lambda: gate.wait(60))  # the worker waits (controls run before admission) until all are queued
        threading.Thread(target=open_when_all_wait, daemon=True).start()
        out = concurrently(lambda i: sched.generate(ps[i], route(served, ADAPTERS[i % 4]),
                                                    SamplingParams(max_tokens=10, ignore_eos=True), timeout=60), 12)
        steps = sched.steps
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out)
    # 12 requests x 9 decode steps alone would be 108 steps; 4 at a time it is about a quarter
    assert steps <= 12 * 9 / 4 * 1.5


def test_a_request_alone_equals_generate(served, offline):
    p = prompts(1, seed=2)[0]
    with Scheduler(served, max_batch=1).start() as sched:
        c = sched.generate(p, "chat", SamplingParams(max_tokens=15), timeout=60)
    assert c.token_ids == offline.generate("chat", p, 15)


# --- sampling and text -------------------------------------------------------------------------------------
def test_seeded_sampling_repeats_and_top_p_keeps_the_top_tokens():
    logits = torch.tensor([3.0, 2.9, 0.0, -5.0])
    params = SamplingParams(temperature=1.0, top_p=0.5)
    draws = {sample(logits, params, torch.Generator().manual_seed(s)) for s in range(50)}
    assert draws == {0, 1} or draws <= {0, 1}  # the two top tokens hold > 0.5 together; the rest never
    one = [sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(5)]
    two = [sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3)) for _ in range(5)]
    assert one == two
    assert sample(logits, SamplingParams(temperature=0.0), None) == 0


def test_stop_strings_cut_the_text_and_hold_back_a_possible_start():
    words = ["hello", " wor", "ld", " again"]
    text = _Text(lambda ids: "".join(words[i] for i in ids), ("world",))
    assert text.add(0) == ("hello", False)
    assert text.add(1) == (" ", False)  # "wor" may begin "world": held back
    assert text.add(2) == ("", True)  # "hello world": the text ends before the stop string
    assert text.text == "hello "


def test_seeded_requests_repeat_in_a_batch(served):
    p = prompts(1, seed=3)[0]
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    with Scheduler(served, max_batch=4).start() as sched:
        a, b = concurrently(lambda i: sched.generate(p, "sql", params, timeout=60).token_ids, 2)
    assert a == b


# --- failures stay with their request ------------------------------------------------------------------------
def test_a_failing_prefill_ends_only_its_request(served, offline):
    real = served.forward
    poison = 83

    def forward(ids, *args, **kw):
        if ids.shape[1] > 1 and poison in ids[0].tolist():  # the prefill of the poisoned prompt
            raise RuntimeError("boom")
        return real(ids, *args, **kw)

    served.forward = forward
    ps = prompts(6, seed=4)
    ps[2] = ps[2] + [poison]
    with Scheduler(served, max_batch=4).start() as sched:
        results = concurrently(lambda i: _outcome(sched, ps[i], "sql", 8), 6)
        assert sched.alive
    assert isinstance(results[2], RuntimeError)
    for i in (0, 1, 3, 4, 5):
        assert results[i] == offline.generate("sql", ps[i], 8)


def test_a_failing_batched_step_isolates_the_row_that_fails_alone(served, offline):
    real = served.forward

    def forward(ids, mask, pos, cache, names):
        if ids.shape[1] == 1 and "solo" in names:  # decoding any batch with a "solo" row fails
            raise RuntimeError("solo is broken")
        return real(ids, mask, pos, cache, names)

    served.forward = forward
    ps = prompts(5, seed=5)
    names = ["sql", "solo", "chat", "peft", "sql"]
    with Scheduler(served, max_batch=5).start() as sched:
        results = concurrently(lambda i: _outcome(sched, ps[i], names[i], 10), 5)
    assert isinstance(results[1], RuntimeError)
    for i in (0, 2, 3, 4):
        assert results[i] == offline.generate(names[i], ps[i], 10)


def _outcome(sched, prompt, adapter, n):
    try:
        return sched.generate(prompt, adapter, SamplingParams(max_tokens=n), timeout=60).token_ids
    except RuntimeError as e:
        return e


def test_the_queue_is_bounded(served):
    from sharelora.serve.scheduler import GenerationRequest

    release, busy = threading.Event(), threading.Event()
    real = served.forward

    def forward(*args):
        busy.set()
        release.wait(30)  # the worker is busy with the first request
        return real(*args)

    served.forward = forward
    with Scheduler(served, max_batch=1, max_queue=2).start() as sched:
        sched.submit(GenerationRequest([5, 6], "sql", SamplingParams(max_tokens=2)))
        assert busy.wait(30)
        for _ in range(2):
            sched.submit(GenerationRequest([5, 6], "sql", SamplingParams(max_tokens=2)))
        with pytest.raises(QueueFull, match="max-queue 2"):
            sched.submit(GenerationRequest([5, 6], "sql"))
        release.set()


def test_cancelled_requests_leave_the_batch(served):
    from sharelora.serve.scheduler import GenerationRequest

    events, started = [], threading.Event()

    def sink(e):
        events.append(e)
        started.set()

    with Scheduler(served, max_batch=2).start() as sched:
        req = sched.submit(GenerationRequest([5, 6, 7], "sql", SamplingParams(max_tokens=400, ignore_eos=True), sink))
        assert started.wait(30)
        sched.cancel(req.id)
        c = sched.generate([8, 9], "chat", SamplingParams(max_tokens=3), timeout=30)
    assert c.completion_tokens == 3
    assert events[-1].finish_reason == "cancelled" and events[-1].completion_tokens < 400


# --- the KV layout ---------------------------------------------------------------------------------------------
def _state(value: float, width: int, window: int = 3) -> BatchCache:
    """One row of ``width`` tokens: a full layer holding every column, a sliding one (window 3) the last 2."""
    full = value * torch.arange(1, width + 1, dtype=torch.float).view(1, 1, width, 1).expand(1, 2, width, 4)
    sliding = full[:, :, -(window - 1):]
    return BatchCache([full, sliding], [full.clone(), sliding.clone()], [None, window],
                      torch.ones(1, width, dtype=torch.long))


def test_join_and_select_keep_each_rows_columns_and_cut_unused_ones():
    a, b = _state(1.0, 3), _state(2.0, 5)
    both = BatchCache.join([a, b])
    assert both.mask.tolist() == [[0, 0, 1, 1, 1], [1] * 5]
    assert both.keys[0].shape == (2, 2, 5, 4) and torch.equal(both.keys[0][0, :, 2:], a.keys[0][0])
    assert both.keys[1].shape == (2, 2, 2, 4)  # the sliding layer keeps the last W - 1 = 2 columns
    assert torch.equal(both.keys[1][0], a.keys[1][0]) and torch.equal(both.keys[1][1], b.keys[1][0])
    short = BatchCache.join([_state(3.0, 1), b]).select([0])  # the long row leaves: 1 column is left
    assert short.mask.tolist() == [[1]] and short.keys[0].shape[2] == 1 and short.keys[1].shape[2] == 1
    assert float(short.keys[1][0, 0, 0, 0]) == 3.0
    alone = both.select([0])
    assert alone.mask.tolist() == [[1, 1, 1]] and torch.equal(alone.keys[0], a.keys[0])
    assert torch.equal(alone.keys[1], a.keys[1])


def test_to_cache_hands_transformers_the_layout():
    state = BatchCache.join([_state(1.0, 3), _state(2.0, 5)])
    cache = state.to_cache()
    assert cache.is_sliding == [False, True]
    assert [layer.get_seq_length() for layer in cache.layers] == [5, 5]  # every layer has seen 5 columns
    assert cache.layers[1].get_mask_sizes(1) == (3, 3)  # the sliding keys are mask columns 3, 4 (+ the new one)
    back = BatchCache.of(cache, state.mask)
    assert all(torch.equal(x, y) for x, y in zip(back.keys, state.keys)) and back.windows == [None, 3]


# --- adapters while serving ---------------------------------------------------------------------------------------
def test_an_adapter_with_another_shared_A_is_served_in_its_own_group(served, offline, files):
    with Scheduler(served, max_batch=2).start() as sched:
        p = prompts(1, seed=6)[0]
        before = sched.generate(p, "sql", SamplingParams(max_tokens=8), timeout=30).token_ids
        info, = sched.call(lambda: served.add_adapter(served.read_adapter(files["clash"], "clash"))).result(30)
        after = sched.generate(p, "sql", SamplingParams(max_tokens=8), timeout=30).token_ids
    assert info.task_group != "default"  # clash/ says "default", but its A is not multi/'s
    assert before == after == offline.generate("sql", p, 8)


def test_a_non_fitting_adapter_is_refused_and_leaves_the_model_as_it_was(served, tmp_path):
    from sharelora import ShareLoraConfig, get_sharelora_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=24, vocab_size=120))
    get_sharelora_model(other, ShareLoraConfig(rank=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "w")
    names = served.lora.adapter_names
    with pytest.raises(BadRequest, match="does not fit"):
        served.add_adapter(served.read_adapter(tmp_path / "w", "wrong"))
    assert served.lora.adapter_names == names and "wrong" not in served.adapters


def test_unloading_every_adapter_gives_back_the_base_model(files, offline):
    served = ServedModel.load(str(files["model"]), device="cpu")
    base_modules = dict(served.base.named_modules())
    served.add_adapter(served.read_adapter(files["solo"], "solo"))
    served.remove_adapter("solo")
    assert served.lora is None
    assert {n: type(m) for n, m in served.base.named_modules()} == {n: type(m) for n, m in base_modules.items()}
    p = prompts(1, seed=7)[0]
    with Scheduler(served).start() as sched:
        c = sched.generate(p, "__base__", SamplingParams(max_tokens=6), timeout=30)
    assert c.token_ids == offline.generate(None, p, 6)


def test_call_when_unused_waits_for_the_adapters_requests(served):
    from sharelora.serve.scheduler import GenerationRequest

    started = threading.Event()
    with Scheduler(served, max_batch=2).start() as sched:
        req = sched.submit(GenerationRequest([5, 6], "peft", SamplingParams(max_tokens=400, ignore_eos=True),
                                             lambda e: started.set()))
        assert started.wait(30)
        done = sched.call_when_unused("peft", lambda: served.remove_adapter("peft"))
        assert not done.done() and "peft" in served.adapters
        sched.cancel(req.id)
        done.result(30)
    assert "peft" not in served.adapters
