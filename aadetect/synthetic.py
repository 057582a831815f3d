"""Procedural microscope-like blood-cell images for the offline demo.

Every image shows one roughly round, pink/purple-stained cell on a light,
slightly vignetted background, in the spirit of thin-smear malaria cell crops.
*Good* cells vary in size, shape, position, stain colour, brightness and inner
texture.  *Anomalous* cells are drawn the same way and then get small local
defects inside the cell: mostly one to three dark ring-shaped parasites (ring
trophozoites, often with a chromatin dot), sometimes a dark irregular blob, a
crescent-shaped gametocyte or a cluster of dark dots.

Only numpy is needed to draw; Pillow is imported lazily to write PNGs.

Determinism: image ``i`` of ``draw_cells(..., seed=s)`` depends only on
``(s, i)`` (and ``size``/``anomalous``), so a longer run starts with the same
images as a shorter one.  The base cell and the defects come from separate
random streams, so ``draw_cells(n, anomalous=True, seed=s)`` shows the very same
cells as ``draw_cells(n, anomalous=False, seed=s)`` with defects added: the
two differ only where a defect was drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["draw_cells", "write_demo_dataset"]

# Stream tags mixed into the per-image seed sequence.
_BASE_STREAM = 0
_DEFECT_STREAM = 1

# Split tags used to derive independent seeds for write_demo_dataset.
_SPLITS = (
    ("train", False, 0),
    ("calibrate_good", False, 1),
    ("calibrate_anomalous", True, 2),
    ("test_good", False, 3),
    ("test_anomalous", True, 4),
)

MASK_CHANGE = 0.05  # of the 0-1 range: a defect's soft edge fainter than this is not part of its mask

# Stain palette (RGB in 0..1): a pinkish and a purplish end, mixed per cell.
_PINK = np.array([0.89, 0.62, 0.70])
_PURPLE = np.array([0.74, 0.55, 0.76])
_BACKGROUND = np.array([0.93, 0.90, 0.91])
# Parasite stain: dark purple / blue-violet.
_PARASITE = np.array([0.30, 0.13, 0.42])
_CHROMATIN = np.array([0.22, 0.05, 0.30])


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index, stream]))


def _smooth_inside(dist: np.ndarray, softness: float) -> np.ndarray:
    """Anti-aliased coverage (0..1) from a signed distance in px (negative inside)."""
    return np.clip(0.5 - dist / softness, 0.0, 1.0)


class _Grid:
    """Pixel-centre coordinates for one image size (shared by all images of a run)."""

    def __init__(self, size: int):
        self.size = size
        self.coords = np.arange(size, dtype=np.float64) + 0.5
        self.y, self.x = np.meshgrid(self.coords, self.coords, indexing="ij")
        c = size / 2.0
        self.r2_centre = ((self.x - c) ** 2 + (self.y - c) ** 2) / (c * c)

    def window(self, cx: float, cy: float, half: float):
        """Slice of the image around (cx, cy) and its pixel-centre coordinates."""
        x0 = max(0, int(np.floor(cx - half)))
        x1 = min(self.size, int(np.ceil(cx + half)) + 1)
        y0 = max(0, int(np.floor(cy - half)))
        y1 = min(self.size, int(np.ceil(cy + half)) + 1)
        sl = (slice(y0, y1), slice(x0, x1))
        return sl, self.x[sl], self.y[sl]


def _draw_base(grid: _Grid, rng: np.random.Generator):
    """Draw a good cell: (float RGB image in 0..1 without noise, cell geometry, pixel noise)."""
    s = grid.size
    x, y = grid.x, grid.y
    coords = grid.coords

    # --- geometry: slightly elliptical, slightly irregular outline ---------------------------
    radius = s * rng.uniform(0.30, 0.42)
    jitter = rng.normal(0.0, 0.045 * s, size=2)
    margin = radius + 0.03 * s
    lo, hi = min(margin, s / 2.0), max(s - margin, s / 2.0)
    cx = float(np.clip(s / 2.0 + jitter[0], lo, hi))
    cy = float(np.clip(s / 2.0 + jitter[1], lo, hi))
    dx, dy = x - cx, y - cy
    rho = np.sqrt(dx * dx + dy * dy)
    # Unit complex direction z = exp(i*theta); Re(c * z**k) = |c| cos(k*theta + arg c).
    z = (dx + 1j * dy) / np.maximum(rho, 1e-6)
    z2 = z * z
    z3 = z2 * z
    ellipticity = rng.uniform(0.0, 0.09) * np.exp(-2j * rng.uniform(0, np.pi))
    harmonics = rng.normal(0.0, 0.010, size=4) * np.exp(1j * rng.uniform(0, 2 * np.pi, size=4))
    wobble = ellipticity * z2 + harmonics[0] * z3 + harmonics[1] * z3 * z
    wobble = wobble + harmonics[2] * z3 * z2 + harmonics[3] * z3 * z3
    boundary = radius * (1.0 + wobble.real)
    dist = rho - boundary  # ~ signed distance to the membrane, px
    coverage = _smooth_inside(dist, rng.uniform(1.0, 1.8))

    # --- background colour: near-uniform light grey-pink -------------------------------------
    bg = (_BACKGROUND + rng.normal(0.0, 0.015, size=3)) * rng.uniform(0.94, 1.04)

    # --- stain colour: pink..purple mix, hue/saturation/brightness jitter ---------------------
    mix = rng.uniform(0.0, 1.0)
    colour = (1.0 - mix) * _PINK + mix * _PURPLE
    colour = colour + rng.normal(0.0, 0.025, size=3)
    grey = colour.mean()
    colour = grey + (colour - grey) * rng.uniform(0.75, 1.3)
    colour = colour * rng.uniform(0.88, 1.05)
    # Keep a visible contrast with the background, as in a real smear.
    colour = colour * min(1.0, 0.85 * bg.mean() / colour.mean())

    # --- inner texture: central pallor, blurred blobs, low-frequency waves (all separable) ---
    n_blobs = int(rng.integers(2, 6))
    ang = rng.uniform(0, 2 * np.pi, size=n_blobs + 1)
    rr = radius * np.sqrt(rng.uniform(0, 0.6, size=n_blobs + 1))
    rr[0] = radius * rng.uniform(0.0, 0.12)  # the pallor sits near the centre
    bx = cx + rr * np.cos(ang)
    by = cy + rr * np.sin(ang)
    sigma = radius * rng.uniform(0.18, 0.40, size=n_blobs + 1)
    amp = rng.normal(0.0, 0.06, size=n_blobs + 1)
    sigma[0] = radius * rng.uniform(0.25, 0.40)
    amp[0] = rng.uniform(0.0, 0.08)
    gx = np.exp(-((coords[None, :] - bx[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    gy = np.exp(-((coords[None, :] - by[:, None]) ** 2) / (2 * sigma[:, None] ** 2))
    shade = 1.0 + np.einsum("k,ki,kj->ij", amp, gy, gx)
    freq = rng.uniform(0.6, 1.6, size=2) * 2 * np.pi / s
    wave_ang = rng.uniform(0, np.pi, size=2)
    phase = np.exp(1j * rng.uniform(0, 2 * np.pi, size=2)) * rng.normal(0.0, 0.025, size=2)
    wx = np.exp(1j * freq[:, None] * np.cos(wave_ang)[:, None] * coords[None, :])
    wy = np.exp(1j * freq[:, None] * np.sin(wave_ang)[:, None] * coords[None, :])
    shade += np.einsum("k,ki,kj->ij", phase, wy, wx).real
    # Darker membrane rim just inside the edge.
    rim_strength = rng.uniform(0.07, 0.17)
    rim_width = rng.uniform(0.9, 1.6)
    shade -= rim_strength * np.exp(-(((dist + 1.4) / rim_width) ** 2))
    np.minimum(shade, 1.08, out=shade)  # a pale centre never reaches the background
    cell_rgb = shade[..., None] * colour

    # --- background: mild vignetting and a faint illumination gradient -------------------------
    vignette = 1.0 - rng.uniform(0.01, 0.04) * grid.r2_centre
    g_ang = rng.uniform(0, 2 * np.pi)
    g_amp = rng.uniform(0.0, 0.03) / s
    vignette += g_amp * ((x - s / 2) * np.cos(g_ang) + (y - s / 2) * np.sin(g_ang))
    bg_rgb = vignette[..., None] * bg

    image = bg_rgb + coverage[..., None] * (cell_rgb - bg_rgb)
    # Uniform noise with standard deviation `noise_sd` (much faster than Gaussian, looks alike).
    noise_sd = rng.uniform(0.008, 0.018)
    noise = (rng.random(image.shape, dtype=np.float32) - 0.5) * np.float32(noise_sd * 12**0.5)
    info = {"cx": cx, "cy": cy, "radius": radius}
    return image, info, noise


def _inside_point(rng: np.random.Generator, info: dict, keep_in: float):
    """A random point at least ~`keep_in` px inside the membrane (the centre if none fits)."""
    # The outline deviates from `radius` by up to ~13 %: stay inside the worst case.
    max_r = max(0.0, info["radius"] * 0.86 - keep_in)
    ang = rng.uniform(0, 2 * np.pi)
    r = max_r * np.sqrt(rng.uniform(0.0, 1.0))
    return info["cx"] + r * np.cos(ang), info["cy"] + r * np.sin(ang)


def _paint(image: np.ndarray, sl, alpha: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend `colour` into the window `sl` of `image`."""
    patch = image[sl]
    patch += alpha[..., None] * (colour - patch)


