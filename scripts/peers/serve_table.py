#!/usr/bin/env python3
"""The table of `scripts/bench-peers serve`: medians over rounds of scripts/serve-load's JSON.

usage: serve_table.py DIR ROUNDS   (DIR holds {stancemix-mixed,stancemix-base,llama-server}-N.json)
"""
import json
import os
import statistics
import sys
from pathlib import Path

out, rounds = Path(sys.argv[1]), int(sys.argv[2])
rows = []
for name, label in [("stancemix-mixed", "stancemix serve, mixed blends"),
                    ("stancemix-base", "stancemix serve, base"),
                    ("llama-server", "llama-server --parallel 16, base")]:
    runs = [json.loads(p.read_text()) for i in range(1, rounds + 1)
            if (p := out / f"{name}-{i}.json").exists()]
    if not runs:
        continue
    single = None
    for level in runs[0]["levels"]:
        n = level["clients"]
        same = [lv for r in runs for lv in r["levels"] if lv["clients"] == n]
        med = lambda k: statistics.median(lv[k] for lv in same)  # noqa: E731
        single = med("tok_s") if n == 1 else single
        ratio = f"{med('tok_s') / single:.2f}x" if single else "-"
        rows.append(
            f"| {label} | {n} | {sum(lv['completed'] for lv in same)} / {sum(lv['requests'] for lv in same)} "
            f"| {sum(lv['busy'] for lv in same)} | {sum(lv['differ'] for lv in same)} | {med('tok_s'):.1f} | {ratio} "
            f"| {med('ttft_p50_ms'):.0f} / {med('ttft_p99_ms'):.0f} | {med('tpot_p50_ms'):.1f} / {med('tpot_p99_ms'):.1f} "
            f"| {med('rss_before_mib'):.0f} / {med('rss_after_mib'):.0f} |")
load_after = " ".join(open("/proc/loadavg").read().split()[:3])
print(f"`{os.environ.get('CMD', '')}`: load average before {os.environ.get('LOAD_BEFORE', '?')}, "
      f"after {load_after}; medians of {rounds} round(s), 32 tokens a request.\n")
print("| server | clients | completed / requests | 429 | differ from alone | aggregate tok/s | vs 1 client "
      "| TTFT p50 / p99 (ms) | per token p50 / p99 (ms) | RSS before / after (MiB) |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
print("\n".join(rows))
