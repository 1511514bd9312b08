#!/usr/bin/env python3
"""MinHash near-duplicate removal with datasketch, the reference for services/ingest's bench.

Reads one record text per line (JSON-encoded strings) from the file given as argv[1], builds a
MinHash over the character 5-gram shingles of each text (lowercased, whitespace runs as one
space: the same shingles as lmforge's MinHasher), queries a MinHashLSH index at the threshold
and inserts the record when no near-duplicate is found (keep first). Prints one JSON line:
{"records": n, "seconds": t, "duplicates": d, "num_perm": p, "threshold": x}.

Usage: bench_datasketch.py TEXTS.jsonl [NUM_PERM] [THRESHOLD]
Needs `pip install datasketch`; cargo bench -p lmforge-ingest runs it when found.
"""
import json
import re
import sys
import time

from datasketch import MinHash, MinHashLSH


def shingles(text, k=5):
    chars = re.sub(r"\s+", " ", text).strip()
    chars = "".join(c.lower() if c.isascii() else c for c in chars)
    if len(chars) <= k:
        return [chars.encode("utf-8")]
    return [chars[i : i + k].encode("utf-8") for i in range(len(chars) - k + 1)]


def main():
    path = sys.argv[1]
    num_perm = int(sys.argv[2]) if len(sys.argv) > 2 else 128
    threshold = float(sys.argv[3]) if len(sys.argv) > 3 else 0.8
    with open(path, encoding="utf-8") as f:
        texts = [json.loads(line) for line in f if line.strip()]
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    duplicates = 0
    start = time.perf_counter()
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm)
        m.update_batch(shingles(text))
        if lsh.query(m):
            duplicates += 1
        else:
            lsh.insert(str(i), m)
    seconds = time.perf_counter() - start
    print(json.dumps({"records": len(texts), "seconds": seconds, "duplicates": duplicates, "num_perm": num_perm, "threshold": threshold}))


if __name__ == "__main__":
    main()
