"""The `mmgen` command: train, finetune, sample, convert. Errors a user can cause are one line and a non-zero exit."""

from __future__ import annotations

import argparse
import sys

from .errors import UserError

EPILOG = "Config overrides are dotted.key=value pairs, e.g. train.max_steps=500 model.dropout=0.1"


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _probability(text: str) -> float:
    value = _float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {text}")
    return value


def _non_negative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _unit_float(text: str) -> float:
    value = _float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--out", help="run folder to create (RUN_DIR)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")


# `mmgen train NAME` -> (recipe module in mmgen.recipes, help); each module has train(config, run_dir, overrides, resume)
TRAIN_COMMANDS = {
    "lm": "GPT language model (configs/lm-*.yaml)",
    "clip": "CLIP on image-caption pairs (configs/clip-*.yaml)",
    "diffusion": "GLIDE-style text-to-image diffusion on a trained CLIP (configs/diffusion-*.yaml)",
    "vae": "KL autoencoder for latent diffusion; measures the latent scaling factor (configs/vae-*.yaml)",
    "latent-diffusion": "text-to-image diffusion on a trained VAE's latents (configs/ldm-*.yaml)",
    "prior": "unCLIP prior: CLIP text -> CLIP image embedding, on a trained CLIP (configs/prior-*.yaml)",
    "decoder": "unCLIP decoder: CLIP image embedding -> image, on a trained CLIP (configs/decoder-*.yaml)",
}
# `mmgen finetune NAME` -> (recipe module in mmgen.recipes, help); each has train(config, run_dir, overrides, resume, base)
FINETUNE_COMMANDS = {
    "lm": ("finetune_lm", "adapt a GPT to a text or to instruction/response pairs (configs/finetune-lm-*.yaml)"),
    "clip": ("finetune_clip", "adapt a CLIP to new image-caption data (configs/finetune-clip-*.yaml)"),
    "diffusion": ("finetune_diffusion", "adapt a text-to-image model's UNet (configs/finetune-diffusion-*.yaml)"),
    "clip-classifier": ("finetune_classifier", "CLIP image tower + a classification head on a labelled image folder "
                                               "(linear probe or fine-tuning)"),
}
FINETUNE_EPILOG = (EPILOG + ". The config's method is full, lora or qlora; lora/qlora runs save adapter folders "
                   "(RUN_DIR/final) used as --adapter RUN_DIR beside --checkpoint BASE, or merged by mmgen merge-lora.")
SAMPLE_HINTS = {
    "lm": "mmgen sample lm --checkpoint {run}",
    "clip": "mmgen eval clip --checkpoint {run} --zeroshot-dir shapes --retrieval shapes:val",
    "diffusion": 'mmgen sample text2img --checkpoint {run} --prompt "a large red circle in the middle" --out samples',
    "clip-classifier": "python -c \"import mmgen; print(mmgen.load('{run}'))\"",
    "vae": "mmgen train latent-diffusion --config configs/ldm-shapes.yaml --out runs/ldm-shapes model.vae={run}",
    "latent-diffusion": 'mmgen sample text2img --checkpoint {run} --prompt "a large red circle in the middle" '
                        '--out samples',
    "prior": 'mmgen sample text2img --checkpoint {run} --decoder DECODER_RUN --prompt "a large red circle in the '
             'middle" --out samples',
    "decoder": "mmgen sample variations --checkpoint {run} IMAGE.png --out variations",
}


