"""Decoding real files of every kind the tool accepts, and refusing bad ones with a clear reason."""

from __future__ import annotations

import io
import os
import re

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aadetect.errors import UserError
from aadetect.images import ImageRef, decode, find_images, image_mode


def gradient(mode_size=(20, 12)) -> np.ndarray:
    width, height = mode_size
    return (np.add.outer(np.arange(height) * 10, np.arange(width) * 5) % 256).astype(np.uint8)


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".bmp", ".tif"])
def test_formats_decode_to_the_model_size(tmp_path, suffix):
    path = tmp_path / f"image{suffix}"
    Image.fromarray(np.stack([gradient()] * 3, -1)).save(path)
    pixels = decode(ImageRef(path), 16, 3)
    assert pixels.shape == (3, 16, 16) and pixels.dtype == np.uint8
    assert image_mode(ImageRef(path)) == (20, 12, 3)


def test_sixteen_bit_grayscale_is_scaled(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray((gradient().astype(np.uint16) * 257)).save(path)
    assert image_mode(ImageRef(path))[2] == 1
    eight_bit = tmp_path / "plain.png"
    Image.fromarray(gradient()).save(eight_bit)
    assert np.abs(decode(ImageRef(path), 16, 1).astype(int) - decode(ImageRef(eight_bit), 16, 1)).max() <= 1


def test_deep_pixels_scale_by_type_never_by_the_brightest_pixel(tmp_path):
    """A pixel decodes alike whatever else is in the picture (training and scoring images differ)."""
    dark = np.full((8, 8), 20_000, np.uint16)  # 16-bit: 20,000 / 257 is 78 in 8 bits
    dark[1, 1] = 200
    bright = dark.copy()
    bright[0, 0] = 65535
    for name, pixels in (("dark", dark), ("bright", bright)):
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
        np.save(tmp_path / f"{name}.npy", pixels[None])
        np.save(tmp_path / f"{name}-dim.npy", np.minimum(pixels, 200 if name == "dark" else 300)[None])
    for stem, suffix in (("", ".png"), ("", ".npy"), ("-dim", ".npy")):
        refs = [find_images(tmp_path / f"{name}{stem}{suffix}")[0] for name in ("dark", "bright")]
        dark_pixels, bright_pixels = (decode(ref, 8, 1)[0] for ref in refs)
        assert dark_pixels[1, 1] == bright_pixels[1, 1] == 1, stem + suffix  # 200 / 257
        assert dark_pixels[4, 4] == bright_pixels[4, 4] == (78 if not stem else 1), stem + suffix

    floats = np.full((2, 8, 8), 0.5)
    floats[1, 0, 0] = 1.0
    np.save(tmp_path / "floats.npy", floats)
    np.save(tmp_path / "ints.npy", np.full((1, 8, 8), 128, np.int64))
    assert {decode(ref, 8, 1)[0, 4, 4] for ref in find_images(tmp_path / "floats.npy")} == {128}
    assert decode(find_images(tmp_path / "ints.npy")[0], 8, 1)[0, 4, 4] == 128


@pytest.mark.parametrize("suffix", [".npy", ".npz"])
def test_an_array_file_rewritten_in_the_same_process_is_read_afresh(tmp_path, suffix):
    path = tmp_path / f"images{suffix}"
    save = (lambda a: np.save(path, a)) if suffix == ".npy" else (lambda a: np.savez(path, images=a))
    save(np.zeros((5, 8, 8), np.uint8))
    old_refs = find_images(path)
    assert len(old_refs) == 5 and decode(old_refs[4], 8, 1).max() == 0
    save(np.full((3, 8, 8), 200, np.uint8))
    assert len(find_images(path)) == 3 and decode(find_images(path)[0], 8, 1).max() == 200
    with pytest.raises(UserError, match=r"images\.np.\[4\]: no such image \(the array now holds 3\)"):
        decode(old_refs[4], 8, 1)


def test_reading_many_array_files_keeps_only_the_last_few_in_memory(tmp_path):
    from aadetect import images

    paths = []
    for value in range(5):
        paths.append(tmp_path / f"batch{value}.npz")
        np.savez(paths[-1], images=np.full((3, 8, 8), 40 * value, np.uint8))
    for value, path in [*enumerate(paths), (0, paths[0])]:  # the first again, after it was let go
        assert [int(decode(ref, 8, 1).max()) for ref in find_images(path)] == [40 * value] * 3
        assert len(images._ARRAY_CACHE) <= images.ARRAY_CACHE_FILES
    assert paths[0] in images._ARRAY_CACHE and paths[1] not in images._ARRAY_CACHE


def test_byte_order_and_32_bit_integer_images_follow_the_type_rules(tmp_path):
    """Big-endian 16-bit data is 16-bit data; a 32-bit integer TIFF of 0-255 values is not."""
    deep = (gradient().astype(np.uint16) * 257)
    expected = decode_from(tmp_path, "plain.png", gradient())
    Image.fromarray(deep).save(tmp_path / "little.tif")
    Image.frombytes("I;16B", deep.shape[::-1], deep.astype(">u2").tobytes()).save(tmp_path / "big.tif")
    np.save(tmp_path / "big.npy", deep.astype(">u2")[None])
    Image.fromarray(gradient().astype(np.int32)).save(tmp_path / "int32.tif")
    np.save(tmp_path / "int32.npy", gradient().astype(np.int32)[None])
    for name in ("little.tif", "big.tif", "big.npy", "int32.tif", "int32.npy"):
        got = decode(find_images(tmp_path / name)[0], 16, 1)
        assert np.abs(got.astype(int) - expected).max() <= 1, name


def decode_from(folder: Path, name: str, pixels: np.ndarray) -> np.ndarray:
    Image.fromarray(pixels).save(folder / name)
    return decode(ImageRef(folder / name), 16, 1)


def test_float_image_files_out_of_range_are_refused(tmp_path):
    path = tmp_path / "hdr.tif"
    Image.fromarray(np.full((8, 8), 3.5, np.float32)).save(path)
    with pytest.raises(UserError, match=r"hdr.tif: cannot decode image \(float pixels must lie in \[0, 1\]"):
        decode(ImageRef(path), 8, 1)


def test_float_image_files_with_nan_are_refused(tmp_path):
    """NaN passes every range comparison; it must not be cast to black and scored (or trained on)."""
    pixels = np.full((8, 8), 0.5, np.float32)
    pixels[3, 4] = np.nan
    Image.fromarray(pixels).save(tmp_path / "nan.tif")
    with pytest.raises(UserError, match=r"nan.tif: cannot decode image \(contains NaN or infinite values"):
        decode(ImageRef(tmp_path / "nan.tif"), 8, 1)


def test_palette_rgba_and_cmyk_become_rgb(tmp_path):
    rgb = Image.fromarray(np.stack([gradient(), 255 - gradient(), gradient() // 2], -1))
    expected = decode_saved(tmp_path / "rgb.png", rgb)
    for name, image in [("p.png", rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=256)),
                        ("rgba.png", rgb.convert("RGBA")), ("cmyk.jpg", rgb.convert("CMYK"))]:
        pixels = decode_saved(tmp_path / name, image)
        assert pixels.shape == (3, 16, 16)
        assert np.abs(pixels.astype(int) - expected).mean() < 12, name


def decode_saved(path, image):
    image.save(path)
    return decode(ImageRef(path), 16, 3)


def test_exif_rotation_is_applied(tmp_path):
    array = np.zeros((8, 16), np.uint8)
    array[:, :4] = 255  # bright band on the left of a landscape image
    image = Image.fromarray(array)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif, quality=95)
    pixels = decode(ImageRef(path), 16, 1)[0].astype(int)
    assert pixels[:4].mean() > 200 and pixels[-4:].mean() < 60  # band now on top


def test_grayscale_for_colour_model_and_reverse(tmp_path):
    gray = tmp_path / "gray.png"
    Image.fromarray(gradient()).save(gray)
    as_colour = decode(ImageRef(gray), 16, 3)
    assert (as_colour[0] == as_colour[1]).all() and (as_colour[1] == as_colour[2]).all()
    colour = tmp_path / "colour.png"
    Image.fromarray(np.stack([gradient()] * 3, -1)).save(colour)
    assert decode(ImageRef(colour), 16, 1).shape == (1, 16, 16)


def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gradient((64, 64))] * 3, -1)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.stack([gradient((64, 64))] * 3, -1)).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.png", b"", "empty file"),
    ("text.png", b"hello, I am not an image\n", "not a recognised image"),
    ("truncated.png", png_bytes()[:300], "cannot (open|decode) image"),
    ("truncated.jpg", jpeg_bytes()[:400], "cannot (open|decode) image"),
])
def test_bad_files_give_one_line_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError) as caught:
        decode(ImageRef(path), 16, 3)
    message = str(caught.value)
    assert message.startswith(str(path)) and re.search(reason, message) and "\n" not in message


