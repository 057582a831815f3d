"""The model folder: its file names, checksums, and how it is written and read.

`train` writes the whole folder beside its final place and renames it into place (`save_trained`);
`calibrate` writes a new card and its companions (`save_calibration`), each file atomically.
Every file is read without unpickling and checked against the card's checksum before use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from aadetect.atomic import check_writable, staged_directory, write_atomic, write_text_atomic
from aadetect.card import ANOMALIES_PREFIX, ModelCard
from aadetect.density import KernelDensity
from aadetect.errors import UserError, first_line
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_path(model_dir: Path) -> Path:
    return model_dir.with_name(model_dir.name + ".checkpoint.pt")


def check_output_dir(model_dir: Path) -> None:
    """Never replace a folder that is not an aadetect model: it may hold the user's data. And find
    out now, not after training, when the model cannot be written where it should go."""
    if model_dir.exists() and (not model_dir.is_dir() or
                               (any(model_dir.iterdir()) and not (model_dir / CARD_FILE).exists())):
        raise UserError(f"{model_dir}: exists and is not an aadetect model folder; choose another --out")
    check_writable(model_dir)


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{path}: no model card here (train a model first, or pass --model)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read model card ({exc})") from None
    return ModelCard.from_yaml(text, str(path))


def write_names(path: Path, names: list[str], *, atomic: bool = False) -> None:
    """One file name a line, as the bytes the file system gave (a name need not be UTF-8 on Linux)."""
    def write(target: Path) -> None:
        target.write_text("".join(name + "\n" for name in names), encoding="utf-8", errors="surrogateescape")

    if atomic:
        write_atomic(path, write)
    else:
        write(path)


def read_names(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="surrogateescape").splitlines()


def save_trained(model_dir: Path, card: ModelCard, model, density, *, validation: list[str], rejected: list[str],
                 density_images: list[str], held_out_errors: np.ndarray, held_out_codes: np.ndarray) -> ModelCard:
    """Write a trained model's folder whole, replacing any model there; returns the card with its checksums."""


    with staged_directory(model_dir) as staging:
        torch.save(model.state_dict(), staging / WEIGHTS_FILE)
        density.save(staging / DENSITY_FILE)
        np.savez(staging / HELD_OUT_FILE, view_codes=held_out_codes, reconstruction_error=held_out_errors)
        write_names(staging / VALIDATION_FILE, validation)
        write_names(staging / REJECTED_FILE, rejected)
        write_names(staging / DENSITY_IMAGES_FILE, density_images)
        card = dataclasses.replace(card, files={name: sha256_file(staging / name) for name in CHECKED_FILES})
        write_text_atomic(staging / CARD_FILE, card.to_yaml())
    return card


def save_calibration(model_dir: Path, previous: ModelCard, card: ModelCard, centres: np.ndarray | None) -> ModelCard:
    """Write a calibration over the card `previous`: the anomalous samples' kernel centres (if any) under
    a name made from their content, so the card in force never names a file being rewritten, then the
    card, then the list of lookalikes (the card decides; the list only reports it). Returns the card."""
    names = read_names(model_dir / DENSITY_IMAGES_FILE) if card.calibration.lookalike_codes else []
    if names and len(names) != card.density.n_codes:
        raise UserError(f"{model_dir / DENSITY_IMAGES_FILE}: lists {len(names)} images for the density's "
                        f"{card.density.n_codes} codes (damaged?); the card is unchanged")
    files = {name: card.files[name] for name in CHECKED_FILES}
    anomalies_file = None
    if centres is not None:
        buffer = io.BytesIO()
        np.save(buffer, np.asarray(centres, dtype=np.float64))  # .npy: the same centres give the same bytes
        content = buffer.getvalue()
        digest = hashlib.sha256(content).hexdigest()
        anomalies_file = f"{ANOMALIES_PREFIX}{digest[:16]}.npy"
        write_atomic(model_dir / anomalies_file, lambda temp: temp.write_bytes(content))
        files[anomalies_file] = digest
    card = dataclasses.replace(card, files=files,
                               calibration=dataclasses.replace(card.calibration, anomalies_file=anomalies_file))
    write_text_atomic(model_dir / CARD_FILE, card.to_yaml())
    write_names(model_dir / LOOKALIKES_FILE, [names[i] for i in card.calibration.lookalike_codes], atomic=True)
    # older calibrations' centres; the card just replaced keeps its own, for a `score` that read that card
    # a moment ago (it goes with the next calibration)
    previous_file = previous.calibration.anomalies_file if previous.calibration else None
    for stale in model_dir.glob(f"{ANOMALIES_PREFIX}*.npy"):
        if stale.name not in (anomalies_file, previous_file):
            stale.unlink(missing_ok=True)
    return card


