"""The training loop: a reconstruction phase and, with the adversarial prior on, a regularisation
phase, each step; robust to outliers.

Robust training follows Beggel et al. (ECML-PKDD 2019): after a warm-up, images whose
reconstruction error is far out of line with the rest, or whose code has few close
neighbours among the codes of the images kept so far, are rejected (weight 0) from the
reconstruction and prior-matching losses, re-judged every epoch; so the model is never
pulled to rebuild them well or to place them among the good codes, and the KDE is fitted
without them.

Under torchrun (`aadetect.distributed`), each process trains on its share of every batch through
DistributedDataParallel wrappers, and the numbers that decide something (the robust rule's codes and
errors, the validation loss) are gathered from all of them, so every process decides the same.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from aadetect import distributed
from aadetect.config import Architecture, TrainConfig
from aadetect.errors import UserError
from aadetect.model import AdversarialAutoencoder, flat_codes, reconstruction_error, structural_dissimilarity, to_input

EVAL_BATCH = 256
NEIGHBOURS = 10  # the robust rule's neighbourhood: larger than a few duplicates, far smaller than a class
MAX_REFERENCE = 10_000  # codes the neighbours are looked for among, at most
NEIGHBOUR_CHUNK = 1024
FINAL_PASSES = 3  # re-judgements of the final model, each against the images the last one kept
MIN_VALIDATION = 5  # held-out images, at least: the default thresholds' spreads are measured on them


@dataclass
class TrainResult:
    model: AdversarialAutoencoder
    train_indices: np.ndarray  # into the image tensor
    validation_indices: np.ndarray
    rejected: np.ndarray  # subset of train_indices left out as likely outliers at the end
    epochs_run: int
    best_epoch: int
    history: list[dict] = field(default_factory=list)

    @property
    def final_losses(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


def validation_size(count: int, fraction: float) -> int:
    """How many of `count` images are held out. Never fewer than MIN_VALIDATION (while half are left
    to train on): one held-out image has no spread, and thresholds scaled by none flag nearly everything."""
    return max(1, min(max(MIN_VALIDATION, round(count * fraction)), count // 2))


def robust_z(values: torch.Tensor) -> torch.Tensor:
    """Modified z-score (Iglewicz & Hoaglin): distance from the median in units of MAD."""
    median = values.median()
    mad = (values - median).abs().median().clamp_min(1e-12)
    return 0.6745 * (values - median) / mad


@torch.inference_mode()
def encode_all(model: AdversarialAutoencoder, images: torch.Tensor, device: str, measure: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and reconstruction errors for many images, in eval mode."""
    model.eval()
    codes, errors = [], []
    for start in range(0, len(images), EVAL_BATCH):
        batch = to_input(images[start:start + EVAL_BATCH], device)
        code, reconstruction = model(batch)
        codes.append(flat_codes(code).float().cpu())
        errors.append(reconstruction_error(reconstruction, batch, measure).float().cpu())
    return torch.cat(codes), torch.cat(errors)


