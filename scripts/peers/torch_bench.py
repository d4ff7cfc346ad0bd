"""PyTorch + transformers + PEFT side of scripts/bench-peers: one measurement, one JSON line.

  torch_bench.py train  --hf DIR --data DIR --threads N [--steps 4] [--batch 4] [--seq 64]
      LoRA SFT as stancemix's `bench` trains: rank 8, alpha 16, q_proj + v_proj, fp32, AdamW,
      batch 4 x 64 tokens from the stance pairs (ChatML prompt + progressive answer, truncated to
      64 tokens, loss on the answer only). One warm-up step, then --steps timed steps.
      Prints train_tok_s (non-pad tokens / s, as stancemix counts) and train_peak_rss_mb
      (this process's peak resident memory, from getrusage).
  torch_bench.py infer  --hf DIR --threads N
      prompt_tok_s: one forward pass over a 64-token prompt; decode_tok_s: greedy generate of 64
      tokens after an 8-token prompt (the time includes those 8 tokens, as stancemix's does).
      One warm-up run of each first.

Run it in its own process per figure, so the peak memory is the figure's own.
"""

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

import torch

# stancemix's bench prompt (src/cli/bench.rs), repeated and cut to 64 tokens.
BREAD = (
    "The history of bread is long and varied. People have baked flat loaves from ground grain for "
    "thousands of years, and every region developed its own methods, ovens and recipes. Today bakers "
    "still argue about"
)


def prompt_ids(tok, n=64):
    ids = tok(BREAD, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def chatml_user(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def load(hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    return tok, model


def train_batches(tok, data_dir, batch, seq, seed=1):
    """Batches of (input_ids, attention_mask, labels), like stancemix's SFT export and packing."""
    rows = []
    for f in sorted(Path(data_dir).glob("*.jsonl")):
        for line in f.read_text().splitlines():
            if line.strip():
                p = json.loads(line)
                rows.append((chatml_user(p["prompt"]), p["progressive"] + "<|im_end|>"))
    random.Random(seed).shuffle(rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    for i in range(0, len(rows) - batch + 1, batch):
        seqs = []
        for prompt, answer in rows[i : i + batch]:
            p = tok(prompt, add_special_tokens=False)["input_ids"]
            a = tok(answer, add_special_tokens=False)["input_ids"]
            ids = (p + a)[:seq]
            labels = ([-100] * len(p) + a)[:seq]
            seqs.append((ids, labels))
        width = max(len(s[0]) for s in seqs)
        ids = torch.full((batch, width), pad, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for r, (s, l) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            mask[r, : len(s)] = 1
            labels[r, : len(l)] = torch.tensor(l)
        out.append((ids, mask, labels))
    return out


def cmd_train(a):
    from peft import LoraConfig, get_peft_model

    tok, model = load(a.hf)
    model.config.use_cache = False
    cfg = LoraConfig(
        r=a.rank,
        lora_alpha=2 * a.rank,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    batches = train_batches(tok, a.data, a.batch, a.seq)
    if len(batches) < a.steps + 1:
        sys.exit(f"only {len(batches)} batches in {a.data}")

    def step(b):
        ids, mask, labels = b
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return int(mask.sum()), loss.item()

    step(batches[0])  # warm-up
    tokens, t0 = 0, time.perf_counter()
    for b in batches[1 : a.steps + 1]:
        n, loss = step(b)
        tokens += n
    dt = time.perf_counter() - t0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        "train_tok_s": tokens / dt,
        "train_peak_rss_mb": rss_mb,
        "train_steps": a.steps,
        "train_tokens": tokens,
        "trainable_params": sum(p.numel() for p in params),
        "last_loss": loss,
    }


def cmd_infer(a):
    tok, model = load(a.hf)
    model.eval()
    ids = torch.tensor([prompt_ids(tok)])
    with torch.inference_mode():

        def prompt():
            model(input_ids=ids, use_cache=False)

        def decode():
            out = model.generate(
                input_ids=ids[:, :8],
                attention_mask=torch.ones_like(ids[:, :8]),
                max_new_tokens=64,
                min_new_tokens=64,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )
            assert out.shape[1] == 8 + 64, out.shape

        res = {}
        for name, f in (("prompt_tok_s", prompt), ("decode_tok_s", decode)):
            f()  # warm-up
            t0 = time.perf_counter()
            f()
            res[name] = 64 / (time.perf_counter() - t0)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "infer"])
    ap.add_argument("--hf", required=True)
    ap.add_argument("--data", default="adapters/data/stance")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(1)
    res = cmd_train(a) if a.what == "train" else cmd_infer(a)
    res.update(
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        omp_num_threads=os.environ.get("OMP_NUM_THREADS"),
    )
    print(json.dumps(res))


if __name__ == "__main__":
    main()