def test_decompression_bomb_is_refused(tmp_path):
    path = tmp_path / "bomb.png"
    Image.new("1", (9000, 8000)).save(path)  # 72 megapixels, a few kB on disk
    with pytest.raises(UserError, match="too large"):
        decode(ImageRef(path), 16, 1)


def test_unreadable_file(model_dir, tmp_path):
    """A file the user may not read. Root reads everything, so as root (as in CI) the command runs
    without the capabilities that let root bypass file permissions."""
    import shutil
    import subprocess
    import sys

    locked = tmp_path / "locked.png"
    Image.fromarray(gradient()).save(locked)
    locked.chmod(0)
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv to drop the file-permission override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    result = subprocess.run([*prefix, sys.executable, "-m", "aadetect", "score", "--model", str(model_dir),
                             "--format", "jsonl", str(locked)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert f"{locked}: permission denied" in result.stderr and "Traceback" not in result.stderr


def test_folder_search_is_recursive_sorted_and_survives_symlink_loops(tmp_path):
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    (tmp_path / "a").mkdir()
    for path in (tmp_path / "b" / "deeper" / "x.png", tmp_path / "a" / "y.JPG", tmp_path / "z.bmp"):
        Image.fromarray(gradient()).save(path, format="PNG" if path.suffix == ".png" else None)
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "b" / "loop").symlink_to(tmp_path)
    found = [ref.path.relative_to(tmp_path).as_posix() for ref in find_images(tmp_path)]
    assert found == ["a/y.JPG", "b/deeper/x.png", "z.bmp"]


def test_folder_search_skips_hidden_files_and_folders(tmp_path):
    """macOS's AppleDouble `._x.png` files are not images at all; notebook checkpoints are copies."""
    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "a.png", tmp_path / "sub" / "b.png", tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png",
                 tmp_path / ".hidden.png"):
        Image.fromarray(gradient()).save(path)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")
    found = [ref.path.relative_to(tmp_path).as_posix() for ref in find_images(tmp_path)]
    assert found == ["a.png", "sub/b.png"]
    assert [ref.path for ref in find_images(tmp_path / ".hidden.png")] == [tmp_path / ".hidden.png"]  # named: read


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_files_of_several_pages_or_frames_are_refused(tmp_path, suffix):
    """Judged on its first page alone, a stack would pass whatever its other pages show."""
    first, black = Image.fromarray(gradient()), Image.new("L", (20, 12))
    path = tmp_path / f"stack{suffix}"
    first.save(path, save_all=True, append_images=[black, black])
    for read in (lambda ref: decode(ref, 16, 1), image_mode):
        with pytest.raises(UserError, match=rf"stack{suffix}: holds 3 pages or frames; save each as an image"):
            read(ImageRef(path))
    first.save(tmp_path / f"one{suffix}", save_all=True)  # one page, written the same way: read
    assert decode(ImageRef(tmp_path / f"one{suffix}"), 16, 1).shape == (1, 16, 16)


