"""The model folder: its file names, checksums, and how it is written and read.

`train` writes the whole folder beside its final place and renames it into place (`save_trained`);
`calibrate` writes a new card and its companions (`save_calibration`), each file atomically. Writers
of one folder take turns (`writing`, an advisory lock beside it).

Every file is read once, only if it is a regular file, within a size fitting its kind, and checked
against the card's checksum before it is parsed (without unpickling); arrays are checked against the
shapes the card implies before they are decompressed. A reader that meets a folder being replaced
reads it again (`read_model`), so it gets one whole generation.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import os
import pickle
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Iterator

import numpy as np
from numpy.lib import format as npy

from aadetect.atomic import (check_writable, remove_abandoned, remove_abandoned_temp_files, staged_directory,
                             write_bytes_atomic, write_text_atomic)
from aadetect.card import ANOMALIES_PREFIX, EXPORT_FORMATS, Export, ModelCard
from aadetect.errors import UserError, first_line

if TYPE_CHECKING:  # imported where used: reading a card and an export needs no torch (aadetect.onnx_engine)
    from aadetect.density import GridDensity, KernelDensity
    from aadetect.lookalikes import AnomalyKind
    from aadetect.model import AdversarialAutoencoder

CARD_FILE = "card.yaml"
WEIGHTS_FILE = "weights.pt"
DENSITY_FILE = "density.npz"
HELD_OUT_FILE = "held_out.npz"  # the held-out images' codes and errors, to measure them again at calibration
VALIDATION_FILE = "validation.txt"
REJECTED_FILE = "rejected.txt"
DENSITY_IMAGES_FILE = "density_images.txt"  # the training images behind the density's codes, in order
LOOKALIKES_FILE = "lookalikes.txt"
CHECKED_FILES = (WEIGHTS_FILE, DENSITY_FILE, HELD_OUT_FILE)  # plus the anomalies file, where there is one
EXPORT_FILES = tuple(EXPORT_FORMATS.values())  # `aadetect export`; its checksum is in the card's export record
NAMED_FILES = (CARD_FILE, *CHECKED_FILES, VALIDATION_FILE, REJECTED_FILE, DENSITY_IMAGES_FILE, LOOKALIKES_FILE,
               *EXPORT_FILES)

CARD_LIMIT = 1 << 20  # a card is kilobytes; a long list of skipped files may make it more
NAMES_LIMIT = 256 << 20  # a line per training image
FILE_LIMIT = 4 << 30  # weights, density and held-out codes of the largest sensible model
MAX_ANOMALOUS_SAMPLES = 100_000
LOCK_WAIT_SECONDS = 30.0  # a calibration takes seconds; a training that long holds the lock on purpose
READ_ATTEMPTS = 3  # a reader that meets a folder being replaced reads the new one


# ------------------------------------------------------------------------------------------- reading

def open_regular(path: Path) -> BinaryIO:
    """`path` opened for reading if it is a regular file (or a link to one): a FIFO would hang a reader,
    a device never end. FileNotFoundError where there is nothing."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO opens at once without a writer, then is refused
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"{path}: not a regular file (a device, FIFO, socket or folder)")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, up to `limit` of them (more is refused before it is read)."""
    with open_regular(path) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise UserError(f"{path}: {size:,} bytes, too large for {what} (at most {limit:,})")
        content = handle.read(size)  # what it holds now, not `limit` bytes of buffer
        if handle.read(1):  # grew while read
            raise UserError(f"{path}: changed while it was read; try again")
    return content


def read_model_file(path: Path, limit: int, what: str, *, missing: str) -> bytes:
    """`read_bytes`, with what can go wrong as one line for the user (`missing` where there is no file)."""
    try:
        return read_bytes(path, limit, what)
    except FileNotFoundError:
        raise UserError(f"{path}: {missing}") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    content = read_model_file(path, CARD_LIMIT, "a model card",
                              missing="no model card here (train a model first, or pass --model)")
    try:
        text = content.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a model card (not UTF-8 text)") from None
    card = ModelCard.from_yaml(text, str(path))
    anomalies_file = card.calibration.anomalies_file if card.calibration else None
    expected = {*CHECKED_FILES, *([anomalies_file] if anomalies_file else [])}
    if set(card.files) != expected:
        raise UserError(f"{path}: files must list exactly {', '.join(sorted(expected))}")
    if not all(len(digest) == 64 and all(c in "0123456789abcdef" for c in digest) for digest in card.files.values()):
        raise UserError(f"{path}: files must give each file's sha256 as 64 hex digits")
    return card


def read_names(path: Path) -> list[str]:
    return read_bytes(path, NAMES_LIMIT, "a list of file names").decode("utf-8", "surrogateescape").splitlines()


def checked_bytes(model_dir: Path, name: str, card: ModelCard) -> bytes:
    """A file the card lists, read once and matched against its checksum."""
    path = model_dir / name
    content = read_model_file(path, FILE_LIMIT, "a model file", missing="missing from the model folder")
    if hashlib.sha256(content).hexdigest() != card.files[name]:
        raise UserError(f"{path}: does not match the card's checksum (damaged, or from another model)")
    return content


def npz_arrays(content: bytes, path: Path, shapes: dict[str, tuple]) -> dict[str, np.ndarray]:
    """The arrays of an .npz, which must hold exactly `shapes`' names with those shapes; each shape is
    read from its header before its data is decompressed (a small file may declare gigabytes)."""
    if not content.startswith(b"PK\x03\x04"):  # numpy would guess at other formats, a pickle among them
        raise UserError(f"{path}: not a valid .npz archive")
    try:
        archive = np.load(io.BytesIO(content), allow_pickle=False)
    except Exception as exc:  # numpy raises many types for damaged files
        raise UserError(f"{path}: not a valid .npz archive ({first_line(exc, 120)})") from None
    with archive:
        if sorted(archive.files) != sorted(shapes):
            raise UserError(f"{path}: holds {len(archive.files)} arrays; expected {', '.join(sorted(shapes))}")
        arrays = {}
        for name, expected in shapes.items():
            declared = _declared_shape(archive, name)
            if declared != expected:
                raise UserError(f"{path}: {name} is shaped {declared}, the card implies {expected}")
            try:
                arrays[name] = archive[name]
            except Exception as exc:
                raise UserError(f"{path}: cannot read {name} ({first_line(exc, 120)})") from None
    return arrays


def _declared_shape(archive, name: str) -> tuple | None:
    try:
        with archive.zip.open(f"{name}.npy") as member:
            version = npy.read_magic(member)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            return tuple(read_header(member)[0])
    except Exception:  # a damaged header: the shapes then differ, and that is the message
        return None


def load_model(model_dir: Path, card: ModelCard, device: str):
    """Rebuild the networks from the card, then load the weights without unpickling code."""
    import torch

    from aadetect.model import AdversarialAutoencoder

    path = model_dir / WEIGHTS_FILE
    content = checked_bytes(model_dir, WEIGHTS_FILE, card)
    try:
        state = torch.load(io.BytesIO(content), map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UserError(f"{path}: refused to load (not a plain tensor file: {first_line(exc, 120)})") from None
    except Exception as exc:
        raise UserError(f"{path}: cannot read weights ({first_line(exc, 160)})") from None
    try:
        model = AdversarialAutoencoder(card.architecture)
        keys = model.load_state_dict(state, strict=False)  # wrong shapes still raise
        problems = [f"missing {name}" for name in keys.missing_keys] + [f"unexpected {name}" for name in keys.unexpected_keys]
    except Exception as exc:  # torch's first line is only a header; the line after it names the tensor
        details = [line.strip() for line in str(exc).splitlines() if line.strip()]
        problems = [details[1][:160] if len(details) > 1 else first_line(exc, 160)]
    if problems:
        listed = ", ".join(problems[:3]) + (", ..." if len(problems) > 3 else "")
        raise UserError(f"{path}: weights do not fit the card's architecture ({listed})")
    if not all(bool(torch.isfinite(value).all()) for value in model.state_dict().values() if value.is_floating_point()):
        raise UserError(f"{path}: holds NaN or infinite weights (did the training diverge?); retrain the model")
    return model


def load_density(model_dir: Path, card: ModelCard) -> KernelDensity | GridDensity:
    """The density as trained (every training code it was fitted on): one KDE, or one per grid position."""
    from aadetect.density import GridDensity, KernelDensity

    path = model_dir / DENSITY_FILE
    n, d, grid = card.density.n_codes, card.architecture.latent_dim, card.architecture.code_grid
    kind, shapes = (KernelDensity, {"codes": (n, d), "covariance": (d, d)}) if grid == 1 else (
        GridDensity, {"codes": (grid * grid, n, d), "covariance": (grid * grid, d, d)})
    state = npz_arrays(checked_bytes(model_dir, DENSITY_FILE, card), path,
                       {**shapes, "bandwidth": (), "factor": (), "radius": ()})
    try:
        density = kind.from_state_dict(state)
    except ValueError as exc:
        raise UserError(f"{path}: {first_line(exc, 200)}") from None
    if density.radius != card.settings.code_radius:
        raise UserError(f"{path}: the density's code radius is {density.radius}, the card says "
                        f"{card.settings.code_radius}")
    return density


def load_anomaly_kind(model_dir: Path, card: ModelCard, trained: KernelDensity) -> AnomalyKind | None:
    """What the card's calibration learnt from its anomalous samples (`trained`: the density as trained),
    or None for a model calibrated without them."""
    from aadetect.lookalikes import AnomalyKind

    if card.calibration is None or (not card.calibration.lookalike_codes and card.calibration.anomalies_file is None):
        return None
    centres = None
    if card.calibration.anomalies_file is not None:
        path = model_dir / card.calibration.anomalies_file
        buffer = io.BytesIO(checked_bytes(model_dir, card.calibration.anomalies_file, card))
        try:
            npy.read_magic(buffer)
            shape = npy.read_array_header_1_0(buffer)[0]
            buffer.seek(0)
            if len(shape) != 2 or shape[1] != trained.dim or not 0 < shape[0] <= MAX_ANOMALOUS_SAMPLES:
                raise ValueError(f"shaped {shape}")
            centres = np.asarray(np.load(buffer, allow_pickle=False), dtype=np.float64)
        except Exception as exc:  # numpy raises many types for damaged files
            raise UserError(f"{path}: cannot read the anomalous samples' codes, shaped (n, {trained.dim}) "
                            f"({first_line(exc, 120)})") from None
        if not np.isfinite(centres).all():
            raise UserError(f"{path}: the anomalous samples' codes must be finite")
    try:
        return AnomalyKind.of(trained, card.calibration.lookalike_codes, centres)
    except ValueError as exc:  # e.g. a hand-edited list that leaves a latent dimension constant
        raise UserError(f"{model_dir / CARD_FILE}: calibration.lookalike_codes leave no usable density "
                        f"({first_line(exc, 160)})") from None


def load_held_out(model_dir: Path, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images' reconstruction errors (n,) and codes in every view (views, n, d), as `train`
    saved them."""
    path = model_dir / HELD_OUT_FILE
    n = card.data.validation_count
    views = (2 * card.shift_radius + 1) ** 2
    arrays = npz_arrays(checked_bytes(model_dir, HELD_OUT_FILE, card), path,
                        {"view_codes": (views, n, card.architecture.code_numbers), "reconstruction_error": (n,)})
    errors, view_codes = arrays["reconstruction_error"], arrays["view_codes"]
    if not (np.isfinite(view_codes).all() and np.isfinite(errors).all()):
        raise UserError(f"{path}: the held-out images' codes and errors must be finite")
    return errors.astype(np.float64), view_codes


