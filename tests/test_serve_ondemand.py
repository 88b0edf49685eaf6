"""Adapters on demand (`--adapter-root`, `--max-adapters`, `--adapter-memory`, pinning), through the official
openai client: a request loads its adapter on first use, once however many ask at the same time; the least
recently used adapter no request holds is evicted under a bound; a request for an adapter being evicted gets
it back; a task-shared basis is resident once; only directories the root allows are loaded."""

from __future__ import annotations

import os
import shutil
import threading
import time

import openai
import pytest

from serve_tiny import LiveServer, Offline, build_files, build_root, load_served, one_thread, slow, watchdog

from sharelora.serve.model import ServedModel
from sharelora.serve.settings import Settings

PROMPT = "name : blue spice , food : italian"
K = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def _bounded():
    with watchdog(240):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("ondemand")
    files = build_files(base)
    files["tasks"] = base / "tasks"
    files["dirs"] = build_root(files["tasks"], K)
    return files


@pytest.fixture(scope="module")
def offline(files):
    return Offline.of(files["model"], files["dirs"])


@pytest.fixture(scope="module")
def want(offline):
    """{adapter: greedy completion of PROMPT} offline."""
    ids = offline.encode(PROMPT)
    return {name: offline.text(offline.generate(name, ids, 8)) for name in [f"t{i}" for i in range(K)] + ["ind"]}


def bare(files) -> ServedModel:
    return ServedModel.load(str(files["model"]), device="cpu")


def settings(files, **kw) -> Settings:
    return Settings(model=str(files["model"]), adapter_root=str(files["tasks"]), **kw)


def complete(client, model: str, max_tokens: int = 8) -> str:
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0).choices[0].text


def statuses(client) -> dict[str, str]:
    return {m.id: m.status for m in client.models.list().data}


def resident(srv) -> list[str]:
    return srv.pool.resident()


def check_books(srv) -> None:
    """The pool's books agree with the model: the same adapters, and its byte count is the bank's."""
    served = srv.served
    assert sorted(served.adapters) == sorted(resident(srv))
    bank = 0 if served.lora is None else sum(p.numel() * p.element_size() for p in served.lora.sharelora_bank.values())
    assert srv.pool.stats().bytes == bank


# --- loading on demand ----------------------------------------------------------------------------------------
def test_a_request_loads_its_adapter_from_the_root_on_first_use(files, want):
    with LiveServer(bare(files), settings(files)) as srv:
        client = srv.client()
        before = statuses(client)
        assert before == {str(files["model"]): "loaded"} | {n: "loadable" for n in sorted(files["dirs"])}
        assert complete(client, "t3") == want["t3"]
        assert complete(client, "t3") == want["t3"]
        assert srv.pool.stats().loads == 1
        assert statuses(client)["t3"] == "loaded" and statuses(client)["t2"] == "loadable"
        assert complete(client, "ind") == want["ind"]
        stream = client.chat.completions.create(model="t1", messages=[{"role": "user", "content": "hello"}],
                                                max_tokens=4, stream=True)
        assert list(stream)[-1].choices[0].finish_reason in ("stop", "length")
        status, health = srv.request("GET", "/health")
        assert health["adapters"] == 3 and health["adapter_loads"] == 3
        check_books(srv)


def test_a_task_shared_basis_is_resident_once(files, want):
    with LiveServer(bare(files), settings(files)) as srv:
        client = srv.client()
        for n in ("t0", "t1", "t2", "t3"):
            assert complete(client, n) == want[n]
        served = srv.served
        shared = [k for k in served.lora.sharelora_bank if k.startswith("@") or "tasks" in k]
        own, group = served.adapter_tensor_bytes("t0")
        assert group and all(served.adapter_tensor_bytes(n)[1] == group for n in ("t1", "t2", "t3"))
        assert srv.pool.stats().bytes == 4 * own + sum(group.values())  # the group's tensors once
        assert len(shared) == len(group)
        check_books(srv)


