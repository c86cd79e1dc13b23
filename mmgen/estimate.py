"""`mmgen estimate`: the arithmetic before a training run — parameters, FLOPs per step, memory per process, step and
training time at a stated MFU, Chinchilla-optimal tokens and compute in petaflop/s-days.

The model is built on the meta device (shapes, no storage: a 7B config costs nothing) and one forward of one micro-batch
runs there (mmgen/meta_forward.py): what it saves for the backward is the activation memory, with CUDA autocast's casts
under bf16/fp16 and a fused attention kernel, as in a real run. FLOPs per step are 6·N·D plus the attention term for a
GPT (N: the parameters that multiply, D: tokens), else torch.utils.flop_counter on the meta forward and backward.

Memory per process follows mmgen's Trainer: fp32 master weights (plus, under mixed precision, the 16-bit copies
autocast keeps for the backward), fp32 gradients for trainable parameters, AdamW's two fp32 moments; LoRA trains only
its adapters, QLoRA also stores the frozen block weights in 4 bits (NF4 with its block scales); gradient checkpointing
keeps one input per transformer block and recomputes one block at a time; DDP (ZeRO-0 over N > 1) adds gradient
buckets as large as the gradients, ZeRO-2 shards gradients and optimizer state over N processes, ZeRO-3 also the
weights (plus two blocks gathered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch

from .errors import ConfigError, UserError
from .memory import _SkipFillsOnMeta
from .meta_forward import AsOnAnAccelerator, meta_forward
from .training.throughput import GpuSpec, find_gpu, flop_counter

ADAM_MOMENTS = 2
PETAFLOP_S_DAY = 1e15 * 86400
CHINCHILLA_TOKENS_PER_PARAMETER = 20
NF4_BYTES_PER_PARAMETER = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes + 8-bit block scales + their fp32 scales
NF4_BYTES_SINGLE_QUANT = 0.5 + 4 / 64  # 4-bit codes + fp32 scale per block of 64
RECIPES = ("lm", "clip", "vae", "finetune-lm")


@dataclass
class Subject:
    """What is estimated: how to build the model (on the current device), a micro-batch for a batch size, the loss,
    tokens per sample (sequence models), and the LoRA section of a fine-tuning config."""

    name: str
    build: Callable[[], torch.nn.Module]
    batch: Callable[[int], object] | None = None
    loss_fn: Callable | None = None
    tokens_per_sample: int | None = None
    lora: object | None = None  # a mmgen.finetune.LoRAConfig
    method: str = "full"
    train: object | None = None  # the recipe's TrainConfig (batch size, steps, precision)
    model_config: object | None = None


@dataclass
class Setup:
    """How it would train: precision, method, gradient checkpointing, sharding and the hardware."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision: fp32 weights, 16-bit matmuls)
    method: str = "full"  # full | lora | qlora
    checkpointing: bool = False
    zero: int = 0  # 0: every process holds everything (DDP), 2: gradients + optimizer sharded, 3: weights too
    processes: int = 1
    batch_size: int = 1  # per process and micro-step
    grad_accum_steps: int = 1
    gpu: GpuSpec | None = None
    mfu: float = 0.4
    tokens: float | None = None  # tokens (or samples without a sequence) to train on; None: the config's steps
    steps: int | None = None


@dataclass
class Memory:
    """Bytes per process."""

    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations


@dataclass
class Estimate:
    """What `estimate` reports."""

    trainable: int
    frozen: int
    flops_per_step: float  # all processes, one optimizer step
    flops_method: str
    memory: Memory
    setup: Setup
    samples_per_step: int
    tokens_per_sample: int | None
    step_seconds: float | None = None
    steps: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def parameters(self) -> int:
        return self.trainable + self.frozen

    @property
    def chinchilla_tokens(self) -> int:
        return CHINCHILLA_TOKENS_PER_PARAMETER * self.parameters

    @property
    def training_flops(self) -> float | None:
        return self.flops_per_step * self.steps if self.steps else None


def build_on_meta(subject: Subject, setup: Setup) -> torch.nn.Module:
    """The subject's model on the meta device, with gradient checkpointing as asked and LoRA adapters when the method
    is lora / qlora (QLoRA's 4-bit storage is accounted for separately: bitsandbytes cannot quantise meta tensors)."""
    with torch.device("meta"), _SkipFillsOnMeta():
        model = subject.build()
        if setup.method in ("lora", "qlora"):
            from .finetune.lora import LoRAConfig, add_lora

            lora = subject.lora or LoRAConfig(targets=["attn", "mlp"])
            add_lora(model, replace(lora, method="lora"))
    model.train()
    return model


