#!/usr/bin/env bash
# Screenshots of the real release app under Xvfb, driven with xdotool, as evidence for issues 9
# and 10. Writes to $1 (default /tmp/smoldesk-evidence) and prints the PNGs' paths:
#   a-poem-line-breaks.png      SmolLM2 writes a poem; its line breaks show as line breaks.
#   b-thinking-budget.png       scripted-thinker with the chat's thinking budget at 256: the
#                               thought says "… (budget reached)" and an answer follows.
#   c-overflow-notice.png       a 2,048-token chat that overflowed: the block-drop notice (and
#                               c-overflow-bottom.png: its end, with the context meter).
#   d-interrupted-reply.png     a reply killed (SIGKILL) while streaming, after a restart on the
#                               same data folder: marked interrupted, with Continue and Regenerate.
# Each scenario runs in a fresh home (preferences, conversations and caches in a temp folder).
#
# Needs: Xvfb, xdotool, imagemagick (import), mesa; the models below.
# Environment: SHOT_DISPLAY (default :77), SHOT_THREADS (compute threads, default 1: on a busy
# 2-core machine one thread is much faster than two that wait for each other), SMOLDESK_SMOLLM2,
# SMOLDESK_FIXTURES, SHOT_ONLY (e.g. "a d": run only those scenarios).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-/tmp/smoldesk-evidence}")
mkdir -p "$out"

smollm2=${SMOLDESK_SMOLLM2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$smollm2" ] || smollm2=/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf
fixtures=${SMOLDESK_FIXTURES:-../shared/fixtures}
[ -d "$fixtures" ] || fixtures=/work/shared/fixtures
thinker=$fixtures/scripted-thinker.gguf
smollm2=$(realpath "$smollm2")
thinker=$(realpath "$thinker")
threads=${SHOT_THREADS:-1}
only=${SHOT_ONLY:-a b c d}

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/smoldesk-target}
nice -n 10 cargo build --release --locked --bin smoldesk >&2
work=$(mktemp -d /tmp/smoldesk-evidence.XXXX)
# A private copy: the shared target folder may be rebuilt from another branch meanwhile.
bin=$work/smoldesk
cp "$CARGO_TARGET_DIR/release/smoldesk" "$bin"

export DISPLAY=${SHOT_DISPLAY:-:77}
xvfb_pid=
if ! xdotool getmouselocation >/dev/null 2>&1; then
    Xvfb "$DISPLAY" -screen 0 1280x800x24 >"$work/xvfb.log" 2>&1 &
    xvfb_pid=$!
    for _ in $(seq 50); do xdotool getmouselocation >/dev/null 2>&1 && break; sleep 0.2; done
fi
app_pid=
cleanup() {
    [ -n "$app_pid" ] && kill "$app_pid" 2>/dev/null
    [ -n "$xvfb_pid" ] && kill "$xvfb_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

log() { echo "[evidence] $*" >&2; }

# A fresh home with the given context length; dark theme, thinking shown.
fresh_home() {
    home=$(mktemp -d "$work/home.XXXX")
    export HOME=$home XDG_DATA_HOME=$home/.local/share XDG_CONFIG_HOME=$home/.config
    export XDG_CACHE_HOME=$home/.cache SMOLDESK_DATA_DIR=$home/data
    export SMOLDESK_CACHE_DIR=$home/cache RUST_LOG=warn
    mkdir -p "$XDG_DATA_HOME/smoldesk"
    # eframe's storage file, holding only SmolDesk's preferences.
    python3 - "$XDG_DATA_HOME/smoldesk/app.ron" "$1" "$threads" <<'PY'
import json, sys
path, context, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
prefs = {"show_thinking": True, "theme": "Dark", "font_size": 15.0, "sidebar_open": True,
         "load_options": {"context_length": context, "threads": threads}}
with open(path, "w") as f:
    f.write("{\n    %s: %s,\n}\n" % (json.dumps("smoldesk.preferences"), json.dumps(json.dumps(prefs))))
PY
}

# Starts the app on a model and waits until its window is shown and has the keyboard.
start_app() {
    "$bin" "$1" >>"$home/app.log" 2>&1 &
    app_pid=$!
    win=
    for _ in $(seq 120); do
        win=$(xdotool search --name '^SmolDesk$' 2>/dev/null | head -n 1 || true)
        [ -n "$win" ] && xdotool windowfocus --sync "$win" 2>/dev/null && break
        kill -0 "$app_pid" 2>/dev/null || { log "the app exited:"; cat "$home/app.log" >&2; exit 1; }
        sleep 0.5
    done
    [ -n "$win" ] || { log "no window; see $home/app.log"; exit 1; }
    sleep 3 # the model loads
}

stop_app() {
    kill "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
    app_pid=
}

click() { xdotool mousemove --window "$win" "$1" "$2" click 1; sleep "${3:-0.7}"; }
# Moves the mouse off the controls (no tooltip in the picture) and lets the frame settle.
settle() { xdotool mousemove --window "$win" 700 590; sleep 0.5; xdotool mousemove --window "$win" 690 580; sleep 1; }
shot() {
    settle
    import -window "$win" "$out/$1"
    echo "$out/$1"
}

# Layout of the 1120×760 window (egui 0.37, font size 15).
composer=(600 680)
settings_close=(1070 67)
budget_combo=(803 240)
budget_256=(805 304)
max_reply_field=(869 427)
first_chat_row=(110 165)
first_thought=(470 147)

type_message() { click "${composer[@]}" 0.3; xdotool type --delay 15 "$1"; xdotool key Return; }

# Sets this chat's "Max reply tokens" in the settings window.
set_max_reply_tokens() {
    xdotool key ctrl+comma
    sleep 1
    click "${max_reply_field[@]}" 0.3
    xdotool key ctrl+a
    xdotool type "$1"
    xdotool key Return
    sleep 0.3
    click "${settings_close[@]}"
}

# The newest conversation's last message: count role chars newlines stats|nostats
# interrupted|- dropped.
conv_state() {
    python3 - "$SMOLDESK_DATA_DIR/conversations" <<'PY'
import glob, json, os, sys
files = sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime)
try:
    d = json.load(open(files[-1]))
    m = d["messages"][-1]
except Exception:
    print("none")
    sys.exit()
s = m.get("stats") or {}
print(len(d["messages"]), m["role"], len(m["content"]) + len(m.get("thinking") or ""),
      m["content"].count("\n"), "stats" if m.get("stats") else "nostats",
      "interrupted" if m.get("interrupted") else "-", s.get("dropped_messages", 0))
PY
}

