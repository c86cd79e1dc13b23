"""Using a trained CLIP: zero-shot classification of image files, and held-out zero-shot / retrieval evaluation."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..clip.model import CLIP
from ..clip.tokenizer import CLIPTokenizer
from ..clip.zeroshot import DEFAULT_TEMPLATES, classify, zero_shot_classifier
from ..data.images import image_transform, load_rgb
from ..errors import UserError
from ..hub import load, resolve_model_folder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def load_clip(checkpoint, device: str = "cpu", adapter=None) -> CLIP:
    """The CLIP model in a run or model folder, with a LoRA `adapter` folder on it if given; another model type is
    a UserError."""
    folder = resolve_model_folder(checkpoint)
    model = load(folder, map_location=device)
    if not isinstance(model, CLIP):
        raise UserError(f"{folder} holds a {model.model_type!r} model, not CLIP")
    if adapter is not None:
        from ..finetune import load_adapter

        load_adapter(model, adapter)
    return model


def image_files(paths: Sequence[str]) -> list[Path]:
    """The image files named, with folders searched recursively; a missing path is a UserError."""
    files = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"image not found: {path}")
    if not files:
        raise UserError("no image files found in " + ", ".join(paths))
    return files


def zeroshot_files(checkpoint, class_names: Sequence[str], paths: Sequence[str], *, templates=None, top_k: int = 5,
                   device: str = "cpu", adapter=None):
    """[(path, [(class, probability), ...] or an error string)] for every image file; unreadable files are reported."""
    model = load_clip(checkpoint, device, adapter)
    tokenizer = CLIPTokenizer(model.config.text.context_length)
    classifier = zero_shot_classifier(model, tokenizer, class_names, templates or DEFAULT_TEMPLATES)
    transform = image_transform(model.config.vision.image_size, train=False)
    results = []
    for path in image_files(paths):
        try:
            image = transform(load_rgb(path))
        except Exception as error:  # noqa: BLE001 — report the file and go on with the others
            results.append((path, f"unreadable image ({str(error).splitlines()[0] if str(error) else type(error).__name__})"))
            continue
        probabilities = classify(model, image[None], classifier)[0]
        top = probabilities.topk(min(top_k, len(class_names)))
        results.append((path, [(class_names[i], p) for p, i in zip(top.values.tolist(), top.indices.tolist())]))
    return results


def evaluate(checkpoint, *, zeroshot: str | None = None, retrieval: str | None = None, templates=None,
             max_samples: int = 5000, device: str = "cpu", adapter=None) -> dict:
    """Zero-shot top-1/top-5 on a labelled folder (or "shapes") and recall@1/5/10 on a caption table (or "shapes:val")."""
    from .clip import CLIPDataConfig, CLIPRecipe, HeldOutEvaluation

    if not zeroshot and not retrieval:
        raise UserError("nothing to evaluate: give --zeroshot-dir LABELLED_DIR (or 'shapes') and/or --retrieval TABLE")
    model = load_clip(checkpoint, device, adapter)
    data = CLIPDataConfig(zeroshot=zeroshot, zeroshot_templates=list(templates) if templates else None,
                          retrieval=retrieval, eval_samples=max_samples)
    evaluation = HeldOutEvaluation(CLIPRecipe(model=model.config, data=data))
    with torch.no_grad():
        return evaluation(model)
