"""The masked LM: BERT's masking statistics, a loss on the chosen tokens only, padding, post-norm blocks."""

import pytest
import torch
from torch.nn import functional as F

from mmgen.nn import TransformerBlock
from mmgen.text.mlm import (
    IGNORE_INDEX,
    MaskedLM,
    MaskedLMObjective,
    MaskingConfig,
    MLMConfig,
    mask_tokens,
    masked_lm_loss,
)

MASK = 60


def tiny_mlm(**changes) -> MaskedLM:
    torch.manual_seed(0)
    options = dict(vocab_size=61, context_length=24, num_layers=2, num_heads=4, dim=32)
    options.update(changes)
    return MaskedLM(MLMConfig(**options)).eval()


def test_masking_follows_bert_proportions():
    tokens = torch.randint(0, MASK, (200, 500))
    generator = torch.Generator().manual_seed(0)
    inputs, targets = mask_tokens(tokens, MASK, torch.arange(MASK), generator=generator)
    chosen = targets != IGNORE_INDEX
    assert torch.equal(targets[chosen], tokens[chosen])  # a chosen target is the original token
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # what is not chosen stays
    assert abs(chosen.float().mean().item() - 0.15) < 0.003
    masked = (inputs == MASK) & chosen
    changed = (inputs != tokens) & (inputs != MASK)
    kept = (inputs == tokens) & chosen
    count = chosen.sum().item()
    assert abs(masked.sum().item() / count - 0.8) < 0.01
    # a random replacement equals the original 1 time in 60; the rest of the random 10% look changed
    assert abs(changed.sum().item() / count - 0.1 * 59 / 60) < 0.01
    assert abs(kept.sum().item() / count - (0.1 + 0.1 / 60)) < 0.01
    assert (inputs != MASK).logical_or(chosen).all()  # [MASK] appears only at chosen positions


def test_masking_respects_maskable_replacements_and_seed():
    tokens = torch.randint(0, 10, (50, 80))
    maskable = torch.rand(50, 80) < 0.5
    masking = MaskingConfig(probability=0.5, mask_fraction=0.0, random_fraction=1.0)
    first = mask_tokens(tokens, MASK, torch.tensor([3, 7]), masking, maskable, torch.Generator().manual_seed(1))
    again = mask_tokens(tokens, MASK, torch.tensor([3, 7]), masking, maskable, torch.Generator().manual_seed(1))
    inputs, targets = first
    assert torch.equal(inputs, again[0]) and torch.equal(targets, again[1])
    chosen = targets != IGNORE_INDEX
    assert not chosen[~maskable].any() and chosen.any()
    assert set(inputs[chosen].tolist()) == {3, 7}


@pytest.mark.parametrize("bad", [dict(probability=0.0), dict(mask_fraction=0.8, random_fraction=0.3),
                                 dict(random_fraction=-0.1)])
def test_masking_config_refuses_impossible_fractions(bad):
    with pytest.raises(ValueError):
        MaskingConfig(**bad)


def test_loss_counts_only_the_chosen_tokens():
    torch.manual_seed(0)
    logits = torch.randn(3, 9, 61, requires_grad=True)
    targets = torch.full((3, 9), IGNORE_INDEX)
    targets[0, 2], targets[1, 5], targets[2, 0] = 4, 17, 59
    loss, accuracy = masked_lm_loss(logits, targets)
    chosen = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[chosen], targets[chosen])
    assert torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert logits.grad[~chosen].abs().max() == 0 and logits.grad[chosen].abs().max() > 0
    assert accuracy.item() == (logits[chosen].argmax(-1) == targets[chosen]).float().mean().item()


def test_objective_gradient_reaches_only_through_chosen_positions():
    model = tiny_mlm().train()
    tokens = torch.randint(0, MASK, (2, 24))
    objective = MaskedLMObjective(MASK, torch.arange(MASK))
    loss, metrics = objective(model, tokens, generator=torch.Generator().manual_seed(3))
    inputs, targets = mask_tokens(tokens, MASK, torch.arange(MASK), generator=torch.Generator().manual_seed(3))
    assert torch.allclose(loss, masked_lm_loss(model(inputs), targets)[0])
    assert 0.0 <= metrics["train/masked_accuracy"] <= 1.0


@pytest.mark.parametrize("norm_position,type_vocab_size", [("pre", 0), ("post", 2)])
def test_padding_does_not_change_the_real_positions(norm_position, type_vocab_size):
    model = tiny_mlm(norm_position=norm_position, type_vocab_size=type_vocab_size)
    tokens = torch.randint(0, MASK, (1, 10))
    padded = torch.cat([tokens, torch.randint(0, MASK, (1, 6))], dim=1)
    padding_mask = torch.zeros(1, 16, dtype=torch.bool)
    padding_mask[:, 10:] = True
    alone = model(tokens)
    with_padding = model(padded, padding_mask=padding_mask)
    assert torch.allclose(alone, with_padding[:, :10], atol=1e-5)
    # bidirectional: the first position sees a change at the last real one
    changed = tokens.clone()
    changed[0, 9] = (changed[0, 9] + 1) % MASK
    assert not torch.allclose(model(changed)[0, 0], alone[0, 0])


def test_post_norm_block_matches_its_formula():
    torch.manual_seed(0)
    block = TransformerBlock(16, 2, norm_position="post").eval()
    x = torch.randn(2, 5, 16)
    middle = block.norm_attn(x + block.attn(x))
    assert torch.allclose(block(x), block.norm_mlp(middle + block.mlp(middle)), atol=1e-6)
    with pytest.raises(ValueError, match="norm_position"):
        TransformerBlock(16, 2, norm_position="sandwich")


def test_model_round_trips_through_a_folder(tmp_path):
    model = tiny_mlm(type_vocab_size=2, norm_position="post")
    model.save_pretrained(tmp_path / "mlm")
    import mmgen

    loaded = mmgen.load(tmp_path / "mlm")
    tokens = torch.randint(0, MASK, (2, 12))
    assert isinstance(loaded, MaskedLM) and torch.equal(loaded(tokens), model(tokens))