def build_parser() -> argparse.ArgumentParser:
    """The full `mmgen` argument parser."""
    parser = _Parser(prog="mmgen", description="Train and sample multimodal generative models.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a recipe config", epilog=EPILOG)
    train_models = train.add_subparsers(dest="model", required=True, parser_class=_Parser)
    for name, help_text in TRAIN_COMMANDS.items():
        _add_train_arguments(train_models.add_parser(name, help=help_text, epilog=EPILOG))

    finetune = commands.add_parser("finetune", help="adapt a trained model: full, LoRA or QLoRA fine-tuning",
                                   epilog=FINETUNE_EPILOG)
    finetune_models = finetune.add_subparsers(dest="model", required=True, parser_class=_Parser)
    for name, (_, help_text) in FINETUNE_COMMANDS.items():
        parser_for = finetune_models.add_parser(name, help=help_text, epilog=FINETUNE_EPILOG)
        parser_for.add_argument("--base", metavar="CHECKPOINT", help="the model to adapt: RUN_DIR or a model folder "
                                "(sets the config's base; a resumed run knows its own)")
        _add_train_arguments(parser_for)

    merge = commands.add_parser("merge-lora", help="fold a LoRA adapter into its base and write a full model folder")
    merge.add_argument("--adapter", required=True, help="adapter folder or adapter run (RUN_DIR)")
    merge.add_argument("--base", metavar="CHECKPOINT", help="the base model (default: the one the adapter records)")
    merge.add_argument("--out", required=True, help="new folder for the merged model")

    sample = commands.add_parser("sample", help="generate from a trained model")
    sample_models = sample.add_subparsers(dest="model", required=True, parser_class=_Parser)
    sample_lm = sample_models.add_parser("lm", help="generate text from a GPT checkpoint")
    sample_lm.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/final or a model folder")
    sample_lm.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample_lm.add_argument("--max-new-tokens", type=_positive_int, default=500)
    sample_lm.add_argument("--temperature", type=_non_negative_float, default=0.8, help="0 = greedy")
    sample_lm.add_argument("--top-k", type=_positive_int, default=None)
    sample_lm.add_argument("--top-p", type=_probability, default=None)
    sample_lm.add_argument("--stop", default=None, help="stop after this token (e.g. a character)")
    sample_lm.add_argument("--num-samples", type=_positive_int, default=1)
    sample_lm.add_argument("--seed", type=_int, default=0)
    sample_lm.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")
    sample_lm.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder or adapter run to put on the checkpoint")
    template = sample_lm.add_mutually_exclusive_group()
    template.add_argument("--template", help="instruction prompt template with {instruction} (where --prompt goes); "
                          "\\n in TEXT is a newline")
    template.add_argument("--template-file", metavar="FILE", help="the template read from a file, as it is")
    sample_image = sample_models.add_parser("text2img", help="generate images from a text-to-image diffusion run")
    sample_image.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/final or a model folder")
    sample_image.add_argument("--prompt", action="append", required=True, dest="prompts", metavar="TEXT",
                              help='text to draw (repeatable); "" samples unconditionally')
    sample_image.add_argument("--n", type=_positive_int, default=4, help="images per prompt")
    sample_image.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    sample_image.add_argument("--steps", type=_positive_int, default=50)
    sample_image.add_argument("--guidance", type=_non_negative_float, default=3.0, help="classifier-free guidance")
    sample_image.add_argument("--guidance-rescale", type=_unit_float, default=0.0,
                              help="rescale the guided prediction towards the conditional one's std (0..1, diffusers' "
                                   "guidance_rescale)")
    sample_image.add_argument("--guidance-interval", type=_non_negative_int, nargs=2, metavar=("T_LOW", "T_HIGH"),
                              help="apply classifier-free guidance only at timesteps T_LOW..T_HIGH")
    sample_image.add_argument("--clip-guidance", type=_non_negative_float, default=0.0, help="CLIP guidance scale")
    sample_image.add_argument("--clip-model", help="CLIP folder for --clip-guidance (default: the text encoder)")
    sample_image.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    sample_image.add_argument("--seed", type=_int, default=0)
    sample_image.add_argument("--out", required=True, help="new folder for grid.png and one PNG per image")
    sample_image.add_argument("--device", default="cpu")
    sample_image.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder or adapter run to put on the checkpoint")
    sample_image.add_argument("--decoder", metavar="DECODER_RUN", help="unCLIP: --checkpoint is a prior run, this its "
                              "decoder (run or model folder); --sampler, --steps, --guidance, --eta are the decoder's")
    sample_image.add_argument("--prior-steps", type=_positive_int, default=64, help="unCLIP: the prior's DDIM steps")
    sample_image.add_argument("--prior-guidance", type=_non_negative_float, default=2.0,
                              help="unCLIP: the prior's classifier-free guidance")
    variations = sample_models.add_parser("variations", help="unCLIP image variations: decode the CLIP image "
                                          "embeddings of images with a decoder run")
    variations.add_argument("--checkpoint", required=True, help="decoder RUN_DIR, RUN_DIR/final or a model folder")
    variations.add_argument("--n", type=_positive_int, default=4, help="variations per image")
    variations.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    variations.add_argument("--steps", type=_positive_int, default=50)
    variations.add_argument("--guidance", type=_non_negative_float, default=3.0, help="classifier-free guidance")
    variations.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    variations.add_argument("--seed", type=_int, default=0)
    variations.add_argument("--out", required=True, help="new folder for grid.png and one PNG per image")
    variations.add_argument("--device", default="cpu")
    variations.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    zeroshot = commands.add_parser("zeroshot", help="zero-shot classify images with a CLIP checkpoint")
    zeroshot.add_argument("--checkpoint", required=True, help="CLIP RUN_DIR or model folder")
    zeroshot.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,red circle"')
    zeroshot.add_argument("--template", action="append", dest="templates", help='prompt template with {} (repeatable)')
    zeroshot.add_argument("--top-k", type=_positive_int, default=5)
    zeroshot.add_argument("--device", default="cpu")
    zeroshot.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder or adapter run to put on the checkpoint")
    zeroshot.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    evaluate = commands.add_parser("eval", help="evaluate a trained model")
    evaluate_models = evaluate.add_subparsers(dest="model", required=True, parser_class=_Parser)
    evaluate_clip = evaluate_models.add_parser("clip", help="zero-shot accuracy and retrieval recall of a CLIP")
    evaluate_clip.add_argument("--checkpoint", required=True)
    evaluate_clip.add_argument("--zeroshot-dir", help="labelled image folder (one sub-folder per class), or 'shapes' "
                               "('shapes:extra=heart' adds an extra shape's classes)")
    evaluate_clip.add_argument("--retrieval", help="caption table / shards / 'shapes:val' for image<->text recall")
    evaluate_clip.add_argument("--template", action="append", dest="templates", help="prompt template with {}")
    evaluate_clip.add_argument("--max-samples", type=_positive_int, default=5000)
    evaluate_clip.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate_clip.add_argument("--device", default="cpu")
    evaluate_clip.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder or adapter run to put on the checkpoint")

    quickstart = commands.add_parser(
        "quickstart", help="train a small CLIP and text-to-image model on built-in shapes and sample them (~15 min CPU)",
        epilog="Overrides, e.g. --clip train.max_steps=300 --diffusion train.max_steps=500, go to the two recipes "
               "(mmgen/recipes/presets/quickstart-*.yaml).")
    quickstart.add_argument("--out", default="runs/quickstart", help="new folder for both runs and the samples")
    quickstart.add_argument("--clip", action="append", default=[], dest="clip_overrides", metavar="key=value",
                            help="override of the CLIP recipe (repeatable)")
    quickstart.add_argument("--diffusion", action="append", default=[], dest="diffusion_overrides",
                            metavar="key=value", help="override of the diffusion recipe (repeatable)")
    quickstart.add_argument("--prompts", type=_positive_int, default=6, help="held-out prompts to sample")
    quickstart.add_argument("--n", type=_positive_int, default=4, help="images per prompt")

    convert = commands.add_parser("convert", help="convert models from other libraries")
    convert_from = convert.add_subparsers(dest="source", required=True, parser_class=_Parser)
    gpt2 = convert_from.add_parser("gpt2", help="a transformers GPT-2 folder -> mmgen GPT folder")
    gpt2.add_argument("--model", required=True, help="folder written by GPT2LMHeadModel.save_pretrained")
    gpt2.add_argument("--out", required=True)
    open_clip_parser = convert_from.add_parser("open-clip", help="an open_clip model -> mmgen CLIP folder")
    open_clip_parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    open_clip_parser.add_argument("--pretrained", help="a local checkpoint FILE or an open_clip tag (needs internet)")
    open_clip_parser.add_argument("--out", required=True)
    diffusers_vae = convert_from.add_parser("diffusers-vae", help="a diffusers AutoencoderKL folder -> mmgen VAE folder")
    diffusers_vae.add_argument("--model", required=True, help="folder written by AutoencoderKL.save_pretrained "
                               "(or a pipeline folder with vae/)")
    diffusers_vae.add_argument("--out", required=True)
    return parser


