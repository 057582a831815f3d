"""Finding and decoding images: one code path for training, scoring and evaluation.

Pillow (torchvision's own image backend) decodes every format the tool accepts,
including BMP and TIFF, which torchvision.io cannot read; it also applies EXIF
rotation and guards against decompression bombs.

torch is imported only where images become tensors (`iterate_batches`, `load_images`, `ImagesOnDisk`), so
that finding and decoding images works without it (`aadetect.onnx_engine`).
"""

from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from numpy.lib import format as npy
from PIL import Image, ImageOps, UnidentifiedImageError

from aadetect.config import LOCAL_IMAGE_SIZE
from aadetect.errors import UserError, first_line

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy", ".npz")
MAX_PIXELS = 64_000_000  # larger images are refused as likely decompression bombs
NPZ_LIMIT = 1 << 30  # bytes an .npz array may decompress to (a .npy is memory-mapped, so it has no limit)
GRAYSCALE_MODES = {"1", "L", "LA", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class ImageRef:
    """Where one image comes from: a file, or one entry of a .npy/.npz array.

    `shown` is the path as the user spelled it (`./incoming/a.png`, which `Path` would shorten to
    `incoming/a.png`), so that output rows can be joined back to the list a pipeline fed in.
    """

    path: Path
    index: int | None = None
    shown: str | None = field(default=None, compare=False)

    @property
    def name(self) -> str:
        base = str(self.path) if self.shown is None else self.shown
        return base if self.index is None else f"{base}[{self.index}]"


def checked_refs(refs) -> list[ImageRef]:
    """`refs` as a list, or a plain error for a folder name or paths where ImageRefs belong (`score_images`
    would otherwise fail deep inside with an AttributeError)."""
    if isinstance(refs, (str, os.PathLike)):
        got = type(refs).__name__
    else:
        refs = list(refs)
        stray = next((ref for ref in refs if not isinstance(ref, ImageRef)), None)
        if stray is None:
            return refs
        got = f"a {type(stray).__name__} among them"
    raise UserError(f"score_images takes ImageRefs, as find_images(path) returns; got {got}")


def find_images(path: str | os.PathLike) -> list[ImageRef]:
    """All images under a folder (recursively, sorted), in an array file, or the one image file."""
    given = os.fspath(path)
    path = Path(given)
    if not path.exists():
        raise UserError(f"{given}: no such file or folder")
    if path.is_dir():
        refs = [ImageRef(Path(found), shown=found) for found in _walk_images(given)]
        if not refs:
            raise UserError(f"{given}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})")
        return refs
    _check_regular(path, given)
    suffix = path.suffix.lower()
    if suffix in ARRAY_SUFFIXES:
        return [ImageRef(path, i, shown=given) for i in range(len(_read_array(path, given)))]
    if suffix in IMAGE_SUFFIXES:
        return [ImageRef(path, shown=given)]
    raise UserError(f"{given}: unsupported format {suffix or '(no suffix)'!r} "
                    f"(supported: {', '.join(IMAGE_SUFFIXES + ARRAY_SUFFIXES)})")


def _check_regular(path: Path, shown: str) -> os.stat_result:
    """Only regular files (or links to them) are read: a FIFO would hang the reader, a device never end."""
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError(f"{shown}: no such file") from None
    except OSError as exc:
        raise UserError(f"{shown}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{shown}: is a folder, not an image")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{shown}: not a regular file (a device, FIFO or socket)")
    return info


def _walk_images(root: str) -> list[str]:
    """Recursive search that follows symlinked folders but never loops; paths begin as `root` is
    spelled. Hidden files and folders (macOS's `._x.png` resource forks, `.ipynb_checkpoints`
    copies) are not the user's images."""
    found: list[str] = []
    seen: set[tuple[int, int]] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        stat = os.stat(folder)
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders.clear()
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        found.extend(os.path.join(folder, f) for f in files
                     if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
    return sorted(found, key=Path)  # the order of the paths' parts, whatever the spelling


_ARRAY_CACHE: dict[Path, tuple[tuple, np.ndarray]] = {}  # path -> (its file's stamp, the checked array)
ARRAY_CACHE_FILES = 2  # entries of one file are decoded one by one; a notebook reading many files keeps only these


def _read_array(path: Path, shown: str | None = None) -> np.ndarray:
    """Load and check a (N,H,W) or (N,H,W,C) image array once per version of the file: one rewritten
    since (in a notebook, say) is read afresh, never served from the old copy. Errors name the
    file as `shown`."""
    name = str(path) if shown is None else shown
    try:
        info = path.stat()
    except OSError as exc:
        raise UserError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{name}: not a regular file (a device, FIFO or socket)")
    stamp = (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
    cached = _ARRAY_CACHE.pop(path, None)
    if cached is not None and cached[0] == stamp:
        _ARRAY_CACHE[path] = cached  # now the most recently used
        return cached[1]
    try:
        loaded = np.load(path, allow_pickle=False, mmap_mode="r" if path.suffix.lower() == ".npy" else None)
    except Exception as exc:  # numpy raises many types for bad files
        raise UserError(f"{name}: not a readable numpy file ({first_line(exc)})") from None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("images", "x", "X", "arr_0") if k in keys), keys[0] if len(keys) == 1 else None)
            if not keys:
                raise UserError(f"{name}: holds no arrays")
            if key is None:
                raise UserError(f"{name}: holds several arrays {keys}; name the images array 'images'")
            declared = _declared_shape(loaded, key)
            if declared is not None:  # before decompressing: a few MB may declare gigapixels
                shape, dtype = declared
                _check_shape(name, shape)
                size = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if size > NPZ_LIMIT:
                    raise UserError(f"{name}: array {key!r} would take {size / 2**30:,.1f} GiB decompressed (over "
                                    f"{NPZ_LIMIT / 2**30:.0f}); save it as .npy, which is read as it is used")
            try:
                array = loaded[key]
            except Exception as exc:
                raise UserError(f"{name}: cannot read array {key!r} ({first_line(exc)})") from None
    else:
        array = loaded
    _check_shape(name, array.shape)  # a .npy is memory-mapped: no pixel has been read yet
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == np.bool_):
        raise UserError(f"{name}: unsupported dtype {array.dtype} (use uint8, or floats in [0, 1])")
    problem = out_of_range(array)
    if problem:
        raise UserError(f"{name}: {problem}")
    _ARRAY_CACHE[path] = (stamp, array)
    while len(_ARRAY_CACHE) > ARRAY_CACHE_FILES:
        del _ARRAY_CACHE[next(iter(_ARRAY_CACHE))]  # the least recently used
    return array


