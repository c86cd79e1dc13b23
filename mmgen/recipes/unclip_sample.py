"""Sampling with unCLIP folders into an output folder: `mmgen sample text2img --checkpoint PRIOR --decoder DECODER`
and `mmgen sample variations --checkpoint DECODER IMAGE...`."""

from __future__ import annotations

from pathlib import Path

from ..data.images import load_rgb
from ..errors import UserError
from ..hub import read_model_config, resolve_model_folder
from ..pipelines.unclip import DecoderPipeline, UnCLIPPipeline, default_decoder_guidance
from ..run_folder import new_output_folder
from .clip_eval import image_files
from .text2img_sample import check_out_dir, on_device, write_samples


def model_type(checkpoint) -> str:
    """The model_type of the model in a run or model folder (a CheckpointError when there is none)."""
    return read_model_config(resolve_model_folder(checkpoint))["model_type"]


def decoder_defaults_used(pipeline: DecoderPipeline, options: dict) -> dict:
    """The decoder's sampler, steps, guidance scale and guidance interval `options` sampled with: the decoder's stored
    defaults where `options` gave none."""
    used = pipeline.sampler.override(kind=options.get("sampler"), steps=options.get("steps"))
    guidance, interval = options.get("guidance_scale"), options.get("guidance_interval")
    interval = pipeline.decoder.config.guidance_interval if interval is None else interval
    return {"sampler": used.kind, "steps": used.steps,
            "guidance_scale": default_decoder_guidance(pipeline.decoder) if guidance is None else guidance,
            "guidance_interval": None if interval is None else list(interval)}


def sample_unclip_images(prior, decoder, prompts: list[str], out_dir, *, num_images_per_prompt: int = 4,
                         device: str = "cpu", **options) -> list[Path]:
    """Write OUT_DIR/000.png ... (prompt by prompt), grid.png (a row per prompt) and samples.json, all at once.

    `options` go to UnCLIPPipeline.__call__. An existing OUT_DIR that holds files is refused, never overwritten.
    """
    out_dir = Path(out_dir)
    with new_output_folder(out_dir) as staging:
        pipeline = on_device(device, lambda: UnCLIPPipeline.from_pretrained(prior, decoder, device=device))
        images = pipeline(prompts, num_images_per_prompt=num_images_per_prompt, **options)
        entries = [{"prompt": prompts[index // num_images_per_prompt]} for index in range(len(images))]
        record = {"checkpoint": str(prior), "decoder": str(decoder), "num_images_per_prompt": num_images_per_prompt,
                  **options, **decoder_defaults_used(pipeline.decoder, options)}
        names = write_samples(staging, images, entries, num_images_per_prompt if len(prompts) > 1 else None, record)
    return [out_dir / name for name in names]


def sample_variations(decoder, paths: list[str], out_dir, *, num_variations: int = 4, device: str = "cpu",
                      **options) -> list[Path]:
    """Write `num_variations` variations of each image (files, or folders searched for images) as OUT_DIR/000.png
    ... (image by image), grid.png (a row per image: the input, then its variations) and samples.json, all at once.

    `options` go to DecoderPipeline.__call__. An unreadable image is a UserError; nothing is written then.
    """
    out_dir = check_out_dir(out_dir)
    files = image_files(paths)
    inputs = []
    for path in files:
        try:
            inputs.append(load_rgb(path))
        except Exception as error:  # PIL raises many types for a bad file
            raise UserError(f"{path}: not a readable image ({type(error).__name__})") from None
    with new_output_folder(out_dir) as staging:
        pipeline = on_device(device, lambda: DecoderPipeline.from_pretrained(decoder, device=device))
        images = pipeline.variations(inputs, num_variations=num_variations, **options)
        entries = [{"image": str(files[index // num_variations])} for index in range(len(images))]
        record = {"checkpoint": str(decoder), "num_variations": num_variations, **options,
                  **decoder_defaults_used(pipeline, options)}
        names = write_samples(staging, images, entries, num_variations, record)
    return [out_dir / name for name in names]
