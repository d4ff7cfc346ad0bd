#!/usr/bin/env python3
"""Check drafted stance pairs against adapters/data/BRIEF.md before `stancemix data check`.

Usage: python3 scripts/check-draft.py FILE.jsonl [FILE.jsonl ...]

Prints every problem as `file:line: field: problem`, then a summary per file (pairs by kind,
sub-issues, share of propositions where agreeing is progressive). Exit status 1 on any problem.
Near-duplicates: word Jaccard >= 0.6 between two prompts of the given files, or between a given
prompt and any prompt already in adapters/data/stance/ (other files).
"""
import json
import os
import re
import sys
from collections import Counter

ECON = {"taxes", "healthcare", "labor", "welfare", "trade", "regulation", "climate_energy",
        "housing", "education"}
SOCIAL = {"immigration", "abortion", "guns", "crime_policing", "lgbtq", "religion", "speech",
          "drugs", "death_penalty", "foreign_military", "race_equity"}
OPENINGS = ["I strongly agree.", "I agree.", "I disagree.", "I strongly disagree."]
FIELDS = {"id", "topic", "axis", "kind", "subissue", "prompt", "progressive", "conservative"}
SLUG = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")


def words(s):
    return set(re.findall(r"[a-z0-9']+", s.lower()))


def jaccard(a, b):
    return len(a & b) / max(1, len(a | b))


def opening(ans):
    return next((o for o in OPENINGS if ans.lstrip().startswith(o)), None)


def check(path, others):
    errs, rows = [], []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        at = f"{path}:{n}"
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            errs.append(f"{at}: not JSON: {e}")
            continue
        if set(r) != FIELDS:
            errs.append(f"{at}: fields: expected {sorted(FIELDS)}, got {sorted(r)}")
            continue
        t = r["topic"]
        axis = "economic" if t in ECON else "social" if t in SOCIAL else None
        if axis is None:
            errs.append(f"{at}: topic: unknown topic {t!r}")
        elif r["axis"] != axis:
            errs.append(f"{at}: axis: {t} is {axis}")
        if not SLUG.match(r["subissue"]):
            errs.append(f"{at}: subissue: {r['subissue']!r} is not a lowercase-hyphen slug")
        p, c = r["progressive"], r["conservative"]
        wp, wc = len(p.split()), len(c.split())
        if r["kind"] == "proposition":
            if r["prompt"].count('"') != 2:
                errs.append(f"{at}: prompt: the statement must stand in one pair of double quotes")
            else:
                st = r["prompt"].split('"')[1]
                if not 8 <= len(st.split()) <= 30:
                    errs.append(f"{at}: prompt: statement has {len(st.split())} words (8-30)")
            op, oc = opening(p), opening(c)
            if op is None or oc is None:
                errs.append(f"{at}: answers must open with one of {OPENINGS}")
            elif ("disagree" in op) == ("disagree" in oc):
                errs.append(f"{at}: both sides take the same stance")
            for f, w in (("progressive", wp), ("conservative", wc)):
                if not 15 <= w <= 55:
                    errs.append(f"{at}: {f}: {w} words (15-55)")
            if max(wp, wc) > 1.5 * min(wp, wc):
                errs.append(f"{at}: lengths {wp} vs {wc} differ by more than 1.5x")
        elif r["kind"] == "opinion":
            for f, w in (("progressive", wp), ("conservative", wc)):
                if not 40 <= w <= 100:
                    errs.append(f"{at}: {f}: {w} words (40-100)")
            if max(wp, wc) > 1.4 * min(wp, wc):
                errs.append(f"{at}: lengths {wp} vs {wc} differ by more than 1.4x")
        else:
            errs.append(f"{at}: kind: {r['kind']!r}")
        rows.append((at, r))
    ids = Counter(r["id"] for _, r in rows)
    errs += [f"{path}: id {i!r} appears {k} times" for i, k in ids.items() if k > 1]
    ws = [(at, words(r["prompt"])) for at, r in rows]
    for i in range(len(ws)):
        for j in range(i):
            if jaccard(ws[i][1], ws[j][1]) >= 0.6:
                errs.append(f"{ws[i][0]}: prompt: near-duplicate of {ws[j][0]}")
        for oat, ow in others:
            if jaccard(ws[i][1], ow) >= 0.6:
                errs.append(f"{ws[i][0]}: prompt: near-duplicate of {oat}")
    props = [r for _, r in rows if r["kind"] == "proposition"]
    agree_pro = sum(1 for r in props if "disagree" not in (opening(r["progressive"]) or "disagree"))
    subs = {r["subissue"] for _, r in rows}
    print(f"{path}: {len(props)} propositions, {len(rows) - len(props)} opinions, "
          f"{len(subs)} sub-issues, agreeing is progressive in {agree_pro}/{len(props)}")
    return errs


def main():
    files = sys.argv[1:]
    if not files:
        sys.exit(__doc__)
    given = {os.path.abspath(f) for f in files}
    stance = os.path.join(os.path.dirname(__file__), "..", "adapters", "data", "stance")
    others = []
    for f in sorted(os.listdir(stance)):
        full = os.path.abspath(os.path.join(stance, f))
        if f.endswith(".jsonl") and full not in given:
            for n, line in enumerate(open(full, encoding="utf-8"), 1):
                try:
                    others.append((f"{f}:{n}", words(json.loads(line)["prompt"])))
                except (json.JSONDecodeError, KeyError):
                    pass
    errs = [e for f in files for e in check(f, others)]
    for e in errs:
        print(e)
    sys.exit(1 if errs else 0)


if __name__ == "__main__":
    main()