def _draw_dot(image, grid, qx, qy, dot_r, strength, colour) -> None:
    sl, X, Y = grid.window(qx, qy, dot_r + 2.0)
    dot = _smooth_inside(np.sqrt((X - qx) ** 2 + (Y - qy) ** 2) - dot_r, 0.9)
    _paint(image, sl, strength * dot, colour)


def _draw_ring(image, grid, rng, px, py, ring_r) -> None:
    """Ring trophozoite: thin dark signet ring, usually with a chromatin dot on it."""
    scale = grid.size / 48.0
    thickness = rng.uniform(1.6, 2.4) * scale
    sl, X, Y = grid.window(px, py, ring_r * 1.2 + thickness + 2.0)
    dx, dy = X - px, Y - py
    rho = np.sqrt(dx * dx + dy * dy)
    z = (dx + 1j * dy) / np.maximum(rho, 1e-6)
    squash = 1.0 + (rng.uniform(0.0, 0.15) * np.exp(-2j * rng.uniform(0, np.pi)) * z * z).real
    # Thicker on one side, like a signet ring.
    local_thick = thickness * (1.0 + 0.4 * (np.exp(-1j * rng.uniform(0, 2 * np.pi)) * z).real)
    alpha = _smooth_inside(np.abs(rho - ring_r * squash) - local_thick / 2, 0.9)
    _paint(image, sl, rng.uniform(0.75, 0.95) * alpha, _PARASITE * rng.uniform(0.85, 1.2))
    if rng.uniform() < 0.85:
        cang = rng.uniform(0, 2 * np.pi)
        qx, qy = px + ring_r * np.cos(cang), py + ring_r * np.sin(cang)
        _draw_dot(image, grid, qx, qy, rng.uniform(1.0, 1.6) * scale, rng.uniform(0.8, 0.95), _CHROMATIN)


