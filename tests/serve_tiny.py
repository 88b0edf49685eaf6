"""A tiny causal LM on disk, adapter directories of every kind, an offline reference and a live server.

Everything is built from configs in a temporary directory (no download): a random LLaMA with the
word-level tokenizer of ``generation_tiny`` (with its chat template), and adapters with random B
(and A), so every adapter computes a different function.
"""

from __future__ import annotations

import faulthandler
import json
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from generation_tiny import VOCAB, tiny_tokenizer

from sharelora import ShareLoraConfig, ShareLoraModel, get_sharelora_model
from sharelora.method.layers import bank_name
from sharelora.method.peft_io import read_peft

CONTEXT = 512
TARGETS = ["q_proj", "v_proj"]


WINDOW = 5  # the sliding window of the tiny sliding-window models: shorter than most test prompts

# Tiny configs of every attention layout the server batches (docs/SERVING.md):
# llama: full attention; qwen2: full (its default); qwen2-sliding: full then sliding layers
# (use_sliding_window, max_window_layers); mistral: every layer sliding (`sliding_window`, no layer_types);
# gemma2: sliding and full alternating; gemma3: sliding, sliding, full, sliding (its 5:1 pattern, shortened).
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=3, use_sliding_window=True,
                                                              sliding_window=WINDOW, max_window_layers=1)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(num_hidden_layers=4, sliding_window=WINDOW, head_dim=8,
                                                          query_pre_attn_scalar=8)),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        num_hidden_layers=4, sliding_window=WINDOW, head_dim=8, query_pre_attn_scalar=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"])),
}


def tiny_causal_lm(seed: int = 0, arch: str = "llama"):
    import transformers

    config_name, model_name, extra = ARCHS[arch]
    torch.manual_seed(seed)
    kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, vocab_size=len(VOCAB), max_position_embeddings=CONTEXT, bos_token_id=3,
              eos_token_id=2, pad_token_id=0)
    cfg = getattr(transformers, config_name)(**{**kw, **extra})
    return getattr(transformers, model_name)(cfg).eval()


def randomize(model: ShareLoraModel, name: str, seed: int, shared: bool = True) -> None:
    g = torch.Generator().manual_seed(seed)
    keys = list(model.plans[name].own_tensors()) + (list(model.plans[name].shared_tensors()) if shared else [])
    with torch.no_grad():
        for key in keys:
            p = model.sharelora_bank[bank_name(key)]
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)


def cfg(**kw) -> ShareLoraConfig:
    kw.setdefault("rank", 4)
    kw.setdefault("share", "A")
    kw.setdefault("init_lora_weights", False)
    return ShareLoraConfig(target_modules=TARGETS, **kw)


def build_files(root: Path, arch: str = "llama") -> dict[str, Path]:
    """model/ (weights + tokenizer of the tiny ``arch`` model) and the adapters under adapters/:
    multi/ (sql + chat, one task-shared A), solo/ (one sharelora adapter), peft/ (a PEFT LoRA),
    clash/ (task_group "default" like multi/, but another A)."""
    model_dir = root / "model"
    tiny_causal_lm(arch=arch).save_pretrained(model_dir)
    tiny_tokenizer(chat_template=True).save_pretrained(model_dir)
    adapters = root / "adapters"
    multi = get_sharelora_model(tiny_causal_lm(arch=arch), cfg(task_share="A"), adapter_name="sql")
    multi.add_adapter("chat", cfg(task_share="A"))
    randomize(multi, "sql", 1)
    randomize(multi, "chat", 2, shared=False)
    multi.save_pretrained(adapters / "multi")
    solo = get_sharelora_model(tiny_causal_lm(arch=arch), cfg())
    randomize(solo, "default", 3)
    solo.save_pretrained(adapters / "solo")
    peft = get_sharelora_model(tiny_causal_lm(arch=arch), cfg(share="none"))
    randomize(peft, "default", 4)
    peft.export_peft(adapters / "peft")
    clash = get_sharelora_model(tiny_causal_lm(arch=arch), cfg(task_share="A"))
    randomize(clash, "default", 5)
    clash.save_pretrained(adapters / "clash")
    return {"model": model_dir, "root": adapters, "multi": adapters / "multi", "solo": adapters / "solo",
            "peft": adapters / "peft", "clash": adapters / "clash"}