def test_concurrent_requests_for_one_cold_adapter_load_it_once(files, want):
    served = bare(files)
    reads: list[str] = []
    real = served.read_adapter

    def read(path, name=None):
        reads.append(name)
        time.sleep(0.3)  # a slow disk: every request arrives while the load runs
        return real(path, name)

    served.read_adapter = read
    with LiveServer(served, settings(files)) as srv:
        client = srv.client()
        results: dict[int, str] = {}

        def call(i):
            results[i] = complete(client, "t4" if i % 3 else "t5")

        threads = [threading.Thread(target=call, args=(i,)) for i in range(9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert results == {i: want["t4" if i % 3 else "t5"] for i in range(9)}
        assert sorted(reads) == ["t4", "t5"] and srv.pool.stats().loads == 2
        check_books(srv)


# --- bounds and eviction ------------------------------------------------------------------------------------
def test_the_least_recently_used_adapter_is_evicted_under_max_adapters(files, want):
    with LiveServer(bare(files), settings(files, max_adapters=2)) as srv:
        client = srv.client()
        complete(client, "t0")
        complete(client, "t1")
        assert resident(srv) == ["t0", "t1"]
        assert complete(client, "t2") == want["t2"]
        assert resident(srv) == ["t1", "t2"]  # t0 was the least recently used
        complete(client, "t1")  # t1 is now more recent than t2
        assert complete(client, "t3") == want["t3"]
        assert resident(srv) == ["t1", "t3"]
        assert complete(client, "t0") == want["t0"]  # read again from the root, same outputs
        assert resident(srv) == ["t3", "t0"] and srv.pool.stats().evictions == 3
        assert statuses(client)["t1"] == "loadable"
        check_books(srv)


def test_the_memory_bound_holds_the_tensor_bytes(files, want):
    probe = bare(files)
    probe.add_adapter(probe.read_adapter(files["dirs"]["t0"], "t0"))
    own, group = probe.adapter_tensor_bytes("t0")
    bound = sum(group.values()) + 2 * own + own // 2  # room for the basis and two adapters, not three
    del probe
    with LiveServer(bare(files), settings(files, adapter_memory=bound / 2**20)) as srv:
        client = srv.client()
        for n in ("t0", "t1", "t2", "t3", "t1"):
            assert complete(client, n) == want[n]
            assert srv.pool.stats().bytes <= bound
        assert resident(srv) == ["t3", "t1"] and srv.pool.stats().evictions == 3  # t0, t1, t2
        check_books(srv)
    with LiveServer(bare(files), settings(files, adapter_memory=own / 2 / 2**20)) as srv:
        with pytest.raises(openai.BadRequestError) as e:  # one adapter alone does not fit
            complete(srv.client(), "t0")
        assert "--adapter-memory" in e.value.body["message"]


def test_a_request_for_an_adapter_being_evicted_gets_it_back(files, want):
    served = bare(files)
    gate = threading.Event()
    real = served.remove_adapter

    def remove(name):
        gate.wait(30)  # the eviction is under way until the test opens the gate
        real(name)

    served.remove_adapter = remove
    with LiveServer(served, settings(files, max_adapters=1)) as srv:
        client = srv.client()
        assert complete(client, "t0") == want["t0"]
        results = {}
        first = threading.Thread(target=lambda: results.update(t1=complete(client, "t1")))
        first.start()
        deadline = time.monotonic() + 10
        while "t0" not in srv.pool._evicting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        second = threading.Thread(target=lambda: results.update(t0=complete(client, "t0")))
        second.start()
        time.sleep(0.3)
        assert not results  # both wait: t1 for room, t0 for its eviction to end
        gate.set()
        first.join(30)
        second.join(30)
        assert results == {"t1": want["t1"], "t0": want["t0"]}
        assert srv.pool.stats().loads == 3 and resident(srv) in (["t0"], ["t1"])
        check_books(srv)


def test_a_load_waits_for_a_busy_adapter_then_answers_429(files, want, monkeypatch):
    import sharelora.serve.adapters as adapters

    monkeypatch.setattr(adapters, "ROOM_WAIT_S", 0.5)
    with LiveServer(slow(bare(files)), settings(files, max_adapters=1)) as srv:
        client = srv.client()
        busy = client.completions.create(model="t0", prompt="a", max_tokens=400, stream=True,
                                         extra_body={"ignore_eos": True})
        next(iter(busy))  # t0 is held by a running request: it cannot go
        with pytest.raises(openai.RateLimitError) as e:
            complete(client, "t1")
        assert "in use by running requests" in e.value.body["message"]
        busy.close()
        assert complete(client, "t1") == want["t1"]
        check_books(srv)


def test_pinned_adapters_stay_and_unpinned_ones_come_back_from_their_directory(files, want, tmp_path):
    outside = tmp_path / "elsewhere"  # a --adapter directory that is not under the root
    shutil.copytree(files["dirs"]["t5"], outside)

    def served():
        s = bare(files)
        s.add_adapter(s.read_adapter(outside, "mine"))
        return s

    with LiveServer(served(), settings(files, max_adapters=2)) as srv:
        client = srv.client()
        for n in ("t0", "t1", "t2"):
            complete(client, n)
        assert resident(srv) == ["mine", "t2"]
        assert complete(client, "mine") == want["t5"]
    with LiveServer(served(), settings(files, max_adapters=2, pin_adapters=False)) as srv:
        client = srv.client()
        for n in ("t0", "t1"):
            complete(client, n)
        assert "mine" not in resident(srv) and statuses(client)["mine"] == "loadable"
        assert complete(client, "mine") == want["t5"]  # read again from its own directory
        check_books(srv)


def test_bounds_that_the_startup_adapters_do_not_fit_are_refused(files):
    from sharelora.serve.adapters import AdapterPool

    served = load_served(files)
    with pytest.raises(ValueError, match="--max-adapters 4 leaves no room"):
        AdapterPool(served, None, files["tasks"], max_adapters=4)
    AdapterPool(served, None, None, max_adapters=4)  # nothing to load on demand: 4 pinned fit 4
    AdapterPool(served, None, files["tasks"], max_adapters=4, pin_startup=False)
    with pytest.raises(ValueError, match="--adapter-memory"):
        AdapterPool(served, None, files["tasks"], max_bytes=100)
    with pytest.raises(ValueError, match="not a directory"):
        AdapterPool(served, None, files["tasks"] / "nowhere")


# --- what the root allows ---------------------------------------------------------------------------------
def test_only_adapter_directories_under_the_root_are_loaded(files, tmp_path):
    from sharelora import ShareLoraConfig, get_sharelora_model
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path / "root"
    shutil.copytree(files["dirs"]["t0"], root / "good")
    outside = tmp_path / "outside"
    shutil.copytree(files["dirs"]["t1"], outside)
    os.symlink(outside, root / "escape")
    (root / "half").mkdir()
    shutil.copy(files["dirs"]["t1"] / "adapter_config.json", root / "half")
    os.symlink(outside / "adapter_model.safetensors", root / "half" / "adapter_model.safetensors")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_model.bin").write_bytes(b"never unpickled")
    shutil.copytree(files["multi"], root / "several")
    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=24, vocab_size=120))
    get_sharelora_model(other, ShareLoraConfig(rank=4, target_modules=["q_proj"])).save_pretrained(root / "wrong")
    with LiveServer(bare(files), Settings(model=str(files["model"]), adapter_root=str(root))) as srv:
        client = srv.client()
        assert statuses(client) == {str(files["model"]): "loaded", "good": "loadable", "several:sql": "loadable",
                                    "several:chat": "loadable", "wrong": "loadable"}
        for name in ("escape", "half"):
            with pytest.raises(openai.PermissionDeniedError):
                complete(client, name)
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, "pickled")
        assert "safetensors" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, "several")
        assert "several adapters (sql, chat); name one as several:ADAPTER" in e.value.body["message"]
        with pytest.raises(openai.BadRequestError) as e:
            complete(client, "wrong")
        assert "does not fit" in e.value.body["message"]
        for name in ("../tasks/t0", "nowhere", str(outside), "a.b", "x" * 4000, "__base__", "@g", "several:nope",
                     "good:sql", "several:../x"):
            with pytest.raises(openai.NotFoundError) as e:
                complete(client, name)
            assert len(e.value.body["message"]) < 400
        with pytest.raises(openai.BadRequestError) as e:  # over the request model's bound on model names
            complete(client, "x" * 5000)
        assert e.value.body["param"] == "model" and len(e.value.body["message"]) < 400
        assert complete(client, "good")
        assert resident(srv) == ["good"] and srv.pool.stats().loads == 1
        check_books(srv)


