"""`mmgen train vae`: the KL autoencoder of latent diffusion on images (the captions of the data are not used).

Loss: reconstruction (L1 or MSE) + kl_weight * KL (mmgen.diffusion.vae.vae_loss). At each evaluation the main
process logs the PSNR of the posterior-mode reconstructions of fixed held-out images (val/psnr), saves originals
above their reconstructions as RUN_DIR/samples/step-N.png, and measures the latent scaling factor: 1 / std of the
posterior samples of a few fixed training batches, as Stable Diffusion's 0.18215 was found. The factor is stored in
the model's config, so final/config.json carries the one measured on the final weights (the last evaluation is at
the last step, just before final/ is written) and a latent diffusion model gets unit-variance latents from it.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import torch

from ..data.images import make_grid, save_png, to_pil_images
from ..data.robust import collate_captions, robust
from ..diffusion.vae import VAE, VAEConfig, vae_loss
from ..training import TrainConfig
from ..training.trainer import process_state
from .common import RecipeRun
from .diffusion import DiffusionDataConfig


@dataclass
class VAEModelSection(VAEConfig):
    """The VAE's shape (mmgen.diffusion.vae.VAEConfig) and the size of the training images; scaling_factor is
    measured during training, whatever it is set to here."""

    image_size: int = 32

    def __post_init__(self):
        super().__post_init__()
        if self.image_size < 1 or self.image_size % self.downsampling_factor:
            raise ValueError(f"image_size must be a positive multiple of the downsampling factor "
                             f"{self.downsampling_factor}, got {self.image_size}")

    def vae_config(self) -> VAEConfig:
        """The VAEConfig part of the section."""
        return VAEConfig(**{f.name: getattr(self, f.name) for f in fields(VAEConfig)})


@dataclass
class VAELossConfig:
    """reconstruction: "l1" or "mse", summed over each image's elements; kl_weight: LDM's 1e-6 keeps latents nearly
    free (their scale is then fixed by the measured scaling factor)."""

    reconstruction: Literal["l1", "mse"] = "l1"
    kl_weight: float = 1e-6

    def __post_init__(self):
        if self.kl_weight < 0:
            raise ValueError(f"kl_weight must be >= 0, got {self.kl_weight}")


@dataclass
class VAEEvaluationConfig:
    """What each evaluation adds besides val/loss: a grid of `grid_images` originals over their reconstructions
    (0: none), and the scaling factor measured on `scaling_batches` training batches."""

    grid_images: int = 8
    scaling_batches: int = 4

    def __post_init__(self):
        if self.grid_images < 0 or self.scaling_batches < 1:
            raise ValueError(f"need grid_images >= 0 and scaling_batches >= 1, got {self.grid_images}, "
                             f"{self.scaling_batches}")


@dataclass
class VAERecipe:
    """configs/vae-*.yaml: model, data, loss, evaluation and train sections."""

    model: VAEModelSection = field(default_factory=VAEModelSection)
    data: DiffusionDataConfig = field(default_factory=DiffusionDataConfig)
    loss: VAELossConfig = field(default_factory=VAELossConfig)
    evaluation: VAEEvaluationConfig = field(default_factory=VAEEvaluationConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


class ReconstructionLoss:
    """loss_fn: vae_loss of the reconstruction from a posterior sample (training) or the posterior mode (validation)."""

    def __init__(self, config: VAELossConfig):
        self.config = config

    def __call__(self, model, batch: dict):
        images = batch["images"]
        reconstruction, posterior = model(images, sample_posterior=model.training)
        loss = vae_loss(reconstruction, images, posterior, self.config.kl_weight, self.config.reconstruction)
        return loss.total, {"loss/reconstruction": loss.reconstruction.detach(), "loss/kl": loss.kl.detach()}


def first_batches(dataset, batch_size: int, count: int):
    """The images (batch, 3, H, W) of the first `count` batches of `dataset`, in order (a fixed set each time)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions,
                                         generator=torch.Generator().manual_seed(0))  # leaves the global RNG alone
    for batch in itertools.islice(loader, count):
        if len(batch["images"]):
            yield batch["images"]