def build_root(root: Path, k: int, seed: int = 10) -> dict[str, Path]:
    """``k`` task-shared adapters t0 .. t{k-1} (one task group, one A, each its own B), each saved alone in
    ``root/<name>`` (every directory holds its copy of the shared A), and ``ind`` (an independent one)."""
    from sharelora.method import checkpoint

    names = [f"t{i}" for i in range(k)]
    model = get_sharelora_model(tiny_causal_lm(), cfg(task_share="A", task_group="tasks"), adapter_name=names[0])
    for n in names[1:]:
        model.add_adapter(n, cfg(task_share="A", task_group="tasks"))
    for i, n in enumerate(names):
        randomize(model, n, seed + i, shared=i == 0)
    dirs = {}
    for n in names:
        dirs[n] = root / n
        checkpoint.save_adapter(dirs[n], model.sharelora_configs[n], model.adapter_state_dict(n))
    ind = get_sharelora_model(tiny_causal_lm(), cfg())
    randomize(ind, "default", seed + 99)
    dirs["ind"] = ind.save_pretrained(root / "ind")
    return dirs


class Offline:
    """The same adapters loaded from disk into a model of their own; ``generate`` is plain
    ``model.generate`` with one adapter active (no server, no batching)."""

    def __init__(self, files: dict[str, Path], **config):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        base = AutoModelForCausalLM.from_pretrained(files["model"], **config).eval()  # config: attributes to change
        self.tokenizer = AutoTokenizer.from_pretrained(files["model"])
        self.model = ShareLoraModel.from_pretrained(base, files["multi"])
        self.model.load_adapter(files["solo"], adapter_name="solo")
        config, tensors = read_peft(files["peft"])
        self.model.add_adapter("peft", config)
        self.model.load_adapter_state_dict(tensors, "peft")
        self.model.eval()

    @classmethod
    def of(cls, model_dir: Path, adapters: dict[str, Path]) -> Offline:
        """The single-adapter directories ``adapters`` ({name: directory}) loaded into one offline model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self = cls.__new__(cls)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        (first, path), *rest = adapters.items()
        self.model = ShareLoraModel.from_pretrained(base, path, adapter_name=first)
        for name, path in rest:
            self.model.load_adapter(path, adapter_name=name)
        self.model.eval()
        return self

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def chat_ids(self, messages: list[dict]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def generate(self, adapter: str | None, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
        ids = torch.tensor([prompt_ids])
        kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                  do_sample=False, pad_token_id=0)
        if adapter is None:
            with self.model.disable_adapter():
                out = self.model.generate(**kw)
        else:
            self.model.set_adapter(adapter)
            out = self.model.generate(**kw)
        return out[0, ids.shape[1]:].tolist()

    def text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode([t for t in token_ids if t != 2], skip_special_tokens=True)


def load_served(files: dict[str, Path]):
    """A ServedModel of the tiny model with the adapters sql, chat (multi/), solo and peft."""
    from sharelora.serve.model import ServedModel

    served = ServedModel.load(str(files["model"]), device="cpu")
    served.add_adapter(served.read_adapter(files["multi"]))
    served.add_adapter(served.read_adapter(files["solo"], "solo"))
    served.add_adapter(served.read_adapter(files["peft"], "peft"))
    return served


def slow(served, seconds: float = 0.01):
    """Make every forward take a while, so requests are still running when a test looks."""
    real = served.forward

    def forward(*args, **kw):
        time.sleep(seconds)
        return real(*args, **kw)

    served.forward = forward
    return served


class LiveServer:
    """The app on a free loopback port in a thread of this process; stops by itself on exit."""

    def __init__(self, served, settings):
        import uvicorn

        from sharelora.serve.app import create_app
        from sharelora.serve.launch import bind
        from sharelora.serve.scheduler import Scheduler

        self.served = served
        self.scheduler = Scheduler(served, max_batch=settings.max_batch, max_queue=settings.max_queue)
        app = create_app(served, self.scheduler, settings)
        self.app = app
        self.pool = app.state.adapters
        self.sock = bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False,
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=kw.pop("timeout", 60), **kw)

    def request(self, method: str, path: str, body: dict | None = None, key: str | None = None,
                timeout: float = 60) -> tuple[int, dict]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def wait_for(self, condition, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self.request("GET", "/health")[1]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the server did not reach the condition within {timeout} s")
            time.sleep(0.02)


class one_thread:
    """Run torch on one thread: a tiny model on a busy machine is many times faster so (no spinning workers)."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


class watchdog:
    """Bound a test in time: after ``seconds`` dump every thread's stack and end the run."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __enter__(self):
        faulthandler.dump_traceback_later(self.seconds, exit=True)

    def __exit__(self, *exc):
        faulthandler.cancel_dump_traceback_later()


# --- the fixtures the serve test modules share: import them by name (pytest finds fixtures in a module's globals)
@pytest.fixture(scope="module", autouse=True)
def serve_one_thread():
    with one_thread():
        yield


@pytest.fixture(autouse=True)
def serve_bounded():
    with watchdog(240):
        yield


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model and adapter directories of every kind (``build_files``), once per module."""
    return build_files(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def offline(files):
    return Offline(files)
