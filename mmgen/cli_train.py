"""Handlers of the `mmgen` commands that write a model folder: train, finetune, merge-lora, convert, quickstart.

Each takes the parsed arguments (mmgen.cli builds the parser) and imports what it runs only when called, so that
`mmgen --help` stays fast; a problem the user can fix is a UserError.
"""

from __future__ import annotations

from pathlib import Path

from .commands import find_recipe
from .errors import UserError
from .hints import finished_hint


def run_train(args) -> None:
    """`mmgen train NAME`: the recipe's train(), then where the model went and what to try next."""
    run_dir = _run_dir(args)
    recipe = find_recipe("train", args.model)
    _train_recipe(recipe.module, args, run_dir)
    final = _final_folder(run_dir)
    on_main_process(f"model written to {final}; try: {finished_hint(recipe.hint, run_dir, run_dir)}")


def run_finetune(args) -> None:
    """`mmgen finetune NAME`: like train, with --base; an adapter run's hint names its base and --adapter."""
    run_dir = _run_dir(args)
    recipe = find_recipe("finetune", args.model)
    _train_recipe(recipe.module, args, run_dir, base=args.base)
    final = _final_folder(run_dir)
    if (final / "adapter_config.json").is_file():
        from .finetune import read_adapter_config

        model = f"{read_adapter_config(final)['base']} --adapter {run_dir}"
        on_main_process(f"adapter written to {final}; try: {finished_hint(recipe.hint, model, run_dir)}")
    else:
        on_main_process(f"model written to {final}; try: {finished_hint(recipe.hint, run_dir, run_dir)}")


def _run_dir(args) -> str:
    """The run folder of a train/finetune command: --out for a new run, --resume to continue one."""
    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise UserError("--out and --resume name different folders; --resume continues the run in place")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    return run_dir


def _train_recipe(module: str, args, run_dir: str, **extra) -> None:
    """Call mmgen.recipes.<module>.train; a run that failed before training leaves no empty folder."""
    import importlib

    from .run_folder import RunFolder

    recipe = importlib.import_module(f".recipes.{module}", __package__)
    try:
        recipe.train(args.config, run_dir, args.overrides, resume=bool(args.resume), **extra)
    finally:
        RunFolder(run_dir).unlock()


def _final_folder(run_dir: str) -> Path:
    """RUN_DIR/final, the folder a finished run leaves."""
    from .run_folder import RunFolder

    return RunFolder(run_dir).final


def run_merge_lora(args) -> None:
    """`mmgen merge-lora`: fold an adapter into its base."""
    from .recipes.merge_lora import merge_lora

    check_new_out(args.out)
    print(f"wrote {merge_lora(args.adapter, args.out, base=args.base)}")


def run_quickstart(args) -> None:
    """`mmgen quickstart`: a small CLIP and text-to-image model on the built-in shapes, and samples of them."""
    from .recipes.quickstart import quickstart

    check_new_out(args.out)
    quickstart(args.out, clip_overrides=args.clip_overrides, diffusion_overrides=args.diffusion_overrides,
               prompts=args.prompts, images_per_prompt=args.n)


def run_convert(args) -> None:
    """`mmgen convert SOURCE`: a model of another library -> an mmgen model folder."""
    check_new_out(args.out)
    if args.source == "open-clip":
        from .clip.open_clip_interop import convert_open_clip

        convert_open_clip(args.model, args.pretrained, args.out)
        print(f"wrote {args.out}")
    if args.source == "gpt2":
        from .text.hf_gpt2 import convert_gpt2_folder

        convert_gpt2_folder(args.model, args.out)
        print(f"wrote {args.out}")
    if args.source == "bert":
        from .text.hf_bert import convert_bert_folder

        convert_bert_folder(args.model, args.out)
        print(f"wrote {args.out}")
    if args.source == "diffusers-vae":
        from .diffusion.vae_interop import convert_diffusers_vae_folder

        vae = convert_diffusers_vae_folder(args.model, args.out)
        print(f"wrote {args.out} (latent scaling factor {vae.config.scaling_factor:g})")
    if args.source == "hf-clip":
        from .clip.hf_clip_interop import convert_hf_clip_folder

        clip = convert_hf_clip_folder(args.model, args.out)
        towers = "text encoder alone" if clip.config.vision is None else "image and text towers"
        print(f"wrote {args.out} (CLIP, {towers}, context length {clip.config.text.context_length})")
    if args.source == "stable-diffusion":
        from .diffusion.stable_diffusion import convert_stable_diffusion_folder

        model = convert_stable_diffusion_folder(args.model, args.out)
        config = model.config
        print(f"wrote {args.out} (text2img, {config.image_size}px images, {config.schedule.prediction_type} "
              f"prediction): mmgen sample text2img --checkpoint {args.out} --prompt ...")


def on_main_process(message: str) -> None:
    """Print once under torchrun/accelerate (on the main process)."""
    from .training.trainer import process_state

    if process_state().is_main_process:
        print(message)


def check_new_out(out: str) -> None:
    """Refuse an --out that is a file, lies under a file, or is a folder that already holds files, before any model
    is loaded: nothing a user has is ever replaced."""
    from .run_folder import check_output_path

    if check_output_path(out):
        raise UserError(f"--out {out} already exists and is not empty; choose another --out (nothing is overwritten)")
