"""The UNet: shapes, conditioning, padding masks, checkpointing, dropout and save/load."""

import pytest
import torch

import mmgen
from mmgen.diffusion import UNet, UNetConfig
from mmgen.nn import TransformerBlock

TINY = dict(base_channels=8, channel_multipliers=(1, 2), attention_levels=(False, True), blocks_per_level=1)
TINY.update(num_heads=2, groups=4)
SHAPE = (2, 3, 8, 8)


def tiny_unet(seed: int = 0, **options) -> UNet:
    """A tiny UNet whose zero-initialised layers are randomised, so every branch shows in the output."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(**{**TINY, **options}))
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.2)
    return model.eval()


def inputs(seed: int = 1, context_dim: int | None = None, pooled_dim: int | None = None, tokens: int = 5):
    generator = torch.Generator().manual_seed(seed)
    x, t = torch.randn(SHAPE, generator=generator), torch.tensor([17, 730])
    context = torch.randn(2, tokens, context_dim, generator=generator) if context_dim else None
    pooled = torch.randn(2, pooled_dim, generator=generator) if pooled_dim else None
    return x, t, context, pooled


@pytest.mark.parametrize(
    "options",
    [
        {},
        dict(context_dim=12),
        dict(pooled_dim=10),
        dict(context_dim=12, pooled_dim=10, scale_shift_norm=False),
        dict(channel_multipliers=(1, 2, 2), attention_levels=(False, True, True), blocks_per_level=2),
        dict(out_channels=6),
    ],
    ids=["plain", "cross-attention", "pooled", "both-additive-embedding", "three-levels", "six-out"],
)
def test_output_shape(options):
    model = tiny_unet(**options)
    x, t, context, pooled = inputs(context_dim=options.get("context_dim"), pooled_dim=options.get("pooled_dim"))
    output = model(x, t, context=context, pooled=pooled)
    assert output.shape == (2, options.get("out_channels", 3), 8, 8)
    assert torch.isfinite(output).all()


def test_fresh_model_predicts_zero_and_attends_with_mmgen_blocks():
    model = UNet(UNetConfig(**TINY, context_dim=12))
    x, t, context, _ = inputs(context_dim=12)
    assert not model(x, t, context=context).any()  # zero-initialised output conv
    blocks = [module for module in model.modules() if isinstance(module, TransformerBlock)]
    assert len(blocks) == 4 and all(block.cross_attn is not None for block in blocks)  # 1 down, 1 mid, 2 up


def test_timestep_changes_the_output():
    model = tiny_unet()
    x, t, _, _ = inputs()
    assert not torch.allclose(model(x, t), model(x, t + 100))
    torch.testing.assert_close(model(x, torch.tensor(500)), model(x, torch.tensor([500, 500])))  # a scalar t broadcasts


def test_context_changes_the_output_only_with_cross_attention():
    model = tiny_unet(context_dim=12)
    x, t, context, _ = inputs(context_dim=12)
    other = torch.randn(context.shape, generator=torch.Generator().manual_seed(9))
    assert not torch.allclose(model(x, t, context=context), model(x, t, context=other))
    assert not torch.allclose(model(x, t, context=context), model(x, t))  # no context: unconditional
    plain = tiny_unet()
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(x, t, context=context)


def test_pooled_vector_changes_the_output():
    model = tiny_unet(pooled_dim=10)
    x, t, _, pooled = inputs(pooled_dim=10)
    assert not torch.allclose(model(x, t, pooled=pooled), model(x, t, pooled=pooled + 1))
    with pytest.raises(ValueError, match="pooled width"):
        model(x, t, pooled=torch.randn(2, 7))
    with pytest.raises(ValueError, match="no pooled vector"):
        tiny_unet()(x, t, pooled=pooled)


def test_padded_context_tokens_do_not_affect_the_output():
    model = tiny_unet(context_dim=12)
    x, t, context, _ = inputs(context_dim=12, tokens=6)
    padding = torch.tensor([[False] * 4 + [True] * 2, [False] * 3 + [True] * 3])
    reference = model(x, t, context=context, context_padding_mask=padding)
    noise = torch.randn(context.shape, generator=torch.Generator().manual_seed(4))
    repadded = torch.where(padding[..., None], noise, context)
    repadded_output = model(x, t, context=repadded, context_padding_mask=padding)
    torch.testing.assert_close(repadded_output, reference, rtol=1e-5, atol=1e-6)
    changed_real = torch.where(padding[..., None], context, noise)
    assert not torch.allclose(model(x, t, context=changed_real, context_padding_mask=padding), reference)


def test_gradient_checkpointing_gives_the_same_gradients():
    options = dict(context_dim=12, pooled_dim=10)
    plain, checkpointed = tiny_unet(**options), tiny_unet(**options, gradient_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x, t, context, pooled = inputs(context_dim=12, pooled_dim=10)
    gradients, mid_stage_runs = [], []
    for model in (plain, checkpointed):
        runs = []
        model.mid_stage.register_forward_pre_hook(lambda *_: runs.append(1))
        model.train()
        model(x, t, context=context, pooled=pooled).square().sum().backward()
        gradients.append([parameter.grad for parameter in model.parameters()])
        mid_stage_runs.append(len(runs))
    assert mid_stage_runs == [1, 2]  # checkpointing recomputes the stage in the backward pass
    assert all(grad is not None for grad in gradients[1])
    for expected, actual in zip(*gradients):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_dropout_only_in_training():
    model = tiny_unet(dropout=0.5)
    x, t, _, _ = inputs()
    torch.testing.assert_close(model(x, t), model(x, t))
    model.train()
    assert not torch.allclose(model(x, t), model(x, t))


def test_save_and_load_round_trip(tmp_path):
    model = tiny_unet(context_dim=12, pooled_dim=10)
    x, t, context, pooled = inputs(context_dim=12, pooled_dim=10)
    model.save_pretrained(tmp_path / "unet")
    loaded = mmgen.load(tmp_path / "unet")
    assert isinstance(loaded, UNet) and loaded.config == model.config
    expected = model(x, t, context=context, pooled=pooled)
    torch.testing.assert_close(loaded(x, t, context=context, pooled=pooled), expected)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(groups=3), "groups 3 must divide"),
        (dict(attention_levels=(True,)), "one per level"),
        (dict(num_heads=3), "num_heads 3 must divide"),
        (dict(channel_multipliers=()), "channel_multipliers"),
        (dict(dropout=1.0), "dropout"),
        (dict(context_dim=0), "context_dim must be positive"),
    ],
)
def test_bad_config_is_a_clear_error(options, message):
    with pytest.raises(ValueError, match=message):
        UNetConfig(**{**TINY, **options})


def test_bad_input_shape_is_a_clear_error():
    model = tiny_unet()
    with pytest.raises(ValueError, match="expected x of shape"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="multiples of 2"):
        model(torch.randn(2, 3, 7, 8), torch.tensor([1, 2]))
