"""Time scipy's gaussian_kde.logpdf against aadetect's KernelDensity.log_density.

    python benchmarks/kde_speed.py [--codes 20000] [--queries 10000] [--dim 16] [--repeats 3]

Both evaluate the same fitted estimator (Scott bandwidth) on the same queries; the
script prints both times, the speed ratio and the largest relative difference.
Other benchmark scripts import :func:`measure_kde_speed`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aadetect.density import KernelDensity  # noqa: E402


def _data(n_codes: int, n_queries: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Correlated Gaussian codes; queries from the same distribution, 5% of them far outliers."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim) + np.eye(dim)
    offset = rng.standard_normal(dim)
    codes = rng.standard_normal((n_codes, dim)) @ mixing + offset
    queries = rng.standard_normal((n_queries, dim)) @ mixing + offset
    n_far = n_queries // 20
    queries[:n_far] *= 25.0
    return codes, queries


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure_kde_speed(
    n_codes: int = 20000,
    n_queries: int = 10000,
    dim: int = 16,
    repeats: int = 3,
    *,
    scipy_repeats: int = 1,
    seed: int = 0,
    device: str = "cpu",
    chunk_size: int = 2048,
) -> dict:
    """Median time of ``repeats`` KernelDensity.log_density calls vs scipy's logpdf.

    Returns a dict with the problem size, ``scipy_s`` (best of ``scipy_repeats``),
    ``ours_s`` (median), ``ours_runs_s``, ``speedup`` (scipy_s / ours_s),
    ``max_rel_diff`` (max |ours - scipy| / |scipy|), ``fit_s``, ``torch_threads``, the
    process CPU seconds ``scipy_cpu_s`` / ``ours_cpu_s`` and ``load_avg_1min`` (wall-clock
    ratios on a shared machine depend on what else runs; see the load average).
    """
    import scipy.stats
    import torch

    if repeats < 1 or scipy_repeats < 1:
        raise ValueError("repeats and scipy_repeats must be >= 1")
    codes, queries = _data(n_codes, n_queries, dim, seed)

    start = time.perf_counter()
    density = KernelDensity.fit(codes)
    fit_s = time.perf_counter() - start
    # warm-up: builds the per-device cache of whitened codes and loads the torch kernels
    density.log_density(queries[: min(len(queries), 256)], device=device, chunk_size=chunk_size)

    runs, cpu_runs = [], []
    ours = None
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        ours = density.log_density(queries, device=device, chunk_size=chunk_size)
        runs.append(time.perf_counter() - start)
        cpu_runs.append(time.process_time() - cpu_start)
    ours_s = statistics.median(runs)

    kde = scipy.stats.gaussian_kde(codes.T)
    scipy_runs, scipy_cpu_runs = [], []
    reference = None
    for _ in range(scipy_repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        reference = kde.logpdf(queries.T)
        scipy_runs.append(time.perf_counter() - start)
        scipy_cpu_runs.append(time.process_time() - cpu_start)
    scipy_s = min(scipy_runs)

    rel = np.abs(ours - reference) / np.maximum(np.abs(reference), np.finfo(np.float64).tiny)
    return {
        "n_codes": n_codes,
        "n_queries": n_queries,
        "dim": dim,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "fit_s": fit_s,
        "scipy_s": scipy_s,
        "scipy_runs_s": scipy_runs,
        "ours_s": ours_s,
        "ours_runs_s": runs,
        "speedup": scipy_s / ours_s,
        # CPU seconds of this process (all threads): less sensitive to other load on the machine
        "scipy_cpu_s": min(scipy_cpu_runs),
        "ours_cpu_s": statistics.median(cpu_runs),
        "load_avg_1min": _load_average(),
        "max_rel_diff": float(rel.max()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--codes", type=int, default=20000)
    parser.add_argument("--queries", type=int, default=10000)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scipy-repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = parser.parse_args(argv)

    result = measure_kde_speed(
        args.codes,
        args.queries,
        args.dim,
        args.repeats,
        scipy_repeats=args.scipy_repeats,
        device=args.device,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(
        f"{result['n_codes']} codes x {result['n_queries']} queries, d={result['dim']}, "
        f"device={result['device']}, torch threads={result['torch_threads']}"
    )
    print(f"scipy gaussian_kde.logpdf : {result['scipy_s']:.3f} s")
    runs = ", ".join(f"{t:.3f}" for t in result["ours_runs_s"])
    print(f"KernelDensity.log_density : {result['ours_s']:.3f} s (median of {runs})")
    print(f"speed ratio               : {result['speedup']:.1f}x")
    print(
        f"CPU seconds               : scipy {result['scipy_cpu_s']:.3f}, ours {result['ours_cpu_s']:.3f} "
        f"(ratio {result['scipy_cpu_s'] / result['ours_cpu_s']:.1f}x)"
    )
    if result["load_avg_1min"] is not None:
        print(f"load average (1 min)      : {result['load_avg_1min']:.2f} on {os.cpu_count()} CPUs")
    print(f"max relative difference   : {result['max_rel_diff']:.3e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
