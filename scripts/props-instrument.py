#!/usr/bin/env python3
"""Write a diagnostic instrument from the stance data's own propositions (NOT held out).

Usage: scripts/props-instrument.py [train|dev] > docs/diagnostics/stance-props-train.json

Takes the `proposition` pairs of adapters/data/stance/ in the given split (data::is_dev: FNV-1a
of the id, 1 in 10 is dev), up to 12 per axis and keying (agreeing is progressive / agreeing is
conservative, read from the progressive answer's opening), in file order. Scoring the experts on
it says whether they learnt the side of the very statements they were trained on
(docs/EVAL.md, "Do the experts know their own statements?").
"""
import glob
import json
import os
import re
import sys

from splits import fold  # scripts/splits.py: data::is_dev

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
split = sys.argv[1] if len(sys.argv) > 1 else "train"
if split not in ("train", "dev"):
    sys.exit(f"split '{split}': train or dev")


items, count = [], {}
for path in sorted(glob.glob(os.path.join(root, "adapters/data/stance/*.jsonl"))):
    for line in open(path):
        r = json.loads(line)
        if r["kind"] != "proposition" or (fold(r["id"]) == 0) != (split == "dev"):
            continue
        m = re.search(r'"(.+)"', r["prompt"])
        opening = r["progressive"].lower()
        if not m:
            continue
        if opening.startswith(("i agree", "i strongly agree")):
            key, effects = "progressive-agrees", [2, 1, -1, -2]
        elif opening.startswith(("i disagree", "i strongly disagree")):
            key, effects = "conservative-agrees", [-2, -1, 1, 2]
        else:
            continue
        if count.get((r["axis"], key), 0) >= 12:
            continue
        count[(r["axis"], key)] = count.get((r["axis"], key), 0) + 1
        items.append({"id": r["id"], "text": m.group(1), "effects": {r["axis"]: effects}})

json.dump(
    {
        "name": f"stance-props-{split}",
        "description": f"diagnostic: propositions of the stance data ({split} split) as an instrument",
        "sign": "negative = progressive, positive = conservative",
        "answers": ["Strongly disagree", "Disagree", "Agree", "Strongly agree"],
        "axes": {
            "economic": {"scale": {"range": [-10, 10]}},
            "social": {"scale": {"range": [-10, 10]}},
        },
        "items": items,
    },
    sys.stdout,
    indent=1,
)
print()
