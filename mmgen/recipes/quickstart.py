"""`mmgen quickstart`: CLIP and text-to-image diffusion on the built-in shapes, end to end, in minutes on a CPU.

Four steps, each with its progress bar: train a small CLIP (presets/quickstart-clip.yaml), measure its held-out
zero-shot accuracy, train a small text-to-image model on it (presets/quickstart-diffusion.yaml), and sample a
grid for shape x colour prompts neither model saw in training. Everything lands in one folder, summarised at the end.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path

from ..data.shapes import ShapesDataset
from ..errors import UserError
from ..run_folder import RunFolder

PRESETS = resources.files(__package__) / "presets"
CLIP_PRESET = "quickstart-clip.yaml"
DIFFUSION_PRESET = "quickstart-diffusion.yaml"


def heldout_prompts(count: int) -> list[str]:
    """`count` distinct complete captions of held-out shape x colour pairs (the shapes val split), one per pair first."""
    dataset = ShapesDataset("val", size=50 * count, image_size=8)
    prompts: list[str] = []
    pairs: set[tuple[str, str]] = set()
    for index in range(len(dataset)):  # one prompt per held-out pair before any pair repeats
        attributes = dataset.attributes(index)
        pair = (attributes["shape"], attributes["colour"])
        if pair not in pairs:
            pairs.add(pair)
            prompts.append(dataset.caption(index))
        if len(prompts) == count:
            break
    return prompts


def quickstart(out_dir, *, clip_overrides=(), diffusion_overrides=(), prompts: int = 6,
               images_per_prompt: int = 4, sampling_steps: int | None = None,
               guidance_scale: float | None = None) -> dict:
    """Run the four steps into `out_dir` (a new folder); returns the summary it prints. The held-out grid is sampled
    with the text-to-image model's stored defaults (its preset's sampler, steps and guidance) unless given."""
    from . import clip, diffusion
    from .clip_eval import evaluate
    from .common import load_recipe_config
    from .text2img_sample import sample_images

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out (nothing is overwritten)")
    started = time.monotonic()
    clip_dir, diffusion_dir, samples_dir = out_dir / "clip", out_dir / "diffusion", out_dir / "samples"
    diffusion_overrides = [f"model.text_encoder={clip_dir}", *diffusion_overrides]
    # both configs are checked before anything is trained: a bad override costs seconds, not a CLIP run
    load_recipe_config(clip.CLIPRecipe, PRESETS / CLIP_PRESET, list(clip_overrides), clip_dir, resume=False)
    load_recipe_config(diffusion.DiffusionRecipe, PRESETS / DIFFUSION_PRESET, diffusion_overrides, diffusion_dir,
                       resume=False)

    print(f"[1/4] training CLIP on shapes -> {clip_dir}", flush=True)
    clip.train(PRESETS / CLIP_PRESET, clip_dir, list(clip_overrides))
    print("[2/4] held-out zero-shot accuracy (shape x colour pairs CLIP never saw together)", flush=True)
    zeroshot = evaluate(clip_dir, zeroshot="shapes", max_samples=1000)
    print(f"      zero-shot top-1 {100 * zeroshot['zeroshot/top1']:.1f}%, top-5 {100 * zeroshot['zeroshot/top5']:.1f}%",
          flush=True)
    print(f"[3/4] training text-to-image diffusion on that CLIP -> {diffusion_dir}", flush=True)
    diffusion.train(PRESETS / DIFFUSION_PRESET, diffusion_dir, diffusion_overrides)
    chosen = heldout_prompts(prompts)
    print(f"[4/4] sampling {images_per_prompt} images for each of {len(chosen)} held-out prompts -> {samples_dir}",
          flush=True)
    sample_images(diffusion_dir, chosen, samples_dir, num_images_per_prompt=images_per_prompt,
                  steps=sampling_steps, guidance_scale=guidance_scale)

    summary = {
        "zeroshot/top1": zeroshot["zeroshot/top1"],
        "zeroshot/top5": zeroshot["zeroshot/top5"],
        "clip": str(RunFolder(clip_dir).final),
        "text2img": str(RunFolder(diffusion_dir).final),
        "grid": str(samples_dir / "grid.png"),
        "prompts": chosen,
        "seconds": round(time.monotonic() - started, 1),
    }
    minutes = summary["seconds"] / 60
    print(f"\nquickstart done in {minutes:.1f} min; written to {out_dir}:")
    print(f"  {summary['clip']:40s} CLIP (held-out zero-shot top-1 {100 * summary['zeroshot/top1']:.1f}%)")
    print(f"  {summary['text2img']:40s} text-to-image model (+ training sample grids in {diffusion_dir / 'samples'})")
    print(f"  {summary['grid']:40s} one row per held-out prompt:")
    for prompt in chosen:
        print(f"      {prompt}")
    print(f"  {str(out_dir / '*' / 'metrics.jsonl'):40s} training curves (TensorBoard: {out_dir}/*/tensorboard)")
    print(f'next: mmgen sample text2img --checkpoint {diffusion_dir} --prompt "a small green star at the top" '
          f"--out {out_dir / 'my-samples'}")
    return summary
