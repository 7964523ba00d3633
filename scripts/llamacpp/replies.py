#!/usr/bin/env python3
"""Greedy replies of llama.cpp to chat questions, for token-exact comparisons with SmolDesk.

Each question becomes one user message rendered with the GGUF's own chat template (jinja2, as
Hugging Face does; `add_generation_prompt`), tokenized by llama.cpp with special tokens parsed and
no extra BOS, prefilled in one batch, then decoded greedily one token at a time until
`<|im_end|>` (the model's EOS) or --max-tokens. Records the prompt ids, generated ids, text, and
each step's top-2 logit margin.

    python3 scripts/llamacpp/replies.py models/SmolLM2-135M-Instruct.Q4_K_M.gguf \
        --questions-from /work/shared/fixtures/smollm2-135m-chat.ref.json \
        --question "List three fruits that are red." --out tests/fixtures/smollm2-q4km.ref.json
"""

import argparse
import json
import os
import platform
import sys

sys.dont_write_bytecode = True  # keep the checkout free of __pycache__

import jinja2

from common import last_logits, open_model, version

N_CTX = 2048


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="GGUF file")
    p.add_argument("--questions-from", help="a *.ref.json whose cases' questions (and prompts) to reuse")
    p.add_argument("--question", action="append", default=[], help="another question (repeatable)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the JSON here (default: stdout)")
    return p.parse_args()


def render(template, question):
    env = jinja2.Environment(trim_blocks=False, lstrip_blocks=False)
    messages = [{"role": "user", "content": question}]
    return env.from_string(template).render(messages=messages, add_generation_prompt=True)


def top2(logits):
    best = logits.argsort()[::-1][:2]
    return int(best[0]), int(best[1]), float(logits[best[0]] - logits[best[1]])


def reply(llm, prompt_tokens, eos, max_tokens):
    """Greedy ids, and per step [top1, top2, margin]."""
    llm.reset()
    llm.eval(prompt_tokens)
    generated, steps = [], []
    for _ in range(max_tokens):
        first, second, margin = top2(last_logits(llm))
        steps.append([first, second, round(margin, 6)])
        generated.append(first)
        if first == eos:
            break
        llm.eval([first])
    return generated, steps


def main():
    args = parse_args()
    llm = open_model(args.model, N_CTX, args.threads)
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        raise SystemExit("the model has no chat template")
    eos = llm.token_eos()

    known = []
    if args.questions_from:
        known = json.load(open(args.questions_from))["cases"]
    questions = [c["question"] for c in known] + args.question
    cases = []
    for i, question in enumerate(questions):
        prompt = render(template, question)
        ids = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        if i < len(known) and (prompt != known[i]["prompt"] or ids != known[i]["prompt_tokens"]):
            raise SystemExit(f"prompt of {question!r} differs from {args.questions_from}")
        generated, steps = reply(llm, ids, eos, args.max_tokens)
        text_ids = generated[:-1] if generated and generated[-1] == eos else generated
        text = llm.detokenize(text_ids).decode("utf-8", errors="replace")
        cases.append(
            {
                "question": question,
                "prompt": prompt,
                "prompt_tokens": ids,
                "generated": generated,
                "text": text,
                "ended_with_eos": bool(generated) and generated[-1] == eos,
                "top2": steps,
                "min_margin": min(s[2] for s in steps),
            }
        )
        print(f"{question!r}: {len(generated)} tokens, min margin {cases[-1]['min_margin']:.4f}", file=sys.stderr)

    result = {
        "model": os.path.basename(args.model),
        "engine": f"llama-cpp-python {version()}",
        "settings": {
            "n_ctx": N_CTX,
            "n_batch": 512,
            "n_ubatch": 512,
            "threads": args.threads,
            "kv_cache": "f16",
            "flash_attn": False,
            "max_tokens": args.max_tokens,
            "sampling": "greedy (argmax of llama_get_logits_ith(-1))",
        },
        "machine": platform.processor() or platform.machine(),
        "eos": eos,
        "top2_format": "per generated token: [argmax id, runner-up id, logit margin]",
        "cases": cases,
    }
    text = json.dumps(result, indent=1, ensure_ascii=False)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
