"""Cached VAE latents and frozen text states for text-to-image training, written once and reused.

Every step of latent diffusion runs the frozen VAE encoder over the images and the frozen CLIP text tower over the
captions, and both give the same answers every epoch. `LatentCache.open_or_build` runs them once over a finite caption
dataset and keeps, per item, the VAE posterior's scaled mean and standard deviation (each step still draws a fresh
latent sample from them, as without the cache) and the caption's frozen text encoding. A run with the cache reads no
pixels and runs neither encoder.

The folder is reused by later runs and epochs when its manifest matches (the dataset, image size, number of items,
and the exact VAE and text-encoder weights); a folder written for something else is refused in one line. One view of
each image is cached (the dataset's own transform), so random crops would be frozen: recipes refuse crops with it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..clip.model import TextEncoding
from ..data.robust import MAX_EXAMPLES, collate_captions
from ..errors import UserError
from ..io import atomic_folder, load_tensors, read_json, save_tensors, write_json
from .text2img import TextToImage, tokenize_prompts

MANIFEST = "manifest.json"
TENSORS = "cache.safetensors"
FORMAT = 1
TEXT_FIELDS = TextEncoding._fields  # (token_states, embedding, padding_mask)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """sha256 of a module's parameter and buffer names and values: equal exactly when the weights are."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_identity(model: TextToImage, dataset_spec: str, items: int) -> dict:
    """What a cache folder must match to be reused: the data, the image size and the frozen encoders' weights."""
    if model.vae is None:
        raise UserError("data.latent_cache needs latent diffusion (model.vae): a pixel model has no latents to cache")
    return {"format": FORMAT, "dataset": dataset_spec, "items": items, "image_size": model.config.image_size,
            "text_skip_layers": getattr(model.config, "text_skip_layers", 0),
            "vae": weights_fingerprint(model.vae), "text_encoder": weights_fingerprint(model.text_encoder)}


class LatentCache(Dataset):
    """Items {"latent_mean", "latent_std", "token_states", "embedding", "padding_mask"}: scaled VAE posterior moments
    (latent_channels, h, w) and the caption's frozen text encoding; batch them with the default collate."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors["latent_mean"])

    def __getitem__(self, index: int) -> dict:
        return {name: values[index] for name, values in self.tensors.items()}

    @classmethod
    def open_or_build(cls, folder: str | Path, model: TextToImage, dataset: Dataset, dataset_spec: str, *,
                      batch_size: int = 64, progress: bool = True) -> "LatentCache":
        """The cache in `folder` if it was written for this dataset and these encoders, else a new one built there
        (atomically). A folder holding anything else is refused."""
        folder = Path(folder)
        identity = cache_identity(model, dataset_spec, len(dataset))
        if (folder / MANIFEST).is_file():
            stored = read_json(folder / MANIFEST)
            differs = [key for key in identity if stored.get(key) != identity[key]]
            if differs:
                raise UserError(f"data.latent_cache={folder} was written for other data or encoders (differs in: "
                                f"{', '.join(differs)}); choose another folder or delete it")
            return cls(load_tensors(folder / TENSORS))
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            raise UserError(f"data.latent_cache={folder} exists and is not a latent cache; choose another folder")
        tensors = encode_dataset(model, dataset, batch_size=batch_size, progress=progress)
        with atomic_folder(folder) as staging:
            save_tensors(staging / TENSORS, tensors)
            write_json(staging / MANIFEST, {**identity, "cached": len(tensors["latent_mean"])})
        return cls(tensors)


@torch.no_grad()
def encode_dataset(model: TextToImage, dataset: Dataset, *, batch_size: int = 64,
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """The scaled posterior moments and text encodings of every usable item (bad samples left out with a warning)."""
    device = next(model.parameters()).device
    vae, config = model.vae, model.vae.config
    # its own generator: a loader draws a seed when iterated, and the global one would then differ between a run that
    # builds the cache and one that reuses it (adapters initialised after the cache, data order, noise)
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_captions, generator=torch.Generator())
    parts: dict[str, list[torch.Tensor]] = {}
    skipped, examples = 0, []
    for batch in tqdm(loader, desc="caching latents and text states", disable=not progress, leave=False):
        skipped += batch["skipped"]
        examples += batch["skipped_examples"][: MAX_EXAMPLES - len(examples)]
        if not batch["captions"]:
            continue
        posterior = vae.encode(batch["images"].to(device))
        # encode_latents' (sample - shift) * scale, split into a mean and a standard deviation
        parts.setdefault("latent_mean", []).append((posterior.mean - config.shift_factor) * config.scaling_factor)
        parts.setdefault("latent_std", []).append(posterior.std * config.scaling_factor)
        text = model.encode_condition(tokenize_prompts(batch["captions"], model.context_length).to(device))
        for name in TEXT_FIELDS:
            parts.setdefault(name, []).append(getattr(text, name))
    if not parts:
        raise UserError(f"no usable samples to cache ({skipped} unreadable)")
    if skipped:
        print(f"warning: caching latents: {skipped} unreadable samples left out, e.g. {', '.join(examples)}",
              file=sys.stderr)
    return {name: torch.cat(chunks).cpu() for name, chunks in parts.items()}
