"""Several captions per image as extra positives (data.captions_per_image: all): the losses against hand-written
formulas, the objective under cached-feature accumulation, the collate, and a tiny `mmgen train clip` run."""

import copy
import io
import json
import tarfile

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from mmgen.clip import ClipLoss, SigLipLoss
from mmgen.clip.objective import ContrastiveObjective
from mmgen.clip.tokenizer import CLIPTokenizer
from mmgen.config import from_dict
from mmgen.errors import ConfigError
from mmgen.recipes.clip import TokenizingCollate

from .helpers import make_clip, random_tokens
from .test_cached_accumulation import PlainPasses, gradients


def random_mask(batch: int, max_captions: int, generator) -> torch.Tensor:
    """(batch, max_captions): each image has 1..max_captions captions in its first slots."""
    counts = torch.randint(1, max_captions + 1, (batch,), generator=generator)
    return torch.arange(max_captions)[None, :] < counts[:, None]


def features(batch: int, captions: int, dtype=torch.float64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(batch, 8, generator=generator, dtype=dtype), dim=-1).requires_grad_()
    texts = F.normalize(torch.randn(captions, 8, generator=generator, dtype=dtype), dim=-1).requires_grad_()
    return images, texts


def hand_infonce(images, texts, owners, scale, bias):
    """Image i: -(1/k_i) sum over its captions c of log(exp(s_ic) / sum_j exp(s_ij)); caption c: -log of its image's
    softmax probability over all images; the mean of each direction, then of the two."""
    bias = 0.0 if bias is None else bias
    image_terms = []
    for i in range(len(images)):
        scores = torch.stack([scale * images[i] @ text + bias for text in texts])
        own = [c for c in range(len(texts)) if owners[c] == i]
        image_terms.append(-sum(scores[c] - torch.logsumexp(scores, 0) for c in own) / len(own))
    text_terms = []
    for c, text in enumerate(texts):
        scores = torch.stack([scale * image @ text + bias for image in images])
        text_terms.append(-(scores[owners[c]] - torch.logsumexp(scores, 0)))
    return (torch.stack(image_terms).mean() + torch.stack(text_terms).mean()) / 2


def hand_siglip(images, texts, owners, scale, bias):
    """sum over every (image, caption) pair of log(1 + exp(-label * logit)), label +1 for the image's own captions,
    divided by the number of images."""
    bias = 0.0 if bias is None else bias
    total = 0.0
    for i, image in enumerate(images):
        for c, text in enumerate(texts):
            label = 1.0 if owners[c] == i else -1.0
            total = total + torch.log1p(torch.exp(-label * (scale * image @ text + bias)))
    return total / len(images)


def loss_and_gradients(loss_fn, images, texts, scale, bias, **options):
    images, texts = images.detach().clone().requires_grad_(), texts.detach().clone().requires_grad_()
    scale = torch.tensor(scale, dtype=images.dtype, requires_grad=True)
    bias = None if bias is None else torch.tensor(bias, dtype=images.dtype, requires_grad=True)
    loss = loss_fn(images, texts, scale, bias, **options)
    loss.backward()
    return [loss.detach(), images.grad, texts.grad, scale.grad] + ([] if bias is None else [bias.grad])


