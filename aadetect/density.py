"""Exact Gaussian kernel density over latent codes.

scipy fits the estimator (``scipy.stats.gaussian_kde``: Scott / Silverman / fixed
bandwidth factor); torch evaluates it, batched and in float64, to the same number as
``gaussian_kde.logpdf`` (about 1e-13 relative) but many times faster.

For a query q, codes c_1..c_n and kernel covariance S = L L^T::

    log p(q) = log sum_i exp(-|L^-1 (q - c_i)|^2 / 2) - log n - log det(2 pi S) / 2

Queries and codes are whitened once with the Cholesky factor. The exponent
-|q - c|^2 / 2 comes out of one float64 matrix product of augmented vectors,
``[q, -|q|^2/2, 1] . [c, 1, -|c|^2/2]``, clamped to <= 0. Tiles of queries x codes are
small enough to stay in cache, and their exponentials are summed directly; on the CPU
each block of queries runs on one thread, and the blocks are shared out over torch's
threads, so the numbers do not depend on how many there are. The rare
queries whose sum underflows (far from every code) are redone with a max-shifted
logsumexp, so they still get an exact log-density.

With ``radius="sqrt"`` the estimator works on each code with its length square-rooted and
its direction kept (c -> c / sqrt|c|), for fitting and for queries alike: what the code's
direction says weighs more against its length, which follows contrast and ink.

scipy is imported only when it is needed: only ``fit`` uses it,
and scoring only needs torch.
"""

from __future__ import annotations

import io
import math
import threading
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aadetect.atomic import write_atomic
from aadetect.config import CODE_RADII, worst_cell_count
from aadetect.parallel import piece_pool

__all__ = ["GridDensity", "KernelDensity", "map_radius"]

_STATE_KEYS = ("codes", "covariance", "bandwidth", "factor", "radius")
QUERY_TILE = 64  # queries x CODE_TILE float64 tiles (1 MiB) stay in cache between product and exp
CODE_TILE = 2048
EXP_FLOOR = -700.0  # exp() below this is 0 in float64 anyway, and slow on some CPUs
UNDERFLOW = 1e-200  # a direct sum this small is redone with a max-shifted logsumexp


def map_radius(codes, radius: str):
    """Codes (a float64 torch tensor, (..., d)) as the KDE sees them: "linear" keeps them, "sqrt"
    square-roots each one's length. In ops the ONNX exporter takes too (`aadetect.export`).

    Row by row, so a code maps the same in any batch; fitting and queries share this one path,
    so a training code queried again lands exactly on its kernel. A zero code stays zero.
    """
    if radius == "linear":
        return codes
    if radius != "sqrt":
        raise ValueError(f"radius must be one of {', '.join(CODE_RADII)}, got {radius!r}")

    tiny = torch.finfo(codes.dtype).tiny
    largest = codes.abs().amax(dim=-1, keepdim=True).clamp(min=tiny)  # scaled, so 1e200 neither overflows
    length = largest * (codes / largest).square().sum(dim=-1, keepdim=True).sqrt()  # nor 1e-200 underflows
    return codes / length.clamp(min=tiny).sqrt()


def _parse_bandwidth(bandwidth: Any) -> str | float:
    """'scott' | 'silverman' | a positive finite number (or its string) -> scipy's bw_method."""
    if isinstance(bandwidth, str):
        text = bandwidth.strip().lower()
        if text in ("scott", "silverman"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"bandwidth must be 'scott', 'silverman' or a positive number, got {bandwidth!r}"
            ) from None
    elif isinstance(bandwidth, (bool, np.bool_)):
        raise ValueError(f"bandwidth must be 'scott', 'silverman' or a positive number, got {bandwidth!r}")
    elif isinstance(bandwidth, (int, float, np.integer, np.floating)):
        value = float(bandwidth)
    else:
        raise ValueError(
            f"bandwidth must be 'scott', 'silverman' or a positive number, got {bandwidth!r}"
        )
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"bandwidth factor must be a positive finite number, got {bandwidth!r}")
    return value


def _too_few_codes_message(n: int, d: int) -> str:
    return (
        f"the density needs more latent codes than latent dimensions: got {n} code(s) of "
        f"dimension {d}, need at least {d + 1}; use fewer latent dimensions or more images"
    )