def encode_shared(model: AdversarialAutoencoder, images: torch.Tensor, device: str, measure: str
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`encode_all`; under torchrun each process encodes its share of the images, and every one gets all
    the codes and errors, in order."""
    if not distributed.active() or len(images) < distributed.size():  # (a few images: each process all of them)
        return encode_all(model, images, device, measure)
    codes, errors = encode_all(model, images[distributed.share(len(images))], device, measure)
    return distributed.gather_rows(codes, len(images)), distributed.gather_rows(errors, len(images))


def neighbour_distance(codes: torch.Tensor, reference: torch.Tensor, k: int = NEIGHBOURS) -> torch.Tensor:
    """Distance from each code to its k-th nearest reference code (itself not counted), after whitening.

    Whitening with the reference codes' covariance makes the distance blind to how the encoder
    happens to scale and correlate its dimensions. A hidden bad image has few close neighbours
    among the good codes: even a small cluster of similar bad images is much sparser than the good
    ones. This is close to the local density the KDE will see (on the codes as they are: training
    does not depend on --code-radius), measured at a scale of k images, so that one near
    duplicate is not enough to look normal. Large sets are compared with an evenly
    spread subset of the reference, so the cost per epoch stays linear in the number of images.
    """
    positions = reference.nonzero().flatten()
    if len(positions) > MAX_REFERENCE:
        positions = positions[torch.linspace(0, len(positions) - 1, MAX_REFERENCE).long()]
    in_reference = torch.zeros(len(codes), dtype=torch.bool)
    in_reference[positions] = True
    k = max(1, min(k, len(positions) - 1))
    reference_codes = codes[positions].double()
    covariance = torch.cov(reference_codes.T).reshape(codes.shape[1], codes.shape[1])
    ridge = covariance.diagonal().mean().clamp_min(1e-12) * 1e-6  # a dead code dimension must not fail
    factor = torch.linalg.cholesky(covariance + ridge * torch.eye(len(covariance), dtype=covariance.dtype))
    whitened = torch.linalg.solve_triangular(factor, (codes.double() - reference_codes.mean(0)).T,
                                             upper=False).T.float()
    whitened_reference = whitened[positions]
    reference_norms = whitened_reference.square().sum(1)
    distances = []
    for start in range(0, len(codes), NEIGHBOUR_CHUNK):  # |a - b|^2 = |a|^2 - 2 a.b + |b|^2, a block at a time
        block = whitened[start:start + NEIGHBOUR_CHUNK]
        squared = torch.addmm(reference_norms[None, :], block, whitened_reference.T, alpha=-2)
        squared += block.square().sum(1, keepdim=True)
        nearest = squared.topk(k + 1, dim=1, largest=False).values
        own = in_reference[start:start + NEIGHBOUR_CHUNK]  # its nearest reference code is itself
        distances.append(torch.where(own, nearest[:, k], nearest[:, k - 1]))
    return torch.cat(distances).clamp_min(0).sqrt()


def find_outliers(model, images: torch.Tensor, device: str, measure: str, reject_z: float,
                  kept: torch.Tensor) -> torch.Tensor:
    """Images far out of line in reconstruction error or in how sparse their codes' neighbourhood is.

    Neighbours are looked for among the images kept so far (`kept`; all, at first), so judging again
    peels off a cluster of bad images layer by layer. Both measures are positive and right-skewed,
    so they are judged on a log scale; otherwise the long natural tail of good images would be
    rejected too.
    """
    codes, errors = encode_shared(model, images, device, measure)  # of all the images, on every process
    return judge_outliers(codes, errors, kept, reject_z, model.arch)


def judge_outliers(codes: torch.Tensor, errors: torch.Tensor, kept: torch.Tensor, reject_z: float,
                   arch: Architecture) -> torch.Tensor:
    """`find_outliers`' rule on the images' codes (as `flat_codes` gives them) and reconstruction errors."""
    if arch.code_grid > 1:  # thousands of numbers cannot be whitened over a few hundred images:
        local = codes.view(len(codes), -1, arch.latent_dim)  # judge what the image is made of
        codes = torch.cat([local.mean(1), local.std(1)], dim=1)
    log_error = errors.double().clamp_min(1e-12).log()
    log_distance = neighbour_distance(codes, kept).clamp_min(1e-12).log()
    return torch.maximum(robust_z(log_error), robust_z(log_distance)) > reject_z


def rebuilding_loss(reconstruction: torch.Tensor, images: torch.Tensor, arch: Architecture) -> torch.Tensor:
    """What the networks learn to lower, per image: the squared error; for a code grid, plus the structural
    dissimilarity, so that the local codes carry the structure of their neighbourhoods and not only its
    brightness (it made them a far better density on real defects: benchmarks/RESULTS.md)."""
    loss = reconstruction_error(reconstruction, images, "mse")
    if arch.code_grid > 1:
        loss = loss + structural_dissimilarity(reconstruction, images).flatten(1).mean(1)
    return loss


def weighted_mean(values: torch.Tensor, weights: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """The weighted mean, over a sum of weights `total`: the whole batch's (at least 1) divided by the number
    of processes, each of which holds a share of the batch; DDP's average of their gradients is then the
    whole batch's."""
    return (values * weights).sum() / total


def train_autoencoder(images: torch.Tensor, arch: Architecture, config: TrainConfig, device: str, *,
                      on_step: Callable[[dict], None] | None = None,
                      on_epoch: Callable[[dict], None] | None = None,
                      save_checkpoint: Callable[[dict], None] | None = None,
                      resume_from: dict | None = None) -> TrainResult:
    """Train on uint8 images (N, C, S, S); part of them is held out for early stopping."""
    config = dataclasses.replace(config, code_grid=arch.code_grid).resolved(arch.image_size)  # autos decided
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    count = len(images)
    order = torch.randperm(count, generator=generator)
    validation_count = validation_size(count, config.validation_fraction)
    validation_indices, train_indices = order[:validation_count], order[validation_count:]
    train_images = images[train_indices]
    validation_images = images[validation_indices]
    if str(device).startswith("cuda"):  # page-locked host memory: batches copy to the GPU asynchronously
        train_images, validation_images = train_images.pin_memory(), validation_images.pin_memory()

    model = AdversarialAutoencoder(arch).to(device).to(memory_format=torch.channels_last)
    autoencoder_parameters = list(model.encoder.parameters()) + list(model.decoder.parameters())
    reconstruction_optimizer = torch.optim.Adam(autoencoder_parameters, lr=config.learning_rate)
    discriminator_optimizer = torch.optim.Adam(model.discriminator.parameters(), lr=config.learning_rate / 2,
                                               betas=(0.5, 0.999))
    generator_optimizer = torch.optim.Adam(model.encoder.parameters(), lr=config.learning_rate / 2,
                                           betas=(0.5, 0.999))
    optimizers = {"reconstruction": reconstruction_optimizer, "discriminator": discriminator_optimizer,
                  "generator": generator_optimizer}
    loss_measure = "mse"  # whatever the scoring measure: the scaled ones need a trained model first
    weights = torch.ones(len(train_images))
    warmup = max(2, config.epochs // 5)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "best_model": None, "history": []}

    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(resume_from["optimizers"][name])
        weights = resume_from["weights"]
        torch.set_rng_state(resume_from["rng"])
        generator.set_state(resume_from["generator"])
        if resume_from.get("cuda_rng") is not None:  # prior samples are drawn on the device
            torch.cuda.set_rng_state(resume_from["cuda_rng"], device)
        state = {key: resume_from[key] for key in state}
    # under torchrun, each process takes every world_size-th image of each batch, and the networks are called
    # through wrappers that average their gradients over the processes; alone, the networks themselves
    rank, world_size = distributed.rank(), distributed.size()
    if config.batch_size < 2 * world_size:  # batch norm needs two images in each process
        raise UserError(f"--batch-size {config.batch_size} leaves some of the {world_size} processes fewer than 2 "
                        f"images of each batch; use at least {2 * world_size}")
    encoder, decoder, discriminator = (distributed.wrap(net, device)
                                       for net in (model.encoder, model.decoder, model.discriminator))

    for epoch in range(state["epoch"], config.epochs):
        if epoch - state["best_epoch"] >= config.patience:  # early stop (checked here so a resume agrees)
            break
        model.train()
        totals = {name: torch.zeros((), device=device) for name in ("reconstruction", "discriminator", "generator")}
        steps = 0
        permutation = torch.randperm(len(train_images), generator=generator)
        for batch_positions in permutation.split(config.batch_size):
            if len(batch_positions) < 2 * world_size:  # batch norm needs two images (in each process)
                continue
            positions = batch_positions[rank::world_size]  # this process's share
            batch = to_input(train_images[positions], device)
            batch_weights = weights[positions].to(device)
            batch_total = weights[batch_positions].sum().clamp_min(1.0) / world_size  # see weighted_mean

            # Reconstruction phase: encoder and decoder learn to rebuild the image.
            codes = encoder(batch)
            reconstruction = decoder(codes)
            reconstruction_loss = weighted_mean(rebuilding_loss(reconstruction, batch, arch), batch_weights,
                                                batch_total)
            reconstruction_optimizer.zero_grad(set_to_none=True)
            reconstruction_loss.backward()
            reconstruction_optimizer.step()
            totals["reconstruction"] += reconstruction_loss.detach()

            # Regularisation phase: the discriminator learns prior from codes, the encoder learns to fool it.
            if config.adversarial:
                codes = encoder(batch)
                # drawn for the whole batch, so every process's generator stays in step: a resume restores one
                prior_samples = torch.randn((len(batch_positions), *codes.shape[1:]), device=device)[rank::world_size]
                real, fake = discriminator(prior_samples), discriminator(codes.detach())
                discriminator_loss = (F.binary_cross_entropy_with_logits(real, torch.ones_like(real))
                                      + F.binary_cross_entropy_with_logits(fake, torch.zeros_like(fake)))
                discriminator_optimizer.zero_grad(set_to_none=True)
                discriminator_loss.backward()
                discriminator_optimizer.step()

                fooled = discriminator(codes)
                per_image = len(fooled) // len(batch_weights)  # a grid's codes each
                generator_loss = weighted_mean(
                    F.binary_cross_entropy_with_logits(fooled, torch.ones_like(fooled), reduction="none"),
                    batch_weights.repeat_interleave(per_image), batch_total * per_image)
                generator_optimizer.zero_grad(set_to_none=True)
                generator_loss.backward()
                generator_optimizer.step()
                totals["discriminator"] += discriminator_loss.detach()
                totals["generator"] += generator_loss.detach()
            steps += 1
            if on_step is not None:
                on_step({"epoch": epoch + 1, "images": len(batch_positions)})

        distributed.average_batch_norm(model)  # so that every process's model measures the same from here
        _, validation_errors = encode_shared(model, validation_images, device, loss_measure)
        validation_loss = float(validation_errors.mean())
        if not math.isfinite(validation_loss):  # NaN weights: every later step, and the robust rule, would fail
            raise UserError(f"training diverged in epoch {epoch + 1} (the validation loss became "
                            f"{validation_loss}); lower the learning rate ({config.learning_rate:g})")
        if config.robust and epoch + 1 >= warmup:
            outliers = find_outliers(model, train_images, device, loss_measure, config.reject_z, kept=weights > 0)
            weights = (~outliers).float()
        losses = distributed.average(torch.stack(list(totals.values()))).tolist()  # one sync per epoch
        record = {name: total / max(steps, 1) for name, total in zip(totals, losses)}
        record.update(epoch=epoch + 1, validation=validation_loss, rejected=int((weights == 0).sum()))
        state["history"].append(record)
        if validation_loss < state["best_loss"]:
            state.update(best_loss=validation_loss, best_epoch=epoch + 1,
                         best_model=copy.deepcopy(model.state_dict()))
        state["epoch"] = epoch + 1
        if on_epoch is not None:
            on_epoch(record)
        if save_checkpoint is not None:
            save_checkpoint({**state, "model": model.state_dict(), "weights": weights,
                             "optimizers": {name: opt.state_dict() for name, opt in optimizers.items()},
                             "rng": torch.get_rng_state(), "generator": generator.get_state(),
                             "cuda_rng": torch.cuda.get_rng_state(device) if str(device).startswith("cuda") else None})

    if state["best_model"] is not None:
        model.load_state_dict(state["best_model"])
    distributed.check_same_weights(model)
    model.eval()
    outliers = weights == 0
    if config.robust:
        for _ in range(FINAL_PASSES):
            judged = find_outliers(model, train_images, device, loss_measure, config.reject_z, kept=~outliers)
            if torch.equal(judged, outliers):
                break
            outliers = judged
    rejected = train_indices[outliers]
    return TrainResult(model=model, train_indices=train_indices.numpy(),
                       validation_indices=validation_indices.numpy(), rejected=rejected.numpy(),
                       epochs_run=state["epoch"], best_epoch=state["best_epoch"], history=state["history"])
