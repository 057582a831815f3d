#!/usr/bin/env bash
# Gate a CI job on aadetect: fail the build when any new image looks anomalous.
#
#   examples/ci_gate.sh MODEL_DIR IMAGE_FOLDER
#
# aadetect score exits 0 when every image is normal, 1 when at least one is
# anomalous, 2 when an input could not be read (the rest are still scored),
# 3 on a bug in aadetect, 141 when its output was cut off.
set -uo pipefail
model=${1:?model folder}
images=${2:?folder of images to check}
report=$(mktemp)

find "$images" -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' \) -print0 \
  | aadetect score --model "$model" --null - --format jsonl --quiet > "$report"
status=$?

# stdout is pure JSON lines: summarise with jq (or python -m json.tool, or anything)
if command -v jq >/dev/null; then
  jq -r 'select(.anomaly == true) | "ANOMALY \(.reason) score=\(.score) \(.path)"' "$report"
  jq -r 'select(.error != null) | "UNREADABLE \(.path): \(.error)"' "$report"
fi

case $status in
  0) echo "all $(wc -l < "$report") images look normal" ;;
  1) echo "anomalies found: failing the build" >&2 ;;
  2) echo "some inputs could not be read: failing the build" >&2 ;;
  *) echo "aadetect failed (exit $status): failing the build" >&2 ;;
esac
exit $status