def _checkpointing_off(model: torch.nn.Module) -> bool:
    """Switch the model's gradient checkpointing off for the meta forward (ForwardProfile works out what it would
    keep); False when the model has no such option."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "gradient_checkpointing"):
        return False
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing") and isinstance(module.gradient_checkpointing, bool):
            module.gradient_checkpointing = False
    return True


# ------------------------------------------------------------------ the arithmetic

def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters, a tied matrix once."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters()) - trainable


def quantized_block_parameters(model: torch.nn.Module) -> int:
    """Parameters QLoRA stores in 4 bits: the frozen weights of the block Linear layers (mmgen.finetune.lora)."""
    from .finetune.lora import _block_linears

    # after add_lora a block Linear is peft's base_layer, and the adapters' own Linear layers stay unquantised
    return sum(model.get_submodule(name).weight.numel() for name in _block_linears(model) if ".lora_" not in name)


def gpt_step_flops(model: torch.nn.Module, tokens: int) -> float:
    """Training FLOPs of a GPT over `tokens` tokens: 2 N forward, 2 N backward to the activations, 2 N_trainable for
    the weight gradients (6 N for full training), plus 12 L T d of attention (nanoGPT / PaLM)."""
    config = model.config
    multiplying = [p for name, p in model.named_parameters() if "position" not in name]
    total = sum(p.numel() for p in multiplying)
    trainable = sum(p.numel() for p in multiplying if p.requires_grad)
    attention = 12 * config.num_layers * config.context_length * config.dim
    return (4 * total + 2 * trainable + attention) * tokens


def counted_step_flops(model: torch.nn.Module, batch, loss_fn: Callable) -> float:
    """FLOPs of one forward + backward of `loss_fn(model, batch)`, counted by torch.utils.flop_counter on meta (with
    the fused attention kernel a real run uses)."""
    with flop_counter() as counter, AsOnAnAccelerator(None):
        loss_fn(model, batch).backward()
    return float(counter.get_total_flops())


def _largest_block_parameters(model: torch.nn.Module) -> int:
    from .nn.block import TransformerBlock

    sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, TransformerBlock)]
    return max(sizes, default=0)


def estimate(subject: Subject, setup: Setup) -> Estimate:
    """Parameters, FLOPs, memory per process and time of training `subject` as `setup` says."""
    model = build_on_meta(subject, setup)
    notes = []
    has_checkpointing = _checkpointing_off(model)
    if setup.checkpointing and not has_checkpointing:
        raise UserError(f"--checkpointing: this {subject.name} model has no gradient_checkpointing option")
    trainable, frozen = count_parameters(model)
    batch = subject.batch(setup.batch_size) if subject.batch else None
    samples_per_step = setup.batch_size * setup.grad_accum_steps * setup.processes
    tokens = subject.tokens_per_sample

    if batch is None:
        flops, flops_method, activations = float("nan"), "unknown (no batch for this model type)", float("nan")
        copies = 0
        notes.append("activations and FLOPs need a recipe config (lm, clip) or a gpt / clip model folder")
    else:
        forward = meta_forward(model, batch, subject.loss_fn, setup.precision)
        activations = forward.activations(setup.checkpointing)
        copies = forward.weight_copies(setup.checkpointing)
        if getattr(model, "model_type", None) == "gpt":
            flops = gpt_step_flops(model, tokens * samples_per_step)
            flops_method = "6·N·D + 12·L·T·d·D"
        else:
            flops = counted_step_flops(model, subject.batch(setup.batch_size), subject.loss_fn) * samples_per_step
            flops = flops / setup.batch_size
            flops_method = "torch.utils.flop_counter"
        if setup.checkpointing and not forward.blocks:
            notes.append("gradient checkpointing outside transformer blocks is not modelled: activations as without")
        if setup.checkpointing:
            flops *= 4 / 3  # the blocks' forward runs twice
            notes.append("gradient checkpointing: FLOPs include the recomputed forward (x4/3)")

    weights = 4.0 * (trainable + frozen)
    if setup.method == "qlora":
        quantized = quantized_block_parameters(model)
        weights -= (4.0 - NF4_BYTES_PER_PARAMETER) * quantized
        notes.append(f"qlora: {quantized:,} block weights stored as NF4 ({NF4_BYTES_PER_PARAMETER:.3f} bytes each)")
    if copies and setup.zero != 3:  # under ZeRO-3 the gathered weights are already 16-bit
        weights += copies
        notes.append(f"weights include the {_bytes(copies)} of 16-bit copies autocast keeps for the backward")
    gradients = 4.0 * trainable
    optimizer = 4.0 * ADAM_MOMENTS * trainable
    n = setup.processes
    if setup.zero == 0 and n > 1:
        gradients *= 2
        notes.append("DDP: gradient buckets as large as the gradients")
    if setup.zero >= 2:
        gradients, optimizer = gradients / n, optimizer / n
    if setup.zero == 3:
        gathered = 2 * _largest_block_parameters(model) * (2 if setup.precision != "fp32" else 4)
        weights = weights / n + gathered
        notes.append("ZeRO-3: weights sharded, plus two blocks gathered at a time")
    memory = Memory(weights, gradients, optimizer, activations)  # activations: one micro-batch's

    result = Estimate(trainable, frozen, flops, flops_method, memory, setup, samples_per_step, tokens, notes=notes)
    if setup.gpu is not None and math.isfinite(flops):
        peak = setup.gpu.peak_tflops("tf32" if setup.precision == "fp32" else setup.precision)
        if peak is None:
            notes.append(f"{setup.gpu.name} has no {setup.precision} tensor cores: no step time")
        else:
            result.step_seconds = flops / n / (peak * 1e12 * setup.mfu)
    per_step = samples_per_step * (tokens or 1)
    result.steps = math.ceil(setup.tokens / per_step) if setup.tokens else setup.steps
    return result


# ------------------------------------------------------------------ subjects from configs and folders

def recipe_of(config_path: Path) -> str:
    """The recipe a config file is for, from its name (configs/lm-*.yaml -> lm); ConfigError when it cannot tell."""
    name = config_path.name
    for recipe in sorted(RECIPES, key=len, reverse=True):
        if name.startswith(recipe + "-") or name.startswith(recipe + "."):
            return recipe
    raise ConfigError(f"cannot tell the recipe of {config_path} from its name: pass --recipe ({', '.join(RECIPES)})")


def subject_from_config(config_path: str | Path, overrides: list[str], recipe: str | None = None,
                        base: str | None = None) -> Subject:
    """The Subject of a recipe config (`recipe` inferred from the file name when None) with overrides."""
    from .config import apply_overrides, from_dict, load_yaml

    config_path = Path(config_path)
    recipe = recipe or recipe_of(config_path)
    data = apply_overrides(load_yaml(config_path), list(overrides))
    if recipe == "lm":
        from .recipes.lm import LMRecipe

        config = from_dict(LMRecipe, data)
        if config.data.tokenizer == "bpe":
            config.model = replace(config.model, vocab_size=config.data.vocab_size)
        return gpt_subject(config.model, config.train)
    if recipe == "clip":
        from .recipes.clip import CLIPRecipe

        config = from_dict(CLIPRecipe, data)
        return clip_subject(config.model, config.train, config.loss)
    if recipe == "vae":
        from .recipes.vae import ReconstructionLoss, VAERecipe

        config = from_dict(VAERecipe, data)
        return vae_subject(config.model.vae_config(), config.model.image_size, ReconstructionLoss(config.loss),
                           config.train)
    if recipe == "finetune-lm":
        from .recipes.finetune_lm import LMFinetuneRecipe

        config = from_dict(LMFinetuneRecipe, data)
        folder = base or config.base
        if not folder:
            raise ConfigError("finetune-lm: give the base model (--base FOLDER or base: in the config)")
        subject = subject_from_folder(folder)
        subject.train, subject.method = config.train, config.method
        subject.lora = config.lora if config.method in ("lora", "qlora") else None
        return subject
    raise ConfigError(f"--recipe {recipe!r}: mmgen estimate knows {', '.join(RECIPES)} (and model folders)")


def subject_from_folder(path: str | Path) -> Subject:
    """The Subject of a model folder or run (gpt and clip with activations and FLOPs; other types parameters only)."""
    from .config import from_dict
    from .hub import model_class, read_model_config, resolve_model_folder

    folder = resolve_model_folder(path)
    meta = read_model_config(folder)
    cls = model_class(meta["model_type"])
    config = from_dict(cls.config_class, meta["config"], "config.")
    if meta["model_type"] == "gpt":
        return gpt_subject(config)
    if meta["model_type"] == "clip":
        return clip_subject(config)
    return Subject(meta["model_type"], lambda: cls(config), model_config=config)


def gpt_subject(config, train=None) -> Subject:
    from .recipes.lm import next_token_loss
    from .text.gpt import GPT

    def batch(size: int):
        return torch.zeros(size, config.context_length + 1, dtype=torch.long, device="meta")

    return Subject("gpt", lambda: GPT(config), batch, next_token_loss, config.context_length, train=train,
                   model_config=config)


def vae_subject(config, image_size: int, loss, train=None) -> Subject:
    from .diffusion.vae import VAE

    def batch(size: int):
        return {"images": torch.zeros(size, config.in_channels, image_size, image_size, device="meta")}

    def loss_fn(model, batch):
        return loss(model, batch)[0]

    return Subject("vae", lambda: VAE(config), batch, loss_fn, None, train=train, model_config=config)


def clip_subject(config, train=None, loss: str = "infonce") -> Subject:
    from .clip.model import CLIP
    from .clip.objective import ContrastiveObjective

    objective = ContrastiveObjective(loss, "micro-batches")

    def batch(size: int):
        vision, text = config.vision, config.text
        return {"images": torch.zeros(size, 3, vision.image_size, vision.image_size, device="meta"),
                "tokens": torch.zeros(size, text.context_length, dtype=torch.long, device="meta")}

    def loss_fn(model, batch):
        return objective(model, batch)[0]

    return Subject("clip", lambda: CLIP(config), batch, loss_fn, None, train=train, model_config=config)


# ------------------------------------------------------------------ the report

def _bytes(count: float) -> str:
    if not math.isfinite(count):
        return "n/a"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if count >= size:
            return f"{count / size:,.2f} {unit}"
    return f"{count / 1e3:,.1f} kB"


def _count(number: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(number) >= size:
            return f"{number / size:,.2f}{unit}"
    return f"{number:,.0f}"


def _duration(seconds: float) -> str:
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:,.1f} {unit}"
    return f"{seconds:.3g} s"


def report(result: Estimate) -> str:
    """The estimate as a few lines of text."""
    setup, memory = result.setup, result.memory
    lines = [f"parameters: {_count(result.parameters)} ({result.trainable:,} trainable, {result.frozen:,} frozen)",
             f"setup: {setup.method}, {setup.precision}, "
             f"gradient checkpointing {'on' if setup.checkpointing else 'off'}"
             f", {'ZeRO-' + str(setup.zero) if setup.zero else 'no sharding'} over {setup.processes} process(es), "
             f"batch {setup.batch_size} x {setup.grad_accum_steps} accumulation x {setup.processes} = "
             f"{result.samples_per_step} samples per step"
             + (f" ({_count(result.samples_per_step * result.tokens_per_sample)} tokens)"
                if result.tokens_per_sample else ""),
             f"FLOPs per step: {_count(result.flops_per_step)} ({result.flops_method})",
             "memory per process: " + ", ".join(f"{name} {_bytes(value)}" for name, value in (
                 ("weights", memory.weights), ("gradients", memory.gradients), ("optimizer", memory.optimizer),
                 ("activations", memory.activations), ("total", memory.total)))]
    if setup.gpu is not None:
        fits = "fits" if memory.total <= setup.gpu.memory_gb * 1e9 else "does NOT fit"
        lines.append(f"{setup.gpu.name} ({setup.gpu.memory_gb:g} GB): {fits}")
    if result.step_seconds is not None:
        lines.append(f"step time at {setup.mfu:.0%} MFU on {setup.processes} x {setup.gpu.name}: "
                     f"{_duration(result.step_seconds)}"
                     + (f"; {result.steps:,} steps: {_duration(result.step_seconds * result.steps)}"
                        if result.steps else ""))
    if result.training_flops is not None:
        lines.append(f"training compute: {result.training_flops:.3g} FLOPs = "
                     f"{result.training_flops / PETAFLOP_S_DAY:.3g} petaflop/s-days")
    if result.tokens_per_sample:
        chinchilla = result.chinchilla_tokens
        lines.append(f"Chinchilla-optimal data: {_count(chinchilla)} tokens (20 per parameter), "
                     f"{6 * result.parameters * chinchilla / PETAFLOP_S_DAY:.3g} petaflop/s-days at 6·N·D")
    lines += [f"note: {note}" for note in result.notes]
    return "\n".join(lines)


def find_gpu_or_fail(name: str) -> GpuSpec:
    """The GpuSpec for --gpu NAME, or a UserError listing the known ones."""
    spec = find_gpu(name)
    if spec is None:
        from .training.throughput import GPUS

        raise UserError(f"--gpu {name!r}: unknown GPU (known: {', '.join(spec.name for _, spec in GPUS)})")
    return spec
