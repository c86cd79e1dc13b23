"""GPU check of sharded training on one GPU (< 90 s on an H100/H200): not a test, a script a session with a GPU runs.

1. one process, plain (no sharding): the reference;
2. train.fsdp (mmgen's FSDP2 over a 1-process NCCL group): final/ equals the reference, also with cpu_offload;
   bf16 mixed precision trains;
3. train.fsdp with sharded checkpoints: a kill after step 2 (everything after it removed) and --resume gives the
   same final/ as the uninterrupted run;
4. Accelerate's own FSDP2 (configs/accelerate/fsdp2-zero3.yaml, 1 process): final/ equals the reference, and its
   checkpoint resumes to the same final/.
Each line says PASS or FAIL; the exit status is the number of FAILs.

    python bench/gpu_fsdp.py [OUT]          # OUT: a scratch folder (default: a temporary one)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPOSITORY))
TOLERANCE = 1e-5
CASES = ("gpt", "clip", "unet")


def kill_and_resume(run: Path, **options) -> Path:
    """Copy `run` without final/ (as if killed after its step-2 checkpoint) and --resume it."""
    from tests.training.fsdp_cases import train

    resumed = run.with_name(run.name + "-resumed")
    shutil.copytree(run, resumed, ignore=shutil.ignore_patterns("final"))
    train(run.name.split("-")[0], resumed, resume=True, **options)
    return resumed


def inner(out: Path) -> None:
    """Steps 1-3, in this process."""
    from tests.training.fsdp_cases import train

    for case in CASES:
        train(case, out / f"{case}-plain")
        train(case, out / f"{case}-fsdp", fsdp={"enabled": True})
        train(case, out / f"{case}-shards", fsdp={"enabled": True, "sharded_checkpoints": True})
        kill_and_resume(out / f"{case}-shards", fsdp={"enabled": True, "sharded_checkpoints": True})
    train("gpt", out / "gpt-bf16", fsdp={"enabled": True, "mixed_precision": True})
    train("gpt", out / "gpt-offload", fsdp={"enabled": True, "cpu_offload": True})


def accelerate_inner(out: Path) -> None:
    """Step 4, under `accelerate launch --config_file configs/accelerate/fsdp2-zero3.yaml --num_processes 1`."""
    from tests.training.fsdp_cases import train

    for case in ("gpt", "unet"):
        trainer = train(case, out / f"{case}-accelerate")
        kill_and_resume(out / f"{case}-accelerate")
    (out / "accelerate-launch.txt").write_text(trainer.accelerator.distributed_type.value)


def compare(out: Path) -> int:
    """PASS / FAIL lines; returns the number of failures."""
    from safetensors.torch import load_file

    from tests.training.fsdp_cases import max_difference

    def difference(a: Path, b: Path) -> float:
        x, y = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
        return max_difference(x, y) if sorted(x) == sorted(y) else float("inf")

    checks = []
    for case in CASES:
        checks.append((f"{case}: train.fsdp final/ equals one plain process", out / f"{case}-fsdp",
                       out / f"{case}-plain"))
        checks.append((f"{case}: sharded checkpoint, kill + --resume equals uninterrupted",
                       out / f"{case}-shards-resumed", out / f"{case}-shards"))
    checks.append(("gpt: train.fsdp.cpu_offload final/ equals one plain process", out / "gpt-offload",
                   out / "gpt-plain"))
    for case in ("gpt", "unet"):
        checks.append((f"{case}: accelerate FSDP2 final/ equals one plain process", out / f"{case}-accelerate",
                       out / f"{case}-plain"))
        checks.append((f"{case}: accelerate FSDP2 kill + --resume equals uninterrupted",
                       out / f"{case}-accelerate-resumed", out / f"{case}-accelerate"))
    failures = 0
    for name, a, b in checks:
        value = difference(a, b) if (a / "final").exists() and (b / "final").exists() else float("inf")
        failures += not value < TOLERANCE
        print(f"{'PASS' if value < TOLERANCE else 'FAIL'} {name}: max |difference| {value:.2e}", flush=True)
    launch = (out / "accelerate-launch.txt").read_text() if (out / "accelerate-launch.txt").exists() else "none"
    failures += launch != "FSDP"
    print(f"{'PASS' if launch == 'FSDP' else 'FAIL'} the accelerate launch ran Accelerate's FSDP (it ran: {launch})")
    bf16 = (out / "gpt-bf16" / "final" / "model.safetensors").exists()
    failures += not bf16
    print(f"{'PASS' if bf16 else 'FAIL'} gpt: train.fsdp.mixed_precision (bf16 parameters, fp32 reduce) trains")
    return failures


def main() -> None:
    if sys.argv[1:2] == ["--inner"]:
        return inner(Path(sys.argv[2]))
    if sys.argv[1:2] == ["--accelerate"]:
        return accelerate_inner(Path(sys.argv[2]))
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gpu-fsdp-"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    subprocess.run([sys.executable, __file__, "--inner", str(out)], check=False, env=environment)
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(REPOSITORY / "configs" / "accelerate" / "fsdp2-zero3.yaml"), "--num_processes", "1",
                    __file__, "--accelerate", str(out)], check=False, env=environment)
    failures = compare(out)
    print(f"{failures} failure(s), {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(failures)


if __name__ == "__main__":
    main()