def _singular_message(n: int, d: int) -> str:
    return (
        f"the covariance of the {n} latent codes (dimension {d}) is singular or not finite: "
        "the codes lie in a lower-dimensional subspace (e.g. collapsed or constant latent "
        "dimensions); use fewer latent dimensions or more (and more varied) images"
    )


# Reject covariances whose correlation matrix has an eigenvalue below this: the codes
# then lie (to rounding) in a lower-dimensional subspace and the whitening is meaningless.
_MIN_CORRELATION_EIGENVALUE = 1e-12
# A latent dimension whose codes span less than this fraction of their magnitude is constant.
_MIN_RELATIVE_SPREAD = 1e-9


def _check_codes_not_degenerate(codes: np.ndarray) -> None:
    n, d = codes.shape
    spread = np.ptp(codes, axis=0)
    magnitude = np.max(np.abs(codes), axis=0)
    constant = np.flatnonzero(spread <= _MIN_RELATIVE_SPREAD * magnitude)
    if constant.size:
        listed = ", ".join(str(int(i)) for i in constant[:10]) + (", ..." if constant.size > 10 else "")
        raise ValueError(
            f"latent dimension(s) {listed} of the {n} codes are constant, so the covariance is "
            "singular; use fewer latent dimensions or more (and more varied) images"
        )


def _checked_codes(codes: np.ndarray) -> np.ndarray:
    """Codes a KDE can be fitted to: (n, d), finite, more codes than dimensions, none constant."""
    if codes.ndim != 2 or codes.shape[1] < 1:
        raise ValueError(f"codes must be a 2-D array (n_codes, dim), got shape {codes.shape}")
    n, d = codes.shape
    if n < d + 1:
        raise ValueError(_too_few_codes_message(n, d))
    if not np.all(np.isfinite(codes)):
        raise ValueError("codes contain NaN or infinite values")
    _check_codes_not_degenerate(codes)
    return codes


def _checked_centres(codes: np.ndarray) -> np.ndarray:
    """Kernel centres for a kernel fitted elsewhere: any number of them will do, all finite."""
    if codes.ndim != 2 or len(codes) < 1 or codes.shape[1] < 1:
        raise ValueError(f"centres must be a non-empty 2-D array (n_centres, dim), got shape {codes.shape}")
    if not np.all(np.isfinite(codes)):
        raise ValueError("centres contain NaN or infinite values")
    return codes


def _cholesky_lower(covariance: np.ndarray, n: int) -> np.ndarray:
    """Lower Cholesky factor with numpy (no scipy); ValueError when (numerically) singular."""
    d = covariance.shape[0]
    if not np.all(np.isfinite(covariance)):
        raise ValueError(_singular_message(n, d))
    variances = np.diag(covariance)
    if not np.all(variances > 0.0):
        raise ValueError(_singular_message(n, d))
    scale = 1.0 / np.sqrt(variances)
    correlation = covariance * scale[:, None] * scale[None, :]
    if np.linalg.eigvalsh(correlation)[0] < _MIN_CORRELATION_EIGENVALUE:
        raise ValueError(_singular_message(n, d))
    try:
        chol = np.linalg.cholesky(covariance)
    except np.linalg.LinAlgError:
        raise ValueError(_singular_message(n, d)) from None
    diag = np.diag(chol)
    if not np.all(np.isfinite(chol)) or not np.all(diag > 0.0):
        raise ValueError(_singular_message(n, d))
    return chol


def _log_sum_kernels(block, codes, code_tile: int, tile):
    """log sum_i exp(-|q - c_i|^2 / 2) for each augmented query row of ``block``.

    ``tile`` is a scratch buffer of at least len(block) x code_tile float64 values.
    """
    total = torch.zeros(len(block), dtype=torch.float64, device=block.device)
    for first in range(0, codes.shape[1], code_tile):
        part = codes[:, first:first + code_tile]
        exponent = tile[:len(block) * part.shape[1]].view(len(block), part.shape[1])
        torch.mm(block, part, out=exponent)
        total += exponent.clamp_(EXP_FLOOR, 0.0).exp_().sum(1)
    result = total.log()
    far = total < UNDERFLOW
    if bool(far.any()):  # max-shifted logsumexp, floored so exp() stays on its fast path
        exponent = torch.mm(block[far], codes).clamp_(max=0.0)
        top = exponent.amax(dim=1, keepdim=True)
        result[far] = exponent.sub_(top).clamp_(min=EXP_FLOOR).exp_().sum(1).log_() + top[:, 0]
    return result


