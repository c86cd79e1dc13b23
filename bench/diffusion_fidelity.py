"""Prompt fidelity of a text2img checkpoint on the shapes data: the fraction of samples whose shape and colour (and
size, position) match the prompt, as read by an independent judge CNN (bench/judge.py), per sampler setting.

Prompts are full captions ("a large red circle at the top left") of a deterministic sample of the held-out
shape x colour pairs x sizes x positions: compositions the model never saw in training. The judge's accuracy on real
renders of the same prompts is the ceiling.

    python bench/diffusion_fidelity.py --checkpoint runs/diffusion-shapes
    python bench/diffusion_fidelity.py --checkpoint runs/diffusion-shapes --train-prompts   # + seen pairs
    python bench/diffusion_fidelity.py --checkpoint runs/diffusion-shapes --settings ddim:50:3,ddpm:1000:3
    python bench/diffusion_fidelity.py --checkpoint RUN --quick                             # smoke run
    python bench/diffusion_fidelity.py --checkpoint runs/prior-shapes --decoder runs/decoder-shapes  # unCLIP

With --decoder, --checkpoint is an unCLIP prior and the images come from the prior + decoder pipeline; a setting's
sampler, steps and guidance are the decoder's, the prior samples with DDIM at --prior-steps / --prior-guidance.
--real-embeddings skips the prior: the decoder decodes the CLIP image embeddings of real renders of the prompts
(with the prompts as its text), which tells the decoder's errors from the prior's.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from judge import load_or_train_judge, score

from mmgen.data.shapes import COLOURS, POSITIONS, SHAPES, SIZES, caption, heldout_pairs, render
from mmgen.diffusion.samplers import SAMPLERS
from mmgen.errors import UserError
from mmgen.io import atomic_write_text
from mmgen.pipelines.text2img import TextToImagePipeline
from mmgen.pipelines.unclip import UnCLIPPipeline

REPOSITORY = Path(__file__).resolve().parents[1]
RESULTS = REPOSITORY / "bench" / "results"
# guidance 1 / 3 / 5 at DDIM 50, then DDIM 25 and DDPM 1000 at guidance 3 (DDIM 50 at 3 is shared)
DEFAULT_SETTINGS = "ddim:50:1,ddim:50:3,ddim:50:5,ddim:25:3,ddpm:1000:3"
QUICK_SETTINGS = "ddim:10:1,ddim:10:3"
COLUMNS = ("shape+colour", "shape", "colour", "size", "position")


def parse_settings(text: str) -> list[dict]:
    """"ddim:50:3,ddpm:1000:3" -> [{"sampler": "ddim", "steps": 50, "guidance_scale": 3.0}, ...]."""
    settings = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        parts = item.split(":")
        try:
            sampler, steps, guidance = parts[0], int(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            raise UserError(f"bad setting {item!r}: expected SAMPLER:STEPS:GUIDANCE, e.g. ddim:50:3") from None
        if len(parts) != 3 or sampler not in SAMPLERS or steps < 1 or guidance < 0:
            raise UserError(f"bad setting {item!r}: sampler one of {', '.join(SAMPLERS)}, steps >= 1, guidance >= 0")
        settings.append({"name": item, "sampler": sampler, "steps": steps, "guidance_scale": guidance})
    if not settings:
        raise UserError("no sampler setting given")
    return settings


def prompt_attributes(split: str, count: int, seed: int = 0) -> list[dict]:
    """A deterministic sample of `count` (shape, colour, size, position) combinations whose shape x colour pair is
    held out ("heldout") or seen in training ("train"), in a fixed order."""
    heldout = heldout_pairs()
    combinations = [{"shape": shape, "colour": colour, "size": size, "position": position}
                    for shape in SHAPES for colour in COLOURS for size in SIZES for position in POSITIONS
                    if ((shape, colour) in heldout) == (split == "heldout")]
    chosen = np.random.default_rng(seed).choice(len(combinations), size=min(count, len(combinations)), replace=False)
    return [combinations[index] for index in sorted(chosen)]


def generate(pipeline: TextToImagePipeline | UnCLIPPipeline, prompts: list[str], setting: dict,
             images_per_prompt: int, batch_size: int, seed: int, embeddings: torch.Tensor | None = None) -> list:
    """The pipeline's images for `prompts` under `setting`, `batch_size` prompts per call, each call seeded apart.
    With `embeddings` (one per image, prompt-major), an unCLIP pipeline's decoder decodes them instead of the prior's."""
    if embeddings is not None:
        batch = [prompt for prompt in prompts for _ in range(images_per_prompt)]
        step = batch_size * images_per_prompt
        return [image for index, start in enumerate(range(0, len(batch), step))
                for image in pipeline.decoder(embeddings[start : start + step], batch[start : start + step],
                                              sampler=setting["sampler"], steps=setting["steps"],
                                              guidance_scale=setting["guidance_scale"],
                                              guidance_interval=setting.get("interval"), seed=seed + index,
                                              progress=False)]
    if isinstance(pipeline, UnCLIPPipeline):
        options = {"prior_steps": setting["prior_steps"], "prior_guidance_scale": setting["prior_guidance_scale"],
                   "guidance_interval": setting.get("interval")}
    else:
        options = {"guidance_rescale": setting.get("rescale", 0.0), "guidance_interval": setting.get("interval"),
                   "clip_guidance_scale": setting.get("clip_guidance"), "clip_rerank": setting.get("clip_rerank"),
                   "clip_guidance_views": setting.get("clip_views")}
    images = []
    for batch, start in enumerate(range(0, len(prompts), batch_size)):
        images += pipeline(prompts[start : start + batch_size], num_images_per_prompt=images_per_prompt,
                           sampler=setting["sampler"], steps=setting["steps"],
                           guidance_scale=setting["guidance_scale"], seed=seed + batch, progress=False, **options)
    return images


def load_pipeline(args: argparse.Namespace) -> tuple[TextToImagePipeline | UnCLIPPipeline, int]:
    """The pipeline under test and the size of its images."""
    if args.decoder is None:
        pipeline = TextToImagePipeline.from_pretrained(args.checkpoint, device=args.device)
        return pipeline, pipeline.model.config.image_size
    if args.guidance_rescale or any(value is not None for value in (args.clip_guidance, args.clip_rerank,
                                                                     args.clip_views)):
        raise UserError("--guidance-rescale, --clip-guidance, --clip-views and --clip-rerank are for text2img models, "
                        "not prior + decoder")
    pipeline = UnCLIPPipeline.from_pretrained(args.checkpoint, args.decoder, device=args.device)
    return pipeline, pipeline.decoder.decoder.config.image_size


def machine() -> dict:
    """Where the figures were taken: OS, CPU threads, and the accelerator if one is used."""
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def print_table(results: dict) -> None:
    print(f"{'prompts':<9}{'setting':<16}" + "".join(f"{name:>14}" for name in COLUMNS) + f"{'seconds':>10}")
    for split, block in results["prompt_sets"].items():
        rows = [("real renders", block["ceiling"], None)]
        rows += [(s["name"], s["fidelity"], s["seconds"]) for s in block["settings"]]
        for name, figures, seconds in rows:
            timing = f"{seconds:>10.1f}" if seconds is not None else f"{'':>10}"
            print(f"{split:<9}{name:<16}" + "".join(f"{figures[c]:>14.3f}" for c in COLUMNS) + timing)


def run(args: argparse.Namespace) -> dict:
    settings = parse_settings(args.settings or (QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS))
    for setting in settings:
        setting.update(interval=args.guidance_interval)
        if args.decoder is None:
            setting.update(rescale=args.guidance_rescale, clip_guidance=args.clip_guidance, clip_rerank=args.clip_rerank,
                           clip_views=args.clip_views)
        else:
            setting.update(prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance)
    count = args.prompts or (8 if args.quick else 64)
    judge = load_or_train_judge(args.judge_size, args.judge_cache)
    pipeline, image_size = load_pipeline(args)
    if args.decoder is None:  # recorded as used: the model's stored ones where none was given
        stored = pipeline.model.config
        for setting in settings:
            for key, name in (("clip_guidance", "clip_guidance_scale"), ("clip_rerank", "clip_rerank"),
                              ("clip_views", "clip_guidance_views")):
                if setting[key] is None:
                    setting[key] = getattr(stored, name)
    # warm-up, so the first setting's time is not start-up
    generate(pipeline, ["a red circle"], {**settings[0], "steps": 1}, 1, 1, args.seed)
    results = {
        "checkpoint": str(args.checkpoint), "decoder": args.decoder and str(args.decoder),
        "date": time.strftime("%Y-%m-%d %H:%M"), "machine": machine(),
        "device": args.device, "model_image_size": image_size, "images_per_prompt": args.images_per_prompt,
        "seed": args.seed, "real_embeddings": args.real_embeddings, "judge": {"image_size": judge.config.image_size, "report": judge.report},
        "command": " ".join(sys.argv), "prompt_sets": {},
    }
    for split in ["heldout"] + (["train"] if args.train_prompts else []):
        attributes = prompt_attributes(split, count, args.seed)
        prompts = [caption(a) for a in attributes]
        expected = [a for a in attributes for _ in range(args.images_per_prompt)]  # the pipeline's image order
        # the ceiling: the judge on real renders of the same prompts, at the model's size
        rng = np.random.default_rng([args.seed, 7])
        ceiling = score(judge.predict([render(a, image_size, rng) for a in expected]), expected)
        block = {"prompts": len(prompts), "examples": prompts[:4], "ceiling": ceiling, "settings": []}
        embeddings = None
        if args.real_embeddings:  # another draw of renders than the ceiling's, embedded by the decoder's CLIP
            renders = np.random.default_rng([args.seed, 11])
            embeddings = pipeline.decoder.image_embeddings([render(a, image_size, renders) for a in expected])
            block["embeddings"] = "real renders"
        for setting in settings:
            start = time.perf_counter()
            images = generate(pipeline, prompts, setting, args.images_per_prompt, args.batch_size, args.seed,
                              embeddings)
            seconds = time.perf_counter() - start
            block["settings"].append({**setting, "seconds": round(seconds, 2),
                                      "fidelity": score(judge.predict(images), expected)})
            print(f"{split} {setting['name']}: {seconds:.1f}s", file=sys.stderr)
        results["prompt_sets"][split] = block
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True,
                        help="text2img run or model folder (with --decoder: the unCLIP prior's)")
    parser.add_argument("--decoder", type=Path, help="unCLIP decoder run or model folder: test prior + decoder")
    parser.add_argument("--prior-steps", type=int, default=64, help="the prior's DDIM steps (with --decoder)")
    parser.add_argument("--prior-guidance", type=float, default=2.0, help="the prior's guidance (with --decoder)")
    parser.add_argument("--real-embeddings", action="store_true",
                        help="with --decoder: decode the CLIP embeddings of real renders instead of prior samples")
    parser.add_argument("--settings", help=f"SAMPLER:STEPS:GUIDANCE,... (default {DEFAULT_SETTINGS})")
    parser.add_argument("--prompts", type=int, help="prompts per prompt set (default 64; 8 with --quick)")
    parser.add_argument("--images-per-prompt", type=int, default=1)
    parser.add_argument("--guidance-rescale", type=float, default=0.0, help="CFG rescale in [0, 1] (all settings)")
    parser.add_argument("--clip-guidance", type=float,
                        help="CLIP guidance scale with the model's own CLIP (text2img; all settings; default: the "
                             "model's stored one, config.json's clip_guidance_scale)")
    parser.add_argument("--clip-views", type=int, metavar="N",
                        help="shifted views of each x0 estimate CLIP guidance scores (text2img; default: the model's "
                             "stored clip_guidance_views)")
    parser.add_argument("--clip-rerank", type=int, metavar="K",
                        help="draw K candidates per image, keep the one the model's CLIP matches best (text2img; all "
                             "settings; default: the model's stored one, config.json's clip_rerank)")
    parser.add_argument("--guidance-interval", type=int, nargs=2, metavar=("T_LOW", "T_HIGH"),
                        help="guide only at timesteps T_LOW..T_HIGH (all settings)")
    parser.add_argument("--train-prompts", action="store_true",
                        help="also evaluate prompts of shape x colour pairs seen in training, for comparison")
    parser.add_argument("--batch-size", type=int, default=64, help="prompts per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt sample, the renders and the sampler")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--judge-size", type=int, default=32, help="the judge's image size; samples are resized to it")
    parser.add_argument("--judge-cache", type=Path, help="default: bench/results/judge-<size>px/")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 8 prompts, two 10-step DDIM settings")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/diffusion_fidelity.json; "
                                                  "diffusion_fidelity_quick.json with --quick)")
    args = parser.parse_args()
    if args.images_per_prompt < 1 or args.batch_size < 1 or (args.prompts is not None and args.prompts < 1):
        parser.error("--prompts, --images-per-prompt and --batch-size must be >= 1")
    if args.real_embeddings and args.decoder is None:
        parser.error("--real-embeddings needs --decoder")
    if args.prior_steps < 1 or args.prior_guidance < 0:
        parser.error("--prior-steps must be >= 1 and --prior-guidance >= 0")
    try:
        results = run(args)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    print_table(results)
    out = args.out or RESULTS / ("diffusion_fidelity_quick.json" if args.quick else "diffusion_fidelity.json")
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
