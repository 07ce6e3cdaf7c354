#!/usr/bin/env python3
"""Writes a random-weight checkpoint with transformers' own `save_pretrained`.

Usage: python3 scripts/hf_save_random.py CONFIG_DIR OUT_DIR [--seed N]

CONFIG_DIR holds a config.json (for example a preset folder written by
`generate --preset tiny-moe`). transformers builds the model from that config
with its own random initialisation and saves it, in whatever tensor layout this
transformers version writes (for Qwen3-MoE in transformers 5 that is fused
expert tensors). `generate --model OUT_DIR --dump FILE` then loads it and
scripts/compare_hf.py checks the result against transformers.
"""
import argparse
import shutil
import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    config = AutoConfig.from_pretrained(a.config_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(a.out_dir)
    tok = os.path.join(a.config_dir, "tokenizer.json")
    if os.path.exists(tok):
        shutil.copy(tok, a.out_dir)
    import json
    from safetensors import safe_open
    names = []
    for f in sorted(os.listdir(a.out_dir)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(a.out_dir, f), "pt") as s:
                names += list(s.keys())
    print(json.dumps({"saved": a.out_dir, "tensors": len(names),
                      "expert_names": sorted(n for n in names if "experts" in n)[:6]}))


if __name__ == "__main__":
    main()
