"""The model's building blocks on hand-made inputs with a known answer."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from aadetect.config import Architecture  # noqa: E402
from aadetect.images import choose_image_size  # noqa: E402
from aadetect.model import AdversarialAutoencoder, pooled_error, reconstruction_error  # noqa: E402


def test_smooth_mse_is_per_image():
    images = torch.rand(3, 1, 8, 8)
    reconstructions = torch.rand(3, 1, 8, 8)
    together = reconstruction_error(reconstructions, images, "smooth-mse")
    alone = torch.cat([reconstruction_error(reconstructions[i:i + 1], images[i:i + 1], "smooth-mse")
                       for i in range(3)])
    assert torch.allclose(together, alone)


@pytest.mark.parametrize("sides, expected", [([28] * 5, 28), ([30, 30, 31], 28), ([32, 32], 32), ([6], 8),
                                             ([33, 40, 500], 64)])
def test_small_images_keep_their_own_size(sides, expected):
    assert choose_image_size([(side, side, 1) for side in sides]) == expected


@pytest.mark.parametrize("size", [28, 32, 64, 12])
def test_the_decoder_rebuilds_the_input_shape(size):
    arch = Architecture.for_images(size, 3, 32, extra_convs=0)
    codes, reconstruction = AdversarialAutoencoder(arch).eval()(torch.rand(2, 3, size, size))
    assert codes.shape == (2, 32) and reconstruction.shape == (2, 3, size, size)


def test_the_adversarial_prior_pulls_codes_towards_a_standard_gaussian():
    """`--adversarial`: the discriminator's pressure shows in the codes' moments."""
    from aadetect.config import TrainConfig
    from aadetect.training import encode_all, train_autoencoder
    from conftest import SIZE, blob_images

    images = torch.from_numpy(blob_images(240, seed=21))[:, None]
    arch = Architecture.for_images(SIZE, 1, 4, extra_convs=0)

    def code_moments(adversarial: bool) -> float:
        config = TrainConfig(epochs=15, batch_size=16, image_size=SIZE, seed=0, adversarial=adversarial, robust=False,
                             patience=100)
        codes, _ = encode_all(train_autoencoder(images, arch, config, "cpu").model, images, "cpu", "mse")
        return float(codes.mean(0).abs().mean() + (codes.std(0) - 1).abs().mean())  # 0 for N(0, I)

    assert code_moments(adversarial=True) < 0.5 * code_moments(adversarial=False)


def test_scaled_mse_weighs_each_pixel_by_its_scale():
    images = torch.zeros(1, 1, 4, 4)
    scale = torch.ones(1, 4, 4)
    off_here, off_there = images.clone(), images.clone()
    off_here[0, 0, 0, 0] = 0.5
    off_there[0, 0, 3, 3] = 0.5
    assert reconstruction_error(off_here, images, "scaled-mse", scale) == reconstruction_error(off_here, images, "mse")
    scale[0, 0, 0], scale[0, 3, 3] = 0.5, 2.0  # (0, 0) is rebuilt well on good images, (3, 3) badly
    here, there = (reconstruction_error(r, images, "scaled-mse", scale).item() for r in (off_here, off_there))
    assert here == pytest.approx(16 * there)
    with pytest.raises(ValueError, match="scale"):
        reconstruction_error(off_here, images, "scaled-mse")


@pytest.mark.parametrize("measure, channels", [("scaled-mse", 1), ("ssim", 3)])
def test_error_scale_is_the_rms_of_the_unscaled_map_plus_its_mean(measure, channels):
    from aadetect.model import residual_scale, structural_dissimilarity

    torch.manual_seed(0)
    model = AdversarialAutoencoder(Architecture.for_images(8, channels, 4, extra_convs=0)).eval()
    pixels = torch.randint(0, 256, (10, channels, 8, 8), dtype=torch.uint8)
    scale = residual_scale(model, pixels, "cpu", measure, batch_size=3)  # batches of 3, 3, 3, 1
    with torch.no_grad():
        inputs = pixels.float() / 255
        reconstruction = model(inputs)[1]
        unscaled = (structural_dissimilarity(reconstruction, inputs) if measure == "ssim"
                    else reconstruction - inputs)
        rms = unscaled.square().mean(0).sqrt()
    assert scale.shape == (channels, 8, 8)
    assert torch.allclose(scale, rms + rms.mean(), rtol=1e-5, atol=0)


def test_structural_dissimilarity_of_flat_images_is_the_luminance_term():
    from aadetect.model import SSIM_C1, structural_dissimilarity

    bright, dark = torch.full((1, 1, 8, 8), 0.5), torch.full((1, 1, 8, 8), 0.3)
    similarity = (2 * 0.5 * 0.3 + SSIM_C1) / (0.5 ** 2 + 0.3 ** 2 + SSIM_C1)  # no contrast, so only the means differ
    expected = torch.full((1, 1, 8, 8), (1 - similarity) / 2)
    assert torch.allclose(structural_dissimilarity(bright, dark), expected, rtol=0, atol=1e-5)  # float32 variances
    textured = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert structural_dissimilarity(textured, textured).abs().max() < 1e-5


def test_ssim_error_is_not_diluted_by_the_pixels_rebuilt_well():
    """A small defect counts more than the same squared residual spread over the whole image, which mse
    cannot tell apart; and it counts more where good images are rebuilt well (a smaller scale)."""
    images = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.2 + 0.4
    defect, spread = images.clone(), images.clone()
    defect[0, 0, 6:9, 6:9] += 0.4  # 9 pixels off by 0.4
    spread += 0.4 * (9 / 256) ** 0.5  # every pixel off by the same total squared residual
    assert reconstruction_error(defect, images, "mse") == pytest.approx(reconstruction_error(spread, images, "mse").item())
    scale = torch.ones(1, 16, 16)
    local, diffuse = (reconstruction_error(r, images, "ssim", scale).item() for r in (defect, spread))
    assert local > 10 * diffuse
    scale[0, 2:14, 2:14] = 0.5  # around the defect, as far as the 5x5 window carries it
    assert reconstruction_error(defect, images, "ssim", scale).item() == pytest.approx(4 * local, rel=1e-4)
    with pytest.raises(ValueError, match="scale"):
        reconstruction_error(defect, images, "ssim")


def test_a_code_grid_pools_the_ssim_error_over_its_worst_cells():
    """With one code per image the ssim error is the image's worst 10% of pixels; with a code grid, each cell's
    worst 10%, then the worst 4% of the cells (one of a 4x4 grid): a thin crack in one cell counts as much
    wherever it lies, and far more than its share of the whole image. The mean-square measures average
    every pixel, grid or not."""
    per_pixel = torch.zeros(1, 32, 32)
    per_pixel[0, 9, 8:16] = 1.0  # a line 8 pixels long, across the cell at row 1, column 1 of a 4x4 grid
    assert pooled_error(per_pixel, "ssim").item() == pytest.approx(8 / 102)  # the image's worst 102 pixels
    assert pooled_error(per_pixel, "ssim", grid=1).item() == pytest.approx(8 / 102)
    assert pooled_error(per_pixel, "ssim", grid=4).item() == pytest.approx(1.0)  # the cell's worst 6 of 64
    moved = torch.roll(per_pixel, shifts=(16, 8), dims=(1, 2))  # the same line, in another cell
    assert pooled_error(moved, "ssim", grid=4).item() == pytest.approx(1.0)
    two_cells = per_pixel + torch.roll(per_pixel, shifts=16, dims=1)
    big_grid = pooled_error(two_cells.repeat(1, 2, 2), "ssim", grid=8)  # 64 cells: the worst 3 (4%), 8 of them hot
    assert big_grid.item() == pytest.approx(1.0)
    for measure in ("mse", "scaled-mse"):
        assert pooled_error(per_pixel, measure, grid=4).item() == pytest.approx(8 / 1024)


def test_shifted_views_move_the_image_and_repeat_its_edges():
    from aadetect.model import shifted_views

    images = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).view(2, 3, 5, 5)
    assert shifted_views(images, 0) is images
    views = shifted_views(images, 1).view(9, 2, 3, 5, 5)
    assert torch.equal(views[0], images)  # the unmoved images first
    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if dy or dx]
    for view, (dy, dx) in zip(views[1:], offsets):
        rows = (torch.arange(5) - dy).clamp(0, 4)  # pixel (y, x) of the view shows (y - dy, x - dx), edges held
        columns = (torch.arange(5) - dx).clamp(0, 4)
        assert torch.equal(view, images[:, :, rows][:, :, :, columns]), (dy, dx)
    assert len(shifted_views(images, 2)) == 25 * 2


def test_extra_convolutions_add_capacity_at_every_resolution():
    plain = AdversarialAutoencoder(Architecture.for_images(28, 1, 8, extra_convs=0))
    deeper = AdversarialAutoencoder(Architecture.for_images(28, 1, 8, extra_convs=1))
    count = lambda net: sum(isinstance(m, torch.nn.Conv2d) and m.stride == (1, 1) for m in net.modules())  # noqa: E731
    assert count(plain.encoder) == 0 and count(deeper.encoder) == len(deeper.arch.widths)
    assert count(plain.decoder) == 0 and count(deeper.decoder) == len(deeper.arch.widths) - 1  # none at the output
    images = torch.rand(4, 1, 28, 28)
    codes, reconstruction = deeper.eval()(images)
    assert codes.shape == (4, 8) and reconstruction.shape == images.shape
