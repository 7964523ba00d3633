#!/usr/bin/env bash
# Draws the SmolDesk icon (a speech bubble with "thinking" dots on a blue-teal tile) with
# ImageMagick and writes the PNG sizes the app and the desktop entry use into assets/icons/.
set -euo pipefail
cd "$(dirname "$0")/.."
out=assets/icons
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
S=1024
convert -size 1500x1500 gradient:'#1fb6a6'-'#3b4fd8' -rotate 315 +repage -gravity center -extent ${S}x${S} "$tmp/grad.png"
convert -size ${S}x${S} xc:none -fill white -draw "roundrectangle 48,48 975,975 210,210" "$tmp/mask.png"
convert "$tmp/grad.png" "$tmp/mask.png" -alpha off -compose CopyOpacity -composite "$tmp/tile.png"
convert -size ${S}x${S} xc:none \
  -fill 'rgba(0,0,0,0.18)' -draw "roundrectangle 222,272 822,702 150,150" -draw "polygon 330,680 300,840 470,690" \
  -blur 0x14 "$tmp/shadow.png"
convert -size ${S}x${S} xc:none \
  -fill white -draw "roundrectangle 202,242 802,672 150,150" -draw "polygon 310,650 280,810 450,660" \
  -fill '#2f7fd0' -draw "circle 352,457 352,512" -draw "circle 502,457 502,512" -draw "circle 652,457 652,512" \
  "$tmp/bubble.png"
convert "$tmp/tile.png" "$tmp/shadow.png" -composite "$tmp/bubble.png" -composite "$tmp/icon.png"
for size in 256 128 64 48 32; do
  convert "$tmp/icon.png" -filter Lanczos -resize ${size}x${size} -strip "PNG32:$out/smoldesk-$size.png"
done
ls -l "$out"
