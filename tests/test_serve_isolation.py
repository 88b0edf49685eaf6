"""Request isolation: no request, adapter directory or key can break `sharelora serve` or another request.

Each test is one way found to break the server (issue 23, part 2) and what it must do instead: a bad
request fails alone with a 4xx in OpenAI's format, the running requests go on, and nothing is read or
tokenized before it is bounded. Tiny model from configs, 127.0.0.1 only (see serve_tiny.py).
"""

from __future__ import annotations

import json
import shutil
import socket
import struct
import threading
import time
import tracemalloc

import openai
import pytest
import torch

from serve_tiny import files, LiveServer, offline, serve_bounded, serve_one_thread  # noqa: F401 (fixtures)

from sharelora.serve.errors import BadRequest
from sharelora.serve.model import ServedModel
from sharelora.serve.scheduler import SamplingParams, Scheduler
from sharelora.serve.settings import Settings

BODY_LIMIT = 64 * 1024
PROMPT_CHARS = 4000


def load_served(files) -> ServedModel:
    served = ServedModel.load(str(files["model"]), device="cpu")
    served.add_adapter(served.read_adapter(files["multi"]))
    served.add_adapter(served.read_adapter(files["peft"], "peft"))
    return served


def settings(files, **kw) -> Settings:
    return Settings(model=str(files["model"]), adapter_root=str(files["root"]), **kw)


@pytest.fixture(scope="module")
def server(files):
    with LiveServer(load_served(files), settings(files, max_body_bytes=BODY_LIMIT,
                                                 max_prompt_chars=PROMPT_CHARS)) as srv:
        yield srv


