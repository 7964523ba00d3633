#!/usr/bin/env python3
"""Speed of llama.cpp on a GGUF file, for comparison with `smoldesk bench`.

Prints JSON: {load_s, prefill_tok_s, decode_tok_s, ...}. The prompt is random token ids (seeded),
prefilled in one call; decoding is greedy, one token at a time, with llama.cpp's default f16 KV
cache. Rates come from wall-clock time around llama.cpp's calls; llama.cpp's own timings are
included under "llama_cpp_perf".

    python3 scripts/llamacpp/bench.py models/synth-smollm3-3b.gguf \
        --prompt-tokens 512 --gen-tokens 128 --threads 2
"""

import argparse
import json
import os
import random
import sys
import time

sys.dont_write_bytecode = True  # keep the checkout free of __pycache__

from common import last_logits, open_model, perf, version


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="GGUF file")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    p.add_argument("--no-mmap", action="store_true", help="read the whole file at load time")
    return p.parse_args()


def main():
    args = parse_args()
    n_ctx = args.prompt_tokens + args.gen_tokens + 8

    start = time.perf_counter()
    llm = open_model(args.model, n_ctx, args.threads, mmap=not args.no_mmap)
    load_s = time.perf_counter() - start

    # Ordinary (non-special) ids: the lower half of the vocabulary.
    rng = random.Random(args.seed)
    prompt = [rng.randrange(1, llm.n_vocab() // 2) for _ in range(args.prompt_tokens)]

    start = time.perf_counter()
    llm.eval(prompt)
    prefill_s = time.perf_counter() - start

    next_token = int(last_logits(llm).argmax())
    start = time.perf_counter()
    for _ in range(args.gen_tokens):
        llm.eval([next_token])
        next_token = int(last_logits(llm).argmax())
    decode_s = time.perf_counter() - start

    print(
        json.dumps(
            {
                "model": os.path.abspath(args.model),
                "engine": f"llama-cpp-python {version()}",
                "threads": args.threads,
                "prompt_tokens": args.prompt_tokens,
                "gen_tokens": args.gen_tokens,
                "load_s": round(load_s, 3),
                "prefill_tok_s": round(args.prompt_tokens / prefill_s, 2),
                "decode_tok_s": round(args.gen_tokens / decode_s, 2),
                "llama_cpp_perf": perf(llm),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