def _draw_rings(image, grid, rng, info) -> None:
    """One to three ring trophozoites, placed so that they do not overlap."""
    s = grid.size
    placed: list[tuple[float, float, float]] = []
    for _ in range(int(rng.integers(1, 4))):
        ring_r = s * rng.uniform(0.08, 0.12)
        for _attempt in range(8):
            px, py = _inside_point(rng, info, ring_r + 2.5 * s / 48.0)
            if all(np.hypot(px - qx, py - qy) > ring_r + qr + 2.5 * s / 48.0 for qx, qy, qr in placed):
                break
        else:
            continue  # no room left for another ring
        placed.append((px, py, ring_r))
        _draw_ring(image, grid, rng, px, py, ring_r)


def _draw_blob(image, grid, rng, info) -> None:
    """Dark irregular blob (e.g. a mature trophozoite with pigment grains)."""
    s = grid.size
    blob_r = s * rng.uniform(0.09, 0.13)
    px, py = _inside_point(rng, info, blob_r * 1.3 + 1.0)
    sl, X, Y = grid.window(px, py, blob_r * 1.6 + 2.0)
    dx, dy = X - px, Y - py
    rho = np.sqrt(dx * dx + dy * dy)
    z = (dx + 1j * dy) / np.maximum(rho, 1e-6)
    coef = rng.normal(0.0, 0.09, size=3) * np.exp(1j * rng.uniform(0, 2 * np.pi, size=3))
    coef2 = rng.uniform(0.0, 0.25) * np.exp(1j * rng.uniform(0, 2 * np.pi))
    z2 = z * z
    outline = 1.0 + (coef2 * z2 + coef[0] * z2 * z + coef[1] * z2 * z2 + coef[2] * z2 * z2 * z).real
    alpha = _smooth_inside(rho - blob_r * outline, 1.2)
    _paint(image, sl, rng.uniform(0.7, 0.9) * alpha, _PARASITE * rng.uniform(0.8, 1.1))
    for _ in range(int(rng.integers(1, 4))):  # darker pigment grains inside
        gx = px + rng.normal(0.0, blob_r * 0.35)
        gy = py + rng.normal(0.0, blob_r * 0.35)
        _draw_dot(image, grid, gx, gy, 0.7 * s / 48.0, 0.7, _CHROMATIN * 0.6)


