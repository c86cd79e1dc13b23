"""The KL autoencoder against diffusers' AutoencoderKL (random init), its posterior, loss, latents and save/load."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch.nn import functional as F

import mmgen
from mmgen.diffusion.blocks import ResidualBlock
from mmgen.diffusion.vae import VAE, DiagonalGaussian, VAEConfig, vae_loss
from mmgen.diffusion.vae_interop import (
    convert_diffusers_vae_folder,
    from_diffusers_vae,
    to_diffusers_vae,
    vae_config_from_diffusers,
)
from mmgen.errors import CheckpointError, UserError

SMALL = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32)
TINY = dict(base_channels=8, channel_multipliers=(1, 2), blocks_per_level=1, groups=4)


def diffusers_vae(seed: int = 0, **options) -> AutoencoderKL:
    """A small random AutoencoderKL whose norm weights and biases are perturbed too, so a swapped name shows."""
    options = {**SMALL, **options}
    levels = len(options["block_out_channels"])
    options.setdefault("down_block_types", ["DownEncoderBlock2D"] * levels)
    options.setdefault("up_block_types", ["UpDecoderBlock2D"] * levels)
    torch.manual_seed(seed)
    model = AutoencoderKL(**options)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.2 * torch.randn_like(parameter))
    return model.eval()


def as_json(config, keys) -> dict:
    """The `keys` of a diffusers config as config.json would hold them (tuples become lists)."""
    return json.loads(json.dumps({key: config[key] for key in keys}))


def randn(*shape, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(norm_num_groups=32),
        dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=3),
        dict(mid_block_add_attention=False),
        dict(use_quant_conv=False, use_post_quant_conv=False, latent_channels=16, shift_factor=0.06,
             scaling_factor=1.5),
    ],
    ids=["sd-like", "32-groups", "three-levels", "no-mid-attention", "sd3-like"],
)
def test_converted_vae_equals_diffusers(options):
    reference = diffusers_vae(**options)
    vae = from_diffusers_vae(reference).eval()
    levels = len(reference.config.block_out_channels)
    images = randn(2, 3, 16, 16)
    latents = randn(2, reference.config.latent_channels, 16 // 2 ** (levels - 1), 16 // 2 ** (levels - 1), seed=2)
    with torch.no_grad():
        posterior, expected = vae.encode(images), reference.encode(images).latent_dist
        torch.testing.assert_close(posterior.mean, expected.mean, rtol=0, atol=1e-4)
        torch.testing.assert_close(posterior.logvar, expected.logvar, rtol=0, atol=1e-4)
        torch.testing.assert_close(vae.decode(latents), reference.decode(latents).sample, rtol=0, atol=1e-4)
        reconstruction, _ = vae(images, generator=torch.Generator().manual_seed(3))
        expected = reference(images, sample_posterior=True, generator=torch.Generator().manual_seed(3)).sample
        torch.testing.assert_close(reconstruction, expected, rtol=0, atol=1e-4)
    assert vae.config.scaling_factor == reference.config.scaling_factor
    assert vae.config.shift_factor == (reference.config.shift_factor or 0.0)


@pytest.mark.parametrize("options", [{}, dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1)])
def test_round_trip_back_to_diffusers(options):
    reference = diffusers_vae(**options)
    back = to_diffusers_vae(from_diffusers_vae(reference))
    expected_state = reference.state_dict()
    assert back.state_dict().keys() == expected_state.keys()
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, expected_state[name]), name
    keys = ["block_out_channels", "down_block_types", "up_block_types", "latent_channels", "layers_per_block",
            "norm_num_groups", "scaling_factor", "shift_factor", "use_quant_conv", "mid_block_add_attention"]
    assert as_json(back.config, keys) == as_json(reference.config, keys)


def test_save_and_load_round_trip(tmp_path):
    vae = from_diffusers_vae(diffusers_vae()).eval()
    vae.save_pretrained(tmp_path / "vae")
    loaded = mmgen.load(tmp_path / "vae")
    assert isinstance(loaded, VAE) and loaded.config == vae.config
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["config"]["scaling_factor"] == 0.18215
    images = randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images, sample_posterior=False)[0], vae(images, sample_posterior=False)[0])


def test_diagonal_gaussian_equals_diffusers():
    moments = randn(3, 8, 4, 4) * 25  # the logvar clamp to [-30, 20] is hit on both sides
    ours, theirs = DiagonalGaussian(moments), DiagonalGaussianDistribution(moments)
    assert (moments[:, 4:] > 20).any() and (moments[:, 4:] < -30).any()
    torch.testing.assert_close(ours.logvar, theirs.logvar, rtol=0, atol=0)
    torch.testing.assert_close(ours.kl(), theirs.kl(), rtol=1e-5, atol=1e-5)
    assert ours.kl().shape == (3,)
    torch.testing.assert_close(ours.mode(), theirs.mode())
    sample = ours.sample(torch.Generator().manual_seed(5))
    torch.testing.assert_close(sample, theirs.sample(torch.Generator().manual_seed(5)))
    assert not torch.equal(sample, ours.sample(torch.Generator().manual_seed(6)))


def test_kl_is_zero_for_the_prior():
    moments = torch.zeros(2, 8, 3, 3)  # mean 0, logvar 0: the posterior is N(0, I)
    assert torch.equal(DiagonalGaussian(moments).kl(), torch.zeros(2))


def test_converts_a_diffusers_folder_on_disk(tmp_path):
    reference = diffusers_vae()
    reference.save_pretrained(tmp_path / "sd" / "vae")  # the layout of a pipeline folder
    images = randn(2, 3, 16, 16)
    expected = reference.encode(images).latent_dist.mean
    for folder in (tmp_path / "sd" / "vae", tmp_path / "sd"):
        vae = from_diffusers_vae(folder)
        torch.testing.assert_close(vae.encode(images).mean, expected, rtol=0, atol=1e-4)
    convert_diffusers_vae_folder(str(tmp_path / "sd"), tmp_path / "converted")
    loaded = mmgen.load(tmp_path / "converted")
    torch.testing.assert_close(loaded.encode(images).mean, expected, rtol=0, atol=1e-4)


def test_latent_helpers_apply_shift_and_scale():
    vae = from_diffusers_vae(diffusers_vae(shift_factor=0.3, scaling_factor=0.5)).eval()
    images = randn(2, 3, 16, 16)
    with torch.no_grad():
        posterior = vae.encode(images)
        latents = vae.encode_latents(images, sample_posterior=False)
        torch.testing.assert_close(latents, (posterior.mean - 0.3) * 0.5)
        sampled = vae.encode_latents(images, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(sampled, (posterior.sample(torch.Generator().manual_seed(4)) - 0.3) * 0.5)
        torch.testing.assert_close(vae.decode_latents(latents), vae.decode(posterior.mean))


def test_vae_loss_sums_per_sample_and_weights_the_kl():
    images, reconstruction = randn(2, 3, 4, 4), randn(2, 3, 4, 4, seed=2)
    posterior = DiagonalGaussian(randn(2, 8, 2, 2, seed=3))
    l1 = vae_loss(reconstruction, images, posterior, kl_weight=0.1)
    torch.testing.assert_close(l1.reconstruction, (reconstruction - images).abs().sum() / 2)
    torch.testing.assert_close(l1.kl, posterior.kl().mean())
    torch.testing.assert_close(l1.total, l1.reconstruction + 0.1 * l1.kl)
    mse = vae_loss(reconstruction, images, posterior, kl_weight=0.0, kind="mse")
    torch.testing.assert_close(mse.total, (reconstruction - images).square().sum() / 2)
    with pytest.raises(ValueError, match="kind must be"):
        vae_loss(reconstruction, images, posterior, kind="l2")
    with pytest.raises(ValueError, match="differ"):
        vae_loss(reconstruction[:, :2], images, posterior)


def test_a_fresh_vae_trains():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**TINY)).train()
    images = F.interpolate(randn(4, 3, 2, 2), size=16, mode="bilinear").tanh()  # smooth images in [-1, 1]
    optimizer = torch.optim.Adam(vae.parameters(), lr=3e-3)
    losses = []
    for step in range(10):
        reconstruction, posterior = vae(images, generator=torch.Generator().manual_seed(step))
        loss = vae_loss(reconstruction, images, posterior).total
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0]


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = VAE(VAEConfig(**TINY)).train()
    checkpointed = VAE(VAEConfig(**TINY, gradient_checkpointing=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    images, gradients = randn(2, 3, 8, 8), []
    for model in (plain, checkpointed):
        reconstruction, posterior = model(images, generator=torch.Generator().manual_seed(1))
        vae_loss(reconstruction, images, posterior, kl_weight=0.01).total.backward()
        gradients.append([parameter.grad for parameter in model.parameters()])
    for expected, actual in zip(*gradients):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(groups=3), "groups 3 must divide"),
        (dict(channel_multipliers=()), "channel_multipliers"),
        (dict(scaling_factor=0.0), "scaling_factor"),
        (dict(latent_channels=0), "latent_channels must be positive"),
    ],
)
def test_bad_config_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(**{**TINY, **options})


def test_bad_input_shape_is_a_clear_error():
    vae = VAE(VAEConfig(**TINY))
    with pytest.raises(ValueError, match="expected images of shape"):
        vae.encode(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="multiples of 2"):
        vae.encode(torch.randn(1, 3, 7, 8))
    with pytest.raises(ValueError, match="expected latents of shape"):
        vae.decode(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(use_quant_conv=False), "both or neither"),
        (dict(block_out_channels=[32, 48]), "multiple of the first"),
        (dict(act_fn="relu"), "act_fn"),
        (dict(out_channels=1), "out_channels"),
        (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "latents_mean"),
        (dict(down_block_types=["DownEncoderBlock2D"]), "down_block_types"),
        (dict(norm_num_groups=5), "groups 5 must divide"),
    ],
)
def test_unsupported_diffusers_config_is_refused(options, message):
    config = {**SMALL, "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    with pytest.raises(UserError, match=message):
        vae_config_from_diffusers({**config, **options})


def test_bad_diffusers_folders_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="folder not found"):
        from_diffusers_vae(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="no config.json"):
        from_diffusers_vae(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderTiny"}))
    with pytest.raises(UserError, match="not an AutoencoderKL"):
        from_diffusers_vae(tmp_path)
    config = {"_class_name": "AutoencoderKL", **SMALL, "down_block_types": ["DownEncoderBlock2D"] * 2,
              "up_block_types": ["UpDecoderBlock2D"] * 2}
    (tmp_path / "config.json").write_text(json.dumps(config))  # but no weights
    with pytest.raises(CheckpointError, match="cannot load it"):
        from_diffusers_vae(tmp_path)
    with pytest.raises(UserError, match="expected a diffusers AutoencoderKL"):
        from_diffusers_vae(torch.nn.Linear(2, 2))


def test_unconditioned_residual_block_takes_no_embedding():
    block = ResidualBlock(8, 16, None, groups=4)
    assert block.embedding_proj is None and block(torch.randn(1, 8, 4, 4)).shape == (1, 16, 4, 4)
    with pytest.raises(ValueError, match="takes no embedding"):
        block(torch.randn(1, 8, 4, 4), torch.randn(1, 32))
    with pytest.raises(ValueError, match="needs an embedding"):
        ResidualBlock(8, 16, 32, groups=4)(torch.randn(1, 8, 4, 4))
