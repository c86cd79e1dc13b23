"""How much memory a model needs, measured before it is built: a config.json or recipe with absurd sizes is refused in
a second instead of allocating terabytes (or swapping until the kernel kills the process).

The model is built on the meta device (tensors with shapes and no storage), so the count is exact for any model class
and costs no memory; counting stops as soon as it passes the free memory, so a 13 TB model is refused at its first
layer."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, UserError

BYTES_PER_TENSOR = 8192  # Python objects behind each parameter / buffer and its module (~7 KB measured on tiny layers)
# more parameters and buffers than this is refused whatever their size: Python builds ~7,000 a second even on the meta
# device, so a config with a billion tiny layers would take weeks to count (the largest transformers have a few thousand)
MAX_TENSORS = 100_000

# value-filling in-place ops: on a meta tensor they change nothing, but torch runs them through slow Python reference
# implementations (~1 ms each), so the meta build skips them
_FILLS = {"normal_", "uniform_", "zero_", "fill_", "copy_", "mul_", "div_", "add_", "sub_", "clamp_", "erfinv_",
          "exponential_", "bernoulli_", "random_", "zeros_", "ones_", "constant_", "kaiming_uniform_", "kaiming_normal_",
          "xavier_uniform_", "xavier_normal_", "trunc_normal_", "orthogonal_", "eye_", "dirac_"}


@dataclass
class ModelSize:
    """What a model built from a config holds: parameter count, bytes (parameters and buffers, with Python overhead)
    and number of tensors; `complete` is False when counting stopped early, past a limit (then all are lower bounds)."""

    parameters: int
    bytes: int
    tensors: int
    complete: bool = True


class _LimitReached(Exception):
    """Raised from a registration hook to abandon the meta build."""


class _SkipFillsOnMeta(TorchFunctionMode):
    """Return the target of a value-filling op unchanged when it is a meta tensor."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args else kwargs.get("tensor")
        if getattr(func, "__name__", "") in _FILLS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **kwargs)


def model_size(build: Callable[[], torch.nn.Module], limit_bytes: int | None = None,
               parameter_copies: int = 1) -> ModelSize:
    """The size of the model `build()` returns, built on the meta device (no memory is allocated).

    `parameter_copies` counts each parameter that many times (4 to train with Adam: weights, gradients, two moments).
    Construction is abandoned once the tensors registered so far need more than `limit_bytes`, or number more than
    MAX_TENSORS."""
    seen: set[int] = set()
    running = ModelSize(0, 0, 0, complete=False)

    def count(tensor: torch.Tensor | None, is_parameter: bool) -> None:
        if tensor is None or id(tensor) in seen:
            return
        seen.add(id(tensor))
        copies = parameter_copies if is_parameter else 1
        running.parameters += tensor.numel() if is_parameter else 0
        running.bytes += tensor.numel() * tensor.element_size() * copies + BYTES_PER_TENSOR
        running.tensors += 1
        if (limit_bytes is not None and running.bytes > limit_bytes) or running.tensors > MAX_TENSORS:
            raise _LimitReached

    hooks = torch.nn.modules.module
    handles = [hooks.register_module_parameter_registration_hook(lambda module, name, tensor: count(tensor, True)),
               hooks.register_module_buffer_registration_hook(lambda module, name, tensor: count(tensor, False))]
    try:
        with torch.device("meta"), _SkipFillsOnMeta():
            model = build()
    except _LimitReached:
        return running
    finally:
        for handle in handles:
            handle.remove()
    parameters, buffers = list(model.parameters()), list(model.buffers())  # a tied parameter once
    size = sum(p.numel() * p.element_size() for p in parameters) * parameter_copies
    size += sum(b.numel() * b.element_size() for b in buffers) + BYTES_PER_TENSOR * (len(parameters) + len(buffers))
    return ModelSize(sum(p.numel() for p in parameters), size, len(parameters) + len(buffers))


def available_memory(device: str | torch.device = "cpu") -> list[tuple[str, int]]:
    """[(description, free bytes)] of the memory a model for `device` is built in: RAM (MemAvailable, capped by a
    cgroup memory limit), and for a CUDA device also its free memory. Unknown amounts are left out."""
    free = []
    ram = _free_ram()
    if ram is not None:
        free.append(("free memory", ram))
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        return free
    if device.type == "cuda" and torch.cuda.is_available():
        try:  # blocks PyTorch's caching allocator holds but no tensor uses are free to this process too
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            free.append((f"free memory on {device}", torch.cuda.mem_get_info(device)[0] + cached))
        except (RuntimeError, AssertionError, ValueError):
            pass
    return free


def check_fits(build: Callable[[], torch.nn.Module], source: str, device: str | torch.device = "cpu",
               parameter_copies: int = 1, error: type[UserError] = CheckpointError) -> ModelSize:
    """Raise `error` (one line naming `source`) when the model `build()` makes needs more than the free memory of
    `device`; else return its size. Call it with the config's class, e.g. `check_fits(lambda: GPT(config), ...)`,
    before building the model for real."""
    free = available_memory(device)
    limit = min((amount for _, amount in free), default=None)
    size = model_size(build, limit_bytes=limit, parameter_copies=parameter_copies)
    if size.tensors > MAX_TENSORS:
        raise error(f"{source} implies more than {MAX_TENSORS:,} parameter and buffer tensors (too many layers to "
                    "build)")
    at_least = "" if size.complete else "at least "
    for description, amount in free:
        if size.bytes > amount:
            raise error(f"{source} implies {at_least}{size.parameters:,} parameters ({_gigabytes(size.bytes)}), more "
                        f"than the {_gigabytes(amount)} of {description}")
    return size


def _gigabytes(count: int) -> str:
    return f"{count / 1e9:,.1f} GB" if count >= 1e8 else f"{count / 1e9:.3f} GB"


def _free_ram() -> int | None:
    """MemAvailable from /proc/meminfo (or free pages from sysconf), capped by the cgroup v2/v1 memory limit."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    limit = _cgroup_room()
    return free if limit is None else min(free, limit)


def _cgroup_room() -> int | None:
    """Bytes the process's memory cgroup (v2, else v1) may still grow by when it has a limit; reclaimable page cache
    (inactive files) does not count as used."""
    for folder, limit_name, usage_name, inactive_name in (
            ("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        try:
            limit = (Path(folder) / limit_name).read_text().strip()
            usage = int((Path(folder) / usage_name).read_text())
            stat = dict(line.split() for line in (Path(folder) / "memory.stat").read_text().splitlines())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" (v2) or a huge number (v1): no limit
            return max(int(limit) - usage + int(stat.get(inactive_name, 0)), 0)
    return None
