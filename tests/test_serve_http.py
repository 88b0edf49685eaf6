"""`sharelora serve` over HTTP, called with the official openai client, on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time

import openai
import pytest

from serve_tiny import files, LiveServer, Offline, offline, serve_bounded, serve_one_thread  # noqa: F401 (fixtures)

from sharelora.serve.model import ServedModel
from sharelora.serve.settings import Settings

ADAPTERS = ["sql", "chat", "solo", "peft"]
PROMPTS = ["the restaurant is", "name : blue spice , food : italian", "translate to french : hello world",
           "what is 2 and 2 ?", "a pub near the riverside", "summarize the following"]


def load_served(files) -> ServedModel:
    served = ServedModel.load(str(files["model"]), device="cpu")
    served.add_adapter(served.read_adapter(files["multi"]))
    served.add_adapter(served.read_adapter(files["solo"], "solo"))
    served.add_adapter(served.read_adapter(files["peft"], "peft"))
    return served


@pytest.fixture(scope="module")
def server(files):
    with LiveServer(load_served(files), Settings(model=str(files["model"]), adapter_root=str(files["root"]),
                                                 max_batch=8)) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def slow(served: ServedModel, seconds: float = 0.01) -> ServedModel:
    """Make every forward take a while, so requests are still running when a test looks."""
    real = served.forward

    def forward(*args):
        time.sleep(seconds)
        return real(*args)

    served.forward = forward
    return served


# --- the API --------------------------------------------------------------------------------------------
def test_models_lists_the_base_model_and_every_adapter(client, files):
    models = client.models.list().data
    assert [m.id for m in models if m.status == "loaded"] == [str(files["model"]), "sql", "chat", "solo", "peft"]
    # and what --adapter-root holds that a request may name (an adapter of multi/ as multi:NAME)
    assert [m.id for m in models if m.status == "loadable"] == ["clash", "multi:sql", "multi:chat"]


def test_health(server):
    status, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["adapters"] == 4


@pytest.mark.parametrize("adapter", ADAPTERS + ["base"])
def test_completions_equal_offline_greedy_generation(client, offline, files, adapter):
    model = str(files["model"]) if adapter == "base" else adapter
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        want = offline.generate(None if adapter == "base" else adapter, offline.encode(prompt), 12)
        assert r.choices[0].text == offline.text(want)
        assert r.usage.completion_tokens == len(want) and r.usage.prompt_tokens == len(offline.encode(prompt))
        assert r.choices[0].finish_reason == ("stop" if 2 in want else "length")


def test_adapters_give_different_completions(client):
    texts = {a: client.completions.create(model=a, prompt=PROMPTS[0], max_tokens=12, temperature=0).choices[0].text
             for a in ADAPTERS}
    assert len(set(texts.values())) == len(ADAPTERS)


@pytest.mark.parametrize("adapter", ["sql", "peft"])
def test_chat_completions_use_the_chat_template_and_equal_offline(client, offline, adapter):
    messages = [{"role": "user", "content": "translate to french : hello world"}]
    r = client.chat.completions.create(model=adapter, messages=messages, max_tokens=10, temperature=0)
    want = offline.generate(adapter, offline.chat_ids(messages), 10)
    assert r.choices[0].message.content == offline.text(want) and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(offline.chat_ids(messages))


def test_streaming_equals_non_streaming(client):
    kw = dict(model="chat", prompt=PROMPTS[1], max_tokens=14, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    messages = [{"role": "user", "content": PROMPTS[2]}]
    chat = client.chat.completions.create(model="solo", messages=messages, max_tokens=14, temperature=0)
    stream = list(client.chat.completions.create(model="solo", messages=messages, max_tokens=14, temperature=0,
                                                 stream=True))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason == chat.choices[0].finish_reason


def test_stop_strings_end_the_text_before_them(client):
    full = client.completions.create(model="sql", prompt=PROMPTS[3], max_tokens=12, temperature=0).choices[0].text
    words = full.split()
    stop = " " + words[len(words) // 2]
    want = full[:full.index(stop)]
    r = client.completions.create(model="sql", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="sql", prompt=PROMPTS[3], max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == want


def test_a_seed_repeats_a_sampled_completion(client):
    kw = dict(model="peft", prompt=PROMPTS[4], max_tokens=12, temperature=1.0, top_p=0.9, seed=123)
    assert client.completions.create(**kw).choices[0].text == client.completions.create(**kw).choices[0].text


def test_token_id_prompts_are_accepted(client, offline):
    ids = offline.encode(PROMPTS[0])
    r = client.completions.create(model="sql", prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == offline.text(offline.generate("sql", ids, 8))


# --- errors -----------------------------------------------------------------------------------------------
def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="a", max_tokens=3)
    assert e.value.body["code"] == "model_not_found" and "'nope'" in e.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "a"}])


@pytest.mark.parametrize("kw,param", [
    (dict(n=100), "n"), (dict(temperature=5.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"), (dict(max_tokens=10_000), "prompt"), (dict(logprobs=21), "logprobs"),
    (dict(prompt="a " * 600), "prompt"), (dict(prompt=[5, 99999]), "prompt"), (dict(prompt=""), "prompt"),
    (dict(stop=["a", "b", "c", "d", "e"]), "stop"),
])
def test_bad_parameters_are_400_in_openais_format(client, kw, param):
    args = dict(model="sql", prompt="the restaurant is", max_tokens=4) | kw
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**args)
    assert e.value.status_code == 400 and e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"].startswith(param)


def test_a_body_that_is_not_json_is_400(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5\r\nConnection: close\r\n\r\n{nope")
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
        reply = reply.decode()
    assert reply.startswith("HTTP/1.1 400") and '"error"' in reply


def test_an_exception_in_one_request_does_not_harm_the_others(files, offline):
    served = load_served(files)
    real = served.forward

    def forward(ids, *args):
        if ids.shape[1] > 1 and ids[0, -1].item() == offline.encode("bonjour")[0]:
            raise RuntimeError("this prompt breaks the model")
        return real(ids, *args)

    served.forward = forward
    with LiveServer(served, Settings(model=str(files["model"]))) as srv:
        client = srv.client()
        results = {}

        def call(i):
            prompt = "le monde bonjour" if i == 0 else PROMPTS[i]
            try:
                results[i] = client.completions.create(model=ADAPTERS[i % 4], prompt=prompt, max_tokens=8,
                                                       temperature=0).choices[0].text
            except openai.APIStatusError as e:
                results[i] = e

        threads = [threading.Thread(target=call, args=(i,)) for i in range(5)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert isinstance(results[0], openai.InternalServerError)
        assert "breaks the model" in results[0].body["message"]
        for i in range(1, 5):
            want = offline.generate(ADAPTERS[i % 4], offline.encode(PROMPTS[i]), 8)
            assert results[i] == offline.text(want)
        assert srv.request("GET", "/health")[0] == 200


def test_a_full_queue_is_429_and_a_disconnecting_client_frees_its_slot(files):
    settings = Settings(model=str(files["model"]), max_batch=1, max_queue=1)
    with LiveServer(slow(load_served(files)), settings) as srv:
        client = srv.client()
        long = client.completions.create(model="sql", prompt="a", max_tokens=400, stream=True, temperature=0,
                                         extra_body={"ignore_eos": True})
        next(iter(long))  # running: the batch (of 1) is full
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=client.completions.create(
            model="chat", prompt="b", max_tokens=3, temperature=0)))
        t.start()
        srv.wait_for(lambda h: h["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="chat", prompt="c", max_tokens=3)
        assert e.value.body["code"] == "queue_full"
        closed = time.monotonic()
        long.close()  # the client goes away: its slot frees, the waiting request runs
        t.join(30)
        assert waiting["r"].usage.completion_tokens >= 1
        assert time.monotonic() - closed < 2.5  # the long request's 400 tokens would take > 4 s
        srv.wait_for(lambda h: h["running"] == 0 and h["waiting"] == 0)


def test_a_client_that_disconnects_from_a_non_streaming_request_frees_its_slot(files):
    with LiveServer(slow(load_served(files)), Settings(model=str(files["model"]))) as srv:
        body = json.dumps({"model": "sql", "prompt": "a", "max_tokens": 450, "ignore_eos": True}).encode()
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        srv.wait_for(lambda h: h["running"] == 1)
        s.close()
        srv.wait_for(lambda h: h["running"] == 0, timeout=2.5)  # long before its 450 tokens (> 4.5 s)


def test_concurrent_load_over_four_adapters_answers_every_request(server, offline):
    client = server.client()
    jobs = [(ADAPTERS[(c + k) % 4], PROMPTS[(c * 4 + k) % len(PROMPTS)]) for c in range(16) for k in range(4)]
    want = {(a, p): offline.text(offline.generate(a, offline.encode(p), 10)) for a, p in set(jobs)}
    got, errors = {}, []

    def client_thread(c):
        for k in range(4):
            adapter, prompt = jobs[c * 4 + k]
            try:
                if k % 2:
                    stream = client.completions.create(model=adapter, prompt=prompt, max_tokens=10, temperature=0,
                                                       stream=True)
                    text = "".join(ch.choices[0].text for ch in stream)
                else:
                    text = client.completions.create(model=adapter, prompt=prompt, max_tokens=10,
                                                     temperature=0).choices[0].text
                got[c * 4 + k] = text
            except Exception as e:  # noqa: BLE001 - counted below
                errors.append(e)

    threads = [threading.Thread(target=client_thread, args=(c,)) for c in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(got) == 64
    assert all(got[i] == want[jobs[i]] for i in range(64))
    # a row leaves the batch just after its last event is sent: the count reaches 0 right after
    server.wait_for(lambda h: h["running"] == 0 and h["waiting"] == 0, timeout=5)


# --- adapters while serving --------------------------------------------------------------------------------
def test_load_and_unload_adapters_while_serving(files, tmp_path):
    from sharelora import ShareLoraModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with LiveServer(slow(load_served(files), 0.002), Settings(model=str(files["model"]),
                                                              adapter_root=str(files["root"]))) as srv:
        client = srv.client()
        busy = client.completions.create(model="sql", prompt="a", max_tokens=300, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # a request runs while adapters come and go
        before = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=10, temperature=0)
        status, body = srv.request("POST", "/v1/load_lora_adapter", {"lora_name": "clash", "lora_path": "clash"})
        assert status == 200 and body["adapters"][0]["name"] == "clash"
        assert "clash" in [m.id for m in client.models.list().data]
        got = client.completions.create(model="clash", prompt=PROMPTS[0], max_tokens=10, temperature=0)
        ref = ShareLoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), files["clash"])
        off = Offline.__new__(Offline)
        off.model, off.tokenizer = ref.eval(), AutoTokenizer.from_pretrained(files["model"])
        assert got.choices[0].text == off.text(off.generate("default", off.encode(PROMPTS[0]), 10))
        after = client.completions.create(model="sql", prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert after.choices[0].text == before.choices[0].text  # clash's own A did not touch sql's

        assert srv.request("POST", "/v1/load_lora_adapter", {"lora_name": "clash", "lora_path": "solo"})[0] == 400
        assert srv.request("POST", "/v1/load_lora_adapter", {"lora_name": "p2", "lora_path": "peft"})[0] == 200
        assert srv.request("POST", "/v1/unload_lora_adapter", {"lora_name": "clash"}) == (
            200, {"status": "ok", "lora_name": "clash"})
        assert {m.id: m.status for m in client.models.list().data}["clash"] == "loadable"  # from the root
        assert srv.request("POST", "/v1/unload_lora_adapter", {"lora_name": "clash"})[0] == 404
        again = client.completions.create(model="clash", prompt=PROMPTS[0], max_tokens=10, temperature=0)
        assert again.choices[0].text == got.choices[0].text  # loaded again on demand
        assert srv.request("POST", "/v1/unload_lora_adapter", {"lora_name": "p2"})[0] == 200
        with pytest.raises(openai.NotFoundError):  # p2 has no directory of its name under the root
            client.completions.create(model="p2", prompt="a", max_tokens=2)
        assert "p2" not in [m.id for m in client.models.list().data]
        busy.close()
        assert srv.request("GET", "/health")[0] == 200


def test_unload_waits_for_the_adapters_running_requests(files):
    with LiveServer(slow(load_served(files)), Settings(model=str(files["model"]))) as srv:
        client = srv.client()
        stream = client.completions.create(model="peft", prompt="a", max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        next(iter(stream))
        result = {}
        t = threading.Thread(target=lambda: result.update(
            r=srv.request("POST", "/v1/unload_lora_adapter", {"lora_name": "peft"})))
        t.start()
        time.sleep(0.3)
        assert not result  # still running: the unload waits
        with pytest.raises(openai.NotFoundError):  # but no new request may start on it
            client.completions.create(model="peft", prompt="a", max_tokens=2)
        stream.close()
        t.join(30)
        assert result["r"][0] == 200 and "peft" not in srv.served.adapters


def test_a_non_fitting_adapter_is_refused_with_400(server, files, tmp_path):
    from sharelora import ShareLoraConfig, get_sharelora_model
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=24, vocab_size=120))
    target = files["root"] / "wrong-shape"
    get_sharelora_model(other, ShareLoraConfig(rank=4, target_modules=["q_proj"])).save_pretrained(target)
    try:
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "w", "lora_path": "wrong-shape"})
    finally:
        shutil.rmtree(target)
    assert status == 400 and "does not fit" in body["error"]["message"]
    assert "w" not in [m.id for m in server.client().models.list().data]


# --- security -------------------------------------------------------------------------------------------
def test_the_api_key_is_required_on_every_request(files):
    with LiveServer(load_served(files), Settings(model=str(files["model"]), api_key="s3cret")) as srv:
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            srv.client(api_key="s3cre").completions.create(model="sql", prompt="a", max_tokens=2)
        assert srv.request("GET", "/health")[0] == 401
        assert srv.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "solo"})[0] == 401
        good = srv.client(api_key="s3cret")
        assert good.completions.create(model="sql", prompt="a", max_tokens=2).usage.completion_tokens >= 1
        assert srv.request("GET", "/health", key="s3cret")[0] == 200
        # without --adapter-root, loading while serving is off
        assert srv.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "solo"},
                           key="s3cret")[0] == 403


def test_load_lora_adapter_reads_only_under_the_adapter_root(server, files, tmp_path):
    outside = tmp_path / "outside"
    shutil.copytree(files["solo"], outside)
    root = files["root"]
    os.symlink(outside, root / "escape")
    (root / "halfway").mkdir()
    shutil.copy(files["solo"] / "adapter_config.json", root / "halfway")
    os.symlink(outside / "adapter_model.safetensors", root / "halfway" / "adapter_model.safetensors")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_model.bin").write_bytes(b"not loaded")
    try:
        for path in ["../model", "solo/../../model", str(outside), "escape", "halfway", str(root / "escape")]:
            status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": path})
            assert status == 403, path
            assert body["error"]["type"] == "permission_error"
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "pickled"})
        assert status == 400 and "safetensors" in body["error"]["message"]
        assert server.request("POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "nowhere"})[0] == 400
    finally:
        for p in ("escape",):
            os.unlink(root / p)
        shutil.rmtree(root / "halfway")
        shutil.rmtree(root / "pickled")
    assert "x" not in [m.id for m in server.client().models.list().data]