def raw_http(port: int, method: str, path: str, body: bytes = b"", headers: list[bytes] = (),
             chunked: bool = False, timeout: float = 30) -> tuple[int, dict | None]:
    """One HTTP/1.1 request written byte for byte (headers as given, UTF-8 or not); (status, JSON body)."""
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Content-Type: application/json",
            b"Connection: close", *headers]
    head.append(b"Transfer-Encoding: chunked" if chunked else b"Content-Length: " + str(len(body)).encode())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"\r\n".join(head) + b"\r\n\r\n")
        try:
            if chunked:
                for i in range(0, len(body), 16384):
                    part = body[i:i + 16384]
                    s.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
                s.sendall(b"0\r\n\r\n")
            else:
                s.sendall(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered (413) and closed before reading everything: the answer is still there
        reply = b""
        try:
            while chunk := s.recv(65536):
                reply += chunk
        except ConnectionResetError:
            pass
    status = int(reply.split(b" ", 2)[1])
    payload = reply.split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in reply.split(b"\r\n\r\n", 1)[0].lower():
        out, rest = b"", payload
        while rest:
            size, _, rest = rest.partition(b"\r\n")
            n = int(size, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2:]
        payload = out
    return status, json.loads(payload) if payload.strip() else None


def post(server, path: str, body: dict | str, **kw) -> tuple[int, dict | None]:
    data = body.encode("utf-8", "surrogatepass") if isinstance(body, str) else json.dumps(body).encode()
    return raw_http(server.port, "POST", path, data, **kw)


# --- a bad seed fails alone ---------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 2**70])
def test_an_out_of_range_seed_is_400_and_the_running_requests_go_on(server, seed):
    client = server.client()
    kw = dict(model="sql", prompt="the restaurant is", max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    alone = client.completions.create(**kw).choices[0].text
    stream = client.completions.create(**kw, stream=True)
    chunks = iter(stream)
    first = next(chunks)  # the request runs now
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="chat", prompt="hello", max_tokens=4, temperature=1.0, seed=seed)
    assert e.value.body["param"] == "seed" and "seed" in e.value.body["message"]
    rest = list(chunks)
    assert first.choices[0].text + "".join(c.choices[0].text for c in rest) == alone
    assert rest[-1].choices[0].finish_reason == "length"


def test_a_seed_the_generator_refuses_ends_only_its_request_in_the_scheduler(files, offline):
    served = load_served(files)
    prompts = [[5, 9, 11, 30], [7, 8, 40, 41, 42], [12, 13]]
    with Scheduler(served, max_batch=4).start() as sched:
        from sharelora.serve.scheduler import GenerationRequest

        done, events = threading.Event(), []

        def sink(e):
            events.append(e)
            if e.finish_reason is not None:
                done.set()

        running = sched.submit(GenerationRequest(prompts[0], "sql", SamplingParams(max_tokens=30), sink))
        while not events:
            time.sleep(0.005)
        with pytest.raises(ValueError, match="seed"):
            sched.generate(prompts[1], "chat", SamplingParams(max_tokens=5, temperature=1.0, seed=2**64), timeout=30)
        other = sched.generate(prompts[2], "peft", SamplingParams(max_tokens=6), timeout=30)
        assert done.wait(30)
    assert running.id and events[-1].error is None
    assert [t for e in events for t in e.token_ids] == offline.generate("sql", prompts[0], 30)
    assert other.token_ids == offline.generate("peft", prompts[2], 6)


# --- bodies and prompts are bounded before anything is parsed or tokenized -------------------------------
def test_a_body_over_the_limit_is_413(server):
    big = json.dumps({"model": "sql", "prompt": "a " * BODY_LIMIT, "max_tokens": 2}).encode()
    status, body = raw_http(server.port, "POST", "/v1/completions", big)
    assert status == 413 and body["error"]["type"] == "invalid_request_error"
    assert str(BODY_LIMIT) in body["error"]["message"] and "--max-body-bytes" in body["error"]["message"]
    status, body = raw_http(server.port, "POST", "/v1/completions", big, chunked=True)  # no Content-Length
    assert status == 413
    assert server.request("GET", "/health")[0] == 200
    assert post(server, "/v1/completions", {"model": "sql", "prompt": "a b", "max_tokens": 2})[0] == 200


def test_a_prompt_over_the_character_bound_is_400_without_tokenizing(files):
    served = load_served(files)
    calls = []
    real = served.encode
    served.encode = lambda text, *a, **kw: calls.append(len(text)) or real(text, *a, **kw)
    with LiveServer(served, settings(files, max_prompt_chars=PROMPT_CHARS)) as srv:
        client = srv.client()
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="sql", prompt="x" * (PROMPT_CHARS + 1), max_tokens=2)
        assert e.value.body["param"] == "prompt" and "--max-prompt-chars" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="sql", max_tokens=2, messages=[
                {"role": "system", "content": "y" * (PROMPT_CHARS // 2)},
                {"role": "user", "content": "z" * (PROMPT_CHARS // 2 + 1)}])
        assert e.value.body["param"] == "messages"
        assert calls == []  # refused before the tokenizer saw it
        assert client.completions.create(model="sql", prompt="x " * 10, max_tokens=2).usage.prompt_tokens >= 10
    assert calls


def test_the_default_bounds_follow_the_context_length(files):
    served = load_served(files)
    s = settings(files)
    assert s.max_body_bytes >= 1 << 20
    assert s.prompt_char_limit(served.context_length) == 32 * served.context_length


def test_tokenizing_runs_off_the_event_loop(files):
    served = load_served(files)
    entered, release = threading.Event(), threading.Event()
    real = served.encode

    def encode(text, *a, **kw):
        if text.startswith("slow"):
            entered.set()
            release.wait(20)  # a long tokenization: the event loop must keep answering meanwhile
        return real(text, *a, **kw)

    served.encode = encode
    with LiveServer(served, settings(files)) as srv:
        result = {}
        t = threading.Thread(target=lambda: result.update(r=srv.request("POST", "/v1/completions", {
            "model": "sql", "prompt": "slow prompt", "max_tokens": 2})))
        t.start()
        try:
            assert entered.wait(20)
            t0 = time.monotonic()
            status, health = srv.request("GET", "/health", timeout=8)
            assert status == 200 and time.monotonic() - t0 < 5
        finally:
            release.set()
            t.join(30)
        assert result["r"][0] == 200


# --- the API key ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key", ["", "   "])
def test_an_empty_api_key_is_refused_at_startup(files, key, capsys):
    from pydantic import ValidationError

    from sharelora.cli import main
    from sharelora.serve.app import create_app

    with pytest.raises(ValidationError, match="api_key"):
        Settings(model="m", api_key=key)
    assert main(["serve", "--model", str(files["model"]), "--api-key", key, "--port", "0"]) == 2
    assert "--api-key" in capsys.readouterr().err
    served = load_served(files)
    with pytest.raises(ValueError, match="api_key"):
        create_app(served, Scheduler(served), Settings.model_construct(**{**settings(files).__dict__, "api_key": key}))


def test_a_non_ascii_api_key_is_compared_as_utf8_bytes(files):
    with LiveServer(load_served(files), settings(files, api_key="clé-secrète")) as srv:
        utf8 = b"Authorization: Bearer " + "clé-secrète".encode("utf-8")
        latin1 = b"Authorization: Bearer " + "clé-secrète".encode("latin-1")
        assert raw_http(srv.port, "GET", "/health", headers=[utf8])[0] == 200
        status, body = raw_http(srv.port, "GET", "/health", headers=[latin1])
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert raw_http(srv.port, "GET", "/health", headers=[b"Authorization: Bearer cl"])[0] == 401


# --- text that is not Unicode -------------------------------------------------------------------------------
@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", '{"model": "sql", "prompt": "the \\ud800 restaurant", "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "sql", "prompt": ["the \\udfff"], "max_tokens": 2}', "prompt"),
    ("/v1/completions", '{"model": "sql", "prompt": "a", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/v1/completions", '{"model": "s\\ud800l", "prompt": "a", "max_tokens": 2}', "model"),
    ("/v1/chat/completions", '{"model": "sql", "messages": [{"role": "user", "content": "hi \\udc00"}]}',
     "messages"),
])
def test_a_lone_surrogate_is_400(server, path, body, param):
    status, reply = post(server, path, body)
    assert status == 400, reply
    assert reply["error"]["param"].startswith(param) and "surrogate" in reply["error"]["message"]


@pytest.mark.parametrize("depth", [500, 20_000])
def test_a_deeply_nested_field_is_400_not_500(server, depth):
    nested = "[" * depth + "]" * depth
    body = '{"model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "tools": %s}' % nested
    status, reply = post(server, "/v1/chat/completions", body)
    assert status == 400, reply  # refused by name, or as a body Python's JSON parser cannot nest so deep


# --- adapter directories that are not what they claim -----------------------------------------------------------
def _peft_variant(files, name: str, edit_config=None, edit_tensors=None) -> str:
    from safetensors.torch import load_file, save_file

    target = files["root"] / name
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(files["peft"], target)
    if edit_config is not None:
        cfg = json.loads((target / "adapter_config.json").read_text())
        (target / "adapter_config.json").write_text(json.dumps(edit_config(cfg)))
    if edit_tensors is not None:
        tensors = load_file(target / "adapter_model.safetensors")
        save_file(edit_tensors(tensors), target / "adapter_model.safetensors")
    return name


def _without(key):
    return lambda cfg: {k: v for k, v in cfg.items() if k != key}


BAD_ADAPTERS = {
    "config-list-peft": (lambda cfg: [cfg], None, "JSON object"),
    "peft-no-r": (_without("r"), None, "'r'"),
    "peft-no-alpha": (_without("lora_alpha"), None, "'lora_alpha'"),
    "peft-r-zero": (lambda cfg: {**cfg, "r": 0}, None, "'r' must be a positive integer"),
    "peft-r-text": (lambda cfg: {**cfg, "r": "four"}, None, "'r'"),
    "peft-no-B": (None, lambda t: {k: v for k, v in t.items() if "lora_B" not in k}, "lora_B"),
    "peft-rank-zero": (lambda cfg: {**cfg, "r": 0},
                       lambda t: {k: (v[:0] if "lora_A" in k else v[:, :0]).contiguous() for k, v in t.items()}, "rank"),
    "peft-B-shape": (None, lambda t: {k: v[:, :2].contiguous() if "lora_B" in k else v for k, v in t.items()}, "lora_B"),
}


@pytest.mark.parametrize("name", sorted(BAD_ADAPTERS))
def test_a_malformed_peft_adapter_is_400_naming_the_problem(server, files, name):
    edit_config, edit_tensors, words = BAD_ADAPTERS[name]
    path = _peft_variant(files, name, edit_config, edit_tensors)
    try:
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": path})
    finally:
        shutil.rmtree(files["root"] / path)
    assert status == 400, body
    assert words in body["error"]["message"]
    assert "bad" not in [m.id for m in server.client().models.list().data]


def test_a_sharelora_adapter_whose_config_is_a_json_list_is_400(server, files):
    target = files["root"] / "list-config"
    shutil.copytree(files["solo"], target)
    (target / "adapter_config.json").write_text("[1, 2, 3]")
    try:
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": target.name})
    finally:
        shutil.rmtree(target)
    assert status == 400 and "JSON object" in body["error"]["message"], body


# --- unimplemented fields are refused by name ---------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"),
    ("functions", [{"name": "f", "parameters": {}}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("top_logprobs", 2),  # without logprobs: true (logprobs itself is implemented, see test_serve_completions_api)
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("top_k", 5),
    ("repetition_penalty", 1.2),
])
def test_an_unimplemented_chat_field_is_refused_by_name(server, field, value):
    status, body = post(server, "/v1/chat/completions", {
        "model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value})
    assert status == 400, body
    assert body["error"]["param"] == field and field in body["error"]["message"]


def test_an_assistant_message_with_tool_calls_is_refused(server):
    status, body = post(server, "/v1/chat/completions", {"model": "sql", "max_tokens": 2, "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function",
                                                               "function": {"name": "f", "arguments": "{}"}}]}]})
    assert status == 400 and "tool_calls" in body["error"]["message"]


@pytest.mark.parametrize("field,value", [
    ("response_format", {"type": "text"}), ("tools", []), ("tool_choice", "none"), ("logprobs", False),
    ("user", "me"), ("store", False), ("metadata", {"k": "v"}), ("modalities", ["text"]),
    ("parallel_tool_calls", True), ("service_tier", "auto"),
])
def test_neutral_values_of_unimplemented_fields_are_accepted(server, field, value):
    status, body = post(server, "/v1/chat/completions", {
        "model": "sql", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value})
    assert status == 200, body


def test_an_unknown_completion_field_is_refused_by_name(server):
    status, body = post(server, "/v1/completions", {"model": "sql", "prompt": "a", "max_tokens": 2, "min_p": 0.1})
    assert status == 400 and body["error"]["param"] == "min_p"


# --- names are bounded ---------------------------------------------------------------------------------------------
def test_a_huge_adapter_name_is_refused_and_never_echoed(server):
    name = "n" * 60_000  # (the body stays under this server's 64 KiB bound)
    status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": "solo"})
    assert status == 400 and body["error"]["param"] == "lora_name" and len(json.dumps(body)) < 1000
    assert name not in [m.id for m in server.client().models.list().data]
    status, body = server.request("POST", "/v1/completions", {"model": name, "prompt": "a", "max_tokens": 2})
    assert status in (400, 404) and len(json.dumps(body)) < 2000


def test_a_sharelora_multi_directory_with_a_huge_adapter_name_is_refused(files, tmp_path):
    from serve_tiny import cfg, tiny_causal_lm

    from sharelora import get_sharelora_model

    name = "a" * 5000
    get_sharelora_model(tiny_causal_lm(), cfg(task_share="A"), adapter_name=name).save_pretrained(tmp_path / "m")
    served = ServedModel.load(str(files["model"]), device="cpu")
    with pytest.raises(BadRequest, match="characters") as e:
        served.add_adapter(served.read_adapter(tmp_path / "m"))
    assert len(e.value.message) < 1000 and not served.adapters


# --- adapter files are checked before they are read -------------------------------------------------------------
def _sparse_peft(files, name: str, header: dict, size: int) -> str:
    target = files["root"] / name
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    shutil.copy(files["peft"] / "adapter_config.json", target)
    text = json.dumps(header).encode()
    with open(target / "adapter_model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        f.truncate(size)  # a sparse file: no disk used, but reading it whole costs `size` bytes of memory
    return name


def _peak_bytes_reading(served, path) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        served.read_adapter(path, "big")
        error = None
    except BadRequest as e:
        error = e
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak, error


@pytest.mark.parametrize("kind", ["offsets-beyond-the-file", "too-large-for-the-base"])
def test_a_huge_adapter_file_is_refused_from_its_header_without_reading_it(files, kind):
    size = 256 << 20
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if kind == "offsets-beyond-the-file":
        header = {key: {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 1 << 40]}}
    else:  # a well-formed file whose one tensor fills it: more numbers than the whole base model holds
        text_len = len(json.dumps({key: {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}))
        n = None
        for _ in range(3):  # the header's length depends on the numbers in it
            n = (size - 8 - text_len) // 4
            header = {key: {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}}
            text_len = len(json.dumps(header))
        size = 8 + text_len + 4 * n
    path = files["root"] / _sparse_peft(files, kind, header, size)
    served = ServedModel.load(str(files["model"]), device="cpu")
    try:
        peak, error = _peak_bytes_reading(served, path)
    finally:
        shutil.rmtree(path)
    assert error is not None and "adapter_model.safetensors" in error.message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated to refuse it"


def test_a_truncated_header_length_is_400(server, files):
    target = files["root"] / "short"
    target.mkdir()
    shutil.copy(files["peft"] / "adapter_config.json", target)
    (target / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    try:
        status, body = server.request("POST", "/v1/load_lora_adapter", {"lora_name": "bad", "lora_path": "short"})
    finally:
        shutil.rmtree(target)
    assert status == 400 and "adapter_model.safetensors" in body["error"]["message"]


def test_after_every_attack_the_server_still_answers_exactly(server, offline):
    r = server.client().completions.create(model="peft", prompt="the restaurant is", max_tokens=8, temperature=0)
    assert r.choices[0].text == offline.text(offline.generate("peft", offline.encode("the restaurant is"), 8))
    assert server.request("GET", "/health")[1]["running"] == 0
    assert torch.get_num_threads() == 1
