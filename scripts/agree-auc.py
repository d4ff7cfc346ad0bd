#!/usr/bin/env python3
"""Reading apart from calibration, from stored forced-choice results (`eval --out X.json.full`).

For each blend: the mean agreeing probability over the instrument's items (calibration) and the
chance that an item the progressive side agrees with gets more agreeing probability than one it
rejects (ties half; the ROC AUC of that probability against the keying): 0.5 reads nothing, a
progressive reader is above, a conservative one below. The same figure `eval` reports as
`keying.agree_auc` (src/eval/forced_choice.rs), computed here independently for runs stored
before it existed.
Usage: scripts/agree-auc.py INSTRUMENT.json RESULT.json.full...
"""
import json
import sys


def main():
    ins = json.load(open(sys.argv[1]))
    agreeing = [i for i, a in enumerate(ins["answers"]) if "disagree" not in a.lower()]
    items = {it["id"]: it for it in ins["items"]}
    for path in sys.argv[2:]:
        d = json.load(open(path))
        for b in d.get("blends", [d]):
            pro, con = [], []
            for r in b["items"]:
                effects = items[r["id"]]["effects"]
                effect = sum(e[i] for e in effects.values() for i in agreeing)
                p_agree = sum(r["probs"][i] for i in agreeing)
                if effect < 0:
                    pro.append(p_agree)
                elif effect > 0:
                    con.append(p_agree)
            auc = sum((a > c) + 0.5 * (a == c) for a in pro for c in con) / (len(pro) * len(con))
            mean = sum(pro + con) / len(pro + con)
            print(f"{path}\t{b['blend'].split(' |')[0]}\titems {len(pro)}+{len(con)}\t"
                  f"mean agree {mean:.3f}\tagree AUC {auc:.3f}")


if __name__ == "__main__":
    main()
