"""How fast a run computes: FLOPs per step counted once, TFLOP/s and model FLOPs utilisation (MFU) per logging window,
and an optional torch.profiler trace of a few steps.

FLOPs are counted by `torch.utils.flop_counter` on the run's first real training step (forward and backward of the
loss, every micro-batch of the step): no extra batch is drawn, nothing extra is computed, and the counter only
watches the ops, so the RNG stream and the results are those of an uncounted run. The count is what the step's
matrix multiplications, convolutions and attention do (elementwise ops are left out, as in every MFU figure); with
gradient checkpointing it includes the recomputed forward.

MFU = achieved FLOP/s of one process / the peak of its device: a GPU's dense tensor-core figure for the run's
precision from `GPUS` (matched by torch.cuda.get_device_name), else the rate of a large matrix multiplication
measured once at start-up (on a CPU that is the only honest peak: it depends on the cores, threads and ISA).
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..io import atomic_write_text

TERA = 1e12


@dataclass(frozen=True)
class GpuSpec:
    """Published dense peak TFLOP/s of one GPU (no structured sparsity) and its memory; None: not supported."""

    name: str
    memory_gb: float
    bf16: float | None
    fp16: float
    tf32: float | None
    fp32: float

    def peak_tflops(self, precision: str) -> float | None:
        """Dense peak for 'bf16', 'fp16', 'tf32' or 'fp32' matmuls (tf32 falls back to fp32 where there is none)."""
        if precision == "tf32":
            return self.tf32 or self.fp32
        return getattr(self, precision)


# (pattern searched in the device name, case-insensitive; first match wins, so the specific ones come first, spec).
# Figures: NVIDIA datasheets and whitepapers, dense tensor-core TFLOP/s (GeForce: fp16/bf16 with fp32 accumulate).
GPUS: tuple[tuple[str, GpuSpec], ...] = (
    (r"B200", GpuSpec("B200", 180, 2250, 2250, 1100, 75)),
    (r"H100.*NVL", GpuSpec("H100 NVL", 94, 835, 835, 417.5, 60)),
    (r"H100.*PCI", GpuSpec("H100 PCIe", 80, 756.5, 756.5, 378, 51.2)),
    (r"H100", GpuSpec("H100 SXM", 80, 989.4, 989.4, 494.7, 66.9)),
    (r"H200.*NVL", GpuSpec("H200 NVL", 141, 835, 835, 417.5, 60)),
    (r"H200", GpuSpec("H200", 141, 989.4, 989.4, 494.7, 66.9)),
    (r"A100.*40|A800.*40", GpuSpec("A100 40GB", 40, 312, 312, 156, 19.5)),
    (r"A100|A800", GpuSpec("A100 80GB", 80, 312, 312, 156, 19.5)),
    (r"A10G", GpuSpec("A10G", 24, 125, 125, 62.5, 31.2)),  # A10's datasheet figures (the A10G has none published)
    (r"A10(?![0-9])", GpuSpec("A10", 24, 125, 125, 62.5, 31.2)),
    (r"L40S", GpuSpec("L40S", 48, 362, 362, 183, 91.6)),
    (r"L40(?![0-9])", GpuSpec("L40", 48, 181, 181, 90.5, 90.5)),
    (r"L4(?![0-9])", GpuSpec("L4", 24, 121, 121, 60, 30.3)),
    (r"RTX.*A6000", GpuSpec("RTX A6000", 48, 154.8, 154.8, 77.4, 38.7)),
    (r"4090", GpuSpec("RTX 4090", 24, 165.2, 165.2, 82.6, 82.6)),
    (r"3090", GpuSpec("RTX 3090", 24, 71, 71, 35.6, 35.6)),
    (r"V100S", GpuSpec("V100S", 32, None, 130, None, 16.4)),
    (r"V100.*PCI", GpuSpec("V100 PCIe", 16, None, 112, None, 14)),
    (r"V100", GpuSpec("V100 SXM2", 16, None, 125, None, 15.7)),
    (r"T4(?![0-9])", GpuSpec("T4", 16, None, 65, None, 8.1)),
)


def find_gpu(name: str) -> GpuSpec | None:
    """The GpuSpec whose pattern a device name ('NVIDIA H100 80GB HBM3') or a short name ('h100', 'a100-40')
    matches, or None."""
    for pattern, spec in GPUS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return spec
    return None


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s for the run's precision and where the figure comes from."""

    flops_per_s: float
    source: str


