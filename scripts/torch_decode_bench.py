#!/usr/bin/env python3
"""Batch-1 greedy decode speed of a checkpoint in PyTorch + transformers, the
peer figure for examples/bench.

Usage: python3 scripts/torch_decode_bench.py MODEL_DIR [--context 1024] [--tokens 64]

Loads MODEL_DIR (for example a preset written by `generate --preset NAME`, in
~/.cache/megakernel/checkpoints/NAME) in bf16 on the GPU, fills a static KV
cache with a prompt of `context` tokens, then times `tokens` greedy decode steps
one token at a time with the forward pass compiled by torch.compile
(mode="reduce-overhead", i.e. CUDA graphs) on the static cache. If compilation
fails it says so and times the eager model instead. Prints one JSON line.
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, StaticCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 7919) % vocab for i in range(a.context)]], device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=a.context + a.tokens + 8)
    mode = "compiled (reduce-overhead)"
    step = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        out = model(prompt, past_key_values=cache, use_cache=True, cache_position=torch.arange(a.context, device="cuda"))
        tok = out.logits[:, -1:].argmax(-1)

        def decode(n, fwd, start):
            nonlocal tok
            for i in range(n):
                pos = torch.tensor([start + i], device="cuda")
                logits = fwd(tok, past_key_values=cache, use_cache=True, cache_position=pos).logits
                tok = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()

        try:
            decode(3, step, a.context)  # warm-up and compilation
            fwd, start = step, a.context + 3
        except Exception as e:  # noqa: BLE001 - report and fall back
            print(f"torch.compile failed ({type(e).__name__}: {e}); timing the eager model")
            mode, fwd, start = "eager", model.forward, a.context + 3
            decode(3, fwd, a.context)
        t = time.perf_counter()
        decode(a.tokens, fwd, start)
        per = (time.perf_counter() - t) / a.tokens
    print(json.dumps({"peer": "pytorch+transformers", "mode": mode, "model": a.model, "context": a.context,
                      "ms_per_token": per * 1e3, "tokens_per_s": 1 / per,
                      "torch": torch.__version__, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