def checked_file(model_dir: Path, name: str, card: ModelCard) -> Path:
    path = model_dir / name
    if not path.is_file():
        raise UserError(f"{path}: missing from the model folder")
    expected = card.files.get(name)
    if expected is None:  # every card lists its files: a missing entry is damage too
        raise UserError(f"{path}: the card lists no checksum for it (damaged card?)")
    if sha256_file(path) != expected:
        raise UserError(f"{path}: does not match the card's checksum (damaged, or from another model)")
    return path


def load_model(model_dir: Path, card: ModelCard, device: str):
    """Rebuild the networks from the card, then load the weights without unpickling code."""



    path = checked_file(model_dir, WEIGHTS_FILE, card)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
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
    return model


def load_density(model_dir: Path, card: ModelCard):
    """The density as trained (every training code it was fitted on)."""
    path = checked_file(model_dir, DENSITY_FILE, card)
    try:
        density = KernelDensity.load(path)
    except ValueError as exc:  # its message names the file
        raise UserError(str(exc)) from None
    if density.dim != card.architecture.latent_dim:
        raise UserError(f"{path}: codes have {density.dim} dimensions, the card says {card.architecture.latent_dim}")
    if density.radius != card.settings.code_radius:
        raise UserError(f"{path}: the density's code radius is {density.radius}, the card says "
                        f"{card.settings.code_radius}")
    if density.n_codes != card.density.n_codes:
        raise UserError(f"{path}: holds {density.n_codes} codes, the card says {card.density.n_codes}")
    return density


def load_anomaly_kind(model_dir: Path, card: ModelCard, trained):
    """What the card's calibration learnt from its anomalous samples (`trained`: the density as trained),
    or None for a model calibrated without them."""
    if card.calibration is None or (not card.calibration.lookalike_codes and card.calibration.anomalies_file is None):
        return None
    centres = None
    if card.calibration.anomalies_file is not None:
        path = checked_file(model_dir, card.calibration.anomalies_file, card)
        try:
            centres = np.asarray(np.load(path, allow_pickle=False), dtype=np.float64)
        except Exception as exc:  # numpy raises many types for damaged files
            raise UserError(f"{path}: cannot read the anomalous samples' codes ({first_line(exc, 160)})") from None
        if centres.ndim != 2 or centres.shape[1] != trained.dim or not len(centres) or not np.isfinite(centres).all():
            raise UserError(f"{path}: the anomalous samples' codes must be finite, shaped (n, {trained.dim}); "
                            f"got {centres.shape}")
    try:
        return AnomalyKind.of(trained, card.calibration.lookalike_codes, centres)
    except ValueError as exc:  # e.g. a hand-edited list that leaves a latent dimension constant
        raise UserError(f"{model_dir / CARD_FILE}: calibration.lookalike_codes leave no usable density "
                        f"({exc})") from None


def load_held_out(model_dir: Path, card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    """The held-out images' reconstruction errors (n,) and codes in every view (views, n, d), as `train`
    saved them."""
    path = checked_file(model_dir, HELD_OUT_FILE, card)
    try:
        with np.load(path, allow_pickle=False) as saved:
            errors, view_codes = np.asarray(saved["reconstruction_error"]), np.asarray(saved["view_codes"])
    except Exception as exc:  # numpy raises many types for damaged files
        raise UserError(f"{path}: cannot read the held-out images' codes ({first_line(exc, 160)})") from None
    views = (2 * card.settings.shift_radius + 1) ** 2
    expected = (views, card.data.validation_count, card.architecture.latent_dim)
    if view_codes.shape != expected or errors.shape != expected[1:2] or not (
            np.isfinite(view_codes).all() and np.isfinite(errors).all()):
        raise UserError(f"{path}: expected finite codes shaped {expected} and as many errors; got "
                        f"{view_codes.shape} and {errors.shape}")
    return errors.astype(np.float64), view_codes


def resolved(model_dir: str | os.PathLike) -> Path:
    """The folder a model is written to: "." or "x/.." has no name to stage beside, and a link to a model
    folder must keep pointing at the new model."""
    return Path(os.path.realpath(model_dir))
