"""The Trainer's checkpoint half: checkpoints and final/ written atomically through the run folder, never from a
non-finite state, with a full disk reported in one line; and a checkpoint read back on resume (model, optimizer, EMA,
RNG, step and fp16's grad scaler)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from ..io import atomic_folder
from .checkpoint import (
    optimizer_from_files,
    optimizer_to_files,
    rng_from_file,
    rng_to_file,
)
from .fsdp import local_tensor
from .metrics import truncate_metrics


class Checkpoints:
    """Mixed into the Trainer, whose attributes it uses: accelerator, run (RunFolder), run_dir, config, model,
    optimizer, ema, sharding (train.fsdp's ShardedTraining or None), step, save_fn, load_fn, _window_loss,
    _model_to_keep() and _on_any_process()."""

    def _diverged(self, step: int, loss: float):
        """Stop on a non-finite loss, naming the last good checkpoint (nothing is written from this state)."""
        latest = self.run.latest()
        where = (f"the last good checkpoint is {latest}: --resume {self.run_dir} continues from it (consider a lower "
                 "train.lr)" if latest else "no checkpoint was written; lower train.lr and start again")
        raise UserError(f"training diverged at step {step} (loss {loss}); nothing was saved from it, {where}")

    def _check_finite(self) -> None:
        """Refuse to save a state whose loss window or trainable weights hold NaN / inf."""
        parameters = [local_tensor(p.detach()) for p in self.accelerator.unwrap_model(self.model).parameters()
                      if p.requires_grad]
        norms = torch.stack([norm.float() for norm in torch._foreach_norm(parameters)]) if parameters else None
        finite = bool(torch.isfinite(self._window_loss).all()) and (norms is None or bool(torch.isfinite(norms).all()))
        if self._on_any_process(not finite):
            self._diverged(self.step, float("nan"))

    def save_checkpoint(self) -> Path:
        """Write RUN_DIR/checkpoints/step-N (model, optimizer, RNG, step) atomically; keep the newest few.

        A non-finite state is never written; a write that fails (a full disk) leaves no temporary folder and the
        previous checkpoint the latest, and stops the run with one line."""
        accelerator, step = self.accelerator, self.step
        self._check_finite()
        failure = None
        try:
            if accelerator.is_main_process:
                staging = self.run.checkpoint_staging(step)
        except OSError as error:
            failure = error
        accelerator.wait_for_everyone()
        if self.sharding is not None and self._on_any_process(failure is not None) and failure is None:
            failure = OSError("it failed on another process")  # every process must skip the gather alike
        staging = self.run.checkpoint_staging_path(step)
        try:
            if failure is None and self.sharding is not None:  # every process: gathers, or writes its shards
                self.sharding.save(staging, self.optimizer, self.ema, self.save_fn)
            elif failure is None and accelerator.is_main_process:
                self.save_fn(accelerator.unwrap_model(self.model), staging)
                optimizer_to_files(self.optimizer, staging)
                if self.ema is not None:
                    self.ema.save(staging)
            if failure is None and accelerator.is_main_process:
                state = {"step": step, "num_processes": accelerator.num_processes}
                if accelerator.scaler is not None:  # fp16's loss scale: resuming without it restarts at 65536
                    state["grad_scaler"] = accelerator.scaler.state_dict()
                if self.throughput is not None and self.throughput.flops_per_step is not None:
                    state["flops_per_step"] = self.throughput.flops_per_step
                self.run.write_state(staging, state)
            if failure is None:
                rng_to_file(staging / f"rng-{accelerator.process_index}.safetensors")
        except OSError as error:
            failure = error
        if self._on_any_process(failure is not None):
            if accelerator.is_main_process:
                self.run.discard_staging(step)
            latest = self.run.latest()
            reason = f"{failure.strerror or failure}" if failure is not None else "it failed on another process"
            raise UserError(f"could not write checkpoint step-{step} in {self.run_dir}: {reason}; "
                            + (f"{latest} is still the latest" if latest else "no checkpoint was written yet"))
        if accelerator.is_main_process:
            self.run.publish_checkpoint(step)
            self.run.prune(self.config.keep_checkpoints)
        accelerator.wait_for_everyone()
        return self.run.checkpoint(step)

    def save_final(self) -> Path:
        """Write RUN_DIR/final (config.json + model.safetensors + recipe files; the EMA weights if on) atomically."""
        self._check_finite()
        folder = self.run.final
        self.accelerator.wait_for_everyone()
        failure = None
        # train.fsdp: every process takes part in the gather, the main one gets the whole model (its EMA when on)
        model = self.sharding.gathered_model(self.ema) if self.sharding is not None else self._model_to_keep()
        if self.accelerator.is_main_process:
            try:
                with atomic_folder(folder) as staging:
                    self.save_fn(model, staging)
            except OSError as error:
                failure = error
        if self._on_any_process(failure is not None):
            latest = self.run.latest()
            reason = f"{failure.strerror or failure}" if failure is not None else "it failed on another process"
            raise UserError(f"could not write {folder}: {reason}; "
                            + (f"--resume {self.run_dir} continues from {latest.name}" if latest else
                               "no checkpoint was written"))
        self.accelerator.wait_for_everyone()
        return folder

    def _load_checkpoint(self, folder: Path) -> None:
        state = self.run.read_state(folder)
        if self.sharding is not None:
            self.sharding.load(folder, self.optimizer, self.ema, self.load_fn)
        else:
            self.load_fn(self.model, folder)
            optimizer_from_files(self.optimizer, folder)
            if self.ema is not None:
                self.ema.load(folder, self.model)
        self.step = state["step"]
        self.flops_per_step = state.get("flops_per_step")
        if self.accelerator.scaler is not None and state.get("grad_scaler"):
            self.accelerator.scaler.load_state_dict(state["grad_scaler"])
        rng_file = folder / f"rng-{self.accelerator.process_index}.safetensors"
        if rng_file.exists():
            rng_from_file(rng_file)
        if self.accelerator.is_main_process:
            truncate_metrics(self.run_dir, self.step)
        self.accelerator.print(f"resuming from {folder} at step {self.step}")
