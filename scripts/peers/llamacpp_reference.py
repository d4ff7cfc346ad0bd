#!/usr/bin/env python3
"""llama.cpp's answers for the parity test (tests/llamacpp.rs), through llama-cpp-python.

Usage: llamacpp_reference.py MODEL.gguf REQUEST.json > ANSWER.json

REQUEST: {"lines": [str], "prompts": [str], "greedy": int, "text": str, "lora": str (optional)}
  lines   texts to tokenize (no BOS, special tokens not parsed: plain text)
  prompts rendered chat prompts (special tokens parsed); each is decoded greedily for `greedy`
          tokens (stopping early at end of generation)
  lora    a llama.cpp LoRA GGUF (convert_lora_to_gguf.py) applied at scale 1
  text    a text whose next-token log-probabilities are returned (tokenized with BOS when the
          model adds one, as stancemix does not: the ids are returned so both sides use the same)
ANSWER: {"ids": [[int]], "greedy": [[int]], "margins": [[float]], "text_ids": [int],
         "logprobs": [float]}
  margins[p][i] = llama.cpp's top logit minus its second at greedy step i (near-ties are small)
  logprobs[i] = log p(text_ids[i + 1] | text_ids[..= i])

llama-cpp-python is built from its source package (which vendors llama.cpp) by
scripts/llamacpp-install; nothing here downloads a model.
"""
import json
import sys

import numpy as np
from llama_cpp import Llama


def main():
    model, request = sys.argv[1], json.load(open(sys.argv[2], encoding="utf-8"))
    llm = Llama(model_path=model, n_ctx=1024, n_threads=2, logits_all=True, verbose=False,
                n_batch=512, lora_path=request.get("lora"))
    ids = [llm.tokenize(line.encode("utf-8"), add_bos=False, special=False)
           for line in request["lines"]]
    greedy, margins = [], []
    for prompt in request["prompts"]:
        toks = llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(toks)
        out, gaps = [], []
        for _ in range(request["greedy"]):
            z = llm.scores[llm.n_tokens - 1]
            nxt = int(np.argmax(z))
            top2 = np.sort(z)[-2:]
            gaps.append(float(top2[1] - top2[0]))
            if llm.token_eos() == nxt or nxt in request.get("stop", []):
                break
            out.append(nxt)
            llm.eval([nxt])
        greedy.append(out)
        margins.append(gaps)
    # add_bos=True adds BOS only where the file says to (tokenizer.ggml.add_bos_token: Gemma).
    text_ids = llm.tokenize(request["text"].encode("utf-8"), add_bos=True, special=False)
    llm.reset()
    llm.eval(text_ids)
    scores = np.array(llm.scores[: len(text_ids)], dtype=np.float64)
    m = scores.max(axis=1, keepdims=True)
    logz = (m + np.log(np.exp(scores - m).sum(axis=1, keepdims=True)))[:, 0]
    logprobs = [float(scores[i, text_ids[i + 1]] - logz[i]) for i in range(len(text_ids) - 1)]
    json.dump({"ids": ids, "greedy": greedy, "margins": margins, "text_ids": text_ids, "logprobs": logprobs},
              sys.stdout)


if __name__ == "__main__":
    main()
