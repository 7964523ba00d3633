#!/usr/bin/env bash
# Screenshots of SmolDesk as a person sees it, written to /tmp/smoldesk-shots (or $1).
#
# 1. The real app (debug build) under a virtual X server, driven with xdotool: the welcome
#    screen, a loaded model, a reply from SmolLM2-135M, the settings and the shortcuts.
# 2. States no small model produces on demand (a thinking reply streaming, shown and hidden,
#    in dark and light), rendered from the same App by tests/ui_screenshots.rs with wgpu.
#
# Needs: xvfb, xdotool, imagemagick, mesa-vulkan-drivers (apt-get install -y ...).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/smoldesk-shots}
mkdir -p "$out"

if [ "${SMOLDESK_SHOT_INSIDE:-}" != 1 ]; then
    cargo build --bin smoldesk
    SMOLDESK_SHOT_INSIDE=1 xvfb-run -a -s "-screen 0 1280x800x24" "$0" "$out"
    # Rendered without a window (wgpu on lavapipe), so outside the X server and the fake home.
    SMOLDESK_SHOT_DIR="$out" cargo test --test ui_screenshots -- --ignored --nocapture \
        >"$out/kittest.log" 2>&1 || echo "the rendered screenshots failed; see $out/kittest.log"
    grep -E "^wrote" "$out/kittest.log" || true
    ls -l "$out"
    exit 0
fi

target=${CARGO_TARGET_DIR:-target}
bin="$target/debug/smoldesk"
model=${SMOLDESK_SMOLLM2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
[ -f "$model" ] || model=/work/main/models/SmolLM2-135M-Instruct.Q4_1.gguf
model=$(realpath "$model")

# A fresh home: no preferences, no conversations from earlier runs.
home=$(mktemp -d)
trap 'kill "${app_pid:-0}" 2>/dev/null || true; rm -rf "$home"' EXIT
export HOME="$home" XDG_DATA_HOME="$home/.local/share" XDG_CONFIG_HOME="$home/.config"
export SMOLDESK_DATA_DIR="$home/data" RUST_LOG=${RUST_LOG:-warn}

start_app() {
    "$bin" "$@" >>"$out/app.log" 2>&1 &
    app_pid=$!
    for _ in $(seq 1 120); do
        win=$(xdotool search --class smoldesk 2>/dev/null | head -n 1 || true)
        [ -n "$win" ] && break
        sleep 0.5
    done
    [ -n "$win" ] || { echo "the window did not appear; see $out/app.log"; exit 1; }
    # No window manager runs under Xvfb: give the window the keyboard by hand.
    xdotool windowfocus --sync "$win" 2>/dev/null || true
}

stop_app() {
    kill "$app_pid" 2>/dev/null || true
    wait "$app_pid" 2>/dev/null || true
}

shot() {
    sleep "${2:-1.5}"
    import -window "$win" "$out/$1"
    echo "wrote $out/$1"
}

: >"$out/app.log"
start_app
shot 01-welcome.png 3
stop_app

start_app "$model"
shot 02-model-loaded.png 8
xdotool mousemove --window "$win" 600 680 click 1
xdotool type --delay 20 "Write a short poem about the sea, then explain it in a list."
shot 03-draft-with-context-meter.png 1.5
xdotool key Return
shot 04-reply-streaming.png 3
shot 05-reply-done.png 40
xdotool key ctrl+comma
shot 06-settings.png 2
xdotool key ctrl+comma F1
shot 07-shortcuts.png 2
xdotool key F1
xdotool mousemove --window "$win" 250 18 click 1
shot 08-model-window.png 2
stop_app
