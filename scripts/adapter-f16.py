"""Rewrite an adapter's weights as float16 (halves the file; the loader reads f16 as f32).
Usage: python3 scripts/adapter-f16.py DIR...   (needs numpy and safetensors)"""
import os, sys
import numpy as np
from safetensors.numpy import load_file, save_file

for d in sys.argv[1:]:
    path = os.path.join(d, "adapter_model.safetensors")
    tensors = {k: v.astype(np.float16) for k, v in load_file(path).items()}
    tmp = path + ".f16.tmp"
    save_file(tensors, tmp)
    os.replace(tmp, path)
    print(f"{path}: float16")
