"""The prior's evaluation as DALLE2-pytorch's prior.md reports it: cosine to the true image, to the caption's text,
to an unrelated pair's image."""

import pytest
import torch

from mmgen.diffusion.text2img import tokenize_prompts
from mmgen.pipelines import PriorPipeline
from mmgen.recipes.prior import embedding_similarity
from tests.diffusion.unclip_helpers import tiny_prior

CAPTIONS = ["a red circle", "a red circle", "a small blue square", "a green triangle at the top", "a heart"]


@pytest.fixture(scope="module")
def prior():
    return tiny_prior()


@torch.no_grad()
def test_each_similarity_is_the_mean_cosine_of_its_pairs(prior):
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    metrics = embedding_similarity(prior, images, CAPTIONS, steps=3, guidance_scale=2.0, seed=4, batch_size=2)
    pipeline = PriorPipeline(prior)
    sampled = torch.cat([pipeline(CAPTIONS[start:start + 2], steps=3, guidance_scale=2.0, seed=4 + start,
                                  progress=False) for start in range(0, len(CAPTIONS), 2)])
    true = prior.clip.encode_image(images)
    text = prior.encode_text(tokenize_prompts(CAPTIONS, prior.context_length)).embedding
    cosine = torch.nn.functional.cosine_similarity
    assert metrics["cosine"] == pytest.approx(cosine(sampled, true).mean().item(), abs=1e-6)
    assert metrics["cosine_text"] == pytest.approx(cosine(sampled, text).mean().item(), abs=1e-6)
    assert metrics["cosine_text_baseline"] == pytest.approx(cosine(text, true).mean().item(), abs=1e-6)
    # pair i against pair i - 1's image; pair 1 repeats pair 0's caption and is left out
    unrelated = [cosine(sampled[i], true[i - 1], dim=0) for i in (0, 2, 3, 4)]
    assert metrics["cosine_unrelated"] == pytest.approx(torch.stack(unrelated).mean().item(), abs=1e-6)
    assert metrics["cosine_unrelated"] != pytest.approx(metrics["cosine"], abs=1e-4)


def test_no_unrelated_pair_without_two_different_captions(prior):
    metrics = embedding_similarity(prior, torch.randn(2, 3, 32, 32), ["a red circle"] * 2, steps=2, guidance_scale=1.0)
    assert "cosine_unrelated" not in metrics and set(metrics) == {"cosine", "cosine_text", "cosine_text_baseline"}
