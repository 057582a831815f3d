#!/usr/bin/env bash
# Fetch the ELPV solar-cell data set (real defects) from PyPI into a cache folder.
#
#   ELPV  PyPI wheel  elpv-dataset==1.0.0.post1  (elpv_dataset/data/images/cellNNNN.png, 300x300 8-bit gray,
#                                                 and elpv_dataset/data/labels.csv)
#
# labels.csv has no header; whitespace-separated columns: path (images/cellNNNN.png),
# defect probability (0, 1/3, 2/3 or 1, as rated by experts) and cell type (mono or poly).
# The data are CC BY-NC-SA 4.0 (Deitsch et al., 2019): benchmark use only, nothing is redistributed.
#
# Usage: benchmarks/fetch_elpv.sh [CACHE_DIR]
#   CACHE_DIR defaults to $AADETECT_BENCH_CACHE, else benchmarks/cache/ next to this script
#   (the same root as fetch_data.sh).
# Result: CACHE_DIR/elpv/{labels.csv, images/*.png, SOURCE}. Nothing is installed (pip download --no-deps).
# Idempotent: skipped when labels.csv and every image it names are already there.
# Set PYTHON to choose the interpreter whose pip downloads (default: python3).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-${AADETECT_BENCH_CACHE:-$here/cache}}"
python="${PYTHON:-python3}"
PKG="elpv-dataset==1.0.0.post1"
# PyPI files are immutable; a different hash means a different file than the benchmark was built on.
SHA256="85e31c1126ee9b48e62d3a0232c58f58b2d189b0814a45c13642fa0415af4a4c"

log() { printf 'fetch_elpv: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when DIR holds labels.csv and every image it lists.
have_elpv() {
    local dir="$1" path rest
    [[ -s "$dir/labels.csv" ]] || return 1
    while read -r path rest; do
        [[ -s "$dir/$path" ]] || return 1
    done < "$dir/labels.csv"
}

if have_elpv "$cache/elpv"; then
    log "ELPV already in $cache/elpv, skipping"
    exit 0
fi

mkdir -p "$cache"
tmp="$(mktemp -d "$cache/.elpv.XXXXXX")"  # on the cache's file system, so the final mv is a rename
trap 'rm -rf "$tmp"' EXIT

log "downloading $PKG from PyPI"
"$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$tmp/wheel" "$PKG" >&2 \
    || die "pip download $PKG failed"
wheel="$(ls "$tmp"/wheel/*.whl 2>/dev/null | head -n1)"
[[ -n "$wheel" ]] || die "pip download produced no wheel"
sha="$(sha256sum "$wheel" | cut -d' ' -f1)"
[[ "$sha" == "$SHA256" ]] || die "$(basename "$wheel"): sha256 $sha, expected $SHA256"

# A wheel is a zip file; Python's zipfile is always there, unzip may not be.
"$python" -m zipfile -e "$wheel" "$tmp/unpacked"
data="$tmp/unpacked/elpv_dataset/data"
mkdir -p "$tmp/elpv"
mv "$data/labels.csv" "$data/images" "$tmp/elpv/"
have_elpv "$tmp/elpv" || die "the wheel lacks images named in labels.csv"
printf 'pypi %s %s sha256:%s\n' "$PKG" "$(basename "$wheel")" "$sha" > "$tmp/elpv/SOURCE"
rm -rf "$cache/elpv"
mv "$tmp/elpv" "$cache/elpv"
log "ELPV ($(wc -l < "$cache/elpv/labels.csv") cells) -> $cache/elpv"
