"""Turn the raw results of scripts/bench-peers into one Markdown table (medians over rounds).

Usage: python table.py RESULTS_DIR  (prints the table; the driver also writes it to a file)

RESULTS_DIR holds meta.json and, per round i:
  sm-i.json        `stancemix bench --json`
  lb-i.json        `llama-bench -o json` (pp64 and tg64)
  lc-base-i.log    llama-completion, no adapter (stderr with llama.cpp's timings)
  lc-lora1-i.log   the same with our progressive adapter (--lora)
  lc-lora2-i.log   the same with two rank-16 adapters, scales 0.6 / 0.4 (as stancemix's blend2)
  pt-infer-i.json  scripts/peers/torch_bench.py infer
  pt-train-i.json  scripts/peers/torch_bench.py train
A missing or failed piece leaves its cells empty ("n/a"); the table says how many rounds each median has.
"""

import json
import re
import statistics
import sys
from pathlib import Path

EVAL = re.compile(r"(prompt )?eval time =.*?([\d.]+) tokens per second")


def median(xs):
    xs = [x for x in xs if x is not None]
    return (statistics.median(xs), len(xs)) if xs else (None, 0)


def load_json(p):
    try:
        t = p.read_text().strip()
        return json.loads(t.splitlines()[-1]) if t and not t.startswith("[") else json.loads(t)
    except (OSError, ValueError, IndexError):
        return None


def lc_decode(p):
    """Decode tok/s from llama-completion's 'eval time' line (not the 'prompt eval time' one)."""
    try:
        text = p.read_text(errors="replace")
    except OSError:
        return None
    hits = [m for m in EVAL.finditer(text) if not m.group(1)]
    return float(hits[-1].group(2)) if hits else None


def llama_bench(p, n_prompt, n_gen):
    rows = load_json(p) or []
    for r in rows:
        if r.get("n_prompt") == n_prompt and r.get("n_gen") == n_gen:
            return r.get("avg_ts")
    return None


def main():
    d = Path(sys.argv[1])
    meta = json.loads((d / "meta.json").read_text())
    rounds = range(1, meta["rounds"] + 1)
    sm = [load_json(d / f"sm-{i}.json") or {} for i in rounds]
    pti = [load_json(d / f"pt-infer-{i}.json") or {} for i in rounds]
    ptt = [load_json(d / f"pt-train-{i}.json") or {} for i in rounds]

    def s(key):
        return median([r.get(key) for r in sm])

    train_format = next((r["train_format"] for r in sm if r.get("train_format")), "f32")
    lc_base = median([lc_decode(d / f"lc-base-{i}.log") for i in rounds])
    lc_l1 = median([lc_decode(d / f"lc-lora1-{i}.log") for i in rounds])
    lc_l2 = median([lc_decode(d / f"lc-lora2-{i}.log") for i in rounds])
    cost = lambda with_, without: (  # noqa: E731
        (without[0] / with_[0] - 1.0, min(with_[1], without[1]))
        if with_[0] and without[0]
        else (None, 0)
    )
    # Rows: figure, stancemix (value, n), peer (value, n), peer name, higher_is_better.
    rows = [
        ("prompt processing, 64 tokens (tok/s)", s("prompt_tok_s"),
         median([llama_bench(d / f"lb-{i}.json", 64, 0) for i in rounds]), "llama-bench pp64", True),
        ("decode, 64 tokens (tok/s)", s("decode_tok_s"),
         median([llama_bench(d / f"lb-{i}.json", 0, 64) for i in rounds]), "llama-bench tg64", True),
        ("decode, no adapter (tok/s)", s("decode_tok_s"), lc_base, "llama-completion", True),
        ("decode, 2 experts r16 all 7 proj, 0.6/0.4 (tok/s)", s("decode_tok_s_blend2"), lc_l2,
         "llama-completion, 2x --lora-scaled", True),
        ("decode cost of 2 experts vs base", s("blend2_cost"), cost(lc_l2, lc_base),
         "llama-completion", False),
        ("decode, 1 adapter: progressive expert (tok/s)", (None, 0), lc_l1,
         "llama-completion --lora", True),
        (f"LoRA SFT r8 q/v, batch 4x64, base {train_format} vs fp32 (train tok/s)", s("train_tok_s"),
         median([r.get("train_tok_s") for r in ptt]), "PyTorch + PEFT", True),
        ("LoRA SFT peak memory (MB)", s("train_peak_rss_mb"),
         median([r.get("train_peak_rss_mb") for r in ptt]), "PyTorch + PEFT", False),
        ("prompt processing, 64 tokens (tok/s)", s("prompt_tok_s"),
         median([r.get("prompt_tok_s") for r in pti]), "transformers fp32", True),
        ("greedy decode, 64 tokens (tok/s)", s("decode_tok_s"),
         median([r.get("decode_tok_s") for r in pti]), "transformers fp32", True),
        ("blend switch (ms)", s("switch_ms"), (None, 0), "", False),
        ("gate routing (ms)", s("route_ms"), (None, 0), "", False),
    ]

    def fmt(v):
        if v is None:
            return "n/a"
        if abs(v) < 1:
            return f"{v:.3g}"
        return f"{v:.1f}"

    out = [
        f"## stancemix vs peers ({meta['threads']} threads, median of {meta['rounds']} "
        f"alternating rounds)",
        "",
        "| figure | stancemix | peer | ratio | peer is |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, (a, na), (b, nb), who, _hib in rows:
        ratio = f"{a / b:.2f}x" if a is not None and b not in (None, 0) and "cost" not in name else ""
        if "cost" in name and a is not None and b is not None:
            ratio = f"{a * 100:+.1f}% vs {b * 100:+.1f}%"
        short = "" if na in (0, meta["rounds"]) and nb in (0, meta["rounds"]) else f" ({na}/{nb} rounds)"
        out.append(f"| {name}{short} | {fmt(a)} | {fmt(b)} | {ratio} | {who} |")
    out += [
        "",
        "Ratio = stancemix / peer (speed: higher is better for stancemix; memory: lower is). "
        "Cost rows: extra time per decoded token with the adapters applied, unmerged.",
        "",
        "How: `" + meta["command"] + "`. " + meta["notes"],
        "",
        "| run facts | |",
        "| --- | --- |",
    ]
    for k in ("date", "cpu", "load_before", "load_after", "stancemix", "llama_cpp", "llama_flags",
              "python", "adapter_lora1"):
        if k in meta:
            out.append(f"| {k} | {meta[k]} |")
    print("\n".join(out))


if __name__ == "__main__":
    main()