@dataclasses.dataclass(frozen=True)
class StoredModel:
    card: ModelCard
    model: AdversarialAutoencoder
    density: KernelDensity  # as trained
    kind: AnomalyKind | None  # None when loaded as trained


def read_model(model_dir: Path, device: str, *, as_trained: bool = False) -> StoredModel:
    """Everything a detector needs, from one generation of the folder: a reader that meets a folder being
    replaced (the card from one, a file from the next) finds the card changed, and reads again."""
    for attempt in range(READ_ATTEMPTS):
        card = read_card(model_dir)
        try:
            density = load_density(model_dir, card)
            kind = None if as_trained else load_anomaly_kind(model_dir, card, density)
            return StoredModel(card, load_model(model_dir, card, device), density, kind)
        except UserError:
            if attempt + 1 == READ_ATTEMPTS or _card_text(model_dir) == card.to_yaml():
                raise


def _card_text(model_dir: Path) -> str | None:
    try:
        return read_card(model_dir).to_yaml()
    except UserError:
        return None


# ------------------------------------------------------------------------------------------- writing

@contextmanager
def writing(model_dir: Path, wait: float = LOCK_WAIT_SECONDS) -> Iterator[None]:
    """Take turns with other writers of `model_dir`: an advisory lock on a file beside it (never inside:
    training replaces the folder whole)."""
    folder = resolved(model_dir)  # "." has no name to put a lock beside
    lock_path = folder.with_name(f".{folder.name}.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise UserError(f"{model_dir}: another aadetect is writing this model (it holds {lock_path}); "
                                f"try again when it has finished") from None
            time.sleep(0.05)
            continue
        if _same_file(fd, lock_path):  # not a file that the writer before removed as it let go
            break
        os.close(fd)
    try:
        if model_dir.is_dir():
            remove_abandoned_temp_files(model_dir)
        yield
    finally:
        lock_path.unlink(missing_ok=True)  # while still held: a writer that opened it then takes another
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def check_output_dir(model_dir: Path, data: Path) -> None:
    """Replacing a model replaces the model's own files only: refuse a target that holds anything else (the
    user's images, notes), or that the training data lies in. And find out now, not after training, when
    the model cannot be written where it should go."""
    if model_dir.exists() and not model_dir.is_dir():
        raise UserError(f"{model_dir}: exists and is not a folder; choose another --out")
    resolved_data = Path(os.path.realpath(data))
    if resolved_data == model_dir or model_dir in resolved_data.parents:
        raise UserError(f"{data}: lies inside {model_dir}, which training replaces whole; choose another --out")
    if model_dir.exists():
        foreign = sorted(entry.name for entry in os.scandir(model_dir) if not _is_model_file(entry))
        if foreign:
            raise UserError(f"{model_dir}: holds {foreign[0]!r:.80}{f' and {len(foreign) - 1} more' if len(foreign) > 1 else ''}, "
                            f"which is not part of an aadetect model; training replaces the folder whole, so "
                            f"choose another --out (or move them)")
    check_writable(model_dir)