def matmul_precision(device: torch.device, mixed_precision: str) -> str:
    """The precision the run's matrix multiplications use: bf16 / fp16 under mixed precision, else tf32 on a CUDA
    device that allows it (torch.backends.cuda.matmul.allow_tf32 or float32_matmul_precision), else fp32."""
    if mixed_precision in ("bf16", "fp16") and not (device.type == "cpu" and mixed_precision == "fp16"):
        return mixed_precision
    if device.type == "cuda" and (torch.backends.cuda.matmul.allow_tf32
                                  or torch.get_float32_matmul_precision() != "highest"):
        return "tf32"
    return "fp32"


def device_peak(device: torch.device, mixed_precision: str = "no") -> Peak | None:
    """The peak of `device` for the run's precision: from GPUS for a known CUDA GPU, else measured once by a matrix
    multiplication (None where that cannot run)."""
    precision = matmul_precision(device, mixed_precision)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        spec = find_gpu(name)
        if spec is not None and spec.peak_tflops(precision):
            return Peak(spec.peak_tflops(precision) * TERA, f"{name}, {precision}, datasheet")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    try:
        return Peak(measure_matmul_flops(device, dtype), f"{device.type}, {precision}, measured matmul")
    except (RuntimeError, TypeError):
        return None


def measure_matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                         seconds: float = 0.03) -> float:
    """FLOP/s of the fastest of a few (size x size) @ (size x size) products on `device` (a few hundredths of a
    second; draws nothing from the global RNG). Default size: 512 on a CPU, 8192 on an accelerator."""
    size = size or (512 if device.type == "cpu" else 8192)
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    b = torch.rand(size, size, generator=generator).to(device=device, dtype=dtype)
    synchronize = getattr(getattr(torch, device.type, None), "synchronize", None) if device.type != "cpu" else None
    best, spent, runs = float("inf"), 0.0, 0
    torch.mm(a, b)  # warm-up: kernel selection, first-touch of the output
    while runs < 3 or (spent < seconds and runs < 50):
        if synchronize:
            synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if synchronize:
            synchronize()
        elapsed = time.perf_counter() - start
        best, spent, runs = min(best, elapsed), spent + elapsed, runs + 1
    return 2 * size**3 / best


class _NoModuleTracking:
    """Stands in for FlopCounterMode's ModuleTracker: every FLOP is counted under "Global" only. The tracker's module
    hooks fail on inputs that require grad without a grad_fn (a slice of a parameter under no_grad, as CLIP's
    cached-feature pass makes), and only the total is wanted here."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def flop_counter() -> torch.utils.flop_counter.FlopCounterMode:
    """torch's FlopCounterMode (display off, total only: get_total_flops) that also counts the CPU's fused attention
    kernels, which torch's formulas leave out (the same counts as the CUDA flash/efficient kernels: two matmuls
    forward, five backward)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = forward
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = backward
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = _NoModuleTracking()
    return counter


