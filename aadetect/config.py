"""Typed settings that flow from the CLI into the library and into the model card."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from aadetect.errors import UserError

ERROR_MEASURES = ("ssim", "scaled-mse", "mse")  # each wins on some benchmark (docs/cli.md)
SCALED_MEASURES = ("ssim", "scaled-mse")  # divided by a per-pixel scale measured on good images (model.error_scale)
CODE_RADII = ("sqrt", "linear")  # how a code's length enters the KDE (density.map_radius)
OBJECTIVES = ("balanced-accuracy", "f1")  # what calibration's joint threshold search maximises
AUTO = 0  # image_size, latent_dim or code_grid == AUTO: pick it from the data
LOCAL_IMAGE_SIZE = 128  # from this size on, a code describes each neighbourhood (code_grid > 1) by default
LOCAL_CELL = 8  # pixels per side of the neighbourhood a local code describes by default
# the fraction of a code grid's cells, the worst ones, that make an image's two numbers: its log-density is the
# mean of its cells' lowest, its (ssim) reconstruction error the mean of their highest (at least one cell)
LOW_CELLS = 0.04
GLOBAL_LATENT, LOCAL_LATENT = 32, 16  # default code sizes: one code per image; one per neighbourhood
GLOBAL_BATCH, LOCAL_BATCH = 64, 16  # default batch sizes: a grid learns from few large images, in more steps
GLOBAL_EPOCHS, LOCAL_EPOCHS = 20, 28
MAX_SHIFT_RADIUS = 2  # (2r + 1)^2 forward passes an image: 25 at most
MAX_EPOCHS = 100_000
MAX_BATCH_SIZE = 1 << 20
MAX_MEMORY_MB = 1 << 30
DENSITY_CODES = 20_000  # kept codes the density holds at most: Scott's bandwidth shrinks as n^(-1/(d+4))


def worst_cell_count(cells: int) -> int:
    """How many of an image's `cells` make its two numbers: LOW_CELLS of them, at least one."""
    return max(1, round(LOW_CELLS * cells))


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides what `train` builds; recorded verbatim in the card.

    Checked once, when it is made (from the CLI, from Python, or from a card being read): every later
    step can take it as valid.
    """

    epochs: int = AUTO  # GLOBAL_EPOCHS, or LOCAL_EPOCHS for a code grid
    image_size: int = AUTO
    latent_dim: int = AUTO  # numbers in each code; default GLOBAL_LATENT, or LOCAL_LATENT for a code grid
    batch_size: int = AUTO  # GLOBAL_BATCH, or LOCAL_BATCH for a code grid
    error: str = "ssim"  # a small local defect is not diluted by the many pixels rebuilt well
    seed: int = 0
    device: str = "auto"
    learning_rate: float = 1e-3
    code_radius: str = "sqrt"  # a code's direction says more about content than its length
    extra_convs: int = 1  # 3x3 convolutions after each resolution change
    code_grid: int = AUTO  # codes per image side: 1 (one code per image) below LOCAL_IMAGE_SIZE, else one per cell
    shift_radius: int = 1  # the density is averaged over the image moved by up to this many pixels
    adversarial: bool = False  # the Gaussian prior squeezes unusual codes into its dense centre
    robust: bool = True
    reject_z: float = 3.0
    validation_fraction: float = 0.1
    patience: int = 8
    target_fpr: float = 0.05
    strict: bool = False
    memory_limit_mb: int = 4096  # decoded training images above this are read from disk each epoch
    # every query is compared with every code the density holds: above this many kept images, a seeded sample
    density_codes: int = DENSITY_CODES

    def __post_init__(self) -> None:
        """Fail fast, before any expensive work, on settings that cannot work."""
        if not 0 <= self.epochs <= MAX_EPOCHS:
            raise UserError(f"--epochs must be 0 (auto) or between 1 and {MAX_EPOCHS:,}, got {self.epochs}")
        if self.image_size != AUTO and (self.image_size < 8 or self.image_size % 4):
            raise UserError(f"--image-size must be 0 (auto) or a multiple of 4 that is at least 8, got {self.image_size}")
        if self.image_size > 512:
            raise UserError(f"--image-size must be at most 512, got {self.image_size}")
        if self.latent_dim < 0 or self.latent_dim > 256:
            raise UserError(f"--latent-dim must be 0 (auto) or between 1 and 256, got {self.latent_dim}")
        if not 0 <= self.code_grid <= 128 or self.code_grid & (self.code_grid - 1):
            raise UserError(f"--code-grid must be 0 (auto) or a power of 2 up to 128, got {self.code_grid}")
        if self.batch_size != AUTO and not 2 <= self.batch_size <= MAX_BATCH_SIZE:  # torch's sizes are 64-bit
            raise UserError(f"--batch-size must be 0 (auto) or between 2 and {MAX_BATCH_SIZE:,}, got {self.batch_size}")
        check_seed(self.seed)
        if self.error not in ERROR_MEASURES:
            raise UserError(f"--error must be one of {', '.join(ERROR_MEASURES)}, got {self.error!r}")
        if self.code_radius not in CODE_RADII:
            raise UserError(f"--code-radius must be one of {', '.join(CODE_RADII)}, got {self.code_radius!r}")
        if not 0 <= self.extra_convs <= 4:
            raise UserError(f"--extra-convs must be between 0 and 4, got {self.extra_convs}")
        if not 0 <= self.shift_radius <= MAX_SHIFT_RADIUS:
            raise UserError(f"--shift-radius must be between 0 and {MAX_SHIFT_RADIUS}, got {self.shift_radius}")
        if not 0.0 < self.validation_fraction < 0.5:
            raise UserError(f"validation fraction must be in (0, 0.5), got {self.validation_fraction}")
        check_fraction("the default thresholds' target FPR", self.target_fpr)  # not a train option
        if not 0 <= self.memory_limit_mb <= MAX_MEMORY_MB:
            raise UserError(f"--memory-limit-mb must be between 0 and {MAX_MEMORY_MB:,}, got {self.memory_limit_mb}")
        if not 2 <= self.density_codes <= MAX_BATCH_SIZE:
            raise UserError(f"--density-codes must be between 2 and {MAX_BATCH_SIZE:,}, got {self.density_codes}")
        if not 0.0 < self.learning_rate < math.inf:  # also refuses NaN, which every comparison passes
            raise UserError(f"the learning rate must be a positive number, got {self.learning_rate}")
        if self.patience < 1:  # 0 would stop before the first epoch and save untrained weights
            raise UserError(f"patience must be at least 1 epoch, got {self.patience}")
        if not 0.0 < self.reject_z < math.inf:
            raise UserError(f"reject_z (the robust rule's cut, in robust z-scores) must be a positive number, "
                            f"got {self.reject_z}")

    def resolved(self, image_size: int) -> TrainConfig:
        """These settings for images of this size, every auto one decided (and the shift radius a code grid
        does not use set to 0). Large images get a code grid: one code for a whole image cannot hold "a
        thin crack at the lower left"; the grid learns from few large images, in more, smaller steps."""
        grid = self.code_grid or (1 if image_size < LOCAL_IMAGE_SIZE else image_size // LOCAL_CELL)
        local = grid > 1
        return dataclasses.replace(
            self, image_size=image_size, code_grid=grid,
            latent_dim=self.latent_dim or (LOCAL_LATENT if local else GLOBAL_LATENT),
            batch_size=self.batch_size or (LOCAL_BATCH if local else GLOBAL_BATCH),
            epochs=self.epochs or (LOCAL_EPOCHS if local else GLOBAL_EPOCHS),
            # a grid's cells are compared position by position, 8 pixels at a time: a pixel's shift is no change
            shift_radius=0 if local else self.shift_radius)


@dataclass(frozen=True)
class Architecture:
    """Shape of the networks: enough to rebuild them from the card before loading weights."""

    image_size: int
    channels: int
    latent_dim: int
    widths: tuple[int, ...]
    discriminator_width: int
    extra_convs: int  # stride-1 3x3 convolutions after each resolution change
    code_grid: int  # codes per side: 1, one code for the image; more, one code per neighbourhood

    @classmethod
    def for_images(cls, image_size: int, channels: int, latent_dim: int, extra_convs: int,
                   grid: int = 1) -> Architecture:
        """Halve the image until it is small and odd-or-4 (one code), or down to the code grid: one conv
        stage per halving."""
        cell = image_size // grid
        if grid > 1 and (cell * grid != image_size or cell < 2 or cell & (cell - 1)):
            raise UserError(f"--code-grid {grid} must divide --image-size {image_size} by a power of 2 (at least 2)")
        widths: list[int] = []
        size = image_size
        while (size > grid if grid > 1 else size % 2 == 0 and size > 4):
            widths.append(min(16 * 2 ** len(widths), 128) if grid == 1 else min(32 * 2 ** len(widths), 128))
            size //= 2
        return cls(image_size=image_size, channels=channels, latent_dim=latent_dim, widths=tuple(widths),
                   discriminator_width=256, extra_convs=extra_convs, code_grid=grid)

    @property
    def code_numbers(self) -> int:
        """Numbers in one image's codes: one code, or one per grid position."""
        return self.latent_dim * self.code_grid ** 2

    @property
    def bottom_size(self) -> int:
        return self.image_size // 2 ** len(self.widths)


def check_seed(seed: int) -> None:
    if not 0 <= seed < 2 ** 63:  # what torch and numpy both take
        raise UserError(f"--seed must be between 0 and 2**63 - 1, got {seed}")


def check_fraction(option: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise UserError(f"{option} must be between 0 and 1 (exclusive), got {value}")