@pytest.mark.parametrize("loss_fn, bias", [(ClipLoss(), None), (ClipLoss(), 0.5), (SigLipLoss(), -4.0)])
def test_one_caption_per_image_is_the_usual_loss(loss_fn, bias):
    images, texts = features(8, 8, dtype=torch.float32)
    usual = loss_and_gradients(loss_fn, images, texts, 12.0, bias)
    one_slot = loss_and_gradients(loss_fn, images, texts, 12.0, bias, caption_mask=torch.ones(8, 1, dtype=torch.bool))
    padded = torch.zeros(8, 3, dtype=torch.bool)
    padded[:, 0] = True  # max_captions 3, each image with one
    three_slots = loss_and_gradients(loss_fn, images, texts, 12.0, bias, caption_mask=padded)
    for expected, got, other in zip(usual, one_slot, three_slots, strict=True):
        assert expected.abs().max() > 0
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(other, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("loss_fn, hand, bias", [(ClipLoss(), hand_infonce, None), (ClipLoss(), hand_infonce, 0.7),
                                                 (SigLipLoss(), hand_siglip, -3.0)])
def test_k_captions_per_image_match_the_hand_written_formula(loss_fn, hand, bias):
    mask = random_mask(6, 3, torch.Generator().manual_seed(1))
    assert mask.sum(1).min() == 1 and mask.sum(1).max() == 3
    images, texts = features(6, int(mask.sum()))
    owners = mask.nonzero()[:, 0].tolist()  # the captions are in image order
    ours = loss_and_gradients(loss_fn, images, texts, 9.0, bias, caption_mask=mask)
    expected = loss_and_gradients(lambda i, t, s, b: hand(i, t, owners, s, b), images, texts, 9.0, bias)
    for got, want in zip(ours, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    # the extra captions matter: dropping all but the first of each image's changes the loss
    first_only = torch.zeros_like(mask)
    first_only[:, 0] = True
    first_texts = texts[torch.cumsum(mask.sum(1), 0) - mask.sum(1)]
    assert abs(loss_fn(images, first_texts, torch.tensor(9.0), None, caption_mask=first_only) - ours[0]) > 1e-3


def test_an_image_scores_higher_with_its_captions_than_with_others():
    mask = torch.ones(4, 2, dtype=torch.bool)
    images, _ = features(4, 0)
    own = images.detach().repeat_interleave(2, dim=0)  # each image's two captions equal its features
    shuffled = own[torch.tensor([2, 3, 4, 5, 6, 7, 0, 1])]  # the captions of the next image
    for loss_fn in (ClipLoss(), SigLipLoss()):
        scale = torch.tensor(10.0, dtype=own.dtype)
        assert loss_fn(images, own, scale, caption_mask=mask) < loss_fn(images, shuffled, scale, caption_mask=mask)


def multi_caption_batches(count: int, size: int, max_captions: int = 3, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        mask = random_mask(size, max_captions, generator)
        batches.append({"images": torch.randn(size, 3, 32, 32, generator=generator),
                        "tokens": random_tokens(int(mask.sum()), 16, generator), "caption_mask": mask})
    return batches


@pytest.mark.parametrize("loss, bias", [("infonce", None), ("siglip", -5.0)])
def test_cached_features_with_several_captions_equal_one_big_batch(loss, bias):
    model = make_clip(init_logit_bias=bias).train()
    reference = copy.deepcopy(model)
    batches = multi_caption_batches(3, 4)
    step_loss, _ = ContrastiveObjective(loss, "cached-features").step(model, batches, PlainPasses())
    whole = {key: torch.cat([batch[key] for batch in batches]) for key in ("images", "tokens", "caption_mask")}
    big_loss, _ = ContrastiveObjective(loss, "micro-batches")(reference, whole)
    big_loss.backward()
    torch.testing.assert_close(step_loss, big_loss.detach(), atol=1e-5, rtol=1e-5)
    ours, expected = gradients(model), gradients(reference)
    assert ours.keys() == expected.keys() and len(ours) > 10
    for name, gradient in expected.items():
        torch.testing.assert_close(ours[name], gradient, atol=1e-5, rtol=1e-4, msg=name)


def item(caption: str, captions=None) -> dict:
    entry = {"image": torch.rand(3, 4, 4), "caption": caption}
    return entry if captions is None else {**entry, "captions": captions}


def test_the_collate_lays_out_every_caption_with_a_mask():
    tokenizer = CLIPTokenizer(16)
    batch = TokenizingCollate(16, max_captions=2)([item("a cat", ["a cat", "a small cat", "one cat"]),
                                                   item("a dog"), item("a red car", ["a red car"])])
    assert batch["caption_mask"].tolist() == [[True, True], [True, False], [True, False]]
    assert torch.equal(batch["tokens"], tokenizer(["a cat", "a small cat", "a dog", "a red car"]))
    assert batch["captions"] == ["a cat", "a dog", "a red car"] and "all_captions" not in batch
    single = TokenizingCollate(16)([item("a cat", ["a cat", "a small cat"]), item("a dog")])
    assert "caption_mask" not in single and torch.equal(single["tokens"], tokenizer(["a cat", "a dog"]))


def test_the_config_keys_are_validated():
    from mmgen.recipes.clip import CLIPRecipe, caption_collate
    from mmgen.recipes.diffusion import DiffusionRecipe

    recipe = from_dict(CLIPRecipe, {"data": {"captions_per_image": "all", "max_captions_per_image": 3}})
    assert caption_collate(recipe.data, 16).max_captions == 3
    assert caption_collate(from_dict(CLIPRecipe, {}).data, 16).max_captions is None
    with pytest.raises(ConfigError, match="max_captions_per_image must be >= 1"):
        from_dict(CLIPRecipe, {"data": {"captions_per_image": "all", "max_captions_per_image": 0}})
    with pytest.raises(ConfigError, match="data.captions_per_image"):  # one caption per image conditions a generator
        from_dict(DiffusionRecipe, {"data": {"captions_per_image": "all"}})


def write_multi_caption_shard(path, samples: int, seed: int) -> None:
    from tests.data.helpers import image_bytes, random_image

    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as archive:
        for index in range(samples):
            captions = [f"a picture number {index} seen {how}" for how in ("closely", "from afar", "at night")]
            members = [(f"{index:04d}.png", image_bytes(random_image(rng, "RGB", (8, 8)), "PNG"))]
            members.append((f"{index:04d}.txt", "\n".join(captions[: 1 + index % 3]).encode()) if index % 2 else
                           (f"{index:04d}.json", json.dumps({"captions": captions[: 1 + index % 3]}).encode()))
            for name, payload in members:
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("loss", ["infonce", "siglip"])
def test_a_clip_run_with_all_captions_trains(tmp_path, capsys, monkeypatch, loss):
    from mmgen import cli

    from .test_recipe import write_config

    masks = []
    loss_class = {"infonce": ClipLoss, "siglip": SigLipLoss}[loss]
    forward = loss_class.forward

    def recording_forward(self, *arguments, caption_mask=None):
        masks.append(caption_mask)
        return forward(self, *arguments, caption_mask=caption_mask)

    monkeypatch.setattr(loss_class, "forward", recording_forward)

    (tmp_path / "shards").mkdir()
    for shard in range(2):
        write_multi_caption_shard(tmp_path / "shards" / f"{shard:05d}.tar", 12, seed=shard)
    config = write_config(tmp_path, data={"train": str(tmp_path / "shards"), "val": str(tmp_path / "shards"),
                                          "cache": False, "zeroshot": None, "retrieval": None,
                                          "captions_per_image": "all", "max_captions_per_image": 2},
                          train={"batch_size": 4, "grad_accum_steps": 2, "max_steps": 3, "eval_every": 3,
                                 "eval_batches": 1, "log_every": 1, "checkpoint_every": 0})
    run = tmp_path / "run"
    assert cli.main(["train", "clip", "--config", str(config), "--out", str(run), f"loss={loss}"]) == 0
    assert "captions_per_image=all" in capsys.readouterr().out
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [record["train/loss"] for record in records if "train/loss" in record]
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert any(np.isfinite(record.get("val/loss", np.nan)) for record in records)
    # the loss of each of the 3 x 2 gradient passes (cached features), then of the evaluation batch
    assert all(mask is not None and mask.shape[1] == 2 for mask in masks) and len(masks) >= 6
    assert any(mask.sum(1).max() == 2 for mask in masks)  # training batches hold images with two captions


@pytest.mark.slow
def test_two_processes_with_different_caption_counts_match_one_process(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    from .multi_positive_worker import losses_and_gradients

    worker = Path(__file__).with_name("multi_positive_worker.py")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    finished = subprocess.run([*launcher, str(worker), str(tmp_path)], capture_output=True, text=True, timeout=180,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [load_file(tmp_path / f"rank{rank}.safetensors") for rank in range(2)]
    assert ranks[0]["clip.text_features"].shape[0] == 6 and ranks[1]["clip.text_features"].shape[0] == 4
    single = losses_and_gradients(0, 1)
    for name in ("clip", "siglip"):
        # the mean over processes of the loss and of the shared gradients (what DDP averages) is one process's
        for key in ("loss", "image_projection", "text_projection", "log_scale", "logit_bias"):
            if f"{name}.{key}" in single:
                mean = (ranks[0][f"{name}.{key}"] + ranks[1][f"{name}.{key}"]) / 2
                torch.testing.assert_close(mean, single[f"{name}.{key}"], atol=1e-5, rtol=1e-5, msg=f"{name}.{key}")
        for key in ("image_features", "text_features"):  # each process's own rows get both losses' gradients
            gathered = torch.cat([ranks[0][f"{name}.{key}"], ranks[1][f"{name}.{key}"]])
            torch.testing.assert_close(gathered / 2, single[f"{name}.{key}"], atol=1e-5, rtol=1e-5, msg=f"{name}.{key}")
