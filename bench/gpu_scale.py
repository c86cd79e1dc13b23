"""The GPU measurements of the scale-out issue, as one short run (about 6 minutes on one H100 / H200):

1. `clip`: ViT-B/32 CLIP training and encode-only throughput against open_clip in bf16 (bench/clip.py), and the
   training step's model FLOPs utilisation (FLOPs counted once with torch.utils.flop_counter on one step).
2. `lm`: nanoGPT's GPU recipe for character-level Shakespeare (configs/lm-shakespeare-char-gpu.yaml) through
   `mmgen train lm`: wall time from the command's start to the first val/loss <= 1.47 (nanoGPT's published 1.4697 at
   step 5000, ~3 min on an A100), and the MFU of its steady-state throughput (nanoGPT's FLOPs per token formula).

    python bench/gpu_scale.py --data PATH/tinyshakespeare.txt --out bench/results/gpu
    python bench/gpu_scale.py --only lm --device cpu --lm-steps 30 --data ...   # a smoke test without a GPU

MFU = achieved FLOP/s / the device's dense bf16 peak (a table of known GPUs; on CPU a measured fp32 GEMM).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
LM_CONFIG = REPOSITORY / "configs" / "lm-shakespeare-char-gpu.yaml"
def peak_flops(device: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for `device`: the Trainer's own figure (mmgen.training.throughput's
    GPU table for bf16 on a known GPU, else a measured GEMM; fp32 on CPU), so MFU here and in metrics.jsonl agree."""
    from mmgen.training.throughput import device_peak

    target = torch.device(device)
    peak = device_peak(target, "bf16" if target.type == "cuda" else "no")
    return peak.flops_per_s, peak.source


def clip_training_flops(batch_size: int, device: str) -> float:
    """FLOPs of one ViT-B/32 CLIP training step (forward + backward) of mmgen's model, counted on one batch."""
    sys.path.insert(0, str(REPOSITORY / "bench"))
    from clip import batch_of, build_models
    from torch.utils.flop_counter import FlopCounterMode

    from mmgen.clip import ClipLoss

    model, _ = build_models("ViT-B-32", device)
    images, tokens = batch_of(model, batch_size, device)
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, logit_scale = model(images, tokens)[:3]
        ClipLoss()(image_features, text_features, logit_scale).backward()
    return counter.get_total_flops()


def run_clip(args) -> dict:
    out = args.out / "clip_vitb32.json"
    subprocess.run([sys.executable, str(REPOSITORY / "bench" / "clip.py"), "--model", "ViT-B-32", "--batch-size",
                    str(args.clip_batch), "--device", args.device, "--dtype", "bf16", "--repeats", "5",
                    "--iterations", str(args.clip_iterations), "--out", str(out)], check=True)
    results = json.loads(out.read_text())
    flops = clip_training_flops(args.clip_batch, args.device)
    peak, source = peak_flops(args.device)
    images_per_s = results["train_images_per_s"]
    results.update({"train_flops_per_image": flops / args.clip_batch, "peak_flops": peak, "peak_source": source,
                    "train_mfu": {name: rate * flops / args.clip_batch / peak for name, rate in images_per_s.items()}})
    out.write_text(json.dumps(results, indent=2))
    return results


def run_lm(args) -> dict:
    """`mmgen train lm` on the GPU recipe, timing each metrics.jsonl record as it appears."""
    run = args.run_dir or args.out / "lm-run"
    command = [sys.executable, "-m", "mmgen.cli", "train", "lm", "--config", str(LM_CONFIG), "--out", str(run),
               f"data.path={args.data}", "train.progress=false", "train.checkpoint_every=0",
               *([f"train.max_steps={args.lm_steps}"] if args.lm_steps else []), *args.lm_overrides]
    start = time.perf_counter()
    process = subprocess.Popen(command)
    metrics, seen, timed = run / "metrics.jsonl", 0, []
    log = (args.out / "lm_timed.jsonl").open("w")  # each record with its time since the start, as it arrives
    while True:
        finished = process.poll() is not None
        if metrics.exists():
            lines = metrics.read_text().splitlines()
            for line in lines[seen:]:
                if line.endswith("}"):
                    timed.append({"seconds": round(time.perf_counter() - start, 2), **json.loads(line)})
                    log.write(json.dumps(timed[-1]) + "\n")
                    log.flush()
                    seen += 1
        if finished:
            break
        time.sleep(0.25)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise SystemExit(f"mmgen train lm failed with exit code {process.returncode}")
    import mmgen

    model = mmgen.load(run)
    config = model.config
    parameters = sum(p.numel() for p in model.parameters())
    # nanoGPT's estimate_mfu: 6 N + 12 L d T FLOPs per token (N without the position table, which has no matmul)
    positions = model.position_embedding.weight.numel() if model.position_embedding is not None else 0
    flops_per_token = 6 * (parameters - positions) + 12 * config.num_layers * config.dim * config.context_length
    rates = [r["throughput/tokens_per_s"] for r in timed if "throughput/tokens_per_s" in r]
    rates = rates[3:] if len(rates) > 6 else rates  # after the warm-up
    tokens_per_s = statistics.median(rates)
    peak, source = peak_flops(args.device)
    reached = next((r for r in timed if r.get("val/loss", 9.0) <= 1.47), None)
    vals = [(r["step"], r["val/loss"], r["seconds"]) for r in timed if "val/loss" in r]
    results = {
        "date": time.strftime("%Y-%m-%d"), "device": torch.cuda.get_device_name() if args.device.startswith("cuda")
        else "cpu", "config": str(LM_CONFIG.relative_to(REPOSITORY)), "wall_s": round(wall, 1),
        "seconds_to_val_1.47": reached and reached["seconds"], "step_at_val_1.47": reached and reached["step"],
        "final_val_loss": vals[-1][1] if vals else None, "val_curve": vals, "parameters": parameters,
        "tokens_per_s": tokens_per_s, "flops_per_token": flops_per_token, "peak_flops": peak, "peak_source": source,
        "mfu": tokens_per_s * flops_per_token / peak,
    }
    (args.out / "lm_gpu.json").write_text(json.dumps(results, indent=2))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="tinyshakespeare.txt")
    parser.add_argument("--out", type=Path, default=REPOSITORY / "bench" / "results" / "gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", choices=("clip", "lm"), default=None)
    parser.add_argument("--clip-batch", type=int, default=256)
    parser.add_argument("--clip-iterations", type=int, default=10)
    parser.add_argument("--run-dir", type=Path, default=None, help="the LM run folder (default: OUT/lm-run)")
    parser.add_argument("--lm-steps", type=int, default=None, help="default: the recipe's 5000")
    parser.add_argument("lm_overrides", nargs="*", help="extra dotted overrides for the LM run")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "clip"):
        results["clip"] = run_clip(args)
    if args.only in (None, "lm"):
        results["lm"] = run_lm(args)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