def _is_model_file(entry: os.DirEntry) -> bool:
    name = entry.name
    ours = (name in NAMED_FILES or (name.startswith(ANOMALIES_PREFIX) and name.endswith(".npy"))
            or (name.startswith(".") and name.endswith(".tmp")))  # an atomic write's temp file
    return ours and entry.is_file(follow_symlinks=False)


def checkpoint_path(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".checkpoint.pt")


def save_checkpoint(path: Path, state: dict) -> None:
    remove_abandoned(path)
    write_bytes_atomic(path, _serialised(state))


def write_names(path: Path, names: list[str]) -> None:
    """One file name a line, as the bytes the file system gave (a name need not be UTF-8 on Linux)."""
    write_bytes_atomic(path, _names_bytes(names))


def _names_bytes(names: list[str]) -> bytes:
    return "".join(name + "\n" for name in names).encode("utf-8", "surrogateescape")


def save_trained(model_dir: Path, card: ModelCard, model, density, *, validation: list[str], rejected: list[str],
                 density_images: list[str], held_out_errors: np.ndarray, held_out_codes: np.ndarray) -> ModelCard:
    """Write a trained model's folder whole, replacing any model there; returns the card with its checksums."""
    held_out = io.BytesIO()
    np.savez(held_out, view_codes=held_out_codes, reconstruction_error=held_out_errors)
    contents = {WEIGHTS_FILE: _serialised(model.state_dict()), DENSITY_FILE: density.to_bytes(),
                HELD_OUT_FILE: held_out.getvalue(), VALIDATION_FILE: _names_bytes(validation),
                REJECTED_FILE: _names_bytes(rejected), DENSITY_IMAGES_FILE: _names_bytes(density_images)}
    card = dataclasses.replace(card, files={name: hashlib.sha256(contents[name]).hexdigest() for name in CHECKED_FILES})
    contents[CARD_FILE] = card.to_yaml().encode("utf-8")
    with staged_directory(model_dir) as staging:
        for name, content in contents.items():
            try:
                (staging / name).write_bytes(content)
            except OSError as error:  # a full disk: name the file the user will look for
                raise OSError(error.errno, error.strerror, str(model_dir / name)) from None
    return card


