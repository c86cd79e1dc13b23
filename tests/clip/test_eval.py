"""Zero-shot classifier, top-k accuracy and retrieval recall against brute-force definitions."""

import pytest
import torch
from torch.nn import functional as F

from mmgen.clip import CLIP, CLIPTokenizer
from mmgen.clip.retrieval import recall_at_k
from mmgen.clip.zeroshot import classify, topk_accuracy, zero_shot_classifier
from mmgen.errors import UserError
from tests.clip.helpers import tiny_config


def test_recall_at_k_matches_brute_force():
    torch.manual_seed(0)
    images, texts = F.normalize(torch.randn(40, 8), dim=-1), F.normalize(torch.randn(40, 8), dim=-1)
    texts[:10] = images[:10]  # some pairs are easy
    metrics = recall_at_k(images, texts, ks=(1, 5))
    similarity = images @ texts.T
    for k in (1, 5):
        i2t = sum(i in similarity[i].topk(k).indices.tolist() for i in range(40)) / 40
        t2i = sum(i in similarity[:, i].topk(k).indices.tolist() for i in range(40)) / 40
        assert metrics[f"i2t/R@{k}"] == pytest.approx(i2t)
        assert metrics[f"t2i/R@{k}"] == pytest.approx(t2i)
    assert metrics["i2t/R@1"] >= 0.25


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.2, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    accuracy = topk_accuracy(scores, labels, ks=(1, 2, 5))
    assert accuracy == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 5: 1.0}


def test_zero_shot_classifier_is_mean_of_template_embeddings():
    torch.manual_seed(1)
    model = CLIP(tiny_config()).eval()
    tokenizer = CLIPTokenizer(model.config.text.context_length)
    templates = ["a photo of a {}.", "a {} drawing"]
    weights = zero_shot_classifier(model, tokenizer, ["red circle", "blue square"], templates)
    expected = F.normalize(model.encode_text(tokenizer(["a photo of a blue square.", "a blue square drawing"])).mean(0), dim=0)
    torch.testing.assert_close(weights[1], expected, atol=1e-6, rtol=1e-5)
    images = torch.randn(3, 3, model.config.vision.image_size, model.config.vision.image_size)
    probabilities = classify(model, images, weights)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))
    logits = model.logit_scale_exp() * model.encode_image(images) @ weights.T
    torch.testing.assert_close(probabilities, logits.softmax(-1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("names,templates,message", [
    ([], None, "non-empty name"),
    (["cat", " "], None, "non-empty name"),
    (["cat", "cat"], None, "distinct"),
    (["cat"], ["no placeholder"], "needs a {}"),
])
def test_zero_shot_bad_input(names, templates, message):
    model = CLIP(tiny_config())
    with pytest.raises(UserError, match=message):
        zero_shot_classifier(model, CLIPTokenizer(16), names, templates or ["a {}"])
