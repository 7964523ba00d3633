#!/usr/bin/env bash
# Speed of SmolDesk (`smoldesk bench`) and llama.cpp (`llama-bench`, built by
# scripts/llamacpp/build.sh if missing) on the same GGUF file, one after the other, same threads.
# Needs a quiet machine for meaningful numbers (compare ratios, not absolute values).
#
#   scripts/bench-vs-llamacpp.sh [MODEL.gguf]     # default: synthetic SmolLM3-3B Q4_K_M, made if missing
#
# Environment (defaults): PROMPT_TOKENS (512), GEN_TOKENS (64), DEPTH (2048), DEPTH_GEN_TOKENS (32),
# THREADS (2), REPS (3, llama-bench repetitions), BANDWIDTH_MB (1024), VARIANT (native: llama.cpp
# built with -DGGML_NATIVE=ON; native-noamx: the same without AMX; avx2: AVX2+FMA+F16C only, see
# scripts/llamacpp/build.sh),
# SMOLDESK_SIMD (unset: the CPU's best kernels; avx2 or portable force a lower level).
# Prints a table, then one line `JSON: {...}` with every number.
#
# On a CPU with AVX-512, the two tables issue 8 asks for:
#   scripts/bench-vs-llamacpp.sh                                      # native against native
#   VARIANT=native-noamx scripts/bench-vs-llamacpp.sh                 # the same where AMX exists
#                                                                     # (llama.cpp's AMX path crashed)
#   VARIANT=avx2 SMOLDESK_SIMD=avx2 scripts/bench-vs-llamacpp.sh      # AVX2 against AVX2
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/smoldesk-target}"
MODEL="${1:-/var/tmp/synth-smollm3-3b.gguf}"
PROMPT="${PROMPT_TOKENS:-512}"
GEN="${GEN_TOKENS:-64}"
DEPTH="${DEPTH:-2048}"
DEPTH_GEN="${DEPTH_GEN_TOKENS:-32}"
THREADS="${THREADS:-2}"
REPS="${REPS:-3}"
BANDWIDTH_MB="${BANDWIDTH_MB:-1024}"

log() { echo "bench-vs-llamacpp: $*" >&2; }

