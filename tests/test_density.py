"""KernelDensity: exact agreement with scipy's gaussian_kde, chunking, persistence, imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from aadetect import density as density_module
from aadetect.density import KernelDensity

REPO_ROOT = Path(__file__).resolve().parents[1]


def _codes_and_queries(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correlated, offset Gaussian codes; near queries from the same law; far queries."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((d, d)) / np.sqrt(d) + np.eye(d)
    offset = 3.0 * rng.standard_normal(d)
    codes = rng.standard_normal((n, d)) @ mixing + offset
    near = rng.standard_normal((200, d)) @ mixing + offset
    far = np.concatenate(
        [
            offset + 40.0 * rng.standard_normal((20, d)),  # density ~ exp(-hundreds): underflows
            offset + 1e4 * rng.standard_normal((10, d)),  # log-density ~ -1e8
            codes[:5],  # exactly on a code (squared distance 0, clamp path)
        ]
    )
    return codes, near, far


def _scipy_logpdf(codes: np.ndarray, queries: np.ndarray, bw_method=None) -> np.ndarray:
    import scipy.stats

    return scipy.stats.gaussian_kde(codes.T, bw_method=bw_method).logpdf(queries.T)


@pytest.mark.parametrize("d", [4, 16])
def test_matches_scipy_near_and_far(d):
    codes, near, far = _codes_and_queries(500, d, seed=d)
    density = KernelDensity.fit(codes)
    for queries in (near, far):
        expected = _scipy_logpdf(codes, queries)
        got = density.log_density(queries)
        assert got.dtype == np.float64 and got.shape == (len(queries),)
        assert np.all(np.isfinite(got))
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    # the far queries really are where linear-space density underflows
    assert np.exp(_scipy_logpdf(codes, far[:30])).min() == 0.0


def test_fit_keeps_scipy_covariance_and_factor():
    import scipy.stats

    codes, near, _ = _codes_and_queries(300, 5, seed=3)
    for bandwidth, bw_method in (("scott", "scott"), ("silverman", "silverman"), ("0.3", 0.3), (0.7, 0.7)):
        density = KernelDensity.fit(codes, bandwidth=bandwidth)
        kde = scipy.stats.gaussian_kde(codes.T, bw_method=bw_method)
        assert density.factor == kde.factor
        np.testing.assert_array_equal(density.covariance, kde.covariance)
        np.testing.assert_allclose(density.log_density(near), kde.logpdf(near.T), rtol=1e-9, atol=0)
    assert density.n_codes == 300 and density.dim == 5


def test_code_tiling_matches_scipy(monkeypatch):
    # many code tiles (and a ragged last one) summed per query, near and far queries alike
    monkeypatch.setattr(density_module, "CODE_TILE", 37)
    codes, near, far = _codes_and_queries(500, 4, seed=7)
    queries = np.concatenate([near[:40], far])
    got = KernelDensity.fit(codes).log_density(queries, chunk_size=10)
    np.testing.assert_allclose(got, _scipy_logpdf(codes, queries), rtol=1e-9, atol=0)


def test_thread_count_does_not_change_the_numbers():
    # query blocks are shared out over torch's threads, each block on one thread
    import torch

    codes, near, far = _codes_and_queries(3000, 8, seed=19)
    queries = np.concatenate([near, far, near, far])
    assert len(queries) > 4 * density_module.QUERY_TILE  # several blocks per thread
    density = KernelDensity.fit(codes)
    threads = torch.get_num_threads()
    by_threads = {}
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            by_threads[count] = density.log_density(queries)
            assert torch.get_num_threads() == count  # restored after the call
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_allclose(by_threads[1], _scipy_logpdf(codes, queries), rtol=1e-9, atol=0)
    np.testing.assert_array_equal(by_threads[2], by_threads[1])
    np.testing.assert_array_equal(by_threads[3], by_threads[1])


def test_chunk_size_invariance():
    codes, near, far = _codes_and_queries(500, 16, seed=11)
    queries = np.concatenate([near, far])
    density = KernelDensity.fit(codes)
    small = density.log_density(queries, chunk_size=7)
    large = density.log_density(queries, chunk_size=4096)
    np.testing.assert_allclose(small, large, rtol=1e-12, atol=0)


def test_same_batch_shape_gives_bitwise_identical_results():
    codes, near, far = _codes_and_queries(500, 16, seed=5)
    density = KernelDensity.fit(codes)
    pool = np.concatenate([near, far])
    batch = 64
    rng = np.random.default_rng(0)
    for index in (0, 3, len(near) + 2, len(near) + 25, len(pool) - 1):  # near, far, on a code
        query = pool[index]
        padded = np.zeros((batch, density.dim))
        padded[0] = query
        alone = density.log_density(padded, chunk_size=16)[0]
        for position in (0, 17, batch - 1):
            mixed = pool[rng.choice(len(pool), size=batch, replace=False)]
            mixed[position] = query
            value = density.log_density(mixed, chunk_size=16)[position]
            assert value.tobytes() == alone.tobytes(), (index, position)


def test_torch_and_float32_inputs():
    import torch

    codes, near, _ = _codes_and_queries(200, 4, seed=2)
    density = KernelDensity.fit(codes)
    expected = density.log_density(near)
    np.testing.assert_array_equal(density.log_density(torch.from_numpy(near)), expected)
    as32 = near.astype(np.float32)
    np.testing.assert_array_equal(
        density.log_density(torch.from_numpy(as32)), density.log_density(as32.astype(np.float64))
    )
    assert density.log_density(np.empty((0, 4))).shape == (0,)


def test_works_under_inference_mode_and_with_grad_tensors():
    import torch

    codes, near, far = _codes_and_queries(500, 4, seed=23)
    queries = torch.from_numpy(np.concatenate([near, far])).requires_grad_(True)
    expected = _scipy_logpdf(codes, queries.detach().numpy())
    with torch.inference_mode():  # the scorer's setting; the cache is built here first
        density = KernelDensity.fit(codes)
        inside = density.log_density(queries)
    np.testing.assert_allclose(inside, expected, rtol=1e-9, atol=0)
    np.testing.assert_array_equal(density.log_density(queries), inside)
    with torch.no_grad():
        np.testing.assert_array_equal(density.log_density(queries), inside)


def test_bad_queries_rejected():
    codes, near, _ = _codes_and_queries(200, 4, seed=2)
    density = KernelDensity.fit(codes)
    with pytest.raises(ValueError, match="shape"):
        density.log_density(near[:, :3])
    with pytest.raises(ValueError, match="shape"):
        density.log_density(near[0])
    bad = near.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        density.log_density(bad)
    with pytest.raises(ValueError, match="chunk_size"):
        density.log_density(near, chunk_size=0)


def test_save_load_round_trip(tmp_path):
    codes, near, far = _codes_and_queries(500, 16, seed=13)
    queries = np.concatenate([near, far])
    density = KernelDensity.fit(codes, bandwidth="silverman")
    path = tmp_path / "density.npz"
    density.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["density.npz"]  # no temp file left
    loaded = KernelDensity.load(path)
    assert (loaded.n_codes, loaded.dim, loaded.bandwidth, loaded.factor) == (
        500,
        16,
        "silverman",
        density.factor,
    )
    np.testing.assert_array_equal(loaded.codes, density.codes)
    np.testing.assert_array_equal(loaded.covariance, density.covariance)
    np.testing.assert_array_equal(loaded.log_density(queries), density.log_density(queries))
    again = KernelDensity.from_state_dict(density.state_dict())
    np.testing.assert_array_equal(again.log_density(queries), density.log_density(queries))
    # saving over an existing file replaces it
    KernelDensity.fit(codes[:100]).save(path)
    assert KernelDensity.load(path).n_codes == 100


def test_sqrt_radius_keeps_direction_and_square_roots_length():
    import torch

    from aadetect.density import map_radius

    codes = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-0.09, 0.12], [1e-200, 0.0], [0.0, -1e200]], dtype=torch.float64)
    mapped = map_radius(codes, "sqrt").numpy()
    np.testing.assert_allclose(np.abs(mapped).max(axis=1), [0.8 * 5 ** 0.5, 0.0, 0.8 * 0.15 ** 0.5, 1e-100, 1e100],
                               rtol=1e-12)
    np.testing.assert_allclose(mapped[0] / np.linalg.norm(mapped[0]), [0.6, 0.8], rtol=1e-12)
    np.testing.assert_allclose(mapped[2] / np.linalg.norm(mapped[2]), [-0.6, 0.8], rtol=1e-12)
    assert np.all(np.isfinite(mapped)) and not mapped[1].any()  # a zero code stays zero
    assert mapped[4, 1] < 0 and mapped[3, 0] > 0
    assert map_radius(codes, "linear") is codes
    with pytest.raises(ValueError, match="radius"):
        map_radius(codes, "log")


def test_sqrt_radius_density_is_scipy_on_the_mapped_codes(tmp_path):
    codes, near, far = _codes_and_queries(400, 6, seed=21)
    density = KernelDensity.fit(codes, radius="sqrt")
    assert density.radius == "sqrt"
    mapped = lambda values: values / np.sqrt(np.linalg.norm(values, axis=1, keepdims=True))
    queries = np.concatenate([near, far[:30]])
    expected = _scipy_logpdf(mapped(codes), mapped(queries))
    np.testing.assert_allclose(density.log_density(queries), expected, rtol=1e-9, atol=0)
    # it is not the plain estimator: the mapping changes the numbers
    assert np.abs(KernelDensity.fit(codes).log_density(near) - expected[:len(near)]).max() > 0.1
    density.save(tmp_path / "density.npz")
    loaded = KernelDensity.load(tmp_path / "density.npz")
    assert loaded.radius == "sqrt"
    np.testing.assert_array_equal(loaded.log_density(queries), density.log_density(queries))


def test_a_density_file_without_its_radius_is_refused(tmp_path):
    codes, _, _ = _codes_and_queries(200, 3, seed=2)
    state = KernelDensity.fit(codes, radius="sqrt").state_dict()
    del state["radius"]  # one format: no key is optional
    np.savez(tmp_path / "partial.npz", **state)
    with pytest.raises(ValueError, match="missing radius"):
        KernelDensity.load(tmp_path / "partial.npz")


def _write_state(path: Path, **overrides) -> Path:
    codes, _, _ = _codes_and_queries(50, 3, seed=1)
    state = KernelDensity.fit(codes).state_dict()
    state.update(overrides)
    state = {key: value for key, value in state.items() if value is not None}
    np.savez(path, **state)
    return path


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"codes": np.full((50, 3), np.nan)}, "NaN"),
        ({"covariance": np.eye(2)}, "shape"),
        ({"covariance": np.diag([1.0, np.inf, 1.0])}, "NaN or infinite"),
        ({"covariance": np.eye(4)}, "shape"),
        ({"codes": np.zeros(50)}, "shape"),
        ({"codes": np.zeros((2, 3))}, "at least 4"),
        ({"covariance": np.zeros((3, 3))}, "singular"),
        ({"factor": np.array(np.nan)}, "factor"),
        ({"factor": np.array([0.5, 0.5])}, "factor"),
        ({"covariance": None}, "missing covariance"),
        ({"radius": np.array("log")}, "radius must be one of sqrt, linear"),
        ({"radius": np.array(["sqrt", "sqrt"])}, "radius"),
        ({"radius": np.array(b"log")}, "got 'log'"),
    ],
)
def test_load_rejects_invalid_files(tmp_path, overrides, reason):
    path = _write_state(tmp_path / "bad.npz", **overrides)
    with pytest.raises(ValueError, match=reason):
        KernelDensity.load(path)


def test_load_rejects_non_density_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not an npz archive")
    with pytest.raises(ValueError, match="not a valid density file"):
        KernelDensity.load(garbage)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, codes=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError):
        KernelDensity.load(pickled)
    plain = tmp_path / "plain.npy"
    np.save(plain, np.zeros((5, 2)))
    with pytest.raises(ValueError, match="npz"):
        KernelDensity.load(plain)
    with pytest.raises(FileNotFoundError):
        KernelDensity.load(tmp_path / "missing.npz")


def test_fit_rejects_too_few_codes_and_singular_covariance():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="fewer latent dimensions or more images"):
        KernelDensity.fit(rng.standard_normal((16, 16)))
    with pytest.raises(ValueError, match="fewer latent dimensions or more images"):
        KernelDensity.fit(rng.standard_normal((3, 8)))
    codes = rng.standard_normal((100, 4))
    codes[:, 3] = 2.0 * codes[:, 0]  # rank 3
    with pytest.raises(ValueError, match="singular"):
        KernelDensity.fit(codes)
    codes[:, 3] = 1.0  # a constant latent dimension
    with pytest.raises(ValueError, match="singular"):
        KernelDensity.fit(codes)
    with pytest.raises(ValueError, match="NaN"):
        KernelDensity.fit(np.full((10, 2), np.nan))
    for bandwidth in ("wide", -1.0, 0, "nan", True):
        with pytest.raises(ValueError, match="bandwidth"):
            KernelDensity.fit(rng.standard_normal((100, 2)), bandwidth=bandwidth)


def test_import_does_not_load_scipy():
    """Scoring evaluates the density with torch alone: scipy only fits it."""
    code = (
        "import sys, aadetect.density\n"
        "heavy = sorted(m for m in ('scipy',) if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"importing aadetect.density loaded {result.stdout.strip()}"


@pytest.mark.parametrize("radius", ["linear", "sqrt"])
def test_cuda_matches_cpu(radius):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    codes, near, far = _codes_and_queries(500, 16, seed=17)
    queries = np.concatenate([near, far])
    density = KernelDensity.fit(codes, radius=radius)
    np.testing.assert_allclose(
        density.log_density(queries, device="cuda"), density.log_density(queries), rtol=1e-12, atol=1e-12
    )  # atol: a log-density near 0 (-0.013 with sqrt radius on an H100) differs by 2e-14, 2e-12 relative
