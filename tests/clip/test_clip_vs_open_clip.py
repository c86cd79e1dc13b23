"""bench/clip_vs_open_clip.py gives open_clip_train the same architecture as mmgen's recipe and reads its checkpoint
back exactly (the training runs themselves are the benchmark, not a test)."""

import importlib
import json
from pathlib import Path

import pytest
import torch

from mmgen.clip.model import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

BENCH = Path(__file__).resolve().parents[2] / "bench"
TINY = CLIPConfig(embed_dim=16, vision=CLIPVisionConfig(image_size=16, patch_size=8, width=24, layers=1, heads=2,
                                                        mlp_ratio=2),
                  text=CLIPTextConfig(context_length=8, vocab_size=49408, width=32, layers=1, heads=2, mlp_ratio=2))


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    return importlib.import_module("clip_vs_open_clip")


def test_open_clip_builds_the_same_architecture_from_the_written_config(bench, tmp_path):
    import open_clip

    (tmp_path / "tiny-bench.json").write_text(json.dumps(bench.open_clip_model_config(TINY)))
    open_clip.add_model_config(tmp_path)
    built = open_clip.create_model("tiny-bench")
    from mmgen.clip.open_clip_interop import to_open_clip

    expected = to_open_clip(CLIP(TINY))
    assert {name: tuple(t.shape) for name, t in built.state_dict().items()} == {
        name: tuple(t.shape) for name, t in expected.state_dict().items()}
    assert type(built.transformer.resblocks[0].mlp.gelu) is type(expected.transformer.resblocks[0].mlp.gelu)
    shapes = bench.open_clip_model_config(bench.recipe_model(BENCH.parent / "configs" / "clip-shapes.yaml"))
    assert shapes["vision_cfg"] == {"image_size": 32, "layers": 3, "width": 96, "head_width": 24, "mlp_ratio": 2,
                                    "patch_size": 4}


def test_open_clip_checkpoint_reads_back_as_the_same_mmgen_clip(bench, tmp_path):
    from mmgen.clip.open_clip_interop import to_open_clip

    torch.manual_seed(0)
    original = CLIP(TINY).eval()
    trained = to_open_clip(original)
    # open_clip_train's checkpoint layout: a dict with "state_dict" (DDP's "module." prefix included)
    torch.save({"epoch": 1, "name": "run", "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "epoch_1.pt")
    converted = bench.load_open_clip_as_mmgen(tmp_path / "epoch_1.pt", TINY)
    images, tokens = torch.randn(3, 3, 16, 16), torch.randint(1, 1000, (3, 8))
    tokens[:, -1] = 49407  # the end-of-text token pools the text
    with torch.no_grad():
        assert torch.allclose(converted.encode_image(images), original.encode_image(images), atol=1e-5)
        assert torch.allclose(converted.encode_text(tokens), original.encode_text(tokens), atol=1e-5)


def test_refuses_a_swiglu_model(bench):
    from mmgen.errors import UserError

    with pytest.raises(UserError, match="GELU"):
        bench.open_clip_model_config(CLIPConfig(embed_dim=16, vision=TINY.vision, text=TINY.text, mlp="swiglu"))
