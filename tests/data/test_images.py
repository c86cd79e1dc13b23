"""Image loading in every PIL mode and the train / eval transforms."""

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from mmgen.data.images import CLIP_MEAN, CLIP_STD, denormalize, image_transform, load_rgb, tensor_transform
from mmgen.errors import ConfigError

from .helpers import random_image


def test_truncated_images_are_not_silently_accepted():
    import mmgen.data.captions  # noqa: F401 — importing the data package must not change PIL's global
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("mode", ["L", "RGB", "P", "CMYK", "1", "I;16", "I", "F", "LA", "RGBA"])
def test_any_mode_loads_as_rgb_of_the_same_size(tmp_path, mode):
    rng = np.random.default_rng(len(mode))
    image = random_image(rng, "RGB")
    image = image.convert(mode) if mode not in ("I;16", "I", "F") else image.convert("L").convert(mode)
    path = tmp_path / ("image.tiff" if mode in ("I;16", "I", "F", "CMYK") else "image.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == image.size


def test_transparency_is_composited_on_white():
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[0, :] = (200, 10, 10, 255)  # opaque
    rgba[1, :] = (200, 10, 10, 0)  # transparent
    rgba[2, :] = (0, 0, 0, 128)  # half-transparent black
    loaded = np.asarray(load_rgb_from(Image.fromarray(rgba, mode="RGBA")))
    assert (loaded[0] == (200, 10, 10)).all()
    assert (loaded[1] == 255).all()
    assert (np.abs(loaded[2].astype(int) - 127) <= 1).all()
    palette = Image.fromarray(np.array([[0, 0], [1, 1]], dtype=np.uint8), mode="L").convert("P")
    palette.putpalette([200, 10, 10, 10, 200, 10])
    palette.info["transparency"] = 1  # the second colour is transparent
    loaded = np.asarray(load_rgb_from(palette))
    assert (loaded[0] == (200, 10, 10)).all() and (loaded[1] == 255).all()


def test_high_bit_depth_is_rescaled_to_8_bits(tmp_path):
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)  # 16-bit greyscale PNG
    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 128, 255]


def load_rgb_from(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    return load_rgb(buffer)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("normalize", ["clip", "minus_one_to_one"])
def test_transforms_give_square_float_tensors(train, normalize):
    rng = np.random.default_rng(3)
    transform = image_transform(24, train=train, normalize=normalize)
    for _ in range(3):
        tensor = transform(random_image(rng, "RGB"))
        assert tensor.shape == (3, 24, 24) and tensor.dtype == torch.float32
        restored = denormalize(tensor, normalize)
        assert restored.min() >= 0 and restored.max() <= 1 and restored.std() > 0.05


def test_normalisations_are_exact():
    rng = np.random.default_rng(4)
    image = random_image(rng, "RGB", size=(16, 16))
    pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
    clip = tensor_transform("clip")(image)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(clip, (pixels - mean) / std)
    torch.testing.assert_close(tensor_transform("minus_one_to_one")(image), pixels * 2 - 1)
    torch.testing.assert_close(denormalize(clip, "clip"), pixels)
    # eval at the image's own size: Resize + CenterCrop change nothing
    torch.testing.assert_close(image_transform(16, train=False)(image), clip)


def test_eval_transform_keeps_the_centre_and_training_crops_vary():
    rng = np.random.default_rng(5)
    image = random_image(rng, "RGB", size=(40, 20))
    torch.testing.assert_close(image_transform(20, train=False)(image), tensor_transform()(image.crop((10, 0, 30, 20))))
    transform = image_transform(20, train=True, crop_scale=(0.5, 0.6))
    torch.manual_seed(0)
    assert not torch.equal(transform(image), transform(image))


def test_bad_settings_are_config_errors():
    with pytest.raises(ConfigError, match="normalize"):
        image_transform(16, train=True, normalize="imagenet")
    with pytest.raises(ConfigError, match="crop_scale"):
        image_transform(16, train=True, crop_scale=(0.9, 1.5))


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.3, 0.6), (1.0, 1.0)])
def test_training_crop_equals_torchvisions_v2_pipeline(scale):
    """The direct training transform draws the same crops and gives the same pixels as the v2 Compose it replaces,
    from PIL images and uint8 tensors of several sizes, upscaled and downscaled."""
    from torchvision.transforms import v2

    generator = torch.Generator().manual_seed(3)
    reference = v2.Compose([v2.ToImage(), v2.RandomResizedCrop(24, scale=scale, antialias=True),
                            v2.ToDtype(torch.float32, scale=True), v2.Normalize(CLIP_MEAN, CLIP_STD)])
    transform = image_transform(24, train=True, crop_scale=scale)
    for height, width in [(36, 36), (17, 40), (64, 30), (24, 24)]:
        pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
        for image in (pixels, Image.fromarray(pixels.permute(1, 2, 0).numpy())):
            for seed in range(4):
                torch.manual_seed(seed)
                expected = reference(image)
                torch.manual_seed(seed)
                got = transform(image)
                assert got.shape == (3, 24, 24) and got.dtype == torch.float32
                torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.manual_seed(0)
    first = transform(pixels)
    assert not torch.equal(first, transform(pixels)) or scale == (1.0, 1.0)  # a new crop per call