def _serialised(state) -> bytes:
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def save_calibration(model_dir: Path, previous: ModelCard, card: ModelCard, centres: np.ndarray | None) -> ModelCard:
    """Write a calibration over the card `previous` (call it `writing` the folder). First what the new card
    will name (the anomalous samples' kernel centres, under a name made from their content, so the card in
    force never names a file being rewritten) and the list of lookalikes, then the card itself: the one
    step that makes the change. Nothing after it can fail. Returns the card as written."""
    lookalikes = card.calibration.lookalike_codes
    names = read_names(model_dir / DENSITY_IMAGES_FILE) if lookalikes else []
    if names and len(names) != card.density.n_codes:
        raise UserError(f"{model_dir / DENSITY_IMAGES_FILE}: lists {len(names)} images for the density's "
                        f"{card.density.n_codes} codes (damaged?); the card is unchanged")
    files = {name: card.files[name] for name in CHECKED_FILES}
    anomalies_file = None
    if centres is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(centres, dtype=np.float64))  # .npy: the same centres give the same bytes
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        anomalies_file = f"{ANOMALIES_PREFIX}{digest[:16]}.npy"
        write_bytes_atomic(model_dir / anomalies_file, buffer.getvalue())
        files[anomalies_file] = digest
    card = dataclasses.replace(card, files=files,
                               calibration=dataclasses.replace(card.calibration, anomalies_file=anomalies_file))
    lookalikes_path = model_dir / LOOKALIKES_FILE
    try:
        listed_before = read_bytes(lookalikes_path, NAMES_LIMIT, "a list of file names")
    except (OSError, UserError):
        listed_before = None
    write_names(lookalikes_path, [names[i] for i in lookalikes])
    try:
        write_text_atomic(model_dir / CARD_FILE, card.to_yaml())
    except BaseException:
        if listed_before is not None:  # the list goes with the card still in force
            write_bytes_atomic(lookalikes_path, listed_before)
        raise
    # older calibrations' centres; the card just replaced keeps its own, for a `score` that read that card
    # a moment ago (it goes with the next calibration)
    previous_file = previous.calibration.anomalies_file if previous.calibration else None
    for stale in model_dir.glob(f"{ANOMALIES_PREFIX}*.npy"):
        if stale.name not in (anomalies_file, previous_file):
            try:
                stale.unlink()
            except OSError:  # a leftover: the next calibration tries again
                pass
    return card