def _check_shape(name: str, shape: tuple) -> None:
    if len(shape) == 4 and shape[-1] not in (1, 3, 4):
        raise UserError(f"{name}: expected images shaped (N,H,W) or (N,H,W,C) with C in 1, 3, 4; got {shape}")
    if len(shape) not in (3, 4) or min(shape[1:3]) < 1:
        raise UserError(f"{name}: expected images shaped (N,H,W) or (N,H,W,C); got {shape}")
    if shape[0] == 0:
        raise UserError(f"{name}: holds no images (shape {shape})")
    if shape[1] * shape[2] > MAX_PIXELS:  # the limit image files have
        raise UserError(f"{name}: images too large ({shape[2]}x{shape[1]}, over {MAX_PIXELS:,} pixels)")


def _declared_shape(archive, key: str) -> tuple[tuple, np.dtype] | None:
    """The shape and type an .npz entry's header declares, read without decompressing its data; None where
    the header cannot be read this way (numpy then reports the problem when it loads the entry)."""
    try:
        with archive.zip.open(f"{key}.npy") as member:
            version = npy.read_magic(member)
            if version not in ((1, 0), (2, 0)):
                return None
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape, _, dtype = read_header(member)
            return tuple(shape), dtype
    except Exception:  # a damaged archive: let the load below name the problem
        return None


