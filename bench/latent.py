"""Latent diffusion measurements on the shapes data: (a) the VAE's reconstruction PSNR on held-out images, and
(b) training throughput of latent against pixel diffusion at the same image size.

    python bench/latent.py --vae runs/vae-shapes                 # both parts, on CPU; writes bench/results/latent.json
    python bench/latent.py                                       # (b) only, on a random VAE (configs/vae-shapes.yaml)
    python bench/latent.py --quick                               # a smoke run (writes no results unless --out)
    python bench/latent.py --device cuda --batch 256

(a) PSNR (dB, pixels in [0, 1]) of the posterior-mode reconstructions of `--images` held-out shapes:val images at
the VAE run's image size (its config.yaml), with the latent size and scaling factor; for scale, the PSNR of a
bicubic round trip through a grid of the latents' height and width (3 values per position, the VAE has
latent_channels) is reported beside it; and the judge's (bench/judge.py) shape / colour / size / position accuracy
on the reconstructions: the most prompt fidelity a latent diffusion model on this VAE can reach.

(b) One training step as the recipes take it (mmgen.diffusion.objective.DenoisingLoss: frozen-CLIP text encoding,
noising, UNet forward, loss, backward, AdamW step) on a batch of `--batch` 32x32 images, for
- pixel: the TextToImage of configs/diffusion-shapes.yaml (its UNet on 3x32x32 pixels);
- latent: the TextToImage of configs/ldm-shapes.yaml (its UNet on the VAE's 4x8x8 latents), encoding the images
  with the VAE of configs/vae-shapes.yaml (or --vae) every step, as `mmgen train latent-diffusion` does;
- latent-cached: the same model on latents encoded once beforehand (what caching latents would buy).
The CLIP is configs/clip-shapes.yaml's shape; every network has random weights, which do not change the speed.
The three steps alternate within each repeat (order flipped between repeats); samples/s comes from the median.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from timing import interleaved_seconds
from torch.nn import functional as F

from mmgen.clip import CLIP, CLIPConfig
from mmgen.config import from_dict, load_yaml
from mmgen.data.captions import build_caption_dataset
from mmgen.diffusion import NoiseSchedule, TextToImage, UNetConfig
from mmgen.diffusion.objective import DenoisingLoss, DiffusionLossConfig
from mmgen.diffusion.text2img import tokenize_prompts
from mmgen.diffusion.vae import VAE
from mmgen.hub import load_as
from mmgen.recipes.vae import VAEModelSection, first_batches, psnr
from mmgen.training import make_optimizer

REPOSITORY = Path(__file__).resolve().parents[1]
CONFIGS = REPOSITORY / "configs"
RESULTS = REPOSITORY / "bench" / "results" / "latent.json"


def machine(device: torch.device) -> dict:
    """Where the figures were taken."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                  if line.startswith("model name")] if cpuinfo.exists() else []
        name = models[0] if models else platform.processor()
    return {"device": str(device), "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def vae_run_image_size(path: Path, default: int = 32) -> int:
    """The image size a VAE run trained on (the config.yaml of RUN_DIR, or of RUN_DIR/final's run), else `default`."""
    for saved in (path / "config.yaml", path.parent / "config.yaml"):
        if saved.is_file():
            return int(load_yaml(saved).get("model", {}).get("image_size", default))
    return default


@torch.no_grad()
def reconstruction(vae: VAE, image_size: int, count: int, batch: int) -> dict:
    """(a): PSNR of the VAE's reconstructions of `count` shapes:val images, and of a bicubic round trip."""
    heldout = build_caption_dataset(f"shapes:val:{count}", split="val", image_size=image_size, train=False,
                                    normalize="minus_one_to_one")
    batches = list(first_batches(heldout, batch, -(-count // batch)))
    vae_psnr, _ = psnr(vae, batches)
    latent = image_size // vae.config.downsampling_factor
    errors = []
    for images in batches:
        small = F.interpolate(images, size=(latent, latent), mode="bicubic", antialias=True, align_corners=False)
        back = F.interpolate(small, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp(-1, 1)
        errors.append(((back - images) / 2).square().flatten(1).mean(dim=1))
    bicubic = (-10 * torch.log10(torch.cat(errors).clamp(min=1e-10))).mean().item()
    return {"judge_on_reconstructions": judge_reconstructions(vae, heldout, batches),
            "images": sum(len(b) for b in batches), "image_size": image_size,
            "latent_shape": [vae.config.latent_channels, latent, latent],
            "compression": 3 * image_size**2 / (vae.config.latent_channels * latent**2),
            "scaling_factor": vae.config.scaling_factor, "psnr_db": vae_psnr,
            f"bicubic_{latent}x{latent}_psnr_db": bicubic}


@torch.no_grad()
def judge_reconstructions(vae: VAE, dataset, batches) -> dict:
    """The judge's per-attribute accuracy on the posterior-mode reconstructions of `batches` (items of `dataset`)."""
    from judge import load_or_train_judge, score
    from torchvision.transforms.functional import to_pil_image

    judge = load_or_train_judge(32, progress=False)
    device = next(vae.parameters()).device
    images = [to_pil_image((image.float().cpu() + 1) / 2) for batch in batches
              for image in vae(batch.to(device), sample_posterior=False)[0].clamp(-1, 1)]
    return score(judge.predict(images), [dataset.attributes(index) for index in range(len(images))])


def text2img_from(config_name: str, clip: CLIP, vae: VAE | None) -> TextToImage:
    """The random TextToImage of a shipped diffusion config, on `clip` (and `vae`)."""
    section = load_yaml(CONFIGS / config_name)["model"]
    unet = from_dict(UNetConfig, section["unet"], "unet.")
    return TextToImage.from_text_encoder(clip, section["image_size"], unet,
                                         from_dict(NoiseSchedule, section["schedule"], "schedule."), vae)


def training_step(model: TextToImage, loss_fn: DenoisingLoss, batch: dict):
    """One optimizer step of `model` on `batch` (the recipes' loss; AdamW as the Trainer makes it)."""
    optimizer = make_optimizer(model, 1e-4, 0.0, (0.9, 0.999))
    model.train()

    def step():
        loss, _ = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def throughput(vae: VAE, batch: int, repeats: int, iterations: int, device: torch.device) -> dict:
    """(b): samples/s of a training step of pixel diffusion, of latent diffusion, and of it on cached latents."""
    torch.manual_seed(0)
    clip = CLIP(from_dict(CLIPConfig, load_yaml(CONFIGS / "clip-shapes.yaml")["model"], "model."))
    pixel = text2img_from("diffusion-shapes.yaml", clip, None).to(device)
    latent = text2img_from("ldm-shapes.yaml", clip, vae).to(device)
    train_set = build_caption_dataset(f"shapes:train:{batch}", split="train", image_size=pixel.config.image_size,
                                      train=True, normalize="minus_one_to_one")
    data = next(iter(first_batches(train_set, batch, 1)))
    captions = [train_set[index]["caption"] for index in range(batch)]
    images = data.to(device)
    tokens = tokenize_prompts(captions, pixel.context_length).to(device)
    with torch.no_grad():
        cached = latent.encode_images(images)

    class OnLatents(DenoisingLoss):  # the batch's "images" are the latents already
        def clean_samples(self, images):
            return images

    def loss_for(model, loss_class=DenoisingLoss):
        return loss_class(model, DiffusionLossConfig(min_snr_gamma=5.0))

    def batch_of(samples):
        return {"images": samples, "tokens": tokens, "captions": captions, "skipped": 0, "skipped_examples": []}

    steps = {
        "pixel": training_step(pixel, loss_for(pixel), batch_of(images)),
        "latent": training_step(latent, loss_for(latent), batch_of(images)),
        "latent-cached": training_step(latent, loss_for(latent, OnLatents), batch_of(cached)),
    }
    seconds = interleaved_seconds(steps, repeats, iterations, device)
    figures = {name: {"samples_per_s": batch / statistics.median(values),
                      "s_per_step_median": statistics.median(values), "s_all": values}
               for name, values in seconds.items()}

    def ratio(name):  # median over repeats of the per-repeat ratio: each repeat's steps ran back to back
        return statistics.median(p / other for p, other in zip(seconds["pixel"], seconds[name]))

    parameters = {name: sum(p.numel() for p in model.unet.parameters()) for name, model in (("pixel", pixel),
                                                                                             ("latent", latent))}
    with torch.no_grad():
        encode = interleaved_seconds({"encode": lambda: latent.encode_images(images)}, repeats, iterations, device)
    return {
        "batch": batch, "image_size": pixel.config.image_size,
        "diffused_shapes": {"pixel": list(pixel.config.sample_shape), "latent": list(latent.config.sample_shape)},
        "unet_parameters": parameters, "vae_encoder_s_per_batch": statistics.median(encode["encode"]),
        "steps": figures, "speedup_over_pixel": {"latent": ratio("latent"), "latent-cached": ratio("latent-cached")},
    }


def load_vae(path: str | None) -> VAE:
    """The VAE of a run or model folder, else a random VAE shaped as configs/vae-shapes.yaml's."""
    if path is not None:
        return load_as(path, VAE)
    section = from_dict(VAEModelSection, load_yaml(CONFIGS / "vae-shapes.yaml")["model"], "model.")
    torch.manual_seed(0)
    return VAE(section.vae_config()).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", help="VAE run or model folder (`mmgen train vae`); without it, (a) is skipped")
    parser.add_argument("--images", type=int, default=256, help="held-out images for the PSNR")
    parser.add_argument("--image-size", type=int, help="of the held-out images (default: the VAE run's, else 32)")
    parser.add_argument("--batch", type=int, default=64, help="training batch (both recipes' train.batch_size)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=3, help="training steps per timing")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke run: batch 8, 2 repeats of 1 step, 16 images")
    parser.add_argument("--out", type=Path, help=f"results JSON (default {RESULTS.relative_to(REPOSITORY)}; "
                                                  "none with --quick)")
    args = parser.parse_args()
    if args.quick:
        args.batch, args.repeats, args.iterations, args.images = 8, 2, 1, 16
    device = torch.device(args.device)
    vae = load_vae(args.vae).to(device)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python", *sys.argv]),
               "machine": machine(device), "vae": args.vae}
    if args.vae is not None:
        size = args.image_size or vae_run_image_size(Path(args.vae))
        results["reconstruction"] = reconstruction(vae, size, args.images, args.batch)
        print(json.dumps(results["reconstruction"]), file=sys.stderr)
    results["throughput"] = throughput(vae, args.batch, args.repeats, args.iterations, device)
    summary = results["throughput"]
    for name, figures in summary["steps"].items():
        print(f"{name:14s} {figures['samples_per_s']:8.1f} samples/s", file=sys.stderr)
    print(f"speed-up over pixel: {summary['speedup_over_pixel']}", file=sys.stderr)
    out = args.out or (None if args.quick else RESULTS)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
