"""Sampling images from a trained text-to-image folder into an output folder, as `mmgen sample text2img` does."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.images import make_grid
from ..diffusion.text2img import CLIP_SAMPLING
from ..errors import UserError
from ..io import write_json
from ..pipelines.text2img import DEFAULT_GUIDANCE_SCALE, TextToImagePipeline
from ..run_folder import check_output_path, new_output_folder

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_images(checkpoint, prompts: list[str], out_dir, *, num_images_per_prompt: int = 4, clip_model=None,
                  device: str = "cpu", adapter=None, dtype: str = "fp32", **options) -> list[Path]:
    """Write OUT_DIR/000.png ... (prompt by prompt), grid.png (a row per prompt) and samples.json, all at once.

    `dtype` (fp32, bf16, fp16) is the precision the model samples in; `options` go to TextToImagePipeline.__call__.
    An existing OUT_DIR that holds files is refused, never overwritten.
    """
    out_dir = Path(out_dir)
    with new_output_folder(out_dir) as staging:
        pipeline = on_device(device, lambda: TextToImagePipeline.from_pretrained(
            checkpoint, clip_model=clip_model, device=device, adapter=adapter, dtype=DTYPES[dtype]))
        images = pipeline(prompts, num_images_per_prompt=num_images_per_prompt, **options)
        entries = [{"prompt": prompts[index // num_images_per_prompt]} for index in range(len(images))]
        used = pipeline.sampler.override(kind=options.get("sampler"), steps=options.get("steps"))
        stored = pipeline.model.config
        record = {"checkpoint": str(checkpoint), "adapter": adapter and str(adapter),
                  "num_images_per_prompt": num_images_per_prompt, "dtype": dtype, **options,
                  "sampler": used.kind, "steps": used.steps}  # the model's stored defaults where none was given
        for name in CLIP_SAMPLING:
            if options.get(name) is None:
                record[name] = getattr(stored, name)
        if options.get("guidance_scale") is None:
            record["guidance_scale"] = (stored.guidance_scale if stored.guidance_scale is not None
                                        else DEFAULT_GUIDANCE_SCALE)
        names = write_samples(staging, images, entries, num_images_per_prompt if len(prompts) > 1 else None, record)
    return [out_dir / name for name in names]


def check_out_dir(out_dir) -> Path:
    """OUT_DIR as a Path; a file, or a folder that holds files, is refused (nothing is ever overwritten). For work
    done before `new_output_folder` (which locks OUT_DIR and checks again) that a taken OUT_DIR would waste."""
    out_dir = Path(out_dir)
    if check_output_path(out_dir):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out (nothing is overwritten)")
    return out_dir


def on_device(device: str, load):
    """load(), with a device torch cannot use (RuntimeError, AssertionError) reported as one line."""
    try:
        return load()
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: {str(error).splitlines()[0]}") from None


def write_samples(folder: Path, images: list, entries: list[dict], columns: int | None, record: dict) -> list[str]:
    """Write folder/000.png ..., grid.png (rows of `columns`) and samples.json ({**record, "images": [{"file": ...,
    **entry}, ...]}) into a staging folder of `new_output_folder`; return the image file names."""
    names = [f"{index:03d}.png" for index in range(len(images))]
    for name, image in zip(names, images):
        image.save(folder / name)
    make_grid(images, columns).save(folder / "grid.png")
    files = [{"file": name, **entry} for name, entry in zip(names, entries)]
    write_json(folder / "samples.json", {**record, "images": files})
    return names
