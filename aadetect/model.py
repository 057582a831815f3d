"""The adversarial autoencoder (Makhzani et al., 2015): encoder, decoder and latent discriminator."""

from __future__ import annotations

import torch
from torch import nn

from aadetect.config import SCALED_MEASURES, Architecture, worst_cell_count
from aadetect.images import materialize


def refinement(width: int, count: int, activation) -> list[nn.Module]:
    """Stride-1 3x3 convolutions at one resolution: more capacity per scale without a larger code."""
    layers: list[nn.Module] = []
    for _ in range(count):
        layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), activation()]
    return layers


class Encoder(nn.Module):
    """Strided convolutions down to a few pixels, then a linear map to the latent code (B, d); or, for a
    code grid, down to the grid, then a 1x1 convolution to one code per neighbourhood (B, d, G, G)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = arch.channels
        activation = lambda: nn.LeakyReLU(0.2, inplace=True)  # noqa: E731
        for width in arch.widths:
            layers += [nn.Conv2d(in_channels, width, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width), activation(), *refinement(width, arch.extra_convs, activation)]
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.local = arch.code_grid > 1
        self.to_code = (nn.Conv2d(in_channels, arch.latent_dim, 1) if self.local
                        else nn.Linear(in_channels * arch.bottom_size ** 2, arch.latent_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.features(images)
        return self.to_code(features if self.local else features.flatten(1))


class Decoder(nn.Module):
    """The encoder's mirror: a linear map to a small feature map, then transposed convolutions."""

    def __init__(self, arch: Architecture):
        super().__init__()
        widths = list(reversed(arch.widths))
        self.bottom = (widths[0], arch.bottom_size, arch.bottom_size)
        self.from_code = nn.Sequential(nn.Conv2d(arch.latent_dim, widths[0], 1) if arch.code_grid > 1
                                       else nn.Linear(arch.latent_dim, widths[0] * arch.bottom_size ** 2),
                                       nn.ReLU(inplace=True))
        layers: list[nn.Module] = []
        activation = lambda: nn.ReLU(inplace=True)  # noqa: E731
        for width, next_width in zip(widths, widths[1:]):
            layers += [nn.ConvTranspose2d(width, next_width, 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(next_width), activation(), *refinement(next_width, arch.extra_convs, activation)]
        layers += [nn.ConvTranspose2d(widths[-1], arch.channels, 4, stride=2, padding=1), nn.Sigmoid()]
        self.features = nn.Sequential(*layers)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.features(self.from_code(codes).reshape(-1, *self.bottom))


class Discriminator(nn.Module):
    """Tells codes drawn from the prior N(0, I) from codes made by the encoder (each local code of a grid
    on its own: the prior is on what one neighbourhood's code looks like)."""

    def __init__(self, arch: Architecture):
        super().__init__()
        width = arch.discriminator_width
        self.net = nn.Sequential(nn.Linear(arch.latent_dim, width), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(width, width), nn.LeakyReLU(0.2, inplace=True),
                                 nn.Linear(width, 1))

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.net(code_rows(codes)).squeeze(1)


class AdversarialAutoencoder(nn.Module):
    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        self.discriminator = Discriminator(arch)
        # What each pixel's residual (scaled-mse) or dissimilarity (ssim) is divided by; set after training.
        self.register_buffer("error_scale", torch.ones(arch.channels, arch.image_size, arch.image_size))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes = self.encoder(images)
        return codes, self.decoder(codes)


def flat_codes(codes: torch.Tensor) -> torch.Tensor:
    """One row per image: (B, d) as it is; a grid's (B, d, G, G) as (B, G * G * d), position by position
    (row-major), each position's d numbers together, as `density.GridDensity` reads them."""
    return codes if codes.ndim == 2 else codes.permute(0, 2, 3, 1).flatten(1)


def code_rows(codes: torch.Tensor) -> torch.Tensor:
    """One row per code: (B, d) as it is; a grid's (B, d, G, G) as (B * G * G, d)."""
    return codes if codes.ndim == 2 else flat_codes(codes).reshape(-1, codes.shape[1])


SSIM_WINDOW, SSIM_SIGMA = 5, 1.0  # a small Gaussian window: 28-32 px images have few pixels to spare
SSIM_C1, SSIM_C2 = 0.01 ** 2, 0.03 ** 2  # the usual stabilisers for pixels in [0, 1] (Wang et al., 2004)
WORST_FRACTION = 0.1  # the ssim error is the mean over this fraction of each cell's pixels (of the image's, with one code), the worst ones


def structural_dissimilarity(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-pixel (1 - SSIM) / 2 of each channel (B, C, H, W), in [0, 1]: how far the local means, contrasts and
    correlation of the two images differ around each pixel. Edges repeat into the window. (Float32 variances
    can put a near-perfect patch a hair below 0, about -1e-4; the ssim error squares it, so that is harmless.)
    Variances and the covariance are taken about each image's own mean (they do not change), so that
    E[x^2] - E[x]^2 does not cancel on a flat patch, where float32 would keep little but rounding."""
    channels = images.shape[1]
    axis = torch.arange(SSIM_WINDOW, dtype=images.dtype, device=images.device) - SSIM_WINDOW // 2
    bell = torch.exp(-axis.square() / (2 * SSIM_SIGMA ** 2))
    bell = bell / bell.sum()
    window = (bell[:, None] * bell[None, :]).expand(channels, 1, SSIM_WINDOW, SSIM_WINDOW)
    pad = SSIM_WINDOW // 2

    def local_mean(values: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.pad(values, (pad,) * 4, mode="replicate"),
                                          window, groups=channels)

    level_a, level_b = reconstruction.mean((2, 3), keepdim=True), images.mean((2, 3), keepdim=True)
    centred_a, centred_b = reconstruction - level_a, images - level_b
    around_a, around_b = local_mean(centred_a), local_mean(centred_b)
    mean_a, mean_b = around_a + level_a, around_b + level_b
    variance_a = local_mean(centred_a * centred_a) - around_a.square()
    variance_b = local_mean(centred_b * centred_b) - around_b.square()
    covariance = local_mean(centred_a * centred_b) - around_a * around_b
    similarity = ((2 * mean_a * mean_b + SSIM_C1) * (2 * covariance + SSIM_C2)
                  / ((mean_a.square() + mean_b.square() + SSIM_C1) * (variance_a + variance_b + SSIM_C2)))
    return (1 - similarity) / 2


def error_map(reconstruction: torch.Tensor, images: torch.Tensor, measure: str,
              scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel error (B, C, H, W) that the measure averages: the residual (mse), or the residual
    (scaled-mse) or structural dissimilarity (ssim) divided by each pixel's scale over good images."""
    difference = structural_dissimilarity(reconstruction, images) if measure == "ssim" else reconstruction - images
    if measure in SCALED_MEASURES:
        if scale is None:
            raise ValueError(f"the {measure} error needs the per-pixel scale")
        difference = difference / scale
    return difference


def pixel_error(reconstruction: torch.Tensor, images: torch.Tensor, measure: str,
                scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel error (B, H, W), channels averaged: what `reconstruction_error` pools into one number per
    image, and the reconstruction side of the anomaly map."""
    return error_map(reconstruction, images, measure, scale).square().mean(1)


def pooled_error(per_pixel: torch.Tensor, measure: str, grid: int = 1) -> torch.Tensor:
    """One error per image from `pixel_error` (B, S, S): the mean over all pixels (mse, scaled-mse), or the
    local one (ssim): the mean over the worst 10% of each cell's pixels of a code grid (`grid` cells a side),
    then over the worst LOW_CELLS of the cells, as the density pools the cells' log-densities. A thin crack
    fills few pixels of a large image, and its neighbourhoods are where it shows. With one cell (grid 1),
    the image's worst 10% of pixels."""
    if measure != "ssim":
        return per_pixel.flatten(1).mean(1)
    count, size = per_pixel.shape[0], per_pixel.shape[-1]
    cell = size // grid
    cells = per_pixel.reshape(count, grid, cell, grid, cell).transpose(2, 3).reshape(count, grid * grid, cell * cell)
    worst = max(1, round(WORST_FRACTION * cell * cell))
    cell_errors = cells.topk(worst, dim=2, sorted=False).values.mean(2)
    return cell_errors.topk(worst_cell_count(grid * grid), dim=1, sorted=False).values.mean(1)


def reconstruction_error(reconstruction: torch.Tensor, images: torch.Tensor, measure: str,
                         scale: torch.Tensor | None = None) -> torch.Tensor:
    """Per-image error: mean squared (mse); scaled-mse: mean squared after dividing each pixel's
    residual by `scale` (the model's `error_scale`), so a pixel the model rebuilds well on every
    good image counts more when it is off; or ssim: the structural dissimilarity, scaled per pixel
    as scaled-mse, squared and averaged over the worst 10% of the pixels, so that a small defect (a
    parasite in a cell) is not diluted by the many pixels rebuilt well, and a texture rebuilt a
    little blurred counts less than a missing or extra part. Pooled over the whole image (training
    judges images so); scoring pools a code grid's cells (`pooled_error`)."""
    return pooled_error(pixel_error(reconstruction, images, measure, scale), measure)


@torch.inference_mode()
def residual_scale(model: AdversarialAutoencoder, images, device: torch.device | str, measure: str = "scaled-mse", *,
                   batch_size: int = 256) -> torch.Tensor:
    """The scaled measures' divisor: each pixel's root-mean-square residual (scaled-mse) or structural
    dissimilarity (ssim) over good images, plus the mean of those, so that no pixel divides by almost zero
    and a pixel that is always rebuilt well weighs at most four times an average one (so a pullover's
    sleeves stand out on a T-shirt model)."""
    model.eval()
    squares = torch.zeros(model.arch.channels, model.arch.image_size, model.arch.image_size,
                          dtype=torch.float64, device=device)
    unscaled = torch.ones_like(squares, dtype=torch.float32)
    for start in range(0, len(images), batch_size):
        batch = to_input(images[start:start + batch_size], device)
        squares += error_map(model(batch)[1], batch, measure, unscaled).double().square().sum(0)
    rms = (squares / max(len(images), 1)).sqrt()
    return (rms + rms.mean()).float()


def to_input(pixels: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """uint8 (B,C,H,W) pixels to the model's float input in [0, 1], channels_last for fast CPU convolutions."""
    images = materialize(pixels).to(device, non_blocking=True).float().div_(255.0)
    return images.contiguous(memory_format=torch.channels_last)


def shifted_views(images: torch.Tensor, radius: int) -> torch.Tensor:
    """The images, then the same images moved by every offset of up to `radius` pixels each way
    ((2 radius + 1)^2 views, stacked view by view), with edge pixels repeated into the gap."""
    if radius == 0:
        return images
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (radius,) * 4, mode="replicate")
    offsets = [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1) if dy or dx]
    views = [images] + [padded[:, :, radius - dy:radius - dy + height, radius - dx:radius - dx + width]
                        for dy, dx in offsets]
    return torch.cat(views).contiguous(memory_format=torch.channels_last)
