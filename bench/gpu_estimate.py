"""`mmgen estimate` against a GPU: estimated memory per process vs torch.cuda.max_memory_allocated of real training
steps (fused AdamW, bf16 autocast, as the Trainer runs them), and the step time's FLOP/s and MFU (about 30 s on one
H100 / H200).

    python bench/gpu_estimate.py --out bench/results/gpu_estimate.json
    python bench/gpu_estimate.py --device cpu --small     # a smoke test of the script without a GPU (no memory figure)

Cases: nanoGPT's Shakespeare GPU recipe (10.7M parameters, batch 64 x 256, bf16), a GPT-2-medium-sized GPT (350M,
batch 8 x 1024, bf16) with and without gradient checkpointing, and a ViT-B/32 CLIP (151M, batch 128, bf16). The
measured peak is taken over three steps, after the weights and the optimizer exist (the optimizer's moments appear on
the first step and are included); the estimate's total is weights + 16-bit copies + gradients + optimizer +
activations. FLOPs per step are the estimate's; MFU uses the GPU table of mmgen.training.throughput.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))

from mmgen.estimate import Setup, estimate, subject_from_config  # noqa: E402
from mmgen.training.optim import make_optimizer  # noqa: E402
from mmgen.training.throughput import device_peak  # noqa: E402

LM = REPOSITORY / "configs" / "lm-shakespeare-char.yaml"
LM_GPU = REPOSITORY / "configs" / "lm-shakespeare-char-gpu.yaml"
CLIP = REPOSITORY / "configs" / "clip-shapes.yaml"
GPT_MEDIUM = ["model.num_layers=24", "model.dim=1024", "model.num_heads=16", "model.context_length=1024",
              "data.tokenizer=bpe", "data.vocab_size=50304", "model.dropout=0.0"]
VIT_B_32 = ["model.embed_dim=512", "model.vision.image_size=224", "model.vision.patch_size=32",
            "model.vision.width=768", "model.vision.layers=12", "model.vision.heads=12", "model.vision.mlp_ratio=4",
            "model.text.width=512", "model.text.layers=12", "model.text.heads=8", "model.text.mlp_ratio=4",
            "model.text.context_length=77"]
# (name, config, overrides, batch size, gradient checkpointing)
CASES = [
    ("gpt-shakespeare-char", LM_GPU, [], 64, False),
    ("gpt-350M", LM, GPT_MEDIUM, 8, False),
    ("gpt-350M-checkpointing", LM, GPT_MEDIUM + ["model.gradient_checkpointing=true"], 8, True),
    ("clip-vit-b-32", CLIP, VIT_B_32, 128, False),
]
SMALL = {"gpt-350M": ["model.num_layers=2", "model.dim=128", "model.num_heads=4", "model.context_length=64"],
         "clip-vit-b-32": ["model.vision.layers=1", "model.text.layers=1", "model.vision.image_size=64"]}


def real_batch(shapes, device):
    """Random inputs of the shapes the estimate's meta batch has."""
    if isinstance(shapes, torch.Tensor):
        return torch.randint(0, 60, shapes.shape, device=device)
    return {"images": torch.randn(shapes["images"].shape, device=device),
            "tokens": torch.randint(1, 1000, shapes["tokens"].shape, device=device)}


def measure(subject, batch_size: int, device: torch.device, precision: str, steps: int = 3) -> dict:
    """Peak allocated bytes and median step seconds of `steps` training steps (after one warm-up step)."""
    torch.manual_seed(0)
    model = subject.build().to(device).train()
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.99))
    batch = real_batch(subject.batch(batch_size), device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        autocast = torch.autocast(device.type, torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with autocast:
            loss = subject.loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if cuda else None
    del model, optimizer, batch
    if cuda:
        torch.cuda.empty_cache()
    return {"peak_bytes": peak, "step_seconds": sorted(times[1:])[len(times[1:]) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="shrunk models (a smoke test)")
    parser.add_argument("--out", type=Path, help="JSON file for the results")
    args = parser.parse_args()
    device = torch.device(args.device)
    precision = "bf16" if device.type == "cuda" else "fp32"  # CPUs without bf16 units crawl under autocast
    peak = device_peak(device, precision)
    rows = []
    for name, config, overrides, batch_size, checkpointing in CASES:
        if args.small:
            overrides = overrides + SMALL.get(name.replace("-checkpointing", ""), ["model.num_layers=1"])
            batch_size = min(batch_size, 4)
        subject = subject_from_config(config, overrides)
        result = estimate(subject, Setup(precision=precision, batch_size=batch_size, checkpointing=checkpointing))
        measured = measure(subject, batch_size, device, precision)
        achieved = result.flops_per_step / measured["step_seconds"]
        row = {"case": name, "parameters": result.parameters, "batch_size": batch_size,
               "estimated_bytes": result.memory.total, "measured_bytes": measured["peak_bytes"],
               "ratio": result.memory.total / measured["peak_bytes"] if measured["peak_bytes"] else None,
               "estimate_split": {"weights": result.memory.weights, "gradients": result.memory.gradients,
                                  "optimizer": result.memory.optimizer, "activations": result.memory.activations},
               "step_seconds": measured["step_seconds"], "tflops": achieved / 1e12,
               "mfu": achieved / peak.flops_per_s if peak else None}
        rows.append(row)
        measured_text = f"{row['measured_bytes'] / 1e9:8.3f} GB" if row["measured_bytes"] else "     n/a"
        ratio = f"{row['ratio']:.3f}" if row["ratio"] else "n/a"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
        print(f"{name:24s} {result.parameters / 1e6:8.1f}M  estimated {row['estimated_bytes'] / 1e9:8.3f} GB  "
              f"measured {measured_text}  estimate/measured {ratio}  step {row['step_seconds'] * 1e3:8.1f} ms  "
              f"{row['tflops']:7.1f} TFLOP/s  MFU {mfu}", flush=True)
    record = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
              "peak": peak.source if peak else None, "torch": torch.__version__, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
