#!/usr/bin/env python3
"""PEFT's greedy answers for the exported-blend test (tests/llamacpp.rs), with transformers.

Usage: peft_reference.py HF_DIR ADAPTER_DIR REQUEST.json > ANSWER.json

HF_DIR: the base as a Hugging Face folder (scripts/bench-peers install writes .peers/hf from the
GGUF, fp32); ADAPTER_DIR: a PEFT LoRA folder, loaded with `PeftModel.from_pretrained` as any
PEFT user would. REQUEST: {"prompts": [[int]] (token ids, the same ones stancemix feeds),
"greedy": int, "stop": [int]}. ANSWER: {"greedy": [[int]], "margins": [[float]]}: the greedy
tokens from each prompt and, per step, the top logit minus the second (near-ties are small).
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main():
    hf, adapter, request = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
    torch.set_num_threads(2)
    base = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter).eval()
    greedy, margins = [], []
    with torch.no_grad():
        for prompt in request["prompts"]:
            ids = torch.tensor([prompt])
            out, gaps, past = [], [], None
            for _ in range(request["greedy"]):
                r = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = r.past_key_values
                z = r.logits[0, -1].double()
                top2 = torch.topk(z, 2).values
                nxt = int(torch.argmax(z))
                gaps.append(float(top2[0] - top2[1]))
                if nxt in request.get("stop", []):
                    break
                out.append(nxt)
                ids = torch.tensor([[nxt]])
            greedy.append(out)
            margins.append(gaps)
    json.dump({"greedy": greedy, "margins": margins}, sys.stdout)


if __name__ == "__main__":
    main()