# Waits until the conversation has $1 messages and the last reply is finished.
wait_reply_done() {
    local state
    for _ in $(seq $(($2 * 2))); do
        read -r -a state <<<"$(conv_state)"
        [ "${state[0]}" = "$1" ] && [ "${state[4]:-}" = stats ] && return 0
        sleep 0.5
    done
    log "no finished reply after $2 s: $(conv_state)"
    return 1
}

scenario_a() {
    log "a: a poem from SmolLM2"
    fresh_home 8192
    start_app "$smollm2"
    set_max_reply_tokens 160
    type_message "Write a four-line poem about the sea."
    wait_reply_done 2 240
    log "a: $(conv_state)"
    shot a-poem-line-breaks.png
    stop_app
}

scenario_b() {
    log "b: the thinking budget (scripted thinker)"
    fresh_home 2048
    start_app "$thinker"
    xdotool key ctrl+comma
    sleep 1
    click "${budget_combo[@]}" 1
    click "${budget_256[@]}"
    click "${settings_close[@]}"
    type_message "Hello"
    wait_reply_done 2 240
    log "b: $(conv_state)"
    shot b-thinking-budget.png
    # The same reply with its thought opened.
    click "${first_thought[@]}" 1
    xdotool mousemove --window "$win" 700 300 click 4 click 4 click 4 click 4 click 4 click 4
    sleep 0.5
    xdotool click --repeat 40 --delay 20 4
    shot b-thinking-budget-open.png
    stop_app
}

scenario_c() {
    log "c: the overflow notice (SmolLM2, 2,048-token context, 150-token replies)"
    fresh_home 2048
    start_app "$smollm2"
    set_max_reply_tokens 150
    local paste=$work/paste.txt
    python3 - >"$paste" <<'PY'
import re
text = open("README.md", encoding="utf-8").read().encode("ascii", "ignore").decode()
text = re.sub(r"\s+", " ", re.sub(r"[`|#*\[\]()<>_]", " ", text)).strip()
print("Summarize this text in three sentences: " + text[:6500])
PY
    click "${composer[@]}" 0.3
    xdotool type --delay 0 --file "$paste"
    sleep 3
    xdotool key Return
    wait_reply_done 2 600
    local turn=2 dropped=0
    for question in "Thanks. Now list three key points." \
        "Which point matters most for a new user, and why?" \
        "Say that again in one sentence." "Give me one more example."; do
        type_message "$question"
        turn=$((turn + 2))
        wait_reply_done "$turn" 300
        dropped=$(conv_state | awk '{print $7}')
        [ "$dropped" -gt 0 ] && break
    done
    log "c: $(conv_state)"
    [ "$dropped" -gt 0 ] || log "c: the context never overflowed"
    shot c-overflow-bottom.png
    # The notice sits above the first message the model still sees: scroll up to it.
    xdotool mousemove --window "$win" 700 300 click --repeat 4 --delay 80 4
    sleep 1
    shot c-overflow-notice.png
    stop_app
}

scenario_d() {
    log "d: a reply killed while streaming, then the app started again"
    fresh_home 8192
    start_app "$smollm2"
    type_message "Explain how a transformer language model works, simply."
    # The reply is saved every 2 s while it streams: wait for text, then ~3 s more.
    local state
    for _ in $(seq 240); do
        read -r -a state <<<"$(conv_state)"
        [ "${state[1]:-}" = assistant ] && [ "${state[2]:-0}" -gt 0 ] && break
        sleep 0.5
    done
    sleep 2
    shot d-before-kill.png >/dev/null
    kill -9 "$app_pid"
    wait "$app_pid" 2>/dev/null || true
    app_pid=
    log "d: killed; saved: $(conv_state)"
    start_app "$smollm2"
    click "${first_chat_row[@]}" 1
    shot d-interrupted-reply.png
    stop_app
}

for scenario in $only; do
    "scenario_$scenario"
done
