"""Image loading (any file PIL reads, any mode -> 8-bit RGB), the train / eval tensor transforms, and back to PNG."""

from __future__ import annotations

import io
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional

from ..errors import ConfigError
from ..io import atomic_write_bytes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# name -> (mean, std): "clip" for CLIP towers, "minus_one_to_one" maps [0, 1] to [-1, 1] for diffusion
NORMALIZATIONS = {
    "clip": (CLIP_MEAN, CLIP_STD),
    "minus_one_to_one": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}
# the most width x height pixels load_rgb decodes (a 10000x10000 PNG can be a few hundred KB on disk and 300 MB in
# memory); the environment variable, read at every load so DataLoader workers see it too, changes it. PIL itself
# still refuses images above 2 x PIL.Image.MAX_IMAGE_PIXELS (~179 megapixels) whatever this says.
MAX_PIXELS_VARIABLE = "MMGEN_MAX_IMAGE_PIXELS"
DEFAULT_MAX_IMAGE_PIXELS = 64_000_000
_WITH_ALPHA = ("RGBA", "RGBa", "LA", "La", "PA")
_HIGH_BIT_DEPTH = ("I", "F")  # plus every "I;16..." mode


def max_image_pixels() -> int:
    """The pixel limit of load_rgb: $MMGEN_MAX_IMAGE_PIXELS if set, else DEFAULT_MAX_IMAGE_PIXELS."""
    value = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if not value:
        return DEFAULT_MAX_IMAGE_PIXELS
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{MAX_PIXELS_VARIABLE} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def load_rgb(source) -> Image.Image:
    """Open an image (path or binary file object), decode it completely and return it as 8-bit RGB.

    Raises what PIL raises for a missing, truncated or undecodable file (OSError and friends), and
    Image.DecompressionBombError, before decoding anything, for more pixels than `max_image_pixels()`."""
    limit = max_image_pixels()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the check below says it in one line
        image = Image.open(source)
    with image:
        if image.width * image.height > limit:
            raise Image.DecompressionBombError(f"{image.width}x{image.height} pixels, more than {limit:,} "
                                               f"({MAX_PIXELS_VARIABLE})")
        image.load()  # PIL decodes lazily: force it here so a truncated file fails inside the caller's try
        return to_rgb(ImageOps.exif_transpose(image))


def shrink(image: Image.Image, shorter_side: int) -> Image.Image:
    """`image` scaled down (bicubic, aspect ratio kept) so that its shorter side is `shorter_side`; a smaller
    image is returned as it is, never enlarged."""
    width, height = image.size
    if min(width, height) <= shorter_side:
        return image
    if width <= height:
        size = (shorter_side, max(1, round(height * shorter_side / width)))
    else:
        size = (max(1, round(width * shorter_side / height)), shorter_side)
    return image.resize(size, Image.Resampling.BICUBIC)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: transparency is composited on white, 16/32-bit and float are rescaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P" and image.has_transparency_data:
        image = image.convert("RGBA")
    if image.mode in _WITH_ALPHA:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in _HIGH_BIT_DEPTH or image.mode.startswith("I;16"):
        return Image.fromarray(_to_uint8(image), mode="L").convert("RGB")
    return image.convert("RGB")


def _to_uint8(image: Image.Image) -> np.ndarray:
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F" and values.size and values.max() <= 1.0:
        values = values * 255.0  # a float image in [0, 1]
    elif image.mode != "F" and (image.mode.startswith("I;16") or values.max(initial=0) > 255):
        values = values / 257.0  # 16-bit range -> 8-bit
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _statistics(normalize: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(map(repr, NORMALIZATIONS))}, got {normalize!r}")
    return NORMALIZATIONS[normalize]


def normalization(normalize: str) -> v2.Normalize:
    """The Normalize step for `normalize` = "clip" | "minus_one_to_one"."""
    mean, std = _statistics(normalize)
    return v2.Normalize(mean, std)


def image_transform(
    image_size: int,
    *,
    train: bool,
    normalize: str = "clip",
    crop_scale: tuple[float, float] | None = (0.9, 1.0),
) -> Callable:
    """PIL RGB or (3, H, W) uint8 tensor -> normalised float tensor (3, image_size, image_size).

    Training: RandomResizedCrop over `crop_scale` of the area (None: no random crop; RandomCropTransform). Eval:
    Resize + CenterCrop."""
    if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
        raise ConfigError(f"crop_scale must satisfy 0 < low <= high <= 1, got {tuple(crop_scale)}")
    if train and crop_scale is not None:
        return RandomCropTransform(image_size, tuple(crop_scale), normalize)
    # resize the uint8 image first: cheaper than resizing floats
    return v2.Compose([v2.ToImage(), v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size),
                       v2.ToDtype(torch.float32, scale=True), normalization(normalize)])


