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


def build_parser() -> argparse.ArgumentParser:
    """The full `mmgen` argument parser."""
    parser = _Parser(prog="mmgen", description="Train and sample multimodal generative models.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a model from a recipe config", epilog=EPILOG)
    train_models = train.add_subparsers(dest="model", required=True, parser_class=_Parser)
    lm = train_models.add_parser("lm", help="GPT language model (configs/lm-*.yaml)", epilog=EPILOG)
    _add_train_arguments(lm)

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

    convert = commands.add_parser("convert", help="convert models from other libraries")
    convert_from = convert.add_subparsers(dest="source", required=True, parser_class=_Parser)
    gpt2 = convert_from.add_parser("gpt2", help="a transformers GPT-2 folder -> mmgen GPT folder")
    gpt2.add_argument("--model", required=True, help="folder written by GPT2LMHeadModel.save_pretrained")
    gpt2.add_argument("--out", required=True)
    return parser


def run_train(args) -> None:
    from pathlib import Path

    if args.resume and args.out and Path(args.out) != Path(args.resume):
        raise UserError("--out and --resume name different folders; --resume continues the run in place")
    run_dir = args.resume or args.out
    if run_dir is None:
        raise UserError("--out RUN_DIR is required (or --resume RUN_DIR)")
    if args.model == "lm":
        from .recipes import lm

        lm.train(args.config, run_dir, args.overrides, resume=bool(args.resume))
        _on_main_process(f"model written to {Path(run_dir) / 'final'}; try: mmgen sample lm --checkpoint {run_dir}")


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


def run_convert(args) -> None:
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
    handlers = {"train": run_train, "sample": run_sample, "convert": run_convert}
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
