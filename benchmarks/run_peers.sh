#!/usr/bin/env bash
# Run the peer methods (no aadetect) on MNIST and Fashion-MNIST, one data set after
# the other, niced; results and logs under benchmarks/runs/. Meant for nohup:
#   nohup benchmarks/run_peers.sh > benchmarks/runs/peers-run.log 2>&1 &
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py="${PYTHON:-.venv/bin/python}"
mkdir -p benchmarks/runs
for ds in ${DATASETS:-mnist fashion}; do
    echo "=== $ds start $(date -u +%FT%TZ)"
    nice -n 10 "$py" benchmarks/oneclass.py --dataset "$ds" --methods pca-kde,pyod-ae,pyod-deepsvdd \
        --out "benchmarks/runs/peers-$ds-oneclass.json" \
        > "benchmarks/runs/peers-$ds-oneclass.stdout.md" 2> "benchmarks/runs/peers-$ds-oneclass.log"
    echo "=== $ds exit $? $(date -u +%FT%TZ)"
done