def run_train(args) -> None:
    from pathlib import Path

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise UserError("--out and --resume name different folders; --resume continues the run in place")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    import importlib

    from .run_folder import RunFolder

    recipe = importlib.import_module(f".recipes.{args.model.replace('-', '_')}", __package__)
    try:
        recipe.train(args.config, run_dir, args.overrides, resume=bool(args.resume))
    finally:
        RunFolder(run_dir).unlock()  # a run that failed before training leaves no empty folder
    hint = SAMPLE_HINTS[args.model].format(run=run_dir)
    _on_main_process(f"model written to {RunFolder(run_dir).final}; try: {hint}")


def run_finetune(args) -> None:
    import importlib
    from pathlib import Path

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise UserError("--out and --resume name different folders; --resume continues the run in place")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    module, _ = FINETUNE_COMMANDS[args.model]
    from .run_folder import RunFolder

    recipe = importlib.import_module(f".recipes.{module}", __package__)
    try:
        recipe.train(args.config, run_dir, args.overrides, resume=bool(args.resume), base=args.base)
    finally:
        RunFolder(run_dir).unlock()
    final = RunFolder(run_dir).final
    if (final / "adapter_config.json").is_file():
        from .finetune import read_adapter_config

        model = f"{read_adapter_config(final)['base']} --adapter {run_dir}"
        _on_main_process(f"adapter written to {final}; try: {SAMPLE_HINTS[args.model].format(run=model)}")
    else:
        _on_main_process(f"model written to {final}; try: {SAMPLE_HINTS[args.model].format(run=run_dir)}")


