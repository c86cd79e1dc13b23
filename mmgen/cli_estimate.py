"""`mmgen estimate`: its arguments and handler (the arithmetic is mmgen/estimate.py; nothing here imports torch)."""

from __future__ import annotations

import argparse
import math

from .cli_types import positive_int, probability
from .errors import UserError

ESTIMATE_EPILOG = ("Examples: mmgen estimate --config configs/lm-shakespeare-char-gpu.yaml --gpu h100 --tokens 300M; "
                   "mmgen estimate --config configs/lm-shakespeare-char.yaml model.num_layers=32 model.dim=4096 "
                   "model.num_heads=32 model.context_length=2048 --precision bf16 --gpus 8 --zero 3 --gpu h100")
_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def _count(text: str) -> float:
    """A positive number, with an optional k / M / B / T suffix: 300B, 1.5e9."""
    scale = _SUFFIXES.get(text[-1:].lower(), 1.0)
    try:
        value = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r} (e.g. 3e9 or 300B)") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def add_estimate_command(commands) -> None:
    """Add `mmgen estimate` to the CLI's sub-commands."""
    parser = commands.add_parser("estimate", epilog=ESTIMATE_EPILOG,
                                 help="parameters, FLOPs, memory per process and training time of a config or model")
    parser.set_defaults(run=run_estimate)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", help="recipe YAML (configs/*.yaml); overrides as key=value after it")
    source.add_argument("--model", metavar="FOLDER", help="a model folder or RUN_DIR")
    parser.add_argument("--recipe", choices=("lm", "clip", "vae", "finetune-lm"),
                        help="the config's recipe (default: from the file name, e.g. lm-*.yaml -> lm)")
    parser.add_argument("--base", metavar="FOLDER", help="finetune-lm: the base model folder (default: the config's)")
    parser.add_argument("--gpus", type=positive_int, default=1, help="processes (one GPU each)")
    parser.add_argument("--gpu", help="h100, h100-pcie, h200, a100, a100-40, a10g, l4, l40s, 4090, 3090, v100, t4 ...")
    parser.add_argument("--tokens", type=_count, help="tokens to train on (samples for models without a sequence), "
                        "e.g. 300B; default: the config's train.max_steps")
    parser.add_argument("--mfu", type=probability, default=0.4, help="model FLOPs utilisation for the time (0.4)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"),
                        help="default: the config's train.mixed_precision (no -> fp32)")
    parser.add_argument("--method", choices=("full", "lora", "qlora"), help="default: the config's, else full")
    parser.add_argument("--checkpointing", action="store_true", default=None,
                        help="gradient checkpointing (default: the config's model.gradient_checkpointing)")
    parser.add_argument("--zero", type=int, choices=(0, 2, 3), default=0,
                        help="FSDP / ZeRO stage over --gpus: 2 shards gradients and optimizer, 3 also weights")
    parser.add_argument("--batch-size", type=positive_int, help="per process and micro-step (default: the config's)")
    parser.add_argument("--grad-accum", type=positive_int, help="micro-steps per step (default: the config's)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.dim=1024")


def _finite(value):
    """`value` with NaN / inf numbers as None (JSON has no NaN)."""
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_estimate(args) -> None:
    """Handler of `mmgen estimate`."""
    import json
    from dataclasses import asdict

    from .estimate import Setup, estimate, find_gpu_or_fail, report, subject_from_config, subject_from_folder

    if args.model and args.overrides:
        raise UserError("key=value overrides apply to --config, not to --model")
    subject = (subject_from_config(args.config, args.overrides, args.recipe, args.base) if args.config
               else subject_from_folder(args.model))
    train = subject.train
    model_config = getattr(subject, "model_config", None)
    precision = args.precision or {"bf16": "bf16", "fp16": "fp16"}.get(getattr(train, "mixed_precision", "no"), "fp32")
    checkpointing = args.checkpointing if args.checkpointing is not None else bool(
        getattr(model_config, "gradient_checkpointing", False))
    setup = Setup(precision=precision, method=args.method or subject.method, checkpointing=checkpointing,
                  zero=args.zero, processes=args.gpus, batch_size=args.batch_size or getattr(train, "batch_size", 1),
                  grad_accum_steps=args.grad_accum or getattr(train, "grad_accum_steps", 1),
                  gpu=find_gpu_or_fail(args.gpu) if args.gpu else None, mfu=args.mfu, tokens=args.tokens,
                  steps=getattr(train, "max_steps", None))
    result = estimate(subject, setup)
    if args.json:
        record = {"parameters": result.parameters, "trainable": result.trainable, "frozen": result.frozen,
                  "flops_per_step": result.flops_per_step, "flops_method": result.flops_method,
                  "memory_bytes": {**asdict(result.memory), "total": result.memory.total},
                  "step_seconds": result.step_seconds, "steps": result.steps, "training_flops": result.training_flops,
                  "chinchilla_tokens": result.chinchilla_tokens, "notes": result.notes,
                  "setup": {**asdict(setup), "gpu": setup.gpu.name if setup.gpu else None}}
        print(json.dumps(_finite(record)))
    else:
        print(report(result))
