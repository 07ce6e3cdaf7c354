#!/usr/bin/env python3
"""Batch-1 greedy decode speed of a checkpoint in PyTorch + transformers, the
peer figure for examples/bench.

Usage: python3 scripts/torch_decode_bench.py MODEL_DIR [--context 1024] [--tokens 64] [--random]

Loads MODEL_DIR (for example a preset written by `generate --preset NAME`, in
~/.cache/megakernel/checkpoints/NAME) in bf16 on the GPU, fills a static KV
cache with a prompt of `context` tokens, then times `tokens` greedy decode steps
one token at a time with the forward pass compiled by torch.compile
(mode="reduce-overhead", i.e. CUDA graphs) on the static cache. If compilation
fails it says so and times the eager model instead. Prints one JSON line.

With --random, MODEL_DIR needs only a config.json (`bench --config-out DIR`
writes one per preset): the model is built from it with random weights
directly on the GPU, so full-size presets need no checkpoint on disk. Speed
does not depend on the weights' values.
"""
import argparse
import json
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--random", action="store_true")
    a = ap.parse_args()
    if a.random:
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(a.model), dtype=torch.bfloat16).eval()
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 7919) % vocab for i in range(a.context)]], device="cuda")
    cache = StaticCache(config=model.config, max_cache_len=a.context + a.tokens + 16)
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

        # The fastest setup that works: whole-graph compile with CUDA graphs,
        # then compile with graph breaks (MoE routing may break the graph),
        # then eager.
        start = a.context
        for mode, fwd in [
            ("compiled, fullgraph, reduce-overhead", lambda: torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)),
            ("compiled, reduce-overhead", lambda: torch.compile(model.forward, mode="reduce-overhead")),
            ("eager", lambda: model.forward),
        ]:
            try:
                fwd = fwd()
                decode(3, fwd, start)  # warm-up and compilation
                start += 3
                break
            except Exception as e:  # noqa: BLE001 - report and try the next setup
                print(f"{mode} failed ({type(e).__name__}: {str(e)[:200]})")
                torch._dynamo.reset()
                start += 3
        t = time.perf_counter()
        decode(a.tokens, fwd, start)
        per = (time.perf_counter() - t) / a.tokens
    print(json.dumps({"peer": "pytorch+transformers", "mode": mode, "model": a.model, "random": a.random, "context": a.context,
                      "ms_per_token": per * 1e3, "tokens_per_s": 1 / per,
                      "torch": torch.__version__, "device": torch.cuda.get_device_name()}))


if __name__ == "__main__":
    main()
