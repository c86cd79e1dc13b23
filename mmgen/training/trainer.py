"""The one Trainer every mmgen model trains with, on Hugging Face Accelerate.

It owns the loop (accumulation, mixed precision, clipping, LR schedule), evaluation, metrics, progress and
checkpoints; a recipe gives it a model, datasets and a `loss_fn(model, batch) -> loss`.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from tqdm.auto import tqdm

from ..data.robust import BadSampleTracker
from ..errors import ConfigError, UserError
from ..hub import WEIGHTS_NAME, load_weights
from ..run_folder import RunFolder
from .accumulation import GradientPasses
from .batches import Batches
from .best import BestModel
from .checkpointing import Checkpoints
from .ema import ExponentialMovingAverage
from .fsdp import FSDPConfig
from .interrupts import DeferredStop, Interrupted
from .launch import accelerator_options, process_state_options, reset_accelerator_state
from .metrics import MetricsLogger
from .optim import learning_rate, make_optimizer
from .sharded_state import sharding_for
from .throughput import Throughput


@dataclass
class TrainConfig:
    """The `train:` section of every recipe."""

    batch_size: int = 32  # per process and micro-step; global batch = batch_size * grad_accum_steps * processes
    grad_accum_steps: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0  # 0 turns clipping off
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)  # FSDP2 sharding across processes (mmgen.training.fsdp)
    eval_every: int = 250
    eval_batches: int = 20
    log_every: int = 10
    checkpoint_every: int = 1000  # 0: only the final model
    keep_checkpoints: int = 2
    ema_decay: float = 0.0  # > 0 (e.g. 0.999): keep an EMA of the weights; final/ and evaluate_fn get the EMA
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates
    seed: int = 1337
    num_workers: int = 0
    tensorboard: bool = True
    progress: bool = True
    # RUN_DIR/best/ keeps the model (the EMA one when on) of the evaluation where this metric was best, e.g. val/loss
    # or zeroshot/top1; best_mode None: "min" for a name containing "loss", else "max"
    best_metric: str | None = None
    best_mode: Literal["min", "max"] | None = None
    profile: bool = False  # write a torch.profiler trace of a few steps to RUN_DIR/profile/ (mmgen.training.throughput)
    profile_steps: int = 3
    # torch.compile the training model (Inductor, through Accelerate's dynamo plugin), as nanoGPT's compile=True: the
    # first step and the first evaluation compile (tens of seconds), then steps run faster on a GPU; saved weights and
    # evaluate_fn's model are the uncompiled module (not with train.fsdp: Accelerate's FSDP config compiles its own)
    compile: bool = False

    def __post_init__(self):
        for name in ("batch_size", "grad_accum_steps", "max_steps", "eval_batches", "log_every", "keep_checkpoints",
                     "profile_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "num_workers", "grad_clip", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr <= 0 or self.min_lr < 0:
            raise ValueError(f"lr must be > 0 and min_lr >= 0, got {self.lr}, {self.min_lr}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        if self.best_mode not in (None, "min", "max"):
            raise ValueError(f"best_mode must be min, max or null, got {self.best_mode!r}")
        if self.best_metric is not None and self.fsdp.enabled:
            raise ValueError("best_metric is not supported with fsdp yet (saving best/ would need every process)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.compile and self.fsdp.enabled:
            raise ValueError("compile is not supported with fsdp.enabled (mmgen's own FSDP2); use an accelerate FSDP "
                             "config (configs/accelerate/fsdp2-*.yaml) with --dynamo_backend inductor instead")


def compile_options(compile: bool) -> dict:
    """Accelerator keyword arguments for train.compile (none when off: a launch's --dynamo_backend still applies)."""
    if not compile:
        return {}
    from accelerate.utils import TorchDynamoPlugin

    return {"dynamo_plugin": TorchDynamoPlugin(backend="inductor")}


def process_state():
    """Accelerate's PartialState for this process (rank, world size, main-process helpers)."""
    from accelerate import PartialState

    return PartialState(**process_state_options())


def default_save(model, folder: Path) -> None:
    model.write_pretrained(folder)


def default_load(model, folder: Path) -> None:
    """Read a checkpoint's model.safetensors back into `model` (the resume counterpart of `default_save`)."""
    load_weights(model, folder / WEIGHTS_NAME)


class Trainer(Checkpoints):
    """Trains `model` on `train_dataset` by minimising `loss_fn(model, batch)`; writes everything under run_dir.

    `loss_fn` returns the loss, or (loss, {name: number}) whose numbers are logged with train/loss (averaged over
    the logging window of this process; names ending in `_total` are counters whose latest value is logged).
    `evaluate_fn(model, step) -> {name: number}` adds metrics at each evaluation; `save_fn(model, folder)` writes
    the model folder (default: config.json + model.safetensors) and `load_fn(model, folder)` reads it back into the
    model on resume (default: model.safetensors; an adapter run passes mmgen.finetune.load_adapter). With `config.ema_decay` > 0 both get the EMA model
    at evaluations and for final/ (val/loss and checkpoints' model.safetensors use the trained weights).
    A `loss_fn` whose `takes_whole_step` is true gets, with grad_accum_steps > 1, all micro-batches of a step at once
    through `loss_fn.step(model, micro_batches, passes)` (mmgen.training.accumulation) and runs their backward passes
    itself (CLIP's cached-feature contrastive accumulation); it returns the step's loss.
    """

    check_loss_every_step: bool | None = None  # None: on CPU only (free there; a host sync per step elsewhere)

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        run_dir: str | Path,
        *,
        loss_fn: Callable,
        train_dataset,
        val_dataset=None,
        collate_fn: Callable | None = None,
        evaluate_fn: Callable | None = None,
        save_fn: Callable = default_save,
        load_fn: Callable = default_load,
        tokens_per_sample: int | None = None,
        max_bad_fraction: float | None = None,
    ):
        from accelerate import Accelerator

        self.config = config
        self.run_dir = Path(run_dir)
        self.run = RunFolder(run_dir)
        self.loss_fn = loss_fn
        # caption data (max_bad_fraction given): the skipped samples its batches report are counted and logged as
        # data/skipped_total; past the fraction the run stops with one line (mmgen.data.robust)
        self.bad_samples = BadSampleTracker(max_bad_fraction) if max_bad_fraction is not None else None
        self.train_dataset = train_dataset
        self.val_dataset = val_dataset
        self.collate_fn = collate_fn
        self.evaluate_fn = evaluate_fn
        self.flops_per_step: int | None = None  # counted on a fresh run's first step; a checkpoint records it
        self.best = BestModel(self.run, config.best_metric, config.best_mode, save_fn or default_save)
        self.throughput = None
        self.save_fn = save_fn
        self.load_fn = load_fn
        self.tokens_per_sample = tokens_per_sample
        reset_accelerator_state()  # one Trainer is one run: forget an earlier run's Accelerator in this process
        try:
            self.accelerator = Accelerator(mixed_precision=config.mixed_precision, **accelerator_options(),
                                           **compile_options(config.compile))
        except ValueError as error:
            raise ConfigError(f"train.mixed_precision={config.mixed_precision!r}: {error}") from None
        if config.mixed_precision == "fp16" and self.accelerator.device.type == "cpu":
            self.accelerator.print("warning: train.mixed_precision=fp16 has no effect on CPU, training runs in fp32 "
                                   "(bf16 is the mixed precision CPUs support)", file=sys.stderr)
        self.batches = Batches(config, collate_fn, self.accelerator.process_index, self.accelerator.num_processes,
                               pin_memory=self.accelerator.device.type == "cuda")
        self.sharding = sharding_for(model, config, self.accelerator)  # train.fsdp, or Accelerate's FSDP/DeepSpeed
        self.model = model
        self.optimizer = make_optimizer(model, config.lr, config.weight_decay, config.betas)
        self.ema = None
        if config.ema_decay and self.sharding is not None:
            self.ema = self.sharding.make_ema(config.ema_decay, config.ema_warmup)
        elif config.ema_decay:
            self.ema = ExponentialMovingAverage(model, config.ema_decay, config.ema_warmup)
        self.step = 0
        self.stop = DeferredStop()
        self._window_loss = torch.zeros(())  # the losses since the last log step (checked before every save)

    # ------------------------------------------------------------------ loop
    def fit(self, resume: bool = False):
        """Train to `max_steps` (continuing from the latest checkpoint when `resume`); return the model.

        Ctrl-C, SIGTERM and SIGUSR1 stop at the next step boundary with a checkpoint (mmgen.training.interrupts);
        a non-finite loss stops before anything is written from the diverged state."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.run.lock()  # the recipes lock first; a Trainer used on its own locks here (re-entrant)
            self.run.clean()
        try:
            with DeferredStop() as self.stop:
                return self._fit(resume)
        except Exception as error:
            if self.config.compile and type(error).__name__ == "BackendCompilerFailed":  # torch._dynamo.exc's
                cause = getattr(error, "inner_exception", None) or error
                detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
                raise ConfigError(f"train.compile=true: torch.compile failed ({detail}); "
                                  "train without it (train.compile=false)") from None
            raise
        finally:
            if accelerator.is_main_process:
                self.run.unlock()

    def _fit(self, resume: bool):
        config, accelerator = self.config, self.accelerator
        resume_folder = self.run.latest() if resume else None
        if resume and resume_folder is None:
            raise UserError(f"--resume: {self.run_dir} has no checkpoints/step-N folder to resume from")
        if resume_folder is not None:
            self._load_checkpoint(resume_folder)
        if self.sharding is not None:
            model, optimizer = self.sharding.prepare(accelerator, self.model, self.optimizer)
        else:
            model, optimizer = accelerator.prepare(self.model, self.optimizer)
        self.prepared_model = model
        if self.ema is not None:
            self.ema.to(accelerator.device)
        logger = MetricsLogger(self.run_dir, config.tensorboard) if accelerator.is_main_process else None
        train_batches = self.batches.train(self.train_dataset, self.step)
        global_batch = config.batch_size * config.grad_accum_steps * accelerator.num_processes
        progress = tqdm(
            total=config.max_steps,
            initial=self.step,
            desc="training",
            unit="step",
            disable=not (config.progress and accelerator.is_main_process),
            dynamic_ncols=True,
        )
        # the loss is checked for NaN / inf every step on CPU (free); on an accelerator at log steps and before every
        # checkpoint (no host sync per step): either way no checkpoint is ever written from a diverged state
        check_every_step = self.check_loss_every_step
        if check_every_step is None:
            check_every_step = accelerator.device.type == "cpu"
        self._window_loss = torch.zeros((), device=accelerator.device)
        window_extras: dict[str, list[float]] = {}
        throughput = Throughput(config, accelerator.device, self.step, self.run.profile_folder, accelerator.process_index,
                                write=progress.write if accelerator.is_main_process else None)
        # counting changes a step's floating-point order (dispatch through the counter), so a resumed run takes the
        # count its checkpoint recorded instead of counting a step the uninterrupted run did not count
        throughput.flops_per_step = self.flops_per_step
        self.throughput = throughput
        window_steps, window_start = 0, time.perf_counter()
        model.train()
        try:
            while self.step < config.max_steps:
                lr = learning_rate(
                    self.step,
                    lr=config.lr,
                    min_lr=config.min_lr,
                    warmup_steps=config.warmup_steps,
                    max_steps=config.max_steps,
                    schedule=config.lr_schedule,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                with throughput.counting():  # the first step's FLOPs (watched, not recomputed)
                    step_loss = self._accumulate_gradients(model, train_batches, window_extras)
                if check_every_step and self._on_any_process(not bool(torch.isfinite(step_loss))):
                    self._diverged(self.step + 1, step_loss.item())  # before the update: the weights stay good
                if config.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    # keep_torch_compile=False: a compiled module names its weights _orig_mod.*
                    self.ema.update(accelerator.unwrap_model(model, keep_torch_compile=False), self.step)
                self.step += 1
                self._window_loss += step_loss
                window_steps += 1
                progress.update(1)
                throughput.step_done()

                if self.step % config.log_every == 0 or self.step == config.max_steps:
                    elapsed = time.perf_counter() - window_start
                    train_loss = accelerator.reduce(self._window_loss, reduction="mean").item() / window_steps
                    if not math.isfinite(train_loss):
                        self._diverged(self.step, train_loss)
                    metrics = {"train/loss": train_loss, "lr": lr}
                    metrics.update(_summarise(window_extras))
                    window_extras = {}
                    metrics["throughput/samples_per_s"] = global_batch * window_steps / elapsed
                    if self.tokens_per_sample:
                        metrics["throughput/tokens_per_s"] = metrics["throughput/samples_per_s"] * self.tokens_per_sample
                    metrics.update(throughput.metrics(window_steps, elapsed))
                    progress.set_postfix({"loss": f"{train_loss:.4f}", "lr": f"{lr:.2e}", **throughput.postfix(metrics)},
                                         refresh=False)
                    if logger:
                        logger.log(self.step, metrics)
                    self._window_loss.zero_()
                    window_steps, window_start = 0, time.perf_counter()

                if (config.eval_every and self.step % config.eval_every == 0) or self.step == config.max_steps:
                    metrics = self.evaluate()
                    if metrics and accelerator.is_main_process:
                        progress.write(f"step {self.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                                         if isinstance(v, float)))
                        if logger:
                            logger.log(self.step, metrics)
                        self.best.consider(metrics, self.step, self._model_to_keep(), progress.write)
                    window_start = time.perf_counter()  # evaluation time is not training throughput

                saved = False
                if config.checkpoint_every and self.step % config.checkpoint_every == 0 and self.step < config.max_steps:
                    self.save_checkpoint()
                    saved = True
                    window_start = time.perf_counter()
                if self.step < config.max_steps and self._on_any_process(self.stop.requested is not None):
                    self._stop(saved)
        except KeyboardInterrupt:  # a second Ctrl-C, or no handler could be installed: the step may be half done
            latest = self.run.latest()
            raise Interrupted(f"interrupted at step {self.step} without a checkpoint; "
                              + (f"--resume {self.run_dir} continues from {latest.name}" if latest else
                                 "no checkpoint was written yet"), 130) from None
        finally:
            progress.close()
            throughput.close()
            if logger:
                logger.close()
        self.save_final()
        accelerator.wait_for_everyone()
        return self._model_to_keep()

    def _accumulate_gradients(self, model, train_batches, window_extras: dict) -> torch.Tensor:
        """Forward and backward over one step's micro-batches; returns the step's (detached) loss."""
        accelerator, config = self.accelerator, self.config
        step_loss = torch.zeros((), device=accelerator.device)
        if config.grad_accum_steps > 1 and getattr(self.loss_fn, "takes_whole_step", False):
            # the objective runs the step's passes itself (CLIP's cached-feature accumulation): it gets all of them
            batches = [self._next_batch(train_batches, window_extras) for _ in range(config.grad_accum_steps)]
            loss, extras = _split_loss(self.loss_fn.step(model, batches, GradientPasses(accelerator, model)))
            _add_extras(window_extras, extras)
            return step_loss + loss.detach().float()
        for micro_step in range(config.grad_accum_steps):
            batch = self._next_batch(train_batches, window_extras)
            last = micro_step == config.grad_accum_steps - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss, extras = _split_loss(self.loss_fn(model, batch))
                loss = loss / config.grad_accum_steps
            _add_extras(window_extras, extras)
            accelerator.backward(loss)
            step_loss += loss.detach().float()
        return step_loss

    def _next_batch(self, train_batches, window_extras: dict):
        """The next training batch on the device, its skipped samples counted."""
        batch = _to_device(next(train_batches), self.accelerator.device)
        if self.bad_samples is not None:
            self.bad_samples.update(batch)
            if self.bad_samples.skipped:
                window_extras.setdefault("data/skipped_total", []).append(self.bad_samples.skipped)
        return batch

    def _on_any_process(self, flag: bool) -> bool:
        """Whether `flag` holds on any process: every process must take the same branch (stop, or save, at the same
        step), or the others wait forever in their next collective."""
        if self.accelerator.num_processes == 1:
            return flag
        count = torch.tensor(float(flag), device=self.accelerator.device)
        return self.accelerator.reduce(count, reduction="sum").item() > 0

    def _stop(self, saved: bool):
        """Checkpoint (unless this step just was) and leave with Interrupted, naming --resume."""
        folder = self.run.checkpoint(self.step) if saved else self.save_checkpoint()
        what = self.stop.name() if self.stop.requested is not None else "a stop signal on another process"
        exit_code = self.stop.exit_code() if self.stop.requested is not None else 75
        raise Interrupted(f"stopped by {what} at step {self.step}; checkpoint {folder} written, continue with "
                          f"--resume {self.run_dir}", exit_code)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over the fixed validation batches, plus whatever `evaluate_fn` reports.

        It runs in a forked RNG seeded with train.seed: an objective's random draws in eval mode (a diffusion loss's
        timesteps and noise) are the same at every evaluation, and training's RNG continues as if none had run."""
        devices = [self.accelerator.device] if self.accelerator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.config.seed)
            return self._evaluate()

    def _evaluate(self) -> dict:
        accelerator = self.accelerator
        model = self.prepared_model
        metrics = {}
        model.eval()
        if self.val_dataset is not None:
            total = torch.zeros((), device=accelerator.device)
            count = 0
            for batch in self.batches.validation(self.val_dataset):
                with accelerator.autocast():
                    loss, _ = _split_loss(self.loss_fn(model, _to_device(batch, accelerator.device)))
                total += loss.float()
                count += 1
            if count:
                metrics["val/loss"] = accelerator.reduce(total / count, reduction="mean").item()
        if self.sharding is not None:  # evaluate_fn may run on the main process alone: it gets a gathered model
            metrics.update(self.sharding.evaluate(self.evaluate_fn, self.ema, self.step, accelerator.device))
        elif self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(self._model_to_keep(), self.step))
        model.train()
        return metrics

    def _model_to_keep(self) -> torch.nn.Module:
        """What is evaluated, saved as final/ and returned: the EMA model when EMA is on, else the trained one."""
        if self.sharding is not None:
            return self.model  # sharded; final/ and evaluate_fn get it (or its EMA) gathered
        return self.ema.model if self.ema is not None else self.accelerator.unwrap_model(self.model)

def _split_loss(output) -> tuple[torch.Tensor, dict]:
    """A loss_fn returns the loss, or (loss, {name: number}) with extra metrics to log."""
    if isinstance(output, tuple):
        return output[0], output[1]
    return output, {}


def _add_extras(window_extras: dict, extras: dict) -> None:
    """Append a step's extra metrics; tensors stay on the device until the log step (no host sync per step)."""
    for name, value in extras.items():
        window_extras.setdefault(name, []).append(value.detach() if torch.is_tensor(value) else value)


def _summarise(extras: dict[str, list]) -> dict[str, float]:
    """Mean of each extra metric over the logging window; `*_total` counters keep their latest value."""
    return {name: float(values[-1] if name.endswith("_total") else sum(values) / len(values))
            for name, values in extras.items()}


def _to_device(batch, device):
    if device.type == "cpu":
        return batch
    from accelerate.utils import send_to_device

    return send_to_device(batch, device, non_blocking=True)
