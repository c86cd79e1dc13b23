"""Sampling images from a trained text-to-image folder into an output folder, as `mmgen sample text2img` does."""

from __future__ import annotations

from pathlib import Path

from ..data.images import make_grid
from ..errors import UserError
from ..io import atomic_folder, write_json
from ..pipelines.text2img import TextToImagePipeline


def sample_images(checkpoint, prompts: list[str], out_dir, *, num_images_per_prompt: int = 4, clip_model=None,
                  device: str = "cpu", **options) -> list[Path]:
    """Write OUT_DIR/000.png ... (prompt by prompt), grid.png (a row per prompt) and samples.json, all at once.

    `options` go to TextToImagePipeline.__call__. An existing OUT_DIR that holds files is refused, never overwritten.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out (nothing is overwritten)")
    try:
        pipeline = TextToImagePipeline.from_pretrained(checkpoint, clip_model=clip_model, device=device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: {str(error).splitlines()[0]}") from None
    images = pipeline(prompts, num_images_per_prompt=num_images_per_prompt, **options)
    names = [f"{index:03d}.png" for index in range(len(images))]
    columns = num_images_per_prompt if len(prompts) > 1 else None
    with atomic_folder(out_dir) as staging:
        for name, image in zip(names, images):
            image.save(staging / name)
        make_grid(images, columns).save(staging / "grid.png")
        files = [{"file": name, "prompt": prompts[index // num_images_per_prompt]} for index, name in enumerate(names)]
        write_json(staging / "samples.json", {"checkpoint": str(checkpoint), "images": files,
                                              "num_images_per_prompt": num_images_per_prompt, **options})
    return [out_dir / name for name in names]