class TensorTransform:
    """PIL RGB or (3, H, W) uint8 tensor -> normalised float tensor at its own size: v2's ToImage, ToDtype(scale=True)
    and Normalize, bit for bit, without their per-call dispatch (most of their cost on a small image)."""

    def __init__(self, normalize: str = "clip"):
        mean, std = _statistics(normalize)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, image) -> tv_tensors.Image:
        pixels = functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image.as_subclass(torch.Tensor)
        if pixels.dtype != torch.uint8:
            raise TypeError(f"TensorTransform expects 8-bit pixels, got {pixels.dtype}")
        return pixels.to(torch.float32).mul_(1.0 / 255).sub_(self.mean).div_(self.std).as_subclass(tv_tensors.Image)


class RandomCropTransform:
    """PIL RGB or (3, H, W) uint8 tensor -> a random crop over `crop_scale` of the area, resized to image_size and
    normalised: v2.Compose([ToImage(), RandomResizedCrop(antialias=True), ToDtype(scale=True), Normalize]) bit for bit
    (the same draws from torch's RNG), calling the kernels directly: the v2 pipeline's per-call dispatch was ~60% of
    its cost on a small image, and the training data loop runs it once per sample."""

    def __init__(self, image_size: int, crop_scale: tuple[float, float], normalize: str = "clip"):
        self.crop = v2.RandomResizedCrop(image_size, scale=crop_scale, antialias=True)  # parameters drawn as v2 does
        self.image_size = image_size
        self.to_tensor = TensorTransform(normalize)

    def __call__(self, image) -> tv_tensors.Image:
        pixels = functional.pil_to_tensor(image) if isinstance(image, Image.Image) else image.as_subclass(torch.Tensor)
        box = self.crop.make_params([pixels])
        pixels = functional.resized_crop_image(pixels, box["top"], box["left"], box["height"], box["width"],
                                               size=[self.image_size, self.image_size], antialias=True)
        return self.to_tensor(pixels)


def tensor_transform(normalize: str = "clip") -> TensorTransform:
    """PIL RGB -> normalised float tensor at its own size (for images rendered at the right size already)."""
    return TensorTransform(normalize)


def denormalize(images: torch.Tensor, normalize: str = "clip") -> torch.Tensor:
    """Undo `normalization(normalize)`: (..., 3, H, W) normalised -> values in [0, 1] (clamped)."""
    mean, std = (torch.tensor(v, dtype=images.dtype, device=images.device)[:, None, None] for v in _statistics(normalize))
    return (images * std + mean).clamp(0.0, 1.0)


def clip_input(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Images (batch, 3, H, W) in [-1, 1] -> CLIP-normalised images resized to image_size (what CLIP's tower reads)."""
    mean = torch.tensor(CLIP_MEAN, device=images.device, dtype=images.dtype)[:, None, None]
    std = torch.tensor(CLIP_STD, device=images.device, dtype=images.dtype)[:, None, None]
    if images.shape[-2:] != (image_size, image_size):
        images = torch.nn.functional.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False, antialias=True)
    return ((images + 1) / 2 - mean) / std


def to_pil_images(images: torch.Tensor, normalize: str = "minus_one_to_one") -> list[Image.Image]:
    """Normalised images (batch, 3, H, W) -> 8-bit RGB PIL images (values outside the range are clamped)."""
    pixels = (denormalize(images.detach().float().cpu(), normalize) * 255).round().to(torch.uint8)
    return [Image.fromarray(array.permute(1, 2, 0).contiguous().numpy()) for array in pixels]  # (H, W, 3) uint8


def make_grid(images: list[Image.Image], columns: int | None = None, padding: int = 2) -> Image.Image:
    """The images (all one size) in rows of `columns` (default: about square) on a white background."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * (width + padding) + padding, rows * (height + padding) + padding), "white")
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid.paste(image, (padding + column * (width + padding), padding + row * (height + padding)))
    return grid


def save_png(image: Image.Image, path: str | Path) -> None:
    """Write `image` as a PNG file through a temporary file and a rename (never half-written)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
