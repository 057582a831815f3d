"""Exact Gaussian kernel density over latent codes.

scipy fits the estimator (``scipy.stats.gaussian_kde``: Scott, Silverman or a fixed
bandwidth factor); torch evaluates it, batched and in float64. The result is the same
number as ``gaussian_kde.logpdf`` (to ~1e-13 relative) at a small fraction of the cost.

For a query q, codes c_1..c_n and kernel covariance S = L L^T::

    log p(q) = log sum_i exp(-|L^-1 (q - c_i)|^2 / 2) - log n - log det(2 pi S) / 2

How it is evaluated:

* Codes and queries are centred on the code mean (keeps the norms, and so the
  rounding of the expansion below, small) and whitened with ``solve_triangular``
  on the Cholesky factor. The whitened codes are cached per device.
* Squared distances come from |q|^2 + |c|^2 - 2 q.c, folded into a single float64
  matrix product on augmented vectors:
  ``[q, -|q|^2/2, 1] . [c, 1, -|c|^2/2] = -|q - c|^2 / 2``.
  They are clamped at >= 0 (rounding can push them slightly below for a query on a code).
* The sum of exponentials is taken directly (no shift) where that is exact: whenever
  the row sum is far above underflow, i.e. for every query that is not far from all
  codes. Rows whose direct sum is tiny (far queries, where the density underflows in
  linear space) are recomputed with a per-row max-shifted logsumexp, so they still
  get an exact log-density. Each row's path depends on that row alone.
* Work is tiled over queries and codes, so memory stays bounded. On the CPU tiles are
  L2-sized (1 MiB) and each block of queries is computed with single-threaded torch
  ops and MKL (thread-local switches, see ``_SerialControls``); the blocks are spread
  over ``torch.get_num_threads()`` Python threads (torch releases the GIL inside each
  op). Per element that is one product, one clamp, one exp and one sum, all in cache,
  with no intra-op barriers to stall whenever another process takes a core. On
  accelerators the tiles are up to ~256 MiB and run one after another.
* A query's value depends on the query and on the tile shapes only (fixed by the
  number of queries, ``chunk_size`` and the device), not on the other queries nor on
  the number of threads: the same query in a batch of the same shape gets the same bits.

Neither torch nor scipy is imported at module import time: only ``fit`` needs scipy,
and scoring only needs torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["KernelDensity"]

_FORMAT_VERSION = 1
_STATE_KEYS = ("format_version", "codes", "covariance", "bandwidth", "factor")

# Tiles of the queries x codes float64 matrix.
# CPU: blocks of _CPU_QUERY_TILE queries against code tiles of _CPU_TILE_ELEMENTS in all
# (1 MiB: stays in L2), one block per task of a few worker threads made single-threaded
# (see _serial_controls). Where that switch is unavailable, tiles stay below torch's
# parallel grain size (32768 elements), so that the ops of a block run serially anyway.
# Accelerators: up to ~256 MiB per tile, few big kernels.
_CPU_QUERY_TILE = 64
_CPU_TILE_ELEMENTS = 1 << 17
_CPU_SMALL_TILE_ELEMENTS = 32767
_ACCEL_TILE_ELEMENTS = 1 << 25
# -|q - c|^2/2 is floored at _EXP_FLOOR before exp(): exp() of arguments below about
# -708.4 (subnormal or zero results) is more than 30x slower on the CPU, and the floored
# terms (< 1e-304 each) cannot change a row sum that is >= _MIN_DIRECT_SUM.
_EXP_FLOOR = -700.0
# Rows whose unshifted sum of exp(-|q - c|^2/2) is below this (queries far from every
# code) are recomputed with the per-row max shift, where nothing underflows.
_MIN_DIRECT_SUM = 1e-200


_SERIAL_CONTROLS: Any = None  # None: not probed yet; else a _SerialControls


def _find_function(patterns: tuple[str, ...], name: str, argtypes: list):
    """``name`` from a library bundled with torch (torch/lib), as a ctypes int function."""
    import ctypes
    import glob

    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    for pattern in patterns:
        for candidate in sorted(glob.glob(os.path.join(lib_dir, pattern))):
            try:
                function = getattr(ctypes.CDLL(candidate), name)
            except (OSError, AttributeError):
                continue
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            return function
    return None


class _SerialControls:
    """Thread-local switches that make torch ops and MKL single-threaded in one thread.

    ``MKL_Set_Num_Threads_Local`` (MKL's C API; the lower-case symbol is the Fortran one)
    and OpenMP's ``omp_set_num_threads`` / ``omp_get_max_threads``, from the libraries
    torch ships. Both settings are per thread, so nothing outside the calling thread
    changes, and ``serial()`` restores them on exit. ``ok`` is True when a probe thread
    confirmed that the OpenMP switch is the one torch obeys (``torch.get_num_threads()``
    drops to 1 in that thread only); otherwise the switches are not used at all.
    """

    def __init__(self, probe: bool = True) -> None:
        self.mkl = self.omp_set = self.omp_get = None
        self.ok = False
        if not probe:
            return
        try:
            import ctypes
            import threading

            import torch

            omp_libs = ("libgomp*", "libiomp*", "libomp*")
            omp_set = _find_function(omp_libs, "omp_set_num_threads", [ctypes.c_int])
            omp_get = _find_function(omp_libs, "omp_get_max_threads", [])
            if omp_set is None or omp_get is None:
                return
            seen: list[int] = []

            def probe() -> None:
                omp_set(1)
                seen.append(torch.get_num_threads())

            thread = threading.Thread(target=probe, name="aadetect-kde-probe")
            thread.start()
            thread.join()
            if seen != [1]:
                return
            if torch.backends.mkl.is_available():
                self.mkl = _find_function(("*torch_cpu*",), "MKL_Set_Num_Threads_Local", [ctypes.c_int])
            self.omp_set, self.omp_get, self.ok = omp_set, omp_get, True
        except Exception:  # noqa: BLE001 - an optimisation only; never fail scoring over it
            self.mkl = self.omp_set = self.omp_get = None
            self.ok = False

    @contextlib.contextmanager
    def serial(self):
        """Run the body with single-threaded torch ops and MKL in this thread."""
        if not self.ok:
            yield
            return
        omp_before = self.omp_get()
        mkl_before = self.mkl(1) if self.mkl is not None else None  # returns the previous value
        self.omp_set(1)
        try:
            yield
        finally:
            self.omp_set(omp_before)
            if mkl_before is not None:
                self.mkl(mkl_before)


def _serial_controls() -> _SerialControls:
    global _SERIAL_CONTROLS
    if _SERIAL_CONTROLS is None:
        _SERIAL_CONTROLS = _SerialControls()
    return _SERIAL_CONTROLS


class _Plan:
    """What the block workers of one log_density call share (all read-only but ``out``)."""

    __slots__ = ("q_aug", "code_tiles", "q_tile", "c_tile", "out", "scratch")

    def __init__(self, q_aug, code_tiles, q_tile: int, c_tile: int, out):
        import threading

        self.q_aug = q_aug
        self.code_tiles = code_tiles
        self.q_tile = q_tile
        self.c_tile = c_tile
        self.out = out
        self.scratch = threading.local()  # one tile buffer per worker thread, reused

    def tile_buffer(self):
        import torch

        buffer = getattr(self.scratch, "buffer", None)
        if buffer is None:
            buffer = torch.empty(self.q_tile * self.c_tile, dtype=torch.float64, device=self.q_aug.device)
            self.scratch.buffer = buffer
        return buffer


def _score_block(plan: _Plan, q0: int) -> None:
    """log sum_i exp(-|q - c_i|^2 / 2) for queries q0 .. q0 + q_tile, into plan.out.

    The value for a query depends only on that query and on the tile shapes (fixed by
    m, n, chunk_size and the device), never on the other queries of the block.
    """
    import torch

    q_aug = plan.q_aug
    q1 = min(q0 + plan.q_tile, q_aug.shape[0])
    rows = q1 - q0
    q_block = q_aug[q0:q1]
    n_tiles = len(plan.code_tiles)
    buffer = plan.tile_buffer()
    full_view = buffer[: rows * plan.c_tile].view(rows, plan.c_tile)

    def tile_view(width: int):
        return full_view if width == plan.c_tile else buffer[: rows * width].view(rows, width)

    # Direct pass, no shift: exact whenever the row sum stays far from underflow, which
    # is every query that is not far away from all codes.
    sums = torch.empty((n_tiles, rows), dtype=torch.float64, device=q_aug.device)
    for codes, row_sums in zip(plan.code_tiles, sums.unbind(0)):
        block = tile_view(codes.shape[1])
        torch.mm(q_block, codes, out=block)  # -|q - c|^2 / 2 via the augmented vectors
        # clamp squared distances at >= 0 (i.e. values at <= 0), and floor for exp()
        block.clamp_(min=_EXP_FLOOR, max=0.0).exp_()
        torch.sum(block, dim=1, out=row_sums)
    total = sums.sum(dim=0)
    result = total.log()

    far = total < _MIN_DIRECT_SUM
    if bool(far.any()):
        # Shifted pass (logsumexp with each row's max) for the block; only the far rows
        # take its values, so a row's result never depends on its neighbours.
        maxes = torch.empty((n_tiles, rows, 1), dtype=torch.float64, device=q_aug.device)
        for codes, row_max, row_sums in zip(plan.code_tiles, maxes.unbind(0), sums.unbind(0)):
            block = tile_view(codes.shape[1])
            torch.mm(q_block, codes, out=block)
            block.clamp_(max=0.0)
            torch.amax(block, dim=1, keepdim=True, out=row_max)
            block.sub_(row_max).clamp_(min=_EXP_FLOOR).exp_()  # row sums are now >= 1
            torch.sum(block, dim=1, out=row_sums)
        top = maxes.amax(dim=0)  # (rows, 1)
        shifted = sums.mul_(maxes.squeeze(2).sub_(top.T).exp_()).sum(dim=0).log_().add_(top[:, 0])
        result = torch.where(far, shifted, result)
    plan.out[q0:q1] = result


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


class KernelDensity:
    """Gaussian KDE over latent codes; scipy fits it, torch evaluates it in batched float64.

    ``codes`` is (n, d) float64 and ``covariance`` the (d, d) kernel covariance exactly as
    ``scipy.stats.gaussian_kde(codes.T).covariance`` (data covariance x factor**2).
    ``bandwidth`` and ``factor`` are recorded for provenance (``factor`` is already
    contained in ``covariance``).
    """

    def __init__(self, codes: np.ndarray, covariance: np.ndarray, bandwidth: str, factor: float):
        codes = np.array(codes, dtype=np.float64, copy=True)
        covariance = np.array(covariance, dtype=np.float64, copy=True)
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise ValueError(f"codes must be a 2-D array (n_codes, dim), got shape {codes.shape}")
        n, d = codes.shape
        if n < d + 1:
            raise ValueError(_too_few_codes_message(n, d))
        if not np.all(np.isfinite(codes)):
            raise ValueError("codes contain NaN or infinite values")
        _check_codes_not_degenerate(codes)
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

        self._codes = codes
        self._covariance = covariance
        self._bandwidth = bandwidth
        self._factor = factor
        self._chol = _cholesky_lower(covariance, n)  # ValueError when singular
        self._center = codes.mean(axis=0)
        d_log_2pi = d * math.log(2.0 * math.pi)
        # log n + 0.5 * log det(2 pi S), with log det S = 2 * sum(log diag L)
        self._log_norm = math.log(n) + 0.5 * (d_log_2pi + 2.0 * float(np.sum(np.log(np.diag(self._chol)))))
        # per-device cache: device string -> (chol, center, augmented whitened codes)
        self._cache: dict[str, tuple[Any, Any, Any]] = {}

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(cls, codes: np.ndarray, bandwidth: str | float = "scott") -> "KernelDensity":
        """Fit with ``scipy.stats.gaussian_kde(codes.T, bw_method=bandwidth)``.

        ``bandwidth``: "scott", "silverman" or a positive number (also as a string), which
        scipy uses directly as the bandwidth factor.
        """
        codes = np.asarray(codes, dtype=np.float64)
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise ValueError(f"codes must be a 2-D array (n_codes, dim), got shape {codes.shape}")
        n, d = codes.shape
        if n < d + 1:
            raise ValueError(_too_few_codes_message(n, d))
        if not np.all(np.isfinite(codes)):
            raise ValueError("codes contain NaN or infinite values")
        _check_codes_not_degenerate(codes)
        bw_method = _parse_bandwidth(bandwidth)

        import scipy.linalg
        import scipy.stats

        try:
            kde = scipy.stats.gaussian_kde(codes.T, bw_method=bw_method)
        except (np.linalg.LinAlgError, scipy.linalg.LinAlgError):
            raise ValueError(_singular_message(n, d)) from None
        covariance = np.array(kde.covariance, dtype=np.float64).reshape(d, d)
        label = bw_method if isinstance(bw_method, str) else repr(float(bw_method))
        return cls(codes, covariance, label, float(kde.factor))

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

    @property
    def bandwidth(self) -> str:
        return self._bandwidth

    @property
    def factor(self) -> float:
        return self._factor

    def __repr__(self) -> str:
        return (
            f"KernelDensity(n_codes={self.n_codes}, dim={self.dim}, "
            f"bandwidth={self._bandwidth!r}, factor={self._factor:.6g})"
        )

    # ---------------------------------------------------------------- scoring
    def _device_state(self, device: Any):
        """(chol, center, augmented whitened codes) on ``device``, computed once per device."""
        import torch

        key = str(device)
        state = self._cache.get(key)
        if state is None:
            chol = torch.from_numpy(self._chol).to(device=device, dtype=torch.float64)
            center = torch.from_numpy(self._center).to(device=device, dtype=torch.float64)
            codes = torch.from_numpy(self._codes).to(device=device, dtype=torch.float64)
            whitened = torch.linalg.solve_triangular(chol, (codes - center).T, upper=False).T
            n, d = whitened.shape
            # columns [c, 1, -|c|^2/2] pair with rows [q, -|q|^2/2, 1] to give -|q - c|^2/2
            # in one product; stored (d + 2, n) row-major, whose column slices multiply
            # ~30% faster than slices of the transposed (n, d + 2) array
            augmented = torch.empty((d + 2, n), dtype=torch.float64, device=device)
            augmented[:d] = whitened.T
            augmented[d] = 1.0
            augmented[d + 1] = (whitened * whitened).sum(dim=1).mul_(-0.5)
            state = (chol, center, augmented)
            self._cache[key] = state
        return state

    def log_density(self, queries, *, device: Any = "cpu", chunk_size: int = 2048) -> np.ndarray:
        """Log-density of each row of ``queries`` ((m, d) numpy array or torch tensor).

        Returns a float64 numpy array of shape (m,). ``chunk_size`` is the most queries
        evaluated together (memory stays bounded whatever ``m`` and ``n_codes``). The
        result for a query depends only on the query, ``m``, ``chunk_size`` and the
        device, so a query gets bitwise the same value in any batch of the same shape.
        """
        import torch

        chunk_size = int(chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        if isinstance(queries, torch.Tensor):
            q = queries.detach().to(device=device, dtype=torch.float64)
        else:
            array = np.asarray(queries)
            if array.dtype == object or not (
                np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
            ):
                raise ValueError(f"queries must be a numeric array, got dtype {array.dtype}")
            q = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64)).to(device)
        d = self.dim
        if q.ndim != 2 or q.shape[1] != d:
            raise ValueError(f"queries must have shape (m, {d}), got {tuple(q.shape)}")
        m = int(q.shape[0])
        if m == 0:
            return np.empty(0, dtype=np.float64)
        if not bool(torch.isfinite(q).all()):
            raise ValueError("queries contain NaN or infinite values")

        # inference mode here and in the worker threads (it is thread-local), so that the
        # cached and intermediate tensors are the same kind whatever mode the caller is in
        with torch.inference_mode():
            chol, center, codes_aug = self._device_state(device)
            out = self._log_density(q, chol, center, codes_aug, chunk_size)
        return out.cpu().numpy().astype(np.float64, copy=False)

    def _log_density(self, q, chol, center, codes_aug, chunk_size: int):
        import torch

        device = q.device
        on_cpu = device.type == "cpu"
        n = int(codes_aug.shape[1])
        d = self.dim
        m = int(q.shape[0])

        # whitened, centred, augmented queries [q, -|q|^2/2, 1]
        whitened = torch.linalg.solve_triangular(chol, (q - center).T, upper=False).T
        q_aug = torch.empty((m, d + 2), dtype=torch.float64, device=device)
        q_aug[:, :d] = whitened
        q_aug[:, d] = (whitened * whitened).sum(dim=1).mul_(-0.5)
        q_aug[:, d + 1] = 1.0

        serial = _serial_controls() if on_cpu else None
        if on_cpu:
            # Blocks run with single-threaded ops (see _SerialControls), so tiles can be
            # L2-sized; without that switch they stay below torch's parallel grain size,
            # so that the ops of a block run serially anyway.
            budget = _CPU_TILE_ELEMENTS if serial.ok else _CPU_SMALL_TILE_ELEMENTS
            # more rows when there are few codes, to keep the number of calls down
            q_tile = max(1, min(chunk_size, m, max(_CPU_QUERY_TILE, budget // n)))
            c_tile = max(1, min(n, budget // q_tile))
        else:
            q_tile = max(1, min(chunk_size, m))
            c_tile = max(1, min(n, _ACCEL_TILE_ELEMENTS // q_tile))
        code_tiles = [codes_aug[:, c0 : min(c0 + c_tile, n)] for c0 in range(0, n, c_tile)]

        plan = _Plan(q_aug, code_tiles, q_tile, c_tile, torch.empty(m, dtype=torch.float64, device=device))
        starts = range(0, m, q_tile)
        workers = min(torch.get_num_threads(), len(starts)) if on_cpu else 1
        if workers > 1:
            # Serial blocks spread over a few Python threads (torch releases the GIL inside
            # each op): the cores stay busy and, unlike intra-op parallelism, nothing
            # stalls at a barrier whenever another process takes a core. Every block is
            # computed the same way whichever thread runs it, and whatever the thread count.
            from concurrent.futures import ThreadPoolExecutor

            def work(q0: int) -> None:
                with torch.inference_mode(), serial.serial():
                    _score_block(plan, q0)

            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="aadetect-kde") as pool:
                for _ in pool.map(work, starts):
                    pass
        elif on_cpu:
            with serial.serial():
                for q0 in starts:
                    _score_block(plan, q0)
        else:
            for q0 in starts:
                _score_block(plan, q0)
        return plan.out.sub_(self._log_norm)

    # ----------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Plain numpy arrays and scalars (no objects), suitable for ``np.savez``."""
        return {
            "format_version": _FORMAT_VERSION,
            "codes": self._codes.copy(),
            "covariance": self._covariance.copy(),
            "bandwidth": self._bandwidth,
            "factor": self._factor,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> "KernelDensity":
        if not isinstance(state, dict) and not hasattr(state, "keys"):
            raise ValueError("density state must be a mapping")
        missing = [key for key in ("codes", "covariance", "bandwidth", "factor") if key not in state]
        if missing:
            raise ValueError(f"density state is missing {', '.join(missing)}")
        version = state.get("format_version", _FORMAT_VERSION)
        try:
            version = int(np.asarray(version).item())
        except (TypeError, ValueError):
            raise ValueError(f"density state has an invalid format_version {version!r}") from None
        if version != _FORMAT_VERSION:
            raise ValueError(
                f"density state has format version {version}, this aadetect reads version {_FORMAT_VERSION}"
            )

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
        return cls(codes, covariance, bandwidth_str, factor_value)

    def save(self, path: Path) -> None:
        """Write an ``.npz`` (no pickles) atomically: a temp file beside ``path``, then os.replace."""
        path = Path(path)
        state = self.state_dict()
        arrays = {
            "format_version": np.asarray(state["format_version"], dtype=np.int64),
            "codes": np.asarray(state["codes"], dtype=np.float64),
            "covariance": np.asarray(state["covariance"], dtype=np.float64),
            "bandwidth": np.asarray(state["bandwidth"], dtype=np.str_),
            "factor": np.asarray(state["factor"], dtype=np.float64),
        }
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            try:
                os.unlink(tmp_name)
            except FileNotFoundError:
                pass
            raise

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
