"""Fine-tuning: LoRA / QLoRA adapters (peft + bitsandbytes) on mmgen's models, and adapter files."""

import logging

# bitsandbytes (imported by peft when installed) logs, on AVX512-BF16 CPUs, that an optional kernel package for its
# bf16 inference path is missing; mmgen turns that path off (see quantize.py), so the hint is noise
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .adapter import (  # noqa: E402
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    base_fingerprint,
    load_adapted,
    load_adapter,
    read_adapter_config,
    resolve_adapter_folder,
    save_adapter,
    write_adapter,
)
from .lora import (  # noqa: E402
    GROUPS,
    TARGETS,
    LoRAConfig,
    add_lora,
    layers_by_target,
    lora_state,
    merge_adapter,
    parameter_counts,
    summary,
    target_layers,
    trainable_fraction,
)
from .quantize import quantized_weight_bytes, require_bitsandbytes  # noqa: E402

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "GROUPS",
    "TARGETS",
    "LoRAConfig",
    "add_lora",
    "base_fingerprint",
    "layers_by_target",
    "load_adapted",
    "load_adapter",
    "lora_state",
    "merge_adapter",
    "parameter_counts",
    "quantized_weight_bytes",
    "read_adapter_config",
    "require_bitsandbytes",
    "resolve_adapter_folder",
    "save_adapter",
    "summary",
    "target_layers",
    "trainable_fraction",
    "write_adapter",
]
