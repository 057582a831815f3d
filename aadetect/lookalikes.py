"""Training images that look like the labelled anomalies, found when calibrating.

A folder of good images may hide a few of the very kind the user labels anomalous (Beggel et al.'s
contamination), and a good class often has a fringe that overlaps it (long-sleeved tops among
T-shirts, when pullovers are the anomaly). In 32 dimensions the KDE ranks almost like the nearest
training code, so each such code gives every anomaly that lands near it a good density. Robust
training cannot see them when the model finds them ordinary; the labelled anomalies point at them.
`calibrate` leaves their codes out of the density (the trained files stay as they are; the card
lists the codes left out).

The same kernels then tell calibrated models more of that kind: the anomalous samples and the
lookalikes make a kernel mixture (`anomaly_mixture`), and each image's log-odds of belonging to it
rather than to the density (equal priors) is tested beside its density. A hidden anomaly or a fringe
image is always near some good code, so its density alone says little; the odds compare it with both.

The rule is a Bayes decision between two kernel mixtures of equal weight, with the density's own
kernel: the anomalous samples' kernels (and those of the codes already claimed) against the other
training codes' kernels. A training code is claimed when the first gives it more density. This is
repeated, the claims only growing, until nothing changes, so a cluster of hidden anomalies is taken
up layer by layer from the labelled ones. A round that would claim one of the labelled good samples,
or more than MAX_CLAIMED of the codes, is not taken: the anomalies then reach into the good images
themselves.

What calibration learns from the samples is one immutable value, `AnomalyKind`, built by
`learn_anomaly_kind` (or read back from the model folder by `AnomalyKind.of`) and handed to the
`Detector` whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from aadetect.density import KernelDensity, map_radius

MAX_CLAIMED = 0.1  # of the training codes
MAX_ROUNDS = 50
BLOCK_ELEMENTS = 2**22  # query x centre kernel values per block (32 MiB of float64)


def find_lookalikes(density, anomalous_codes, good_codes, *, on_codes=None) -> np.ndarray:
    """Indices (sorted) of the density's codes that the anomalous samples claim.

    `anomalous_codes` and `good_codes` are the labelled samples' encoder codes for the unmoved images,
    computed as the density's training codes were (which are unmoved too), before the density's code
    radius (applied here, as to any query). `on_codes(count)` is told as the kernel sums over all pairs
    of training codes, the slow part, progress.
    """


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
    index = torch.arange(n)

    def log_kernel_sums(queries: torch.Tensor, centres: torch.Tensor, query_ids=None, centre_ids=None,
                        on_block=None) -> torch.Tensor:
        """log of the sum, over the centres, of the kernel at each query (-inf for none); a code is no
        evidence about itself, so with ids the pairs of a code with itself are left out."""
        if len(centres) == 0:
            return torch.full((len(queries),), -math.inf, dtype=torch.float64)
        rows, sums = max(1, BLOCK_ELEMENTS // len(centres)), []
        for start in range(0, len(queries), rows):
            exponent = torch.cdist(queries[start:start + rows], centres,
                                   compute_mode="donot_use_mm_for_euclid_dist").square_().mul_(-0.5)
            if query_ids is not None:
                exponent.masked_fill_(query_ids[start:start + rows, None] == centre_ids[None, :], -math.inf)
            sums.append(torch.logsumexp(exponent, dim=1))
            if on_block is not None:
                on_block(len(exponent))
        return torch.cat(sums) + log_kernel_peak

    def claimed_by(claimed: torch.Tensor, queries: torch.Tensor, query_ids, others_sum: torch.Tensor,
                   anomalous_sum: torch.Tensor) -> torch.Tensor:
        """Whether the anomalous mixture (samples + claimed codes) beats the mixture of the unclaimed codes.

        `others_sum`: every code's kernel but the query's own; the unclaimed ones' is that less the
        claimed ones', summed directly where the difference would lose its digits.
        """
        claimed_ids = claimed.nonzero().flatten()
        claimed_sum = log_kernel_sums(queries, codes[claimed_ids], query_ids, claimed_ids)
        share = (claimed_sum - others_sum).clamp(max=0.0)
        good_sum = others_sum + torch.log1p(-share.exp())
        unsure = share > math.log(0.5)
        if unsure.any():
            unclaimed_ids = (~claimed).nonzero().flatten()
            good_sum[unsure] = log_kernel_sums(queries[unsure], codes[unclaimed_ids],
                                               None if query_ids is None else query_ids[unsure], unclaimed_ids)
        own_claimed = claimed[query_ids].double() if query_ids is not None else torch.zeros(len(queries))
        own_unclaimed = (1 - own_claimed) if query_ids is not None else torch.zeros(len(queries))
        anomalous_count = len(anomalous) + len(claimed_ids) - own_claimed
        good_count = (n - len(claimed_ids) - own_unclaimed).clamp_min(1)
        return torch.logaddexp(anomalous_sum, claimed_sum) - anomalous_count.log() > good_sum - good_count.log()

    on_codes_args = (codes, index, log_kernel_sums(codes, codes, index, index, on_block=on_codes),
                     log_kernel_sums(codes, anomalous))
    on_good_args = (good, None, log_kernel_sums(good, codes), log_kernel_sums(good, anomalous))
    most = MAX_CLAIMED * n
    claimed = torch.zeros(n, dtype=torch.bool)
    if claimed_by(claimed, *on_good_args).any():
        return np.zeros(0, dtype=np.int64)
    for _ in range(MAX_ROUNDS):  # claims only grow, so this ends
        proposed = claimed | claimed_by(claimed, *on_codes_args)
        if torch.equal(proposed, claimed) or proposed.sum() > most or claimed_by(proposed, *on_good_args).any():
            break
        try:  # the codes left must still make a density: more of them than dimensions, none constant
            density.without(proposed.nonzero().flatten().numpy())
        except ValueError:
            break
        claimed = proposed
    return claimed.nonzero().flatten().numpy()


@dataclass(frozen=True)
class AnomalyKind:
    """The labelled anomalies' kind: the training codes it claims (`lookalikes`, left out of the good
    density), the samples' kernel centres (None with fewer than two samples: one left out of its own
    mixture leaves none), the good density without the lookalikes, and the kind's kernel mixture."""

    lookalikes: tuple[int, ...]
    centres: np.ndarray | None
    good: KernelDensity
    mixture: KernelDensity | None

    @classmethod
    def of(cls, trained, lookalikes, centres) -> AnomalyKind:
        """From the density as trained; ValueError when the codes left would not make a density."""
        lookalikes = tuple(int(i) for i in lookalikes)
        good = trained.without(lookalikes) if lookalikes else trained
        mixture = None
        if centres is not None:  # the samples' centres first (so sample i is centre i), then the lookalikes
            mixture = trained.over(np.concatenate([centres, trained.codes[np.asarray(lookalikes, dtype=np.int64)]]))
        return cls(lookalikes, centres, good, mixture)



def learn_anomaly_kind(trained, anomalous_codes, good_codes, *, on_codes=None) -> AnomalyKind:
    """What the labelled samples say about their kind; `anomalous_codes` and `good_codes` are the samples'
    codes for the unmoved images, as the density's training codes were computed."""


    lookalikes = find_lookalikes(trained, anomalous_codes, good_codes, on_codes=on_codes)
    centres = None
    if len(anomalous_codes) >= 2:
        centres = map_radius(torch.from_numpy(np.array(anomalous_codes, dtype=np.float64)), trained.radius).numpy()
    return AnomalyKind.of(trained, lookalikes, centres)


def left_out_log_odds(detector, view_codes) -> np.ndarray:
    """Each labelled anomalous sample's log-odds with its own kernel left out of the detector's mixture, as
    a new image of its kind would meet it (with its own kernel, every sample looks certain, and the
    thresholds would be set for anomalies more obvious than the next ones). `view_codes`: (views, n, d)
    of the n samples, in the order of the kind's centres."""
    return np.concatenate([detector.log_densities(view_codes[:, i:i + 1], detector.mixture.without([i]))[1]
                           for i in range(view_codes.shape[1])])
