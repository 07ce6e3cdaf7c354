#!/usr/bin/env python3
"""Compares a megakernel generation with Hugging Face transformers on the same checkpoint.

Usage: python3 scripts/compare_hf.py DUMP.json [DUMP.json ...]

Each DUMP.json is written by `generate --dump FILE`: the checkpoint folder, the
prompt, the greedy tokens and the logits after the prompt. transformers loads
the same folder in bf16 on the GPU, computes the logits after the prompt and
generates greedily; the script prints the relative L2 difference of the logits,
how many tokens agree, and the reference's top-2 margin where they first
differ. It exits non-zero when the logits differ by more than the tolerance or
a token differs where the reference's margin is clear.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM

TOL = 3e-2        # bf16 activations on both sides
MARGIN = 0.1      # tokens are compared only where the reference's top-2 margin exceeds this


def compare(path):
    d = json.load(open(path))
    model = AutoModelForCausalLM.from_pretrained(d["model_dir"], dtype=torch.bfloat16).cuda().eval()
    prompt = torch.tensor([d["prompt"]], device="cuda")
    ours_logits = torch.tensor(d["logits"], dtype=torch.float64)
    tokens = d["tokens"]
    with torch.no_grad():
        ref_logits = model(prompt).logits[0, -1].double().cpu()
        seq = torch.tensor([d["prompt"] + tokens], device="cuda")
        # Teacher-forced on our tokens: the reference's choice and margin at every step.
        all_logits = model(seq).logits[0].double().cpu()
    rel = ((ours_logits - ref_logits).norm() / ref_logits.norm()).item()
    n = len(d["prompt"])
    agree, checked, first_diff = 0, 0, None
    for i, t in enumerate(tokens):
        row = all_logits[n - 1 + i]
        top2 = row.topk(2)
        margin = (top2.values[0] - top2.values[1]).item()
        if int(top2.indices[0]) == t:
            agree += 1
        elif margin > MARGIN:
            first_diff = first_diff or (i, t, int(top2.indices[0]), margin)
        if margin > MARGIN:
            checked += 1
    print(f"{path}: {d['executor']}: logits rel L2 {rel:.3e}; tokens agreeing with the reference's greedy choice "
          f"{agree}/{len(tokens)} ({checked} with margin > {MARGIN}); first clear difference: {first_diff}")
    return rel <= TOL and first_diff is None


def compare_or_report(path):
    try:
        return compare(path)
    except Exception as e:  # noqa: BLE001 - one bad file must not hide the others
        print(f"{path}: could not compare: {type(e).__name__}: {e}")
        return False


if __name__ == "__main__":
    ok = all([compare_or_report(p) for p in sys.argv[1:]])
    sys.exit(0 if ok else 1)
