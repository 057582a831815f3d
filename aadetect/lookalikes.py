"""Training images that look like the labelled anomalies, found when calibrating.

A folder of good images may hide a few of the very kind the user labels anomalous (Beggel et al.'s
contamination), and a good class often has a fringe that overlaps it (long-sleeved tops among
T-shirts, when pullovers are the anomaly). In 32 dimensions the KDE ranks almost like the nearest
training code, so each such code gives every anomaly that lands near it a good density. Robust
training cannot see them when the model finds them ordinary; the labelled anomalies point at them.
`calibrate` leaves their codes out of the density (the trained files stay as they are; the card
lists the codes left out).

The rule is a Bayes decision between two kernel mixtures of equal weight, with the density's own
kernel: the anomalous samples' kernels (and those of the codes already claimed) against the other
training codes' kernels. A training code is claimed when the first gives it more density. This is
repeated until nothing changes, so a cluster of hidden anomalies is taken up layer by layer from
the labelled ones. A round that would claim one of the labelled good samples, or more than
MAX_CLAIMED of the codes, is not taken: the anomalies then reach into the good images themselves.
Benchmarks: benchmarks/RESULTS.md, session 16.
"""

from __future__ import annotations

import math

import numpy as np

MAX_CLAIMED = 0.1  # of the training codes
MAX_ROUNDS = 50
QUERY_BLOCK = 1024


def find_lookalikes(density, anomalous_codes, good_codes, *, on_codes=None) -> np.ndarray:
    """Indices (sorted) of the density's codes that the anomalous samples claim.

    `anomalous_codes` and `good_codes` are the labelled samples' encoder codes, computed as the
    density's training codes were, before the density's code radius (applied here, as to any query).
    `on_codes(count)` is told as the kernel sums over all pairs of training codes, the slow part,
    progress.
    """
    import torch

    from aadetect.density import map_radius

    covariance = torch.from_numpy(np.array(density.covariance))
    cholesky = torch.linalg.cholesky(covariance)

    def whitened(codes, radius: str | None) -> torch.Tensor:
        codes = torch.from_numpy(np.array(codes, dtype=np.float64))  # a copy: the density's codes are read-only
        codes = map_radius(codes, radius) if radius else codes
        return torch.linalg.solve_triangular(cholesky, codes.T, upper=False).T

    codes = whitened(density.codes, None)  # already mapped
    anomalous, good = whitened(anomalous_codes, density.radius), whitened(good_codes, density.radius)
    n = len(codes)
    if len(anomalous) == 0 or n < 3:
        return np.zeros(0, dtype=np.int64)
    log_kernel_peak = -0.5 * float(torch.logdet(2 * math.pi * covariance))

    def log_kernel_sums(queries: torch.Tensor, centres: torch.Tensor, *, skip_self: bool = False,
                        on_block=None) -> torch.Tensor:
        """log of the sum, over the centres, of the kernel at each query (-inf for no centres)."""
        if len(centres) == 0:
            return torch.full((len(queries),), -math.inf, dtype=torch.float64)
        sums = []
        for start in range(0, len(queries), QUERY_BLOCK):
            distances = torch.cdist(queries[start:start + QUERY_BLOCK], centres,
                                    compute_mode="donot_use_mm_for_euclid_dist")
            exponent = -0.5 * distances.square()
            if skip_self:  # a claimed code is no evidence for itself
                exponent[distances == 0] = -math.inf
            sums.append(torch.logsumexp(exponent, dim=1))
            if on_block is not None:
                on_block(len(exponent))
        return torch.cat(sums) + log_kernel_peak

    def claimed_by(claimed: torch.Tensor, queries: torch.Tensor, all_codes_sum: torch.Tensor,
                   anomalous_sum: torch.Tensor, queries_are_codes: bool) -> torch.Tensor:
        """Whether the anomalous mixture (samples + claimed codes) beats the mixture of the other codes."""
        claimed_sum = log_kernel_sums(queries, codes[claimed], skip_self=queries_are_codes)
        is_claimed = torch.zeros(len(queries), dtype=torch.float64)
        own = torch.full((len(queries),), -math.inf, dtype=torch.float64)
        if queries_are_codes:
            is_claimed[claimed] = 1.0
            own.fill_(log_kernel_peak)
        # the other codes: every code's kernel, less the query's own and the claimed ones'
        rest = 1 - torch.exp(own - all_codes_sum) - torch.exp(claimed_sum - all_codes_sum)
        good_side = all_codes_sum + rest.clamp_min(1e-12).log()
        good_count = n - len(claimed) - (1 - is_claimed) * queries_are_codes
        anomalous_count = len(anomalous) + len(claimed) - is_claimed
        anomalous_side = torch.logaddexp(anomalous_sum, claimed_sum)
        return anomalous_side - anomalous_count.log() > good_side - good_count.clamp_min(1).log()

    codes_sums = (codes, log_kernel_sums(codes, codes, on_block=on_codes), log_kernel_sums(codes, anomalous), True)
    good_sums = (good, log_kernel_sums(good, codes), log_kernel_sums(good, anomalous), False)
    most = min(MAX_CLAIMED * n, n - codes.shape[1] - 1)  # the density needs more codes than dimensions
    claimed = torch.zeros(0, dtype=torch.long)
    if claimed_by(claimed, *good_sums).any():
        return claimed.numpy()
    for _ in range(MAX_ROUNDS):
        proposed = claimed_by(claimed, *codes_sums).nonzero().flatten()
        if torch.equal(proposed, claimed) or len(proposed) > most or claimed_by(proposed, *good_sums).any():
            break
        claimed = proposed
    return claimed.numpy()
