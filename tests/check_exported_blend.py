"""Check an exported blend against the experts it came from, with numpy only.

usage: check_exported_blend.py EXPORT_DIR EXPERT_DIR:WEIGHT [EXPERT_DIR:WEIGHT ...]

Independent of stancemix: reads the PEFT files as PEFT would (`adapter_config.json`: r,
lora_alpha, use_rslora, target_modules; tensors `...lora_A.weight` / `...lora_B.weight`, both in
Hugging Face row order on disk) and checks, for every adapted linear, that the export's
`scale * B @ A` equals `sum_i g_i scale_i B_i A_i`. Prints one JSON line: the largest relative
difference and the counts; exits 1 if any linear is off.
"""
import json
import os
import sys

import numpy as np
from safetensors.numpy import load_file


def load(d):
    with open(os.path.join(d, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg.get("peft_type", "LORA") == "LORA", cfg
    for key in ("r", "lora_alpha", "target_modules"):
        assert key in cfg, f"{d}: adapter_config.json has no {key}"
    r = cfg["r"]
    scale = cfg["lora_alpha"] / (np.sqrt(r) if cfg.get("use_rslora") else r)
    t = load_file(os.path.join(d, "adapter_model.safetensors"))
    deltas = {}
    for name, a in t.items():
        if name.endswith("lora_A.weight"):
            b = t[name.replace("lora_A", "lora_B")]
            assert a.shape[0] == r and b.shape[1] == r, (name, a.shape, b.shape, r)
            deltas[name[: -len(".lora_A.weight")]] = scale * (b.astype(np.float64) @ a.astype(np.float64))
    return cfg, deltas


def main():
    export_dir, parts = sys.argv[1], sys.argv[2:]
    cfg, got = load(export_dir)
    want = {}
    ranks = 0
    for p in parts:
        d, w = p.rsplit(":", 1)
        w = float(w)
        c, deltas = load(d)
        if w != 0.0:
            ranks += c["r"]
        for k, v in deltas.items():
            want[k] = want.get(k, 0.0) + w * v
    worst, bad = 0.0, []
    for k in sorted(set(want) | set(got)):
        g = got.get(k)
        w = want.get(k)
        if w is None or g is None:
            if np.abs(g if w is None else w).max() != 0.0:
                bad.append(k)
            continue
        rel = np.abs(g - w).max() / max(np.abs(w).max(), 1e-12)
        worst = max(worst, rel)
        if rel > 1e-5:
            bad.append(k)
    out = {"rank": cfg["r"], "expected_rank": ranks, "linears": len(got),
           "max_rel_diff": worst, "bad": bad[:5]}
    print(json.dumps(out))
    sys.exit(1 if bad or cfg["r"] != ranks else 0)


if __name__ == "__main__":
    main()