def _draw_crescent(image, grid, rng, info) -> None:
    """Banana-shaped gametocyte: a tapered dark band along a circular arc."""
    s = grid.size
    arc_r = s * rng.uniform(0.14, 0.24)
    half_angle = rng.uniform(0.45, 0.75)  # radians
    width = s * rng.uniform(0.08, 0.11)
    mx, my = _inside_point(rng, info, arc_r * np.sin(half_angle) + width + 1.0)
    orient = rng.uniform(0, 2 * np.pi)
    ax, ay = mx - arc_r * np.cos(orient), my - arc_r * np.sin(orient)
    sl, X, Y = grid.window(mx, my, arc_r * np.sin(half_angle) + width + 2.0)
    dx, dy = X - ax, Y - ay
    rho = np.sqrt(dx * dx + dy * dy)
    dtheta = np.angle((dx + 1j * dy) * np.exp(-1j * orient))
    taper = np.sqrt(np.clip(1.0 - (dtheta / half_angle) ** 2, 0.0, 1.0))
    alpha = _smooth_inside(np.abs(rho - arc_r) - width / 2 * taper, 1.0) * (taper > 0)
    _paint(image, sl, rng.uniform(0.7, 0.9) * alpha, _PARASITE * rng.uniform(0.8, 1.1))
    _draw_dot(image, grid, mx, my, 0.9 * s / 48.0, 0.6, _CHROMATIN * 0.7)  # central pigment


def _draw_dots(image, grid, rng, info) -> None:
    """A small cluster of dark dots (e.g. a segmenting schizont / stippling)."""
    s = grid.size
    spread = s * rng.uniform(0.06, 0.09)
    px, py = _inside_point(rng, info, spread * 2 + 2.0)
    for _ in range(int(rng.integers(6, 11))):
        gx = px + rng.normal(0.0, spread)
        gy = py + rng.normal(0.0, spread)
        dot_r = rng.uniform(1.2, 1.8) * s / 48.0
        _draw_dot(image, grid, gx, gy, dot_r, rng.uniform(0.75, 0.95), _CHROMATIN * rng.uniform(0.9, 1.4))


