"""The completions API as clients use it, through the official openai client: log-probabilities (equal to
the offline model's log_softmax, whatever else is in the batch), echo and scoring, several prompts, n > 1,
chat logprobs, /tokenize and /detokenize, and every unimplemented parameter refused by name."""

from __future__ import annotations

import math
import threading

import openai
import pytest
import torch

from serve_tiny import files, LiveServer, load_served, Offline, offline, serve_bounded, serve_one_thread, slow  # noqa: F401 (fixtures)

from sharelora.serve.settings import Settings

TOL = 1e-4
PROMPTS = ["the restaurant is", "name : blue spice , food : italian", "translate to french : hello world"]


@pytest.fixture(scope="module")
def server(files):
    with LiveServer(load_served(files), Settings(model=str(files["model"]), max_batch=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@torch.no_grad()
def offline_logprobs(offline: Offline, adapter: str | None, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log_softmax of the offline model's fp32 logits, one adapter active."""
    x = torch.tensor([ids])
    if adapter is None:
        with offline.model.disable_adapter():
            logits = offline.model(input_ids=x).logits
    else:
        offline.model.set_adapter(adapter)
        logits = offline.model(input_ids=x).logits
    return torch.log_softmax(logits[0].float(), dim=-1)


def greedy(offline: Offline, adapter: str | None, ids: list[int], n: int) -> list[int]:
    """n greedy tokens, end-of-sequence included (as ``ignore_eos`` generates them)."""
    out = list(ids)
    for _ in range(n):
        out.append(int(offline_logprobs(offline, adapter, out)[-1].argmax()))
    return out[len(ids):]


def token(offline: Offline, tid: int) -> str:
    return offline.tokenizer.decode([tid])


def check_top(offline, top: dict, row: torch.Tensor, k: int) -> None:
    values, ids = row.topk(k)
    want = {}
    for i, v in zip(ids.tolist(), values.tolist()):
        want.setdefault(token(offline, i), v)
    assert list(top) == list(want)
    assert all(abs(top[w] - want[w]) < TOL for w in want)


# --- scoring: echo, max_tokens 0 ---------------------------------------------------------------------------
@pytest.mark.parametrize("adapter", ["sql", "chat", "solo", "peft", None])
def test_scoring_with_echo_equals_the_offline_log_softmax(client, offline, files, adapter):
    model = adapter or str(files["model"])
    ids = offline.encode(PROMPTS[1])
    for prompt in (PROMPTS[1], ids):
        r = client.completions.create(model=model, prompt=prompt, max_tokens=0, echo=True, logprobs=3, temperature=0)
        (choice,) = r.choices
        lp = choice.logprobs
        assert choice.text == (PROMPTS[1] if isinstance(prompt, str) else offline.tokenizer.decode(ids))
        assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
        assert lp.tokens == [token(offline, i) for i in ids]
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        want = offline_logprobs(offline, adapter, ids)
        for i in range(1, len(ids)):
            assert abs(lp.token_logprobs[i] - want[i - 1, ids[i]].item()) < TOL
            check_top(offline, lp.top_logprobs[i], want[i - 1], 3)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_echo_with_generation_shows_the_prompt_then_the_completion(client, offline):
    ids = offline.encode(PROMPTS[0])
    r = client.completions.create(model="solo", prompt=PROMPTS[0], max_tokens=6, echo=True, logprobs=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    gen = greedy(offline, "solo", ids, 6)
    choice = r.choices[0]
    assert choice.text == PROMPTS[0] + offline.text(gen)
    full = ids + gen
    want = offline_logprobs(offline, "solo", full)
    assert choice.logprobs.tokens == [token(offline, i) for i in full]
    assert choice.logprobs.token_logprobs[0] is None
    for i in range(1, len(full)):
        assert abs(choice.logprobs.token_logprobs[i] - want[i - 1, full[i]].item()) < TOL
    plain = client.completions.create(model="solo", prompt=PROMPTS[0], max_tokens=6, echo=True, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].text == choice.text and plain.choices[0].logprobs is None


def test_generated_tokens_logprobs_equal_offline_and_do_not_depend_on_the_batch(files, offline):
    """The same greedy request alone and batched with other adapters' requests: same tokens, the same
    log-probabilities, and both equal the offline model's."""
    with LiveServer(slow(load_served(files), 0.005), Settings(model=str(files["model"]), max_batch=8)) as srv:
        client = srv.client()
        kw = dict(model="chat", prompt=PROMPTS[2], max_tokens=10, logprobs=4, temperature=0,
                  extra_body={"ignore_eos": True})
        alone = client.completions.create(**kw)
        others, results = [], {}

        def other(i):
            results[i] = client.completions.create(model=["sql", "peft", "solo"][i % 3], prompt=PROMPTS[i % 3] + " a",
                                                   max_tokens=30, temperature=0, extra_body={"ignore_eos": True})

        for i in range(5):
            others.append(threading.Thread(target=other, args=(i,)))
            others[-1].start()
        srv.wait_for(lambda h: h["running"] >= 3)
        batched = client.completions.create(**kw)
        for th in others:
            th.join(60)
        assert len(results) == 5
    a, b = alone.choices[0].logprobs, batched.choices[0].logprobs
    assert a.tokens == b.tokens and alone.choices[0].text == batched.choices[0].text
    ids = offline.encode(PROMPTS[2])
    gen = greedy(offline, "chat", ids, 10)
    want = offline_logprobs(offline, "chat", ids + gen)
    assert a.tokens == [token(offline, i) for i in gen]
    for j, tid in enumerate(gen):
        row = want[len(ids) + j - 1]
        assert abs(a.token_logprobs[j] - row[tid].item()) < TOL
        assert abs(b.token_logprobs[j] - row[tid].item()) < TOL
        check_top(offline, a.top_logprobs[j], row, 4)
        check_top(offline, b.top_logprobs[j], row, 4)


def test_logprobs_zero_gives_the_chosen_tokens_only(client):
    r = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=4, logprobs=0, temperature=0,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(x <= 0 for x in lp.token_logprobs)
    assert lp.top_logprobs == [{}, {}, {}, {}]


# --- several prompts, n ---------------------------------------------------------------------------------
def test_several_prompts_give_one_choice_each_in_order(client, offline):
    one = [client.completions.create(model="peft", prompt=p, max_tokens=8, temperature=0).choices[0].text
           for p in PROMPTS]
    r = client.completions.create(model="peft", prompt=PROMPTS, max_tokens=8, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == one
    assert r.usage.prompt_tokens == sum(len(offline.encode(p)) for p in PROMPTS)
    ids = [offline.encode(p) for p in PROMPTS]
    r2 = client.completions.create(model="peft", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in r2.choices] == one
    scored = client.completions.create(model="peft", prompt=ids, max_tokens=0, echo=True, logprobs=1)
    for choice, p in zip(scored.choices, ids):
        want = offline_logprobs(offline, "peft", p)
        got = choice.logprobs.token_logprobs
        assert len(got) == len(p) and got[0] is None
        assert all(abs(got[i] - want[i - 1, p[i]].item()) < TOL for i in range(1, len(p)))


def test_n_choices_are_seeded_and_indexed_per_prompt(client):
    kw = dict(model="solo", max_tokens=10, temperature=1.0, seed=7, extra_body={"ignore_eos": True})
    r = client.completions.create(prompt=PROMPTS[0], n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    texts = [c.text for c in r.choices]
    assert len(set(texts)) > 1  # three samples of a random adapter at temperature 1
    assert [c.text for c in client.completions.create(prompt=PROMPTS[0], n=3, **kw).choices] == texts
    assert client.completions.create(prompt=PROMPTS[0], **kw).choices[0].text == texts[0]
    kw8 = kw | {"seed": 8}
    assert client.completions.create(prompt=PROMPTS[0], **kw8).choices[0].text == texts[1]  # choice j: seed + j
    two = client.completions.create(prompt=PROMPTS[:2], n=2, **kw)
    assert [c.index for c in two.choices] == [0, 1, 2, 3]
    assert two.choices[0].text == texts[0] and two.choices[1].text == texts[1]
    assert two.usage.completion_tokens == 40


def test_streaming_several_choices_equals_the_whole_answer(client):
    kw = dict(model="sql", prompt=PROMPTS[:2], n=2, max_tokens=8, temperature=0.8, seed=3, logprobs=2)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    texts, tokens, finish = {}, {}, {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.logprobs:
                tokens.setdefault(ch.index, []).extend(ch.logprobs.tokens)
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]
    assert [tokens[i] for i in range(4)] == [c.logprobs.tokens for c in whole.choices]
    assert [finish[i] for i in range(4)] == [c.finish_reason for c in whole.choices]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# --- chat ----------------------------------------------------------------------------------------------------
def test_chat_logprobs_and_top_logprobs_equal_offline(client, offline):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    r = client.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3, extra_body={"ignore_eos": True})
    ids = offline.chat_ids(messages)
    gen = greedy(offline, "sql", ids, 6)
    want = offline_logprobs(offline, "sql", ids + gen)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [token(offline, i) for i in gen]
    for j, (c, tid) in enumerate(zip(content, gen)):
        row = want[len(ids) + j - 1]
        assert abs(c.logprob - row[tid].item()) < TOL and c.bytes == list(c.token.encode())
        values, top_ids = row.topk(3)
        assert [x.token for x in c.top_logprobs] == [token(offline, i) for i in top_ids.tolist()]
        assert all(abs(x.logprob - v) < TOL for x, v in zip(c.top_logprobs, values.tolist()))
    plain = client.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    stream = list(client.chat.completions.create(model="sql", messages=messages, max_tokens=6, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [c for ch in stream for choice in ch.choices if choice.logprobs for c in choice.logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    n2 = client.chat.completions.create(model="sql", messages=messages, max_tokens=6, n=2, temperature=1, seed=1)
    assert [c.index for c in n2.choices] == [0, 1]


def test_top_logprobs_without_logprobs_is_refused(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "a"}], top_logprobs=2)
    assert e.value.body["param"] == "top_logprobs"


# --- tokenize / detokenize -------------------------------------------------------------------------------------
def test_tokenize_and_detokenize_with_vllms_bodies(server, offline, files):
    status, body = server.request("POST", "/tokenize", {"model": "sql", "prompt": PROMPTS[1]})
    ids = offline.encode(PROMPTS[1])
    assert status == 200 and body == {"count": len(ids), "max_model_len": 512, "tokens": ids, "token_strs": None}
    status, body = server.request("POST", "/tokenize", {"prompt": PROMPTS[1], "return_token_strs": True})
    assert body["token_strs"] == [token(offline, i) for i in ids]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    status, body = server.request("POST", "/tokenize", {"model": str(files["model"]), "messages": messages})
    assert status == 200 and body["tokens"] == offline.chat_ids(messages)
    status, body = server.request("POST", "/detokenize", {"model": "sql", "tokens": ids})
    assert status == 200 and body == {"prompt": offline.tokenizer.decode(ids, skip_special_tokens=True)}
    assert server.request("POST", "/detokenize", {"tokens": [10 ** 9]})[0] == 400
    assert server.request("POST", "/tokenize", {"model": "nope", "prompt": "a"})[0] == 404
    assert server.request("POST", "/tokenize", {"prompt": "a", "messages": messages})[0] == 400
    assert server.request("POST", "/tokenize", {"prompt": "a", "chat_template": "{{x}}"})[1]["error"]["param"] == \
        "chat_template"


# --- refused -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,param", [
    (dict(best_of=2), "best_of"), (dict(suffix="x"), "suffix"), (dict(presence_penalty=0.5), "presence_penalty"),
    (dict(frequency_penalty=0.5), "frequency_penalty"), (dict(logit_bias={"5": 1.0}), "logit_bias"),
    (dict(extra_body={"top_k": 5}), "top_k"), (dict(extra_body={"prompt_logprobs": 1}), "prompt_logprobs"),
    (dict(extra_body={"use_beam_search": True}), "use_beam_search"),
    (dict(max_tokens=0), "max_tokens"), (dict(logprobs=21), "logprobs"), (dict(n=65), "n"),
    (dict(prompt=[[5, 6]] * 300), "prompt"), (dict(prompt=[]), "prompt"), (dict(prompt=[[5], []]), "prompt"),
])
def test_what_is_not_implemented_is_refused_by_name(client, kw, param):
    args = dict(model="sql", prompt="the restaurant is", max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.body["param"].startswith(param), e.value.body


def test_a_prompt_that_fills_the_context_can_be_scored_but_not_continued(client):
    ids = [9] * 512
    r = client.completions.create(model="sql", prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert len(r.choices[0].logprobs.token_logprobs) == 512 and math.isfinite(r.choices[0].logprobs.token_logprobs[-1])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="sql", prompt=ids, max_tokens=1)


# --- the scheduler's side ----------------------------------------------------------------------------------------
def test_the_scheduler_scores_a_prompt_without_generating(files, offline):
    from sharelora.serve.scheduler import SamplingParams, Scheduler

    served = load_served(files)
    ids = offline.encode(PROMPTS[1])
    with Scheduler(served) as sched:
        c = sched.generate(ids, "chat", SamplingParams(max_tokens=0, prompt_logprobs=2), timeout=30)
        with pytest.raises(ValueError, match="max_tokens must be >= 1"):
            sched.generate(ids, "chat", SamplingParams(max_tokens=0), timeout=30)
    assert c.token_ids == [] and c.finish_reason == "length" and c.completion_tokens == 0
    want = offline_logprobs(offline, "chat", ids)
    assert [e.token for e in c.prompt_logprobs] == ids and math.isnan(c.prompt_logprobs[0].logprob)
    assert all(abs(e.logprob - want[i - 1, ids[i]].item()) < TOL for i, e in enumerate(c.prompt_logprobs) if i)
    assert all(len(e.top) == 2 for e in c.prompt_logprobs[1:])


def test_submit_all_queues_every_request_or_none(files):
    from sharelora.serve.scheduler import GenerationRequest, QueueFull, SamplingParams, Scheduler

    sched = Scheduler(slow(load_served(files)), max_batch=1, max_queue=2)
    with sched:
        busy = sched.submit(GenerationRequest([5, 6], "sql", SamplingParams(max_tokens=300, ignore_eos=True)))
        while sched.running < 1:
            pass
        with pytest.raises(QueueFull):
            sched.submit_all([GenerationRequest([5], "sql", SamplingParams(max_tokens=2)) for _ in range(3)])
        assert sched.waiting == 0
        sched.submit_all([GenerationRequest([5], "sql", SamplingParams(max_tokens=2)) for _ in range(2)])
        assert sched.waiting == 2
        sched.cancel(busy.id)
