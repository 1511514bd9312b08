#!/usr/bin/env python3
"""Reference for `lmforge bench serve`: Hugging Face transformers' static-batch greedy
`generate` on the same checkpoint directory, CPU, f32, 2 threads (BENCH.md's setting).

For each batch size, `batch` random prompts of `--prompt-len` token ids (seeded) generate
exactly `--output-len` tokens (min_new_tokens = max_new_tokens, so EOS cannot end a row early).
Prints one JSON object:

    {"decode": {"1": tok/s, "16": tok/s}, "generate": {"1": tok/s, ...},
     "transformers": "5.x", "torch": "2.x", "threads": 2}

`decode` excludes the prefill (a 1-token generate is timed and subtracted), as BENCH.md's
reference figures do; `generate` is the whole call, prefill included. Each time is the median
of `--repeats` runs (whole and 1-token calls alternating): one run of the `small` shape moved
by ±15% between invocations on the same machine.
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def timed_generate(model, ids, new_tokens):
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="Hugging Face checkpoint directory")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per timing (median)")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32)
    model.eval()
    vocab = model.config.vocab_size
    out = {
        "decode": {},
        "generate": {},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "threads": args.threads,
        "repeats": max(args.repeats, 1),
    }
    with torch.no_grad():
        for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
            # Ids 0-2 are the special tokens of lmforge's checkpoints, as in the Rust client.
            ids = torch.randint(3, vocab, (batch, args.prompt_len))
            timed_generate(model, ids, 1)  # warm-up
            fulls, prefills = [], []
            for _ in range(max(args.repeats, 1)):
                fulls.append(timed_generate(model, ids, args.output_len))
                prefills.append(timed_generate(model, ids, 1))
            full, prefill = statistics.median(fulls), statistics.median(prefills)
            tokens = batch * args.output_len
            out["generate"][str(batch)] = tokens / full
            out["decode"][str(batch)] = tokens / max(full - prefill, 1e-9)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