def native_order(values: np.ndarray) -> np.ndarray:
    """Big-endian pixels (16-bit TIFFs, some .npy files) in this machine's byte order, so that the
    type rules below see a uint16 as a uint16."""
    return values if values.dtype.isnative else values.astype(values.dtype.newbyteorder("="))


def out_of_range(values: np.ndarray) -> str | None:
    """Why these pixel values cannot be read by `to_uint8`'s fixed rule, if they cannot."""
    values = native_order(values)
    if values.dtype in (np.uint8, np.uint16, np.bool_) or values.size == 0:
        return None
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():  # NaN passes every comparison
        return "contains NaN or infinite values"
    low, high = float(values.min()), float(values.max())
    if np.issubdtype(values.dtype, np.floating) and (low < 0.0 or high > 1.0):
        return f"float pixels must lie in [0, 1], these span {low:.9g} to {high:.9g}"  # 1.0000001 is out
    if np.issubdtype(values.dtype, np.integer) and (low < 0 or high > 255):
        return (f"{values.dtype} pixels must lie in 0-255 (or be uint16 for 16-bit images), "
                f"these span {low:.0f} to {high:.0f}")
    return None


def to_uint8(values: np.ndarray) -> np.ndarray:
    """uint8 pixels by a fixed rule per type: uint8 as they are, uint16 / 257, floats x 255 (from
    [0, 1]), other integers as they are (0-255), bool 0 or 255.

    Never by an image's own brightest pixel: the same scene must decode alike in training and
    scoring, whatever else is in the picture. `out_of_range` says which values do not fit.
    """
    values = native_order(values)
    if values.dtype == np.uint8:
        return values
    scale = {np.dtype(np.uint16): 1 / 257, np.dtype(np.bool_): 255.0}.get(
        values.dtype, 255.0 if np.issubdtype(values.dtype, np.floating) else 1.0)
    return np.clip(np.rint(np.asarray(values, dtype=np.float64) * scale), 0, 255).astype(np.uint8)


def image_mode(ref: ImageRef) -> tuple[int, int, int]:
    """(width, height, channels) read from the header alone, without decoding pixels."""
    if ref.index is not None:
        array = _read_array(ref.path, ref.shown)
        channels = 1 if array.ndim == 3 or array.shape[-1] == 1 else 3
        return array.shape[2], array.shape[1], channels
    with _open(ref) as image:
        return image.width, image.height, 1 if image.mode in GRAYSCALE_MODES else 3


def decode(ref: ImageRef, size: int, channels: int) -> np.ndarray:
    """Pixels as uint8 (channels, size, size): the model's input, identical for train and score."""
    return decode_sized(ref, size, channels)[0]