def run_merge_lora(args) -> None:
    from .recipes.merge_lora import merge_lora

    _check_new_out(args.out)
    print(f"wrote {merge_lora(args.adapter, args.out, base=args.base)}")


def _on_main_process(message: str) -> None:
    from .training.trainer import process_state

    if process_state().is_main_process:
        print(message)


def run_sample(args) -> None:
    if args.model in ("text2img", "variations"):
        _check_new_out(args.out)
    if args.model == "variations" or (args.model == "text2img" and _unclip_requested(args)):
        return _run_unclip_sample(args)
    if args.model == "lm":
        from .recipes.lm_sample import sample_text

        texts = sample_text(
            args.checkpoint,
            args.prompt,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            stop=args.stop,
            num_samples=args.num_samples,
            seed=args.seed,
            device=args.device,
            adapter=args.adapter,
            template=_template(args),
        )
        print("\n---------------\n".join(texts))
    if args.model == "text2img":
        import warnings

        from .recipes.text2img_sample import sample_images

        interval = tuple(args.guidance_interval) if args.guidance_interval else None
        if interval is not None and interval[0] > interval[1]:
            raise UserError(f"--guidance-interval needs T_LOW <= T_HIGH, got {interval[0]} {interval[1]}")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = sample_images(args.checkpoint, args.prompts, args.out, num_images_per_prompt=args.n,
                                  clip_model=args.clip_model, device=args.device, sampler=args.sampler,
                                  steps=args.steps, guidance_scale=args.guidance, clip_guidance_scale=args.clip_guidance,
                                  guidance_rescale=args.guidance_rescale, guidance_interval=interval,
                                  eta=args.eta, seed=args.seed, adapter=args.adapter)
        for warning in caught:
            print(f"mmgen: warning: {warning.message}", file=sys.stderr)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")


def _unclip_requested(args) -> bool:
    """Whether `sample text2img` goes through the unCLIP pipeline: --decoder given, or --checkpoint a prior."""
    from .recipes.unclip_sample import model_type

    return args.decoder is not None or model_type(args.checkpoint) == "prior"


