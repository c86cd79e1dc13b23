"""The latent cache measured as a user runs it: `mmgen train latent-diffusion --config configs/ldm-shapes.yaml` with and
without `data.latent_cache`, same data, steps and seed, one after the other with the same threads.

    python bench/latent_cache.py [--items 4000] [--steps 300] [--threads 2] [--out bench/results/latent_cache.json]

Three runs: without the cache (the VAE encoder and the text tower run on every batch; data.cache keeps the pixels in
memory), with a new cache (built first, then trained on), and again with the cache reused. Each reports samples/s
(median of the logged throughput/samples_per_s, i.e. training only) and the command's whole wall time. The CLIP
(configs/clip-shapes.yaml's shape) and the VAE (configs/vae-shapes.yaml's) have random weights, which do not change
the speed.
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


def run(work: Path, name: str, args: argparse.Namespace, *extra: str) -> dict:
    """One `mmgen train latent-diffusion` of `args.steps` steps; its wall time and median training samples/s."""
    command = [sys.executable, "-m", "mmgen.cli", "train", "latent-diffusion", "--config",
               str(CONFIGS / "ldm-shapes.yaml"), "--out", str(work / name), f"model.text_encoder={work / 'clip'}",
               f"model.vae={work / 'vae'}", f"data.train=shapes:train:{args.items}", "data.val=null",
               f"train.max_steps={args.steps}", "train.eval_every=0", "train.checkpoint_every=0", "train.log_every=25",
               "samples.count=0", "train.progress=false", "train.tensorboard=false", *extra]
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=environment, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    rates = [record["throughput/samples_per_s"] for record in records if "throughput/samples_per_s" in record]
    return {"run": name, "wall_s": round(wall, 1), "samples_per_s": round(statistics.median(rates[1:] or rates), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=4000, help="training images (shapes:train:ITEMS)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        torch.manual_seed(0)
        CLIP(from_dict(CLIPConfig, load_yaml(CONFIGS / "clip-shapes.yaml")["model"], "model.")).save_pretrained(
            work / "clip")
        section = from_dict(VAEModelSection, load_yaml(CONFIGS / "vae-shapes.yaml")["model"], "model.")
        VAE(section.vae_config()).save_pretrained(work / "vae")
        cache = f"data.latent_cache={work / 'cache'}"
        results = [run(work, "encode-every-step", args), run(work, "cache-built", args, cache, "data.cache=false"),
                   run(work, "cache-reused", args, cache, "data.cache=false")]
    plain = results[0]["samples_per_s"]
    for result in results:
        result["samples_per_s_ratio"] = round(result["samples_per_s"] / plain, 2)
        print(json.dumps(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"items": args.items, "steps": args.steps, "threads": args.threads,
                                              "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