def resolved(model_dir: str | os.PathLike) -> Path:
    """The folder a model is written to: "." or "x/.." has no name to stage beside, and a link to a model
    folder must keep pointing at the new model."""
    return Path(os.path.realpath(model_dir))


# ------------------------------------------------------------------------------------------- exports

def card_digest(card: ModelCard) -> str:
    """The digest an export records of the card it reflects: the card without its export record, so that
    any later change to it (a calibration, a hand edit) makes the export stale."""
    return hashlib.sha256(dataclasses.replace(card, export=None).to_yaml().encode("utf-8")).hexdigest()


def save_export(model_dir: Path, card: ModelCard, export: Export, content: bytes) -> ModelCard:
    """Write an export of the model whose card is `card` (call it `writing` the folder): the graph first, then
    the card that names it, each atomically. Returns the card as written."""
    if export.sha256 != hashlib.sha256(content).hexdigest() or export.card_sha256 != card_digest(card):
        raise ValueError("the export record does not describe this graph and card")
    write_bytes_atomic(model_dir / export.file, content)
    card = dataclasses.replace(card, export=export)
    write_text_atomic(model_dir / CARD_FILE, card.to_yaml())
    return card


def read_export(model_dir: Path, format: str) -> tuple[ModelCard, bytes]:
    """The card and the exported graph of one generation of the folder, checked: the card must record an
    export in `format`, made from the card as it is now, and the file must match its checksum. A reader
    that meets an export being written (the old card, the new file) reads again."""
    command = f"run `aadetect export --model {model_dir} --format {format}`"
    for attempt in range(READ_ATTEMPTS):
        card = read_card(model_dir)
        export = card.export
        if export is None or export.format != format:
            raise UserError(f"{model_dir}: the model has no {format} export; {command}")
        if export.card_sha256 != card_digest(card):
            raise UserError(f"{model_dir / export.file}: stale (the model card changed after it was exported, "
                            f"e.g. by calibrate); {command} again")
        path = model_dir / export.file
        content = read_model_file(path, FILE_LIMIT, "an exported model", missing=f"missing; {command}")
        if hashlib.sha256(content).hexdigest() == export.sha256:
            return card, content
        if attempt + 1 == READ_ATTEMPTS or _card_text(model_dir) == card.to_yaml():
            raise UserError(f"{path}: does not match the card's checksum (damaged, or from another model); "
                            f"{command}")
    raise AssertionError("unreachable")