_OTHER_DEFECTS = (_draw_blob, _draw_crescent, _draw_dots)


def _draw_defects(image, grid, rng, info) -> None:
    if rng.uniform() < 0.7:
        _draw_rings(image, grid, rng, info)
    else:
        _OTHER_DEFECTS[int(rng.integers(len(_OTHER_DEFECTS)))](image, grid, rng, info)


def draw_cells(count: int, *, anomalous: bool, size: int = 48, seed: int = 0) -> np.ndarray:
    """(count, size, size, 3) uint8 RGB images. Same arguments -> byte-identical output.

    Image ``i`` depends only on ``(seed, i, size, anomalous)``; with the same seed,
    the anomalous images are the good images plus local defects.
    """
    return draw_cells_and_masks(count, anomalous=anomalous, size=size, seed=seed)[0]


def draw_cells_and_masks(count: int, *, anomalous: bool, size: int = 48, seed: int = 0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """`draw_cells`' images, and each one's defect mask (count, size, size), bool: the pixels that the
    defects changed by more than MASK_CHANGE in some channel (all False for good images)."""
    count = int(count)
    size = int(size)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=bool)
    grid = _Grid(size)
    for i in range(count):
        image, info, noise = _draw_base(grid, _rng(seed, i, _BASE_STREAM))
        if anomalous:
            base = image.copy()
            _draw_defects(image, grid, _rng(seed, i, _DEFECT_STREAM), info)
            masks[i] = (np.abs(image - base) > MASK_CHANGE).any(axis=-1)
        image += noise
        np.clip(image * 255.0 + 0.5, 0.0, 255.0, out=image)
        out[i] = image.astype(np.uint8)
    return out, masks


def _split_seed(seed: int, tag: int) -> int:
    return int(np.random.SeedSequence([seed, 0x5EED, tag]).generate_state(1)[0])


def _write_pngs(folder: Path, images: np.ndarray) -> None:
    """Images as cell_00000.png...; bool masks as 0/255 grayscale."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("cell_*.png"):  # leftovers of an earlier, larger run
        stale.unlink()
    for i, img in enumerate(images):
        pixels = img.astype(np.uint8) * 255 if img.dtype == bool else img
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"cell_{i:05d}.png", optimize=False)


def write_demo_dataset(
    root: Path,
    *,
    seed: int = 0,
    size: int = 48,
    n_train: int = 600,
    n_calibrate: int = 20,
    n_test: int = 200,
) -> dict[str, Path]:
    """Write PNG folders under root and return their paths keyed:
    'train' (good only, n_train images), 'calibrate_good', 'calibrate_anomalous' (n_calibrate each),
    'test_good', 'test_anomalous' (n_test each). The anomalous splits' defect masks go to
    root/masks/calibrate_anomalous and root/masks/test_anomalous under the same file names (255 where
    a defect changed the cell). Files named like cell_00000.png. Different splits use different seeds
    derived from `seed` so no image repeats across splits.

    Existing ``cell_*.png`` files in those folders are replaced; other files are left alone."""
    root = Path(root)
    counts = {
        "train": n_train,
        "calibrate_good": n_calibrate,
        "calibrate_anomalous": n_calibrate,
        "test_good": n_test,
        "test_anomalous": n_test,
    }
    paths: dict[str, Path] = {}
    for name, anomalous, tag in _SPLITS:
        folder = root / name
        images, masks = draw_cells_and_masks(counts[name], anomalous=anomalous, size=size, seed=_split_seed(seed, tag))
        _write_pngs(folder, images)
        paths[name] = folder
        if anomalous:
            _write_pngs(root / "masks" / name, masks)
    return paths