@pytest.mark.parametrize("files, target, reason", [
    ({}, "missing", "no such file or folder"),
    ({"empty/": b""}, "empty", "no images found"),
    ({"text/a.txt": b"x"}, "text", "no images found"),
    ({"x.gif": b"GIF89a"}, "x.gif", "unsupported format"),
])
def test_paths_that_hold_no_images(tmp_path, files, target, reason):
    for name, content in files.items():
        if name.endswith("/"):
            (tmp_path / name).mkdir(parents=True)
        else:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=reason):
        find_images(tmp_path / target)


@pytest.mark.parametrize("array, reason", [
    (np.zeros((4, 8), np.uint8), "expected images shaped"),
    (np.zeros((4, 8, 8, 2), np.uint8), "expected images shaped"),
    (np.full((4, 8, 8), np.nan), "NaN or infinite"),
    (np.full((4, 8, 8), np.inf, np.float32), "NaN or infinite"),
    (np.zeros((4, 8, 8), np.complex64), "unsupported dtype"),
    (np.full((4, 8, 8), 200.0), r"float pixels must lie in \[0, 1\], these span 200 to 200"),
    (np.r_[np.full((1, 8, 8), 0.5, np.float32), np.full((1, 8, 8), np.nextafter(np.float32(1), 2), np.float32)],
     r"these span 0.5 to 1.00000012$"),  # not "0.5 to 1", which reads as inside [0, 1]
    (np.zeros((0, 8, 8), np.uint8), r"holds no images \(shape \(0, 8, 8\)\)"),
    (np.full((4, 8, 8), 300, np.int64), "int64 pixels must lie in 0-255"),
    (np.full((4, 8, 8), -1, np.int8), "int8 pixels must lie in 0-255"),
])
def test_bad_arrays(tmp_path, array, reason):
    for suffix in (".npy", ".npz"):
        path = tmp_path / f"bad{suffix}"
        np.save(path, array) if suffix == ".npy" else np.savez(path, images=array)
        with pytest.raises(UserError, match=reason):
            find_images(path)


def test_arrays_of_too_large_images_are_refused_before_their_pixels_are_read(tmp_path):
    import tracemalloc

    pixels = np.zeros((1, 9000, 8000), np.uint8)  # 72 megapixels, as the image-file limit
    np.savez_compressed(tmp_path / "bomb.npz", images=pixels)  # about 70 kB on disk
    np.save(tmp_path / "bomb.npy", pixels)
    del pixels
    for name in ("bomb.npz", "bomb.npy"):
        tracemalloc.start()
        with pytest.raises(UserError, match=rf"{name}: images too large \(8000x9000, over 64,000,000 pixels\)"):
            find_images(tmp_path / name)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8_000_000, f"{name}: {peak:,} bytes allocated"


def test_an_npz_without_arrays(tmp_path):
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(UserError, match="empty.npz: holds no arrays"):
        find_images(tmp_path / "empty.npz")


def test_float_and_colour_arrays(tmp_path):
    path = tmp_path / "float.npy"
    np.save(path, np.random.default_rng(0).random((3, 10, 10, 3)).astype(np.float32))
    refs = find_images(path)
    assert [ref.name for ref in refs] == [f"{path}[{i}]" for i in range(3)]
    assert image_mode(refs[0]) == (10, 10, 3)
    assert decode(refs[1], 16, 3).shape == (3, 16, 16)
