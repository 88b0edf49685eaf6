"""How the copies kept in ``sharelora/sources/data/`` are made from the pinned archives, and a check that they match.

Each copy is either a member file of a registered archive, compressed (``xz -9e``, or as the
archive has it), or a ``subset`` of member files: their own lines, in their own format and
order, keeping only what the default splits read. A subset is verified twice when loaded:
its files must hash to the content digest the registry pins for it, and the splits built from
it must hash to the entry's pinned split fingerprint (``datasets._load_registered``).

Run ``python -m sharelora.sources.copies OUT_DIR`` to rebuild every copy from the pinned
archives (fetched into the cache as usual) into ``OUT_DIR`` and print, for each, the sha256,
size and content digest the registry must pin; ``--check`` compares them with the registry
instead (content digests, since compressed bytes may differ between xz versions).
"""

from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import lzma
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import registry as _registry
from .cache import content_digest_of_files, fetch_paths
from .errors import SourceError


@dataclass(frozen=True)
class Copy:
    """One copy kept in ``sources/data/``: which entry, its files there, and how they are made.

    ``subset``: ``None`` (the members themselves) or a function from the members' paths to the
    lines (bytes) of each subset file, one per member.
    """

    dataset: str
    files: tuple[str, ...]
    subset: Callable[[list[Path]], list[bytes]] | None = None


def wordnet_definitions_subset(members: list[Path], seed: int = 0, mrs: int = 800) -> list[bytes]:
    """The lines of WordNet's ``data.noun1`` / ``data.noun2`` that ``wordnet-definitions``' default splits read.

    Kept, in file order: the licence header; every synset whose meaning representation (MR) is
    one of the ``mrs`` chosen; the first two hypernyms of each synset kept (they give its
    "kind of" words), repeated until every eligible synset in the subset has the same MR as in
    the whole files. The chosen MRs are the first ``mrs`` in seeded order, so the subset's pool
    is an ordered sub-list of the whole pool that starts with the same ``mrs`` MRs: it gives
    the same default splits (the loader checks the fingerprint).
    """
    from .datasets import _chosen_mrs, _definition_pool, _wordnet_synsets

    synsets = _wordnet_synsets(members, "n")
    by_offset = {s["offset"]: s for s in synsets}
    pool = _definition_pool(synsets)
    mr_of = {r["offset"]: r["mr"] for r in pool}
    chosen = set(_chosen_mrs(pool, seed, mrs))
    keep = {r["offset"] for r in pool if r["mr"] in chosen}
    keep |= {h for o in list(keep) for h in by_offset[o]["hypernyms"][:2] if h in by_offset}
    while True:
        changed = [r["offset"] for r in _definition_pool([s for s in synsets if s["offset"] in keep])
                   if r["mr"] != mr_of[r["offset"]]]
        grow = {h for o in changed for h in by_offset[o]["hypernyms"][:2] if h in by_offset} - keep
        if not grow:
            if changed:
                raise SourceError(f"wordnet subset: {len(changed)} synsets keep another MR with all their hypernyms")
            break
        keep |= grow
    out = []
    for path in members:
        lines = path.read_bytes().splitlines(keepends=True)
        out.append(b"".join(ln for ln in lines if not ln[:1].isdigit() or ln.split(b" ", 1)[0].decode() in keep))
    return out


COPIES: tuple[Copy, ...] = (
    Copy("mmlu", ("mmlu/mmlu.jsonl.gz",)),
    Copy("humaneval", ("humaneval/HumanEval.jsonl.gz",)),
    Copy("commonsense-relations", ("commonsense/commonsense.csv.gz",)),
    Copy("gsm8k", ("gsm8k/test.jsonl.xz",)),
    Copy("rotten-tomatoes", ("pang-lee/sentence-polarity-4000.csv.xz",)),
    Copy("movie-reviews", ("pang-lee/movie-reviews-1500.csv.xz",)),
    Copy("rt-snippets", ("rt-snippets/rotten_tomatoes_corpus_full.csv.bz2",)),
    Copy("wordnet-definitions", ("wordnet/data.noun1.subset.xz", "wordnet/data.noun2.subset.xz"),
         wordnet_definitions_subset),
)


def _compress(data: bytes, name: str) -> bytes:
    if name.endswith(".xz"):
        return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)
    if name.endswith(".gz"):
        return gzip.compress(data, compresslevel=9, mtime=0)
    if name.endswith(".bz2"):
        return bz2.compress(data, 9)
    return data


def build(copy: Copy, out_dir: Path, cache_dir=None) -> dict:
    """Write ``copy``'s files under ``out_dir`` from its entry's pinned archive; what the registry must pin."""
    entry = _registry.get(copy.dataset)
    members = fetch_paths(entry, cache_dir)
    contents = copy.subset(members) if copy.subset else [m.read_bytes() for m in members]
    written, sizes, digests = [], [], []
    for rel, member, data in zip(copy.files, entry.paths, contents):
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        same_compression = any(rel.endswith(x) and member.endswith(x) for x in (".gz", ".bz2", ".xz"))
        blob = data if same_compression else _compress(data, rel)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.replace(tmp, target)
        written.append(target)
        sizes.append(len(blob))
        digests.append(hashlib.sha256(blob).hexdigest())
    with tempfile.TemporaryDirectory() as tmp:
        plain = []
        for rel, member, data in zip(copy.files, entry.paths, contents):
            p = Path(tmp) / str(len(plain)) / Path(member.rstrip("/")).name
            p.parent.mkdir(parents=True)
            p.write_bytes(data)
            plain.append(p)
        content = content_digest_of_files(plain)
    return {"dataset": copy.dataset, "path": list(copy.files), "sha256": digests, "size": sizes, "content": content,
            "subset": copy.subset is not None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sharelora.sources.copies", description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="where to write the rebuilt copies")
    ap.add_argument("--check", action="store_true", help="compare each copy's content digest with the registry")
    ap.add_argument("--cache-dir", default=None)
    args = ap.parse_args(argv)
    bad = 0
    for copy in COPIES:
        got = build(copy, args.out_dir, args.cache_dir)
        print(got)
        if args.check:
            entry = _registry.get(copy.dataset)
            repo = [o for o in entry.origins() if o.kind == "repo" and list(o.repo_paths) == got["path"]]
            want = (repo[0].expected_content if repo else None) if got["subset"] else entry.content
            if not repo or want != got["content"]:
                print(f"  MISMATCH: registry pins {want} for {got['path']}", file=sys.stderr)
                bad += 1
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