class Throughput:
    """The Trainer's FLOPs and MFU bookkeeping (and its profiler when `train.profile` is on).

    Use: `with throughput.counting(): <the step's forward + backward>` around every step (it counts the first one
    only), `throughput.step_done()` after each optimizer step, `throughput.metrics(steps, seconds)` at log steps,
    `throughput.close()` at the end."""

    def __init__(self, config, device: torch.device, step: int, profile_folder: Path, rank: int = 0,
                 write: Callable[[str], None] | None = None):
        # config: the run's TrainConfig; step: the step training starts from; write: prints the FLOPs line (or None)
        self.samples_per_step = config.batch_size * config.grad_accum_steps  # this process's, per optimizer step
        self.flops_per_step: int | None = None  # this process's FLOPs in one optimizer step, after the first step
        self.peak = device_peak(device, config.mixed_precision)
        self.write = write
        self.profiler = (StepProfiler(profile_folder, config.profile_steps, config.max_steps - step, device, rank)
                         if config.profile else None)

    @contextlib.contextmanager
    def counting(self):
        """Count the FLOPs of what runs inside, the first time only (then a plain context)."""
        if self.flops_per_step is not None:
            yield
            return
        with flop_counter() as counter:
            yield
        self.flops_per_step = counter.get_total_flops()
        peak = f"peak {self.peak.flops_per_s / TERA:,.1f} TFLOP/s ({self.peak.source})" if self.peak else "no peak"
        if self.write is not None:
            self.write(f"FLOPs: {self.flops_per_step / self.samples_per_step / 1e9:,.3f} GFLOP per sample (forward + "
                       f"backward, counted on the first step); {peak}")

    def step_done(self) -> None:
        """Mark the end of a training step (moves the profiler's schedule on)."""
        if self.profiler is not None:
            self.profiler.step()

    def metrics(self, steps: int, seconds: float) -> dict[str, float]:
        """throughput/tflops (achieved TFLOP/s of this process) and throughput/mfu (of its device's peak) over a
        logging window of `steps` steps; empty before the first step was counted."""
        if not self.flops_per_step or seconds <= 0:
            return {}
        achieved = self.flops_per_step * steps / seconds
        metrics = {"throughput/tflops": achieved / TERA}
        if self.peak is not None:
            metrics["throughput/mfu"] = achieved / self.peak.flops_per_s
        return metrics

    @staticmethod
    def postfix(metrics: dict) -> dict[str, str]:
        """The progress bar's share of `metrics`: MFU, or TFLOP/s where no peak is known."""
        if "throughput/mfu" in metrics:
            return {"mfu": f"{metrics['throughput/mfu']:.1%}"}
        if "throughput/tflops" in metrics:
            return {"TFLOP/s": f"{metrics['throughput/tflops']:.3g}"}
        return {}

    def close(self) -> None:
        """Stop the profiler (writing its trace if it was recording)."""
        if self.profiler is not None:
            self.profiler.close()
            self.profiler = None


class StepProfiler:
    """torch.profiler over a few training steps: skips the first (FLOP counting, warm-up), warms up one, records
    `steps`; writes `trace-rank{R}.json` (chrome://tracing, https://ui.perfetto.dev) and `summary-rank{R}.txt` (the
    ops by self time) into `folder`. A run with fewer steps left records what there is."""

    def __init__(self, folder: Path, steps: int, remaining_steps: int, device: torch.device, rank: int = 0):
        from torch.profiler import ProfilerActivity, profile, schedule

        self.folder, self.rank, self.device = Path(folder), rank, device
        wait, warmup = (1, 1) if remaining_steps >= 3 else (0, 1) if remaining_steps == 2 else (0, 0)
        active = max(1, min(steps, remaining_steps - wait - warmup))
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with warnings_silenced():  # warmup=0 is a warning in torch; here it is the choice of a short run
            self.profiler = profile(activities=activities, schedule=schedule(wait=wait, warmup=warmup, active=active),
                                    on_trace_ready=self._write, record_shapes=True, profile_memory=True,
                                    with_flops=True)
        self.profiler.start()
        self.written = False

    def step(self) -> None:
        if not self.written:
            self.profiler.step()

    def close(self) -> None:
        with warnings_silenced():
            self.profiler.stop()

    def _write(self, profiler) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        trace = self.folder / f"trace-rank{self.rank}.json"
        staging = trace.with_name(f".{trace.name}.tmp")
        profiler.export_chrome_trace(str(staging))
        os.replace(staging, trace)
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        atomic_write_text(self.folder / f"summary-rank{self.rank}.txt",
                          profiler.key_averages().table(sort_by=sort_by, row_limit=40) + "\n")
        self.written = True


@contextlib.contextmanager
def warnings_silenced():
    """Ignore Python warnings inside (torch.profiler's advice on schedules and empty traces)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield
