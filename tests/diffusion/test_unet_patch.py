"""UNetConfig.patch_size: the UNet folds p x p patches into channels (pixel unshuffle), runs every level at 1/p of
the input's size, and unfolds its output the same way."""

import pytest
import torch
from torch.nn import functional as F

from mmgen.diffusion import NoiseSchedule, TextToImage, UNet, UNetConfig
from mmgen.diffusion.unet_interop import unet_config_to_diffusers
from mmgen.errors import UserError
from tests.clip.helpers import make_clip
from tests.diffusion.test_unet import TINY, tiny_unet


def test_a_patched_unet_is_the_unpatched_one_on_unshuffled_pixels():
    patched = tiny_unet(seed=3, patch_size=2, context_dim=12, pooled_dim=10)
    plain = UNet(UNetConfig(**{**TINY, "in_channels": 12, "out_channels": 12, "context_dim": 12, "pooled_dim": 10}))
    plain.load_state_dict(patched.state_dict())  # the same weights: only the folding differs
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 16, 12, generator=generator)
    t = torch.tensor([5, 600])
    context, pooled = torch.randn(2, 4, 12, generator=generator), torch.randn(2, 10, generator=generator)
    output = patched(x, t, context=context, pooled=pooled)
    assert output.shape == x.shape
    expected = F.pixel_shuffle(plain(F.pixel_unshuffle(x, 2), t, context=context, pooled=pooled), 2)
    torch.testing.assert_close(output, expected, rtol=0, atol=0)
    assert output.std() > 0.01


def test_a_patch_is_one_sample_of_the_unets_receptive_field():
    """Moving one pixel within its 2x2 patch changes the output of the whole patch, not only of that pixel."""
    model = tiny_unet(seed=1, patch_size=2)
    x = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    moved = x.clone()
    moved[0, 0, 0, 0] += 1.0
    change = (model(moved, torch.tensor([10])) - model(x, torch.tensor([10]))).abs()[0].amax(dim=0)
    assert (change[:2, :2] > 0).all()


def test_sizes_must_be_multiples_of_the_patch_times_the_levels():
    assert UNetConfig(**TINY, patch_size=2).downsampling == 4 and UNetConfig(**TINY).downsampling == 2
    with pytest.raises(ValueError, match="multiples of 4"):
        tiny_unet(patch_size=2)(torch.randn(1, 3, 6, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="patch_size must be positive"):
        UNetConfig(**TINY, patch_size=0)
    clip = make_clip(0)
    with pytest.raises(ValueError, match="multiple of 4"):
        TextToImage.from_text_encoder(clip, 6, UNetConfig(**TINY, patch_size=2), NoiseSchedule())
    assert TextToImage.from_text_encoder(clip, 8, UNetConfig(**TINY, patch_size=2), NoiseSchedule()).config.sample_shape == (3, 8, 8)


def test_diffusers_cannot_express_a_patched_unet():
    config = UNetConfig(**{**TINY, "context_dim": 12, "scale_shift_norm": False, "mlp": "geglu",
                           "attention_qkv_bias": False}, patch_size=2)
    with pytest.raises(UserError, match="patch size 2"):
        unet_config_to_diffusers(config)