def _run_unclip_sample(args) -> None:
    """`sample variations`, and `sample text2img` with a prior and its decoder."""
    import warnings

    from .recipes.unclip_sample import sample_unclip_images, sample_variations

    options = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance, eta=args.eta, seed=args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.model == "variations":
            paths = sample_variations(args.checkpoint, args.images, args.out, num_variations=args.n,
                                      device=args.device, **options)
        else:
            if args.decoder is None:
                raise UserError(f"{args.checkpoint} holds an unCLIP prior: name its decoder with --decoder DECODER_RUN")
            unsupported = [flag for flag, value in (("--clip-guidance", args.clip_guidance),
                                                    ("--clip-model", args.clip_model), ("--adapter", args.adapter),
                                                    ("--guidance-rescale", args.guidance_rescale),
                                                    ("--guidance-interval", args.guidance_interval))
                           if value]
            if unsupported:
                raise UserError(f"{unsupported[0]} is not supported with an unCLIP prior and decoder")
            paths = sample_unclip_images(args.checkpoint, args.decoder, args.prompts, args.out,
                                         num_images_per_prompt=args.n, device=args.device,
                                         prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance,
                                         **options)
    for warning in caught:
        print(f"mmgen: warning: {warning.message}", file=sys.stderr)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")


def _template(args) -> str | None:
    """The instruction template of `sample lm`: --template (with \\n as a newline) or the --template-file's text."""
    if args.template is not None:
        return args.template.replace("\\n", "\n")
    if args.template_file is not None:
        from pathlib import Path

        path = Path(args.template_file)
        if not path.is_file():
            raise UserError(f"--template-file: file not found: {path}")
        return path.read_text(encoding="utf-8")
    return None


def run_zeroshot(args) -> None:
    from .recipes.clip_eval import zeroshot_files

    class_names = [name.strip() for name in args.classes.split(",")]
    failures = 0
    for path, result in zeroshot_files(args.checkpoint, class_names, args.images, templates=args.templates,
                                       top_k=args.top_k, device=args.device, adapter=args.adapter):
        if isinstance(result, str):
            failures += 1
            print(f"mmgen: error: {path}: {result}", file=sys.stderr)
            continue
        print(f"{path}: " + ", ".join(f"{name} {probability:.3f}" for name, probability in result))
    if failures:
        raise UserError(f"{failures} image(s) could not be read")


def run_eval(args) -> None:
    import json

    from .recipes.clip_eval import evaluate

    metrics = evaluate(args.checkpoint, zeroshot=args.zeroshot_dir, retrieval=args.retrieval, templates=args.templates,
                       max_samples=args.max_samples, device=args.device, adapter=args.adapter)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:16s} {100 * value:6.2f}%")


def run_quickstart(args) -> None:
    from .recipes.quickstart import quickstart

    _check_new_out(args.out)
    quickstart(args.out, clip_overrides=args.clip_overrides, diffusion_overrides=args.diffusion_overrides,
               prompts=args.prompts, images_per_prompt=args.n)


def _check_new_out(out: str) -> None:
    """Refuse an --out that is a file, lies under a file, or is a folder that already holds files, before any model
    is loaded: nothing a user has is ever replaced."""
    from .run_folder import check_output_path

    if check_output_path(out):
        raise UserError(f"--out {out} already exists and is not empty; choose another --out (nothing is overwritten)")


def run_convert(args) -> None:
    _check_new_out(args.out)
    if args.source == "open-clip":
        from .clip.open_clip_interop import convert_open_clip

        convert_open_clip(args.model, args.pretrained, args.out)
        print(f"wrote {args.out}")
    if args.source == "gpt2":
        from .text.hf_gpt2 import convert_gpt2_folder

        convert_gpt2_folder(args.model, args.out)
        print(f"wrote {args.out}")
    if args.source == "diffusers-vae":
        from .diffusion.vae_interop import convert_diffusers_vae_folder

        vae = convert_diffusers_vae_folder(args.model, args.out)
        print(f"wrote {args.out} (latent scaling factor {vae.config.scaling_factor:g})")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmgen` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a one-line argument error
        return exit_request.code if isinstance(exit_request.code, int) else 1
    handlers = {"train": run_train, "finetune": run_finetune, "merge-lora": run_merge_lora, "sample": run_sample,
                "zeroshot": run_zeroshot, "eval": run_eval, "quickstart": run_quickstart, "convert": run_convert}
    try:
        handlers[args.command](args)
    except UserError as error:
        print(f"mmgen: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mmgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