class _KernelChoice:
    """How a density's kernels were chosen, as the card records it: scipy's bandwidth rule, its factor, and
    the code radius applied to every code."""

    _bandwidth: str
    _factor: float
    _radius: str

    @property
    def bandwidth(self) -> str:
        return self._bandwidth

    @property
    def factor(self) -> float:
        return self._factor

    @property
    def radius(self) -> str:
        return self._radius


class KernelDensity(_KernelChoice):
    """Gaussian KDE over latent codes; scipy fits it, torch evaluates it in batched float64.

    ``codes`` is (n, d) float64, the kernel centres (the fitted codes after ``map_radius``),
    and ``covariance`` the (d, d) kernel covariance exactly as
    ``scipy.stats.gaussian_kde(codes.T).covariance`` (data covariance x factor**2).
    ``bandwidth`` and ``factor`` are recorded for provenance (``factor`` is already
    contained in ``covariance``); ``radius`` is applied to every query.
    """

    def __init__(self, codes: np.ndarray, covariance: np.ndarray, bandwidth: str, factor: float,
                 radius: str = "linear", *, fitted: bool = True):
        codes = np.array(codes, dtype=np.float64, copy=True)
        codes = _checked_codes(codes) if fitted else _checked_centres(codes)
        covariance = np.array(covariance, dtype=np.float64, copy=True)
        n, d = codes.shape
        if covariance.shape != (d, d):
            raise ValueError(
                f"covariance must have shape ({d}, {d}) to match codes of dimension {d}, "
                f"got {covariance.shape}"
            )
        if not np.all(np.isfinite(covariance)):
            raise ValueError("covariance contains NaN or infinite values")
        scale = float(np.max(np.abs(covariance))) if covariance.size else 0.0
        if not np.allclose(covariance, covariance.T, rtol=1e-10, atol=1e-12 * scale):
            raise ValueError("covariance must be symmetric")
        factor = float(factor)
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"factor must be a positive finite number, got {factor!r}")
        if not isinstance(bandwidth, str):
            raise ValueError(f"bandwidth must be a string, got {type(bandwidth).__name__}")
        if radius not in CODE_RADII:
            raise ValueError(f"radius must be one of {', '.join(CODE_RADII)}, got {radius!r}")

        self._codes = codes
        self._fitted = fitted
        self._covariance = covariance
        self._bandwidth = bandwidth
        self._factor = factor
        self._radius = radius
        self._chol = _cholesky_lower(covariance, n)  # ValueError when singular
        self._center = codes.mean(axis=0)
        d_log_2pi = d * math.log(2.0 * math.pi)
        # log n + 0.5 * log det(2 pi S), with log det S = 2 * sum(log diag L)
        self._log_norm = math.log(n) + 0.5 * (d_log_2pi + 2.0 * float(np.sum(np.log(np.diag(self._chol)))))
        # per-device cache: device string -> (chol, center, augmented whitened codes)
        self._cache: dict[str, tuple[Any, Any, Any]] = {}

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, codes: np.ndarray, bandwidth: str | float = "scott", radius: str = "linear") -> "KernelDensity":
        """Fit with ``scipy.stats.gaussian_kde(map_radius(codes, radius).T, bw_method=bandwidth)``.

        ``bandwidth``: "scott", "silverman" or a positive number (also as a string), which
        scipy uses directly as the bandwidth factor. ``radius`` is "linear" here, scipy's own
        estimator; `train` passes ``TrainConfig.code_radius`` ("sqrt" by default).
        """
        codes = _checked_codes(np.asarray(codes, dtype=np.float64))
        if radius != "linear":

            codes = map_radius(torch.from_numpy(codes), radius).numpy()
        n, d = codes.shape
        bw_method = _parse_bandwidth(bandwidth)

        import scipy.linalg
        import scipy.stats

        try:
            kde = scipy.stats.gaussian_kde(codes.T, bw_method=bw_method)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            raise ValueError(_singular_message(n, d)) from None
        covariance = np.array(kde.covariance, dtype=np.float64).reshape(d, d)
        label = bw_method if isinstance(bw_method, str) else repr(float(bw_method))
        return cls(codes, covariance, label, float(kde.factor), radius)

    # -------------------------------------------------------------- properties
    @property
    def n_codes(self) -> int:
        return int(self._codes.shape[0])

    @property
    def dim(self) -> int:
        return int(self._codes.shape[1])

    @property
    def codes(self) -> np.ndarray:
        view = self._codes.view()
        view.flags.writeable = False
        return view

    @property
    def covariance(self) -> np.ndarray:
        view = self._covariance.view()
        view.flags.writeable = False
        return view

    def without(self, indices) -> "KernelDensity":
        """The same kernel over the codes less those at `indices` (the covariance is not refitted, so
        the density keeps the bandwidth its training codes chose)."""
        keep = np.ones(self.n_codes, dtype=bool)
        keep[np.asarray(indices, dtype=np.int64)] = False
        return KernelDensity(self._codes[keep], self._covariance, self._bandwidth, self._factor, self._radius,
                             fitted=self._fitted)

    def over(self, centres) -> "KernelDensity":
        """The same kernel centred on other codes (already mapped by the radius), however few: the
        labelled anomalies' mixture, which borrows the good images' kernel rather than fitting its own."""
        return KernelDensity(centres, self._covariance, self._bandwidth, self._factor, self._radius, fitted=False)

    def __repr__(self) -> str:
        return (
            f"KernelDensity(n_codes={self.n_codes}, dim={self.dim}, "
            f"bandwidth={self._bandwidth!r}, factor={self._factor:.6g}, radius={self._radius!r})"
        )

    # ---------------------------------------------------------------- scoring
    def _device_state(self, device: Any):
        """(chol, center, augmented whitened codes (d + 2, n)) on ``device``, computed once per device."""
        key = str(device)
        if key not in self._cache:
            chol = torch.from_numpy(self._chol).to(device=device, dtype=torch.float64)
            center = torch.from_numpy(self._center).to(device=device, dtype=torch.float64)
            codes = torch.from_numpy(self._codes).to(device=device, dtype=torch.float64)
            whitened = torch.linalg.solve_triangular(chol, (codes - center).T, upper=False)  # (d, n)
            ones = torch.ones_like(whitened[:1])
            augmented = torch.cat([whitened, ones, -0.5 * whitened.square().sum(0, keepdim=True)])
            self._cache[key] = (chol, center, augmented)
        return self._cache[key]

    def log_density(self, queries, *, device: Any = "cpu", chunk_size: int = QUERY_TILE) -> np.ndarray:
        """Log-density of each row of ``queries`` ((m, d) numpy array or torch tensor), as float64 (m,).

        A query's value depends only on the query and the batch shape, so the same image
        gets bit-identical numbers in any batch of the same size.
        """
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if isinstance(queries, torch.Tensor):
            q = queries.detach().to(device=device, dtype=torch.float64)
        else:
            array = np.asarray(queries)
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise ValueError(f"queries must be a numeric array, got dtype {array.dtype}")
            q = torch.from_numpy(np.array(array, dtype=np.float64, order="C")).to(device)  # a copy, so read-only too
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must have shape (m, {self.dim}), got {tuple(q.shape)}")
        if not bool(torch.isfinite(q).all()):
            raise ValueError("queries contain NaN or infinite values")
        q = map_radius(q, self._radius)
        with torch.inference_mode(), piece_pool(q.device) as (pool, _):
            chol, center, codes = self._device_state(q.device)
            whitened = torch.linalg.solve_triangular(chol, (q - center).T, upper=False).T  # (m, d)
            augmented = torch.cat([whitened, -0.5 * whitened.square().sum(1, keepdim=True),
                                   torch.ones_like(whitened[:, :1])], dim=1)
            out = torch.empty(len(q), dtype=torch.float64, device=q.device)
            on_cpu = q.device.type == "cpu"
            query_tile = min(int(chunk_size), QUERY_TILE) if on_cpu else int(chunk_size)
            code_tile = CODE_TILE if on_cpu else codes.shape[1]
            starts = range(0, len(q), query_tile)
            scratch = threading.local()  # one reused tile buffer per thread

            def evaluate(start: int) -> None:
                with torch.inference_mode():  # thread-local, so entered again in each worker
                    if not hasattr(scratch, "tile"):
                        scratch.tile = torch.empty(query_tile * code_tile, dtype=torch.float64, device=q.device)
                    block = augmented[start:start + query_tile]
                    out[start:start + query_tile] = _log_sum_kernels(block, codes, code_tile, scratch.tile)

            list((pool.map if len(starts) > 1 else map)(evaluate, starts))  # re-raises a worker's exception
            return (out - self._log_norm).cpu().numpy()

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Plain numpy arrays and scalars (no objects), suitable for ``np.savez``."""
        return {
            "codes": self._codes.copy(),
            "covariance": self._covariance.copy(),
            "bandwidth": self._bandwidth,
            "factor": self._factor,
            "radius": self._radius,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "KernelDensity":
        if not isinstance(state, dict) and not hasattr(state, "keys"):
            raise ValueError("density state must be a mapping")
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"density state is missing {', '.join(missing)}")

        codes = np.asarray(state["codes"])
        covariance = np.asarray(state["covariance"])
        for name, array in (("codes", codes), ("covariance", covariance)):
            if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
                raise ValueError(f"density {name} must be numeric, got dtype {array.dtype}")
        if codes.ndim != 2 or codes.shape[0] < 1 or codes.shape[1] < 1:
            raise ValueError(f"density codes must have shape (n_codes, dim), got {codes.shape}")
        d = codes.shape[1]
        if covariance.shape != (d, d):
            raise ValueError(
                f"density covariance must have shape ({d}, {d}) to match the codes, got {covariance.shape}"
            )
        if not np.all(np.isfinite(codes)):
            raise ValueError("density codes contain NaN or infinite values")
        if not np.all(np.isfinite(covariance)):
            raise ValueError("density covariance contains NaN or infinite values")

        bandwidth = np.asarray(state["bandwidth"])
        if bandwidth.ndim != 0 or bandwidth.dtype.kind not in ("U", "S"):
            raise ValueError("density bandwidth must be a string")
        bandwidth_str = str(bandwidth.item() if bandwidth.dtype.kind == "U" else bandwidth.item().decode())
        factor = np.asarray(state["factor"])
        if factor.ndim != 0 or not (np.issubdtype(factor.dtype, np.floating) or np.issubdtype(factor.dtype, np.integer)):
            raise ValueError("density factor must be a number")
        factor_value = float(factor)
        if not math.isfinite(factor_value) or factor_value <= 0.0:
            raise ValueError(f"density factor must be a positive finite number, got {factor_value!r}")
        radius = np.asarray(state["radius"])
        if radius.ndim != 0:
            radius_str = repr(radius.tolist())
        elif radius.dtype.kind == "S":
            radius_str = radius.item().decode(errors="replace")
        else:
            radius_str = str(radius.item())
        if radius_str not in CODE_RADII:
            raise ValueError(f"density radius must be one of {', '.join(CODE_RADII)}, got {radius_str[:40]!r}")
        return cls(codes, covariance, bandwidth_str, factor_value, radius_str)

    def save(self, path: Path) -> None:
        """Write an ``.npz`` (no pickles) atomically: a temp file beside ``path``, then os.replace."""
        write_atomic(Path(path), lambda temp: temp.write_bytes(self.to_bytes()))

    def to_bytes(self) -> bytes:
        """The ``.npz`` that ``save`` writes, as bytes."""
        return _npz_bytes(self.state_dict())

    @classmethod
    def load(cls, path: Path) -> "KernelDensity":
        """Read a file written by ``save``; ValueError (with the reason) when it is not a valid density.

        A missing file raises FileNotFoundError.
        """
        path = Path(path)
        try:
            loaded = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            # np.load: ValueError for pickled data or unknown formats, OSError for unreadable files
            raise ValueError(f"{path} is not a valid density file: {error}") from None
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} is not a valid density file: expected an .npz archive")
        try:
            with loaded as archive:
                unknown = sorted(set(archive.files) - set(_STATE_KEYS))
                if unknown:
                    raise ValueError(f"unexpected entries {', '.join(unknown)}")
                state = {key: archive[key] for key in archive.files}
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as error:
            raise ValueError(f"{path} is not a valid density file: {error}") from None
        try:
            return cls.from_state_dict(state)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


class GridDensity(_KernelChoice):
    """One Gaussian KDE per position of a code grid, each over the good images' codes at that position.

    A neighbourhood is compared with the same neighbourhood of the good images: a dark corner is
    normal on a monocrystalline cell and a dark patch in its middle is not, which one density over
    every position's codes could not tell apart. scipy fits each position's kernel (the bandwidth
    factor depends only on n and d, so it is the same everywhere); torch evaluates them all at once.

    Codes come flattened, one row per image: (n, positions * d), position-major, as
    ``model.flat_codes`` lays them out. ``log_density`` pools an image's local log-densities as the
    mean of its lowest LOW_CELLS (a defect is as unlikely as its least likely neighbourhoods: the
    lowest few, not the lowest alone, which a single odd cell of a good image can set);
    ``local_log_density`` gives them all.
    """

    def __init__(self, codes: np.ndarray, covariances: np.ndarray, bandwidth: str, factor: float, radius: str):
        codes = np.array(codes, dtype=np.float64, copy=True)
        covariances = np.array(covariances, dtype=np.float64, copy=True)
        if codes.ndim != 3 or min(codes.shape) < 1:
            raise ValueError(f"grid codes must have shape (positions, n_codes, dim), got {codes.shape}")
        positions, n, d = codes.shape
        if covariances.shape != (positions, d, d):
            raise ValueError(f"covariances must have shape ({positions}, {d}, {d}), got {covariances.shape}")
        if not (np.isfinite(codes).all() and np.isfinite(covariances).all()):
            raise ValueError("grid codes or covariances contain NaN or infinite values")
        if radius not in CODE_RADII:
            raise ValueError(f"radius must be one of {', '.join(CODE_RADII)}, got {radius!r}")
        if not math.isfinite(factor) or factor <= 0.0:
            raise ValueError(f"factor must be a positive finite number, got {factor!r}")
        self._codes, self._covariances = codes, covariances
        self._bandwidth, self._factor, self._radius = bandwidth, float(factor), radius
        self._chol = np.stack([_cholesky_lower(covariance, n) for covariance in covariances])
        log_det = 2.0 * np.log(np.diagonal(self._chol, axis1=1, axis2=2)).sum(1)
        self._log_norm = math.log(n) + 0.5 * (d * math.log(2.0 * math.pi) + log_det)  # (positions,)
        self._cache: dict[str, tuple[Any, Any, Any, Any]] = {}

    @classmethod
    def fit(cls, codes: np.ndarray, positions: int, bandwidth: str | float = "scott",
            radius: str = "linear") -> "GridDensity":
        """Fit ``scipy.stats.gaussian_kde`` at each position to codes (n, positions * d)."""
        codes = np.asarray(codes, dtype=np.float64)
        n = len(codes)
        grid = codes.reshape(n, positions, -1).transpose(1, 0, 2)
        fitted = [KernelDensity.fit(grid[p], bandwidth, radius) for p in range(positions)]
        return cls(np.stack([kde.codes for kde in fitted]), np.stack([kde.covariance for kde in fitted]),
                   fitted[0].bandwidth, fitted[0].factor, radius)

    @property
    def n_codes(self) -> int:
        return int(self._codes.shape[1])

    @property
    def positions(self) -> int:
        return int(self._codes.shape[0])

    @property
    def dim(self) -> int:
        """Numbers in one image's codes: positions * the size of one local code."""
        return int(self._codes.shape[0] * self._codes.shape[2])

    def __repr__(self) -> str:
        return (f"GridDensity(positions={self.positions}, n_codes={self.n_codes}, dim={self._codes.shape[2]}, "
                f"bandwidth={self._bandwidth!r}, factor={self._factor:.6g}, radius={self._radius!r})")

    def _device_state(self, device: Any):
        """(chol, centre, whitened codes (P, n, d), their halved squared norms (P, 1, n)) on ``device``."""
        key = str(device)
        if key not in self._cache:
            chol = torch.from_numpy(self._chol).to(device)
            codes = torch.from_numpy(self._codes).to(device)
            centre = codes.mean(1, keepdim=True)
            whitened = torch.linalg.solve_triangular(chol, (codes - centre).transpose(1, 2), upper=False)
            whitened = whitened.transpose(1, 2).contiguous()
            self._cache[key] = (chol, centre, whitened, 0.5 * whitened.square().sum(2)[:, None, :])
        return self._cache[key]

    def local_log_density(self, queries, *, device: Any = "cpu") -> np.ndarray:
        """Each image's log-density at each position, (m, positions) float64, for codes (m, positions * d).
        A query's value depends only on the query and the batch shape, as with KernelDensity."""
        q = torch.as_tensor(queries).detach().to(device=device, dtype=torch.float64)
        positions, _, d = self._codes.shape
        if q.ndim != 2 or q.shape[1] != positions * d:
            raise ValueError(f"queries must have shape (m, {positions * d}), got {tuple(q.shape)}")
        if not bool(torch.isfinite(q).all()):
            raise ValueError("queries contain NaN or infinite values")
        m = len(q)
        q = map_radius(q.reshape(m * positions, d), self._radius).reshape(m, positions, d).transpose(0, 1)
        with torch.inference_mode():
            chol, centre, codes, halved_norms = self._device_state(q.device)
            whitened = torch.linalg.solve_triangular(chol, (q - centre).transpose(1, 2), upper=False).transpose(1, 2)
            # -|a - b|^2 / 2 = a.b - |a|^2 / 2 - |b|^2 / 2, clamped at 0 against rounding
            exponent = torch.baddbmm(halved_norms, whitened, codes.transpose(1, 2), beta=-1.0)
            exponent = (exponent - 0.5 * whitened.square().sum(2, keepdim=True)).clamp_(max=0.0)
            log_density = exponent.logsumexp(2) - torch.from_numpy(self._log_norm).to(q.device)[:, None]
            return log_density.T.cpu().numpy()

    def log_density(self, queries, *, device: Any = "cpu") -> np.ndarray:
        """Each image's log-density (m,): its local ones pooled (`pooled`)."""
        return pooled(self.local_log_density(queries, device=device))

    def state_dict(self) -> dict:
        return {"codes": self._codes.copy(), "covariance": self._covariances.copy(), "bandwidth": self._bandwidth,
                "factor": self._factor, "radius": self._radius}

    @classmethod
    def from_state_dict(cls, state: dict) -> "GridDensity":
        missing = [key for key in _STATE_KEYS if key not in state]
        if missing:
            raise ValueError(f"density state is missing {', '.join(missing)}")
        text = {key: str(np.asarray(state[key]).item()) for key in ("bandwidth", "radius")}
        try:
            factor = float(np.asarray(state["factor"]))
        except (TypeError, ValueError):
            raise ValueError("density factor must be a number") from None
        return cls(np.asarray(state["codes"], dtype=np.float64), np.asarray(state["covariance"], dtype=np.float64),
                   text["bandwidth"], factor, text["radius"])

    def to_bytes(self) -> bytes:
        return _npz_bytes(self.state_dict())


def pooled(local_log_density: np.ndarray) -> np.ndarray:
    """Images' log-densities from their cells' (m, positions): the mean of the lowest LOW_CELLS (at least one)."""
    lowest = worst_cell_count(local_log_density.shape[1])
    return np.sort(local_log_density, axis=1)[:, :lowest].mean(1)


def _npz_bytes(state: dict) -> bytes:
    """A density's state as the ``.npz`` the model folder holds (numbers and strings, no pickles)."""
    buffer = io.BytesIO()
    np.savez(buffer, codes=np.asarray(state["codes"], dtype=np.float64),
             covariance=np.asarray(state["covariance"], dtype=np.float64),
             bandwidth=np.asarray(state["bandwidth"], dtype=np.str_),
             factor=np.asarray(state["factor"], dtype=np.float64), radius=np.asarray(state["radius"], dtype=np.str_))
    return buffer.getvalue()
