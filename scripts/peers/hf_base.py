"""Write a Hugging Face model folder (config.json, tokenizer files, fp32 safetensors) from a GGUF.

The peers need one: llama.cpp's convert_lora_to_gguf.py reads the base model's config.json
(`--base DIR`; `--base-model-id` would fetch it from a model hub, which is not reachable here),
and the PyTorch benchmarks load the model with transformers. transformers reads the GGUF itself
(`gguf_file=`, dequantized to fp32, q/k rows un-permuted back to Hugging Face order); this saves
the result once so later runs skip the dequantization.

Usage: python hf_base.py MODEL.gguf OUT_DIR
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    gguf, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        print(f"{out}: already there")
        return
    tmp = out.with_name(out.name + ".tmp")
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    cfg = model.config
    assert cfg.model_type == "llama", cfg.model_type
    # The GGUF has no output.weight: the head is the token embedding.
    assert cfg.tie_word_embeddings, "expected tied embeddings"
    # transformers marks a GGUF-loaded model as "quantized" (not serializable) although its
    # weights are plain fp32 tensors: copy them into a model built from the config alone.
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    clean = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    clean.load_state_dict(model.state_dict())
    clean.config.name_or_path = "SmolLM2-135M-Instruct (from GGUF)"
    tok.save_pretrained(tmp)
    clean.save_pretrained(tmp)
    # Facts the benchmark reports rely on.
    c = json.loads((tmp / "config.json").read_text())
    print(
        "hf base: layers {num_hidden_layers}, hidden {hidden_size}, heads {num_attention_heads}/"
        "{num_key_value_heads}, vocab {vocab_size}, rope {rope_theta}".format(
            **{**c, "rope_theta": c.get("rope_theta", (c.get("rope_parameters") or {}).get("rope_theta"))}
        )
    )
    if out.exists():
        raise SystemExit(f"{out} exists but is incomplete: remove it")
    tmp.rename(out)


if __name__ == "__main__":
    main()