@torch.no_grad()
def psnr(vae: VAE, batches) -> tuple[float, list[torch.Tensor]]:
    """Mean PSNR (dB, pixels in [0, 1]) of the posterior-mode reconstructions of `batches`, and the first batch's
    (originals, reconstructions)."""
    device = next(vae.parameters()).device
    values, first = [], []
    for images in batches:
        images = images.to(device)
        reconstruction = vae(images, sample_posterior=False)[0].clamp(-1, 1)
        error = ((reconstruction.float() - images.float()) / 2).square().flatten(1).mean(dim=1)  # [-1, 1] -> [0, 1]
        values.append(-10 * torch.log10(error.clamp(min=1e-10)))
        if not first:
            first = [images, reconstruction]
    return torch.cat(values).mean().item(), first


@torch.no_grad()
def measure_scaling_factor(vae: VAE, batches, seed: int = 0) -> float:
    """1 / std of the posterior samples of `batches`: what brings the latents a diffusion model sees to unit variance
    (how Rombach et al. 2022 rescale the latents of a KL autoencoder; Stable Diffusion's 0.18215)."""
    device = next(vae.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    latents = [vae.encode(images.to(device)).sample(generator).float().flatten() for images in batches]
    std = torch.cat(latents).std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"cannot measure a scaling factor: the latents' std is {std}")
    return 1.0 / std


class VAEEvaluation:
    """The Trainer's evaluate_fn: PSNR, reconstruction grid and scaling factor, on the main process (which alone
    writes checkpoints and final/). The factor goes into the evaluated model's config and the trained model's."""

    def __init__(self, run_dir: Path, trained: VAE, train_set, heldout_set, heldout_name: str,
                 config: VAEEvaluationConfig, train_config: TrainConfig):
        self.run_dir, self.trained, self.config = run_dir, trained, config
        self.train_set, self.heldout_set, self.heldout_name = train_set, heldout_set, heldout_name
        self.batch_size, self.eval_batches = train_config.batch_size, train_config.eval_batches
        self.seed = train_config.seed

    def __call__(self, model: VAE, step: int) -> dict:
        if not process_state().is_main_process:
            return {}
        with torch.random.fork_rng(devices=[]):  # random crops of the training data draw from the global RNG
            value, (images, reconstructions) = psnr(model, first_batches(self.heldout_set, self.batch_size,
                                                                         self.eval_batches))
            factor = measure_scaling_factor(
                model, first_batches(self.train_set, self.batch_size, self.config.scaling_batches), self.seed)
        model.config.scaling_factor = self.trained.config.scaling_factor = factor
        metrics = {f"{self.heldout_name}/psnr": value, "vae/scaling_factor": factor}
        count = min(self.config.grid_images, len(images))
        if count:
            path = self.run_dir / "samples" / f"step-{step}.png"
            pictures = to_pil_images(torch.cat([images[:count], reconstructions[:count]]), "minus_one_to_one")
            save_png(make_grid(pictures, columns=count), path)
            metrics["samples/grid"] = str(path.relative_to(self.run_dir))
        return metrics


def train(config_path, run_dir, overrides: list[str] = (), resume: bool = False) -> VAE:
    """Train a VAE as `mmgen train vae` does; returns the (EMA) model (its config holds the measured scaling factor)."""
    run = RecipeRun.open(VAERecipe, config_path, overrides, run_dir, resume)
    recipe = run.recipe
    train_set, val_set = run.caption_datasets(recipe.model.image_size, "minus_one_to_one", recipe.data.shapes_options())
    train_set, val_set = robust(train_set), robust(val_set)

    model = run.build_model(lambda: VAE(recipe.model.vae_config()))
    config, size = model.config, recipe.model.image_size
    latent = size // config.downsampling_factor
    run.state.print(f"vae: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {config.in_channels}x"
                    f"{size}x{size} images -> {config.latent_channels}x{latent}x{latent} latents")
    evaluation = VAEEvaluation(run.folder.path, model, train_set, val_set or train_set, "val" if val_set else "train",
                               recipe.evaluation, recipe.train)
    model = run.fit(model, loss_fn=ReconstructionLoss(recipe.loss), train_dataset=train_set, val_dataset=val_set,
                    collate_fn=collate_captions, evaluate_fn=evaluation, max_bad_fraction=recipe.data.max_bad_fraction)
    run.state.print(f"latent scaling factor {model.config.scaling_factor:.5g} (1 / std of the latents of "
                    f"{recipe.evaluation.scaling_batches} training batches), stored in {run.folder.final}")
    return model
