#!/usr/bin/env python3
"""Reference figures for libs/model's benchmark: Hugging Face transformers on CPU, 2 threads,
f32, random weights, the BENCH.md shapes. Prints one JSON object (tokens/s, peak MB)."""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=688, tie_word_embeddings=False,
                 max_position_embeddings=1024),
    "small": dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, intermediate_size=1536, tie_word_embeddings=True,
                  max_position_embeddings=2048),
}


def decode(model, vocab, batch):
    ids = torch.randint(0, vocab, (batch, 32))
    with torch.no_grad():
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
        full = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        prefill = time.perf_counter() - start
    return batch * 64 / max(full - prefill, 1e-9)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny", choices=SHAPES)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = LlamaConfig(**SHAPES[args.shape], rms_norm_eps=1e-5, rope_theta=10000.0)
    model = LlamaForCausalLM(cfg)
    vocab = cfg.vocab_size
    out = {}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, vocab, (8, 256))
    # One warm-up step, then the median of three (lmforge's bench times the same).
    rates = []
    for i in range(4):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i > 0:
            rates.append(8 * 256 / (time.perf_counter() - start))
    out["train"] = sorted(rates)[1]
    del opt
    model.eval()
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, 256))
        model(ids)
        start = time.perf_counter()
        model(ids)
        out["prefill"] = 256 / (time.perf_counter() - start)
    out["decode1"] = decode(model, vocab, 1)
    out["decode16"] = decode(model, vocab, 16)
    # VmHWM, not ru_maxrss: the latter survives exec and would report the parent's peak.
    with open("/proc/self/status") as f:
        out["peak_mb"] = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
    print(json.dumps(out))


if __name__ == "__main__":
    main()
