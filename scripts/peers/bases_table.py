#!/usr/bin/env python3
"""Table for `scripts/bench-peers bases`: per base, stancemix bench beside llama-bench, medians
over rounds. Reads $OUT/sm-NAME-I.json (stancemix bench --json) and $OUT/lb-NAME-I.json
(llama-bench -o json); prints Markdown."""
import json
import os
import statistics
from pathlib import Path


def load(p):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def main():
    out = Path(os.environ["OUT"])
    names = sorted({p.name[3:].rsplit("-", 1)[0] for p in out.glob("sm-*.json")})
    load_after = " ".join(open("/proc/loadavg").read().split()[:3])
    print(f"`{os.environ.get('CMD', '')}`, {os.environ.get('THREADS', '?')} threads, load "
          f"{os.environ.get('LOAD_BEFORE', '?')} before, {load_after} after; medians over rounds.\n")
    print("| base | prompt tok/s (llama.cpp) | ratio | decode tok/s (llama.cpp) | ratio "
          "| two rank-16 experts: decode cost | train tok/s | train peak MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in names:
        sm = [d for d in (load(p) for p in sorted(out.glob(f"sm-{n}-*.json"))) if d]
        lb = [d for d in (load(p) for p in sorted(out.glob(f"lb-{n}-*.json"))) if d]
        pp = med([r["avg_ts"] for d in lb for r in d if r.get("n_prompt") == 64 and r.get("n_gen") == 0])
        tg = med([r["avg_ts"] for d in lb for r in d if r.get("n_gen") == 64 and r.get("n_prompt") == 0])
        p = med([d.get("prompt_tok_s") for d in sm])
        dc = med([d.get("decode_tok_s") for d in sm])
        cost = med([d.get("blend2_cost") for d in sm])
        tr = med([d.get("train_tok_s") for d in sm])
        mem = med([d.get("train_peak_rss_mb") for d in sm])
        print(f"| {n} | {p:.1f} ({pp:.1f}) | {p / pp:.2f}x | {dc:.1f} ({tg:.1f}) | {dc / tg:.2f}x "
              f"| {100 * cost:+.1f}% | {tr:.0f} | {mem:.0f} |")


if __name__ == "__main__":
    main()
