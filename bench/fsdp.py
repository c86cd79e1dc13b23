"""Per-process memory and step time of CLIP training: one process vs two FSDP2 processes (ZeRO-3 and ZeRO-2), on CPU.

For each setup it reports, per process:
- state: bytes of parameters + gradients + AdamW state this process holds after an optimizer step (its shards under
  FSDP; counted from the tensors, so exact);
- step peak: the parameters held before the first step plus how far the resident memory rose above its level then
  (/proc VmHWM, reset before the steps; glibc returns every freed tensor of 64 KiB or more to the system at once,
  so resident memory follows the live tensors): the state plus activations, communication buffers and, under FSDP, the
  parameters gathered for forward and backward (ZeRO-2 keeps them gathered until backward is done, ZeRO-3 one
  block at a time);
- step time (median), with the same batch per process (so two processes train a global batch twice as large).

    python bench/fsdp.py                                  # ViT-B/32 CLIP, 4 image-text pairs per process, 3 steps
    python bench/fsdp.py --model tiny --batch-size 8      # seconds, to try it
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SETUPS = {"1 process": (1, None), "2 processes, FSDP2 ZeRO-3": (2, True), "2 processes, FSDP2 ZeRO-2": (2, False)}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def state_bytes(model, optimizer) -> int:
    """Bytes of this process's parameters, gradients and optimizer state (local shards of DTensors)."""
    from mmgen.training.fsdp import local_tensor

    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [value for state in optimizer.state.values() for value in state.values() if hasattr(value, "numel")]
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def worker(model_name: str, batch_size: int, steps: int, reshard: bool | None) -> dict:
    """One process's measurement (run under torchrun when sharded)."""
    import torch

    from mmgen.clip.model import CLIP, clip_config
    from mmgen.clip.objective import ContrastiveObjective
    from mmgen.training.fsdp import FSDPConfig, shard_model
    from mmgen.training.optim import make_optimizer

    torch.manual_seed(0)
    config = clip_config(model_name)
    model = CLIP(config)
    if reshard is not None:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        shard_model(model, FSDPConfig(enabled=True, reshard_after_forward=reshard), torch.device("cpu"))
    optimizer = make_optimizer(model, 1e-4, 0.1, (0.9, 0.98))
    objective = ContrastiveObjective("infonce")
    size, context = config.vision.image_size, config.text.context_length
    images = torch.randn(batch_size, 3, size, size)
    tokens = torch.randint(1, config.text.vocab_size, (batch_size, context))
    parameter_bytes = state_bytes(model, optimizer)  # no gradients or optimizer state yet
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    times, state = [], 0
    for _ in range(steps + 1):  # the first step allocates gradients and AdamW state: not timed
        start = time.perf_counter()
        loss, _ = objective(model, {"images": images, "tokens": tokens})
        loss.backward()
        optimizer.step()
        state = state_bytes(model, optimizer)
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"state_bytes": state, "step_peak_bytes": parameter_bytes + (status_kib("VmHWM") - before) * 1024,
            "step_seconds": statistics.median(times[1:]),
            "parameters": sum(p.numel() for p in CLIP(config).parameters()) if reshard is None else None}


def run_setup(processes: int, reshard: bool | None, args) -> list[dict]:
    """Launch one setup; the JSON line of every process."""
    command = [sys.executable, __file__, "--worker", "--model", args.model, "--batch-size", str(args.batch_size),
               "--steps", str(args.steps)]
    if reshard is not None:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)] + command[1:]
        command += ["--reshard", str(reshard).lower()]
    # allocations from 64 KiB up are mmap-ed and unmapped when freed: resident memory then follows the live tensors
    environment = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
                   "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, cwd=REPOSITORY)
    if result.returncode:
        sys.exit(result.stderr[-3000:])
    return [json.loads(line.split("RESULT ", 1)[1]) for line in result.stdout.splitlines() if "RESULT " in line]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-32", help="a mmgen.clip.clip_config name (default ViT-B-32)")
    parser.add_argument("--batch-size", type=int, default=4, help="image-text pairs per process and step")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one untimed)")
    parser.add_argument("--out", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--reshard", choices=("true", "false"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        reshard = None if args.reshard is None else args.reshard == "true"
        result = worker(args.model, args.batch_size, args.steps, reshard)
        line = "RESULT " + json.dumps({**result, "rank": int(os.environ.get("RANK", 0))}) + "\n"
        os.write(sys.stdout.fileno(), line.encode())  # one write: the processes' lines never interleave
        return

    figures = {}
    for name, (processes, reshard) in SETUPS.items():
        results = run_setup(processes, reshard, args)
        figures[name] = {key: max(r[key] for r in results) for key in ("state_bytes", "step_peak_bytes",
                                                                        "step_seconds")}
        if results[0].get("parameters"):
            figures["parameters"] = results[0]["parameters"]
        print(f"{name}: {json.dumps(figures[name])}", flush=True)
    one = figures["1 process"]
    print(f"\n{args.model} CLIP, {figures['parameters'] / 1e6:.1f}M parameters, {args.batch_size} pairs per process, "
          f"CPU, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}")
    print(f"{'setup':30s} {'state/process':>14s} {'ratio':>6s} {'step peak':>10s} {'ratio':>6s} {'step s':>7s}")
    for name in SETUPS:
        row = figures[name]
        print(f"{name:30s} {row['state_bytes'] / 2**20:11.0f} MiB {row['state_bytes'] / one['state_bytes']:6.3f} "
              f"{row['step_peak_bytes'] / 2**20:6.0f} MiB {row['step_peak_bytes'] / one['step_peak_bytes']:6.3f} "
              f"{row['step_seconds']:7.2f}")
    if args.out:
        args.out.write_text(json.dumps({"model": args.model, "batch_size": args.batch_size, **figures}, indent=2))


if __name__ == "__main__":
    main()
