"""The `mmgen` command: train, sample, convert. Errors a user can cause are one line and a non-zero exit."""

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
}
SAMPLE_HINTS = {
    "lm": "mmgen sample lm --checkpoint {run}",
    "clip": "mmgen eval clip --checkpoint {run} --zeroshot-dir shapes --retrieval shapes:val",
    "diffusion": 'mmgen sample text2img --checkpoint {run} --prompt "a large red circle in the middle" --out samples',
}


def build_parser() -> argparse.ArgumentParser:
    """The full `mmgen` argument parser."""
    parser = _Parser(prog="mmgen", description="Train and sample multimodal generative models.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a recipe config", epilog=EPILOG)
    train_models = train.add_subparsers(dest="model", required=True, parser_class=_Parser)
    for name, help_text in TRAIN_COMMANDS.items():
        _add_train_arguments(train_models.add_parser(name, help=help_text, epilog=EPILOG))

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
    sample_image = sample_models.add_parser("text2img", help="generate images from a text-to-image diffusion run")
    sample_image.add_argument("--checkpoint", required=True, help="RUN_DIR, RUN_DIR/final or a model folder")
    sample_image.add_argument("--prompt", action="append", required=True, dest="prompts", metavar="TEXT",
                              help='text to draw (repeatable); "" samples unconditionally')
    sample_image.add_argument("--n", type=_positive_int, default=4, help="images per prompt")
    sample_image.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim")
    sample_image.add_argument("--steps", type=_positive_int, default=50)
    sample_image.add_argument("--guidance", type=_non_negative_float, default=3.0, help="classifier-free guidance")
    sample_image.add_argument("--clip-guidance", type=_non_negative_float, default=0.0, help="CLIP guidance scale")
    sample_image.add_argument("--clip-model", help="CLIP folder for --clip-guidance (default: the text encoder)")
    sample_image.add_argument("--eta", type=_non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    sample_image.add_argument("--seed", type=_int, default=0)
    sample_image.add_argument("--out", required=True, help="new folder for grid.png and one PNG per image")
    sample_image.add_argument("--device", default="cpu")

    zeroshot = commands.add_parser("zeroshot", help="zero-shot classify images with a CLIP checkpoint")
    zeroshot.add_argument("--checkpoint", required=True, help="CLIP RUN_DIR or model folder")
    zeroshot.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,red circle"')
    zeroshot.add_argument("--template", action="append", dest="templates", help='prompt template with {} (repeatable)')
    zeroshot.add_argument("--top-k", type=_positive_int, default=5)
    zeroshot.add_argument("--device", default="cpu")
    zeroshot.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    evaluate = commands.add_parser("eval", help="evaluate a trained model")
    evaluate_models = evaluate.add_subparsers(dest="model", required=True, parser_class=_Parser)
    evaluate_clip = evaluate_models.add_parser("clip", help="zero-shot accuracy and retrieval recall of a CLIP")
    evaluate_clip.add_argument("--checkpoint", required=True)
    evaluate_clip.add_argument("--zeroshot-dir", help="labelled image folder (one sub-folder per class), or 'shapes'")
    evaluate_clip.add_argument("--retrieval", help="caption table / shards / 'shapes:val' for image<->text recall")
    evaluate_clip.add_argument("--template", action="append", dest="templates", help="prompt template with {}")
    evaluate_clip.add_argument("--max-samples", type=_positive_int, default=5000)
    evaluate_clip.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate_clip.add_argument("--device", default="cpu")

    convert = commands.add_parser("convert", help="convert models from other libraries")
    convert_from = convert.add_subparsers(dest="source", required=True, parser_class=_Parser)
    gpt2 = convert_from.add_parser("gpt2", help="a transformers GPT-2 folder -> mmgen GPT folder")
    gpt2.add_argument("--model", required=True, help="folder written by GPT2LMHeadModel.save_pretrained")
    gpt2.add_argument("--out", required=True)
    open_clip_parser = convert_from.add_parser("open-clip", help="an open_clip model -> mmgen CLIP folder")
    open_clip_parser.add_argument("--model", required=True, help="open_clip model name, e.g. ViT-B-32")
    open_clip_parser.add_argument("--pretrained", help="a local checkpoint FILE or an open_clip tag (needs internet)")
    open_clip_parser.add_argument("--out", required=True)
    return parser


def run_train(args) -> None:
    from pathlib import Path

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise UserError("--out and --resume name different folders; --resume continues the run in place")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    import importlib

    recipe = importlib.import_module(f".recipes.{args.model}", __package__)
    recipe.train(args.config, run_dir, args.overrides, resume=bool(args.resume))
    hint = SAMPLE_HINTS[args.model].format(run=run_dir)
    _on_main_process(f"model written to {Path(run_dir) / 'final'}; try: {hint}")


def _on_main_process(message: str) -> None:
    from .training.trainer import process_state

    if process_state().is_main_process:
        print(message)


def run_sample(args) -> None:
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
        )
        print("\n---------------\n".join(texts))
    if args.model == "text2img":
        import warnings

        from .recipes.text2img_sample import sample_images

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = sample_images(args.checkpoint, args.prompts, args.out, num_images_per_prompt=args.n,
                                  clip_model=args.clip_model, device=args.device, sampler=args.sampler,
                                  steps=args.steps, guidance_scale=args.guidance, clip_guidance_scale=args.clip_guidance,
                                  eta=args.eta, seed=args.seed)
        for warning in caught:
            print(f"mmgen: warning: {warning.message}", file=sys.stderr)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")


def run_zeroshot(args) -> None:
    from .recipes.clip_eval import zeroshot_files

    class_names = [name.strip() for name in args.classes.split(",")]
    failures = 0
    for path, result in zeroshot_files(args.checkpoint, class_names, args.images, templates=args.templates,
                                       top_k=args.top_k, device=args.device):
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
                       max_samples=args.max_samples, device=args.device)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:16s} {100 * value:6.2f}%")


def run_convert(args) -> None:
    if args.source == "open-clip":
        from .clip.open_clip_interop import convert_open_clip

        convert_open_clip(args.model, args.pretrained, args.out)
        print(f"wrote {args.out}")
    if args.source == "gpt2":
        from .text.hf_gpt2 import convert_gpt2_folder

        convert_gpt2_folder(args.model, args.out)
        print(f"wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmgen` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a one-line argument error
        return exit_request.code if isinstance(exit_request.code, int) else 1
    handlers = {"train": run_train, "sample": run_sample, "zeroshot": run_zeroshot, "eval": run_eval,
                "convert": run_convert}
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
