#!/usr/bin/env python3
"""Per-prompt comparison of two blends' judged answers in an `eval --open-ended` JSON.

The judge's absolute threshold (p > 0.5) is calibrated on the stance data's answers; on another
base's prose it can call most answers one side (docs/EVAL.md). Within one prompt it orders two
answers far better (0.87 of dev pairs), so this prints, for blends A and B, the share of prompts
whose answer under B is judged more conservative than under A, and each blend's share judged on
each side of the base's answer to the same prompt.
Usage: scripts/open-ended-pairs.py EVAL.json [BASE.json]   (BASE.json: where the base blend is,
       if not in EVAL.json)
"""
import json
import sys


def blends(path):
    d = json.load(open(path))
    return {b["blend"].split(" |")[0]: {a["id"]: a["p_conservative"] for a in b["answers"]}
            for b in d["open_ended"]["blends"]}


def main():
    bs = blends(sys.argv[1])
    if len(sys.argv) > 2:
        bs.update({k: v for k, v in blends(sys.argv[2]).items() if k == "base"})
    pro = next(v for k, v in bs.items() if "progressive" in k)
    con = next(v for k, v in bs.items() if "conservative" in k)
    ids = sorted(pro.keys() & con.keys())
    n = len(ids)
    print(f"prompts: {n}")
    print(f"conservative expert judged more conservative than progressive: "
          f"{sum(con[i] > pro[i] for i in ids)}/{n}")
    base = bs.get("base")
    if base:
        print(f"progressive expert less conservative than base: {sum(pro[i] < base[i] for i in ids)}/{n}")
        print(f"conservative expert more conservative than base: {sum(con[i] > base[i] for i in ids)}/{n}")
    for name, v in bs.items():
        m = sum(v[i] for i in ids) / n
        print(f"{name}: mean p(conservative) {m:.3f}, judged conservative {sum(v[i] > 0.5 for i in ids)}/{n}")


if __name__ == "__main__":
    main()
