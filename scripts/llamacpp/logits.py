#!/usr/bin/env python3
"""llama.cpp's logits for a token sequence, for cross-checks with `smoldesk logits`.

Prints JSON: {tokens, n_vocab, logits, argmax} where logits holds the logits after the last token
(or, with --all-positions, after each prefix, one row per token).

    python3 scripts/llamacpp/logits.py /work/shared/fixtures/tiny-smollm3-f32.gguf \
        --tokens 1,2,3 --kv-f32 --all-positions
"""

import argparse
import json
import sys

sys.dont_write_bytecode = True  # keep the checkout free of __pycache__

from common import last_logits, open_model, version


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="GGUF file")
    p.add_argument("--tokens", required=True, help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-positions", action="store_true", help="logits after every prefix")
    p.add_argument(
        "--kv-f32",
        action="store_true",
        help="f32 KV cache (the tiny-smollm3-f32 reference uses it; default is f16)",
    )
    p.add_argument("--top", type=int, default=0, help="print only the N largest logits per row")
    return p.parse_args()


def row(logits, top):
    if top <= 0:
        return [float(x) for x in logits]
    best = logits.argsort()[::-1][:top]
    return [[int(i), float(logits[i])] for i in best]


def main():
    args = parse_args()
    tokens = [int(t) for t in args.tokens.split(",") if t.strip()]
    if not tokens:
        raise SystemExit("--tokens needs at least one id")
    llm = open_model(
        args.model,
        n_ctx=max(len(tokens) + 8, 64),
        threads=args.threads,
        logits_all=args.all_positions,
        kv_f32=args.kv_f32,
    )
    bad = [t for t in tokens if not 0 <= t < llm.n_vocab()]
    if bad:
        raise SystemExit(f"token ids outside the vocabulary of {llm.n_vocab()}: {bad}")
    llm.eval(tokens)
    if args.all_positions:
        rows = [llm.scores[i] for i in range(len(tokens))]
    else:
        rows = [last_logits(llm)]
    print(
        json.dumps(
            {
                "engine": f"llama-cpp-python {version()}",
                "tokens": tokens,
                "n_vocab": llm.n_vocab(),
                "argmax": [int(r.argmax()) for r in rows],
                "logits": [row(r, args.top) for r in rows]
                if args.all_positions
                else row(rows[0], args.top),
            }
        )
    )


if __name__ == "__main__":
    main()