cargo build --release --locked --bin smoldesk >&2
BIN="$CARGO_TARGET_DIR/release/smoldesk"
[ -f "$MODEL" ] || "$BIN" synth --out "$MODEL" --preset smollm3-3b >&2
LLAMA_BIN=$(scripts/llamacpp/build.sh llama-bench | tail -n 1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
warm_file() { cat "$MODEL" >/dev/null; }

# The read bandwidth bounds decode speed. A shared machine's drifts by 10-20% within minutes, so it
# is measured right before each engine's decode runs, and each engine is set against its own.
bandwidth() {
  log "read bandwidth ($THREADS threads, $BANDWIDTH_MB MiB)"
  "$BIN" bench --bandwidth --bandwidth-mb "$BANDWIDTH_MB" --threads "$THREADS" --json >"$1"
}

log "smoldesk: prompt $PROMPT, generate $GEN, generate $DEPTH_GEN after $DEPTH"
warm_file
"$BIN" bench -m "$MODEL" --prompt-tokens "$PROMPT" --gen-tokens "$GEN" --depth "$DEPTH" \
  --depth-gen-tokens "$DEPTH_GEN" --threads "$THREADS" --json >"$tmp/smoldesk.json"
# llama-bench's tg runs on an empty context; so does this one (the run above decodes after the
# prompt, kept in the JSON as decode_after_prompt_tok_s).
bandwidth "$tmp/bandwidth.json"
log "smoldesk: generate $GEN on an empty context"
# With a read pass of the same threads after every token: the bandwidth of the same moments.
"$BIN" bench -m "$MODEL" --prompt-tokens 1 --gen-tokens "$GEN" --threads "$THREADS" --json \
  --paired-bandwidth --bandwidth-mb "$BANDWIDTH_MB" >"$tmp/smoldesk-empty.json"

# llama-bench: empty-context runs first (their peak RSS is the one reported), then the depth runs.
warm_file
bandwidth "$tmp/bandwidth-llama.json"
log "llama.cpp: prompt $PROMPT, generate $GEN (flash attention off and on)"
/usr/bin/time -f %M -o "$tmp/llama-rss-kb" "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" \
  -p "$PROMPT" -n "$GEN" -fa 0,1 -r "$REPS" -o jsonl >"$tmp/llama.jsonl" 2>"$tmp/llama.err" ||
  { cat "$tmp/llama.err" >&2; exit 1; }
if [ "$DEPTH" -gt 0 ]; then
  log "llama.cpp: generate $DEPTH_GEN after $DEPTH (flash attention off and on)"
  "$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p 0 -n "$DEPTH_GEN" -d "$DEPTH" -fa 0,1 \
    -r "$REPS" -o jsonl >>"$tmp/llama.jsonl" 2>"$tmp/llama.err" || { cat "$tmp/llama.err" >&2; exit 1; }
fi
# llama-bench does not time loading; llama-cpp-python on the same libllama does (mmap, as default).
scripts/llamacpp/install.sh llama >&2
warm_file
python3 scripts/llamacpp/bench.py "$MODEL" --prompt-tokens 1 --gen-tokens 1 --threads "$THREADS" \
  >"$tmp/llama-load.json"

python3 - "$tmp" "$MODEL" "$LLAMA_BIN" "$THREADS" "$PROMPT" "$GEN" "$DEPTH" "$DEPTH_GEN" <<'PY'
import json, os, re, subprocess, sys

tmp, model, llama_bin = sys.argv[1:4]
threads, prompt, gen, depth, depth_gen = map(int, sys.argv[4:])
bandwidth = json.load(open(f"{tmp}/bandwidth.json"))
bandwidth_llama = json.load(open(f"{tmp}/bandwidth-llama.json"))
smol = json.load(open(f"{tmp}/smoldesk.json"))
smol["decode_after_prompt_tok_s"] = smol["decode_tok_s"]
empty = json.load(open(f"{tmp}/smoldesk-empty.json"))
smol["decode_tok_s"] = empty["decode_tok_s"]
smol["paired_read_gb_s"] = empty["paired_read_gb_s"]
runs = [json.loads(line) for line in open(f"{tmp}/llama.jsonl") if line.strip()]
llama_load = json.load(open(f"{tmp}/llama-load.json"))
llama_rss_mb = int(open(f"{tmp}/llama-rss-kb").read().split()[-1]) / 1024


def llama_rate(n_prompt, n_gen, n_depth):
    """{fa: tokens/s} of the llama-bench runs of this shape."""
    return {("on" if r["flash_attn"] in (1, True) else "off"): r["avg_ts"] for r in runs
            if r["n_prompt"] == n_prompt and r["n_gen"] == n_gen and r["n_depth"] == n_depth}


def best(rates):
    if not rates:
        return None, None
    fa = max(rates, key=rates.get)
    return rates[fa], fa


lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
cpu = re.search(r"^Model name:\s*(.*)$", lscpu, re.M).group(1).strip()
flags = re.search(r"^Flags:\s*(.*)$", lscpu, re.M).group(1).split()
simd = [f for f in flags if f in ("avx2", "fma") or f.startswith("avx512")]
file_bytes = os.path.getsize(model)
ceiling = bandwidth["read_gb_s"] * 1e9 / file_bytes
ceiling_llama = bandwidth_llama["read_gb_s"] * 1e9 / file_bytes

pp, pp_fa = best(llama_rate(prompt, 0, 0))
tg, tg_fa = best(llama_rate(0, gen, 0))
deep_rates = llama_rate(0, depth_gen, depth)
deep, deep_fa = best(deep_rates)
rows = [
    ("prefill", f"prompt {prompt} tok/s", smol["prefill_tok_s"], pp, f"fa {pp_fa}"),
    ("decode", f"generate {gen} tok/s (empty context)", smol["decode_tok_s"], tg, f"fa {tg_fa}"),
    ("depth_decode", f"generate {depth_gen} after {depth} tok/s", smol["depth_decode_tok_s"], deep,
     ", ".join(f"fa {k} {v:.2f}" for k, v in sorted(deep_rates.items()))),
    ("load", "warm load s", smol["load_s"], llama_load["load_s"], "llama-cpp-python, mmap"),
    ("peak_rss", f"peak RSS MB ({prompt}+{gen})", smol["peak_rss_mb"], llama_rss_mb, "llama-bench fa off+on"),
]
ratios = {key: (ours / theirs if ours and theirs else None) for key, _, ours, theirs, _ in rows}


def cell(value, fmt):
    return format(value, fmt) if value is not None else "-".rjust(int(fmt.split(".")[0]))

print(f"CPU: {cpu} | SIMD: {' '.join(simd) or 'none of avx2/avx512'} | threads {threads}")
print(f"smoldesk kernels: {smol['simd']} | llama.cpp build: {os.environ.get('VARIANT', 'native')} "
      f"({llama_bin})")
print(f"model: {model} ({file_bytes / 1e9:.3f} GB) | read bandwidth ({bandwidth['threads']} threads) "
      f"before each engine's decode: {bandwidth['read_gb_s']:.1f} and {bandwidth_llama['read_gb_s']:.1f} GB/s "
      f"-> decode ceilings {ceiling:.2f} and {ceiling_llama:.2f} tok/s")
print(f"{'':34} {'smoldesk':>10} {'llama.cpp':>10} {'ratio':>7}  note")
for key, name, ours, theirs, note in rows:
    print(f"{name:34} {cell(ours, '10.2f')} {cell(theirs, '10.2f')} {cell(ratios[key], '6.2f')}x  {note}")
print(f"{'decode / its ceiling':34} {smol['decode_tok_s'] / ceiling:10.0%} {tg / ceiling_llama:10.0%}")
paired_share = smol["decode_tok_s"] * file_bytes / 1e9 / smol["paired_read_gb_s"]
print(f"{'decode / paired bandwidth':34} {paired_share:10.0%} {'-':>10}  "
      f"mean of passes between tokens: {smol['paired_read_gb_s']:.1f} GB/s")
summary = {
    "cpu": cpu, "simd": simd, "llama_variant": os.environ.get("VARIANT", "native"),
    "threads": threads, "model": model, "file_bytes": file_bytes,
    "read_gb_s": bandwidth["read_gb_s"], "decode_ceiling_tok_s": round(ceiling, 3),
    "read_gb_s_llama": bandwidth_llama["read_gb_s"],
    "decode_ceiling_tok_s_llama": round(ceiling_llama, 3),
    "prompt_tokens": prompt, "gen_tokens": gen, "depth": depth, "depth_gen_tokens": depth_gen,
    "smoldesk": smol,
    "llama_cpp": {"prefill_tok_s": pp, "prefill_fa": pp_fa, "decode_tok_s": tg, "decode_fa": tg_fa,
                  "depth_decode_tok_s": deep, "depth_decode_fa": deep_fa,
                  "depth_decode_by_fa": deep_rates, "load_s": llama_load["load_s"],
                  "peak_rss_mb": round(llama_rss_mb, 1)},
    "ratios": ratios,
}
print("JSON: " + json.dumps(summary))
PY