def test_one_adapter_of_a_multi_adapter_directory_loads_as_dir_colon_name(files):
    offline = Offline(files)  # sql and chat of multi/, one task-shared A
    with LiveServer(bare(files), Settings(model=str(files["model"]), adapter_root=str(files["root"]))) as srv:
        client = srv.client()
        for name in ("chat", "sql"):
            want = offline.text(offline.generate(name, offline.encode(PROMPT), 8))
            assert complete(client, f"multi:{name}") == want
        assert resident(srv) == ["multi:chat", "multi:sql"]
        assert len(srv.served.adapter_tensor_bytes("multi:sql")[1]) > 0  # they read one shared A
        assert srv.served.adapter_tensor_bytes("multi:sql")[1] == srv.served.adapter_tensor_bytes("multi:chat")[1]
        check_books(srv)


def test_without_an_adapter_root_nothing_loads_on_demand(files):
    with LiveServer(load_served(files), Settings(model=str(files["model"]))) as srv:
        with pytest.raises(openai.NotFoundError) as e:
            complete(srv.client(), "t0")
        assert "--adapter-root" in e.value.body["message"]


def test_the_cli_takes_the_pool_flags():
    import argparse

    from sharelora.serve.settings import add_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    s = settings_from_args(p.parse_args(["--model", "m", "--adapter-root", "r", "--max-adapters", "64",
                                         "--adapter-memory", "1.5", "--no-pin-adapters"]))
    assert (s.max_adapters, s.adapter_memory, s.pin_adapters) == (64, 1.5, False)
    assert settings_from_args(p.parse_args(["--model", "m"])).pin_adapters is True
