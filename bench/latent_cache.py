"""The latent cache measured as a user runs it, with and without `data.latent_cache`, same data, steps and seed, one
after the other with the same threads. Two recipes:

    python bench/latent_cache.py [--items 4000] [--steps 300] [--threads 2] [--out bench/results/latent_cache.json]
    python bench/latent_cache.py --recipe sd15-lora [--items 8] [--steps 6] [--batch-size 2] [--image-size 512]

ldm-shapes: `mmgen train latent-diffusion --config configs/ldm-shapes.yaml`; the CLIP (configs/clip-shapes.yaml's
shape) and the VAE (configs/vae-shapes.yaml's) have random weights. sd15-lora: `mmgen finetune diffusion` with a LoRA
(rank 4 on the UNet's attention, as diffusers' train_text_to_image_lora.py) on a Stable Diffusion 1.5 of random
weights in the real shapes (860M UNet, 84M VAE, 123M text encoder; converted from diffusers' classes as
bench/stable_diffusion.py does) at `--image-size` px. Random weights do not change the speed.

Three runs: without the cache (the VAE encoder and the text tower run on every batch; data.cache keeps the pixels in
memory), with a new cache (built first, then trained on), and again with the cache reused. Each reports samples/s
(median of the logged throughput/samples_per_s after the first window, i.e. training only) and the command's whole
wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from mmgen.clip import CLIP, CLIPConfig
from mmgen.config import from_dict, load_yaml
from mmgen.diffusion.vae import VAE
from mmgen.recipes.vae import VAEModelSection

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def ldm_shapes_command(work: Path, name: str, args: argparse.Namespace) -> list[str]:
    """`mmgen train latent-diffusion` of configs/ldm-shapes.yaml on the random CLIP and VAE in `work`."""
    return ["train", "latent-diffusion", "--config", str(CONFIGS / "ldm-shapes.yaml"), "--out", str(work / name),
            f"model.text_encoder={work / 'clip'}", f"model.vae={work / 'vae'}", "train.log_every=25"]


def sd15_lora_command(work: Path, name: str, args: argparse.Namespace) -> list[str]:
    """`mmgen finetune diffusion` with a rank-4 attention LoRA on the random SD 1.5 in `work/base`."""
    config = {"method": "lora", "lora": {"rank": 4, "alpha": 4, "targets": ["attn"]},
              "data": {"cache": True}, "samples": {"prompts": ["a red circle"]},
              "train": {"batch_size": args.batch_size, "lr": 1e-4, "warmup_steps": 0, "log_every": 1,
                        "num_workers": 0, "seed": 0}}
    path = work / "sd15-lora.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return ["finetune", "diffusion", "--base", str(work / "base"), "--config", str(path), "--out", str(work / name)]


def run(work: Path, name: str, args: argparse.Namespace, *extra: str) -> dict:
    """One training command of `args.steps` steps; its wall time and median training samples/s."""
    recipe = ldm_shapes_command if args.recipe == "ldm-shapes" else sd15_lora_command
    command = [sys.executable, "-m", "mmgen.cli", *recipe(work, name, args), f"data.train=shapes:train:{args.items}",
               "data.val=null", f"train.max_steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0",
               "samples.count=0", "train.progress=false", "train.tensorboard=false", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rates = [record["throughput/samples_per_s"] for record in records if "throughput/samples_per_s" in record]
    return {"run": name, "wall_s": round(wall, 1), "samples_per_s": float(f"{statistics.median(rates[1:] or rates):.3g}")}


def stable_diffusion_15(image_size: int):
    """An mmgen TextToImage converted from diffusers' SD 1.5 classes with random weights, sampling `image_size` px."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from stable_diffusion import SD15_SCHEDULER, SD15_TEXT, SD15_UNET, SD15_VAE

    from mmgen.diffusion.stable_diffusion import from_diffusers_parts, noise_schedule_from_scheduler

    unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": image_size // 8})  # the VAE downsamples 8x
    return from_diffusers_parts(unet, AutoencoderKL(**SD15_VAE),
                                transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD15_TEXT)),
                                SD15_TEXT["eos_token_id"], noise_schedule_from_scheduler(SD15_SCHEDULER))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4000, help="training images (shapes:train:ITEMS)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--recipe", choices=("ldm-shapes", "sd15-lora"), default="ldm-shapes")
    parser.add_argument("--batch-size", type=int, default=2, help="sd15-lora's batch size")
    parser.add_argument("--image-size", type=int, default=512, help="sd15-lora's image size")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        torch.manual_seed(0)
        if args.recipe == "ldm-shapes":
            CLIP(from_dict(CLIPConfig, load_yaml(CONFIGS / "clip-shapes.yaml")["model"], "model.")).save_pretrained(
                work / "clip")
            section = from_dict(VAEModelSection, load_yaml(CONFIGS / "vae-shapes.yaml")["model"], "model.")
            VAE(section.vae_config()).save_pretrained(work / "vae")
        else:
            stable_diffusion_15(args.image_size).save_pretrained(work / "base")
        cache = f"data.latent_cache={work / 'cache'}"
        results = [run(work, "encode-every-step", args), run(work, "cache-built", args, cache, "data.cache=false"),
                   run(work, "cache-reused", args, cache, "data.cache=false")]
    plain = results[0]["samples_per_s"]
    for result in results:
        result["samples_per_s_ratio"] = round(result["samples_per_s"] / plain, 2)
        print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"recipe": args.recipe, "items": args.items, "steps": args.steps,
                                              "threads": args.threads, "batch_size": args.batch_size,
                                              "image_size": args.image_size, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
