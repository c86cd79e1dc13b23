"""Timing helpers shared by the benchmarks: interleaved repeats, so load changes on the machine hit each side alike."""

from __future__ import annotations

import time

import torch


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer stops after it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_seconds(steps: dict, repeats: int, iterations: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per step of each function (mean over `iterations` calls) per repeat, after one warm-up call each; the
    functions alternate within each repeat, the order flipping between repeats."""
    for step in steps.values():  # warm-up
        step()
    synchronize(device)
    seconds = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            for _ in range(iterations):
                steps[name]()
            synchronize(device)
            seconds[name].append((time.perf_counter() - start) / iterations)
    return seconds