def decode_sized(ref: ImageRef, size: int, channels: int) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode`, with the image's own (width, height): where a map's peak lies in the original."""
    return _decoded(ref, lambda image: (_finish(image, size, channels), image.size))


def original_image(ref: ImageRef):
    """The image at its own size and orientation, in RGB or L, for drawing its heatmap on; the same checks as
    `decode`."""
    return _decoded(ref, lambda image: _finish(image, 0, 3 if image.mode not in GRAYSCALE_MODES else 1,
                                               as_image=True))


def _decoded(ref: ImageRef, finish):
    if ref.index is not None:
        array = _read_array(ref.path, ref.shown)
        if ref.index >= len(array):
            raise UserError(f"{ref.name}: no such image (the array now holds {len(array)})")
        pixels = to_uint8(np.asarray(array[ref.index]))
        if pixels.ndim == 3 and pixels.shape[-1] == 1:
            pixels = pixels[..., 0]
        image = Image.fromarray(np.ascontiguousarray(pixels[..., :3]) if pixels.ndim == 3 else pixels)
        return finish(image)
    try:
        with _open(ref) as image:
            image.load()
            return finish(_upright(image))
    except UserError:
        raise
    except Exception as exc:  # Pillow raises many types on corrupt data
        raise UserError(f"{ref.name}: cannot decode image ({first_line(exc)})") from None


def _open(ref: ImageRef):
    path = ref.path
    size = _check_regular(path, ref.name).st_size
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except FileNotFoundError:
        raise UserError(f"{ref.name}: no such file") from None
    except PermissionError:
        raise UserError(f"{ref.name}: permission denied") from None
    except IsADirectoryError:
        raise UserError(f"{ref.name}: is a folder, not an image") from None
    except UnidentifiedImageError:
        if size == 0:
            raise UserError(f"{ref.name}: empty file") from None
        raise UserError(f"{ref.name}: not a recognised image (corrupt, or not an image at all)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{ref.name}: image too large (over {MAX_PIXELS:,} pixels)") from None
    except Exception as exc:
        raise UserError(f"{ref.name}: cannot open image ({first_line(exc)})") from None
    if image.width * image.height > MAX_PIXELS:
        image.close()
        raise UserError(f"{ref.name}: image too large ({image.width}x{image.height}, over {MAX_PIXELS:,} pixels)")
    frames = _frame_count(image)
    if frames > 1:  # judging the first page alone would miss a defect on any other
        image.close()
        raise UserError(f"{ref.name}: holds {frames} pages or frames; save each as an image of its own")
    return image


def _frame_count(image) -> int:
    """Pages of a TIFF, frames of an animated PNG; 1 for a camera's MPO JPEG, whose extra frames are
    previews of the first. A damaged page table counts as 1 here and fails in decoding."""
    if image.format == "MPO":
        return 1
    try:
        return int(getattr(image, "n_frames", 1))
    except Exception:  # Pillow raises many types on corrupt data
        return 1


def _upright(image):
    """Apply the EXIF orientation in place: most images have none, and a copy of each costs time."""
    ImageOps.exif_transpose(image, in_place=True)
    return image


def _finish(image, size: int, channels: int, *, as_image: bool = False):
    """Convert to L or RGB (16-bit scaled, alpha dropped), resize (size 0: keep its own), and lay out as
    (C, H, W); or, `as_image`, give the Pillow image."""
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image)
        if image.mode == "I" and image.format == "PNG":  # Pillow before 11 opens 16-bit PNGs as 32-bit "I"
            values = values.clip(0, 65535).astype(np.uint16)
        problem = out_of_range(values)
        if problem:
            raise ValueError(problem)
        image = Image.fromarray(to_uint8(values))
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:  # converting to its own mode would only copy
        image = image.convert(mode)
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    if as_image:
        return image.copy() if image.mode == mode else image  # the caller outlives the opened file
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels[None] if channels == 1 else np.ascontiguousarray(pixels.transpose(2, 0, 1))


def choose_image_size(shapes: list[tuple[int, int, int]]) -> int:
    """Default model size: small images keep their own size (down to a multiple of 4; resampling
    them up blurred strokes and cost accuracy on MNIST), mid-sized ones are brought to 64 px, and
    large ones to 128 px, where a crack a pixel or two wide in a 300 px photo still shows."""
    sides = sorted(max(w, h) for w, h, _ in shapes)
    median = sides[len(sides) // 2]
    return max(8, median // 4 * 4) if median <= 32 else 64 if median < LOCAL_IMAGE_SIZE else LOCAL_IMAGE_SIZE


@dataclass(frozen=True)
class Unreadable:
    """A path given by the user that yielded no images, and why."""

    name: str
    message: str


def expand(paths: Iterable[str | os.PathLike]) -> Iterator[ImageRef | Unreadable]:
    """Each path's images in order; an unusable path yields why instead of stopping the rest."""
    for path in paths:
        try:
            yield from find_images(path)
        except UserError as error:
            yield Unreadable(str(path), str(error))


@dataclass
class Batch:
    """Decoded images of one batch, with the positions (into the ref list) of those that failed."""

    indices: list[int]
    pixels: "torch.Tensor | None"  # uint8 (B, C, S, S)
    errors: list[tuple[int, str]]
    sizes: list[tuple[int, int]]  # each decoded image's own (width, height)

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True), so GPU copies can be asynchronous."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


class DecodedImages:
    """Map-style dataset for torch's DataLoader: decode in worker processes, report errors as data."""

    def __init__(self, refs: list[ImageRef], size: int, channels: int):
        self.refs, self.size, self.channels = refs, size, channels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, tuple[np.ndarray, tuple[int, int]] | None, str | None]:
        try:
            return index, decode_sized(self.refs[index], self.size, self.channels), None
        except UserError as error:
            return index, None, str(error)


def _collate(items: list[tuple[int, tuple[np.ndarray, tuple[int, int]] | None, str | None]]) -> Batch:
    import torch

    good = [(i, decoded) for i, decoded, _ in items if decoded is not None]
    pixels = torch.from_numpy(np.stack([decoded[0] for _, decoded in good])) if good else None
    return Batch([i for i, _ in good], pixels, [(i, e) for i, _, e in items if e is not None],
                 [decoded[1] for _, decoded in good])


def iterate_batches(refs: list[ImageRef], size: int, channels: int, batch_size: int,
                    workers: int | None = None, pin_memory: bool = False) -> Iterator[Batch]:
    """Decode in order, in batches; worker processes only when there is enough work to pay for them.

    With nothing else running (decoding the training set), two workers; callers whose own work
    needs the cores too pass `workers` (see `scoring.decoding_workers`).
    """
    from torch.utils.data import DataLoader

    if workers is None:
        workers = 0 if len(refs) < 4 * batch_size else min(2, os.cpu_count() or 1)
    yield from DataLoader(DecodedImages(refs, size, channels), batch_size=batch_size, shuffle=False,
                          num_workers=workers, collate_fn=_collate, pin_memory=pin_memory)


def load_images(refs: list[ImageRef], size: int, channels: int, *, strict: bool = False,
                on_batch=None, keep: bool = True) -> tuple[torch.Tensor, list[ImageRef], list[str]]:
    """Decode every image once into one uint8 tensor; unreadable ones are skipped (or fatal if strict).

    With keep=False the pixels are checked and dropped (for data read from disk later).
    """
    import torch

    parts, kept, errors = [], [], []
    for batch in iterate_batches(refs, size, channels, batch_size=256):
        if strict and batch.errors:
            raise UserError(batch.errors[0][1] + " (--strict)")
        errors.extend(message for _, message in batch.errors)
        if batch.pixels is not None:
            if keep:
                parts.append(batch.pixels)
            kept.extend(refs[i] for i in batch.indices)
        if on_batch is not None:
            on_batch(len(batch.indices) + len(batch.errors))
    pixels = torch.cat(parts) if parts else torch.empty(0, channels, size, size, dtype=torch.uint8)
    return pixels, kept, errors


class ImagesOnDisk:
    """uint8 images decoded when used: the fallback for training sets too large to hold in memory.

    Indexing with a slice or index tensor gives another lazy view; `materialize` decodes it.
    """

    def __init__(self, refs: list[ImageRef], size: int, channels: int):
        self.refs, self.size, self.channels = refs, size, channels

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key) -> ImagesOnDisk:
        picked = self.refs[key] if isinstance(key, slice) else [self.refs[int(i)] for i in key]
        return ImagesOnDisk(picked, self.size, self.channels)

    def pin_memory(self) -> ImagesOnDisk:
        return self

    def materialize(self) -> torch.Tensor:
        import torch

        return torch.from_numpy(np.stack([decode(ref, self.size, self.channels) for ref in self.refs]))


def materialize(pixels) -> torch.Tensor:
    """A uint8 tensor, whether the images are held in memory or read from disk."""
    return pixels.materialize() if isinstance(pixels, ImagesOnDisk) else pixels
