"""The `mmgen` command: train, finetune, sample, convert, export. Errors a user can cause are one line and a non-zero
exit.

This module builds the parser and dispatches to a handler: mmgen/cli_train.py for the commands that write a model
folder, mmgen/cli_sample.py for those that use one, mmgen/cli_export.py for `export`; `mmgen train/finetune NAME`
come from the recipe table in mmgen/commands.py. Nothing imported here imports torch, so `mmgen --help` is fast.
"""

from __future__ import annotations

import argparse
import sys

from .cli_data import add_split_command
from .cli_estimate import add_estimate_command
from .cli_export import run_export
from .cli_sample import run_eval, run_sample, run_zeroshot
from .cli_train import run_convert, run_finetune, run_merge_lora, run_quickstart, run_train
from .cli_types import integer, non_negative_float, non_negative_int, positive_int, probability, unit_float
from .commands import recipes
from .errors import UserError

EPILOG = "Config overrides are dotted.key=value pairs, e.g. train.max_steps=500 model.dropout=0.1"
FINETUNE_EPILOG = (EPILOG + ". The config's method is full, lora or qlora; lora/qlora runs save adapter folders "
                   "(RUN_DIR/final) used as --adapter RUN_DIR beside --checkpoint BASE, or merged by mmgen merge-lora.")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2) instead of a usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class _SamplerKinds:
    """The --sampler choices: the kinds of mmgen.diffusion.samplers.SAMPLERS, read when first needed (that module
    imports torch, which building the parser must not)."""

    def __iter__(self):
        from .diffusion.samplers import SAMPLERS

        return iter(SAMPLERS)

    def __contains__(self, kind) -> bool:
        return kind in list(self)


# Arguments several commands share, each defined once.

def _add_checkpoint(parser: argparse.ArgumentParser, help: str = "RUN_DIR, RUN_DIR/final or a model folder") -> None:
    parser.add_argument("--checkpoint", required=True, help=help)


def _add_adapter(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder or adapter run to put on the checkpoint")


def _add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps ...")


def _add_seed(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=integer, default=0)


def _add_new_out(parser: argparse.ArgumentParser, help: str | None = None) -> None:
    parser.add_argument("--out", required=True, help=help)


def _add_templates(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", action="append", dest="templates", help="prompt template with {} (repeatable)")


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (configs/*.yaml)")
    parser.add_argument("--out", help="run folder to create (RUN_DIR)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")


def _add_diffusion_sampling(parser: argparse.ArgumentParser, n_help: str) -> None:
    """The sampler options, --seed, --out and --device of `sample text2img` and `sample variations`."""
    parser.add_argument("--n", type=positive_int, default=4, help=n_help)
    parser.add_argument("--sampler", choices=_SamplerKinds(), metavar="KIND",
                        help="%(choices)s (dpm++: DPM-Solver++(2M), good in 20-25 steps; default: the model's own, "
                             "stored by its training run; else ddim)")
    parser.add_argument("--steps", type=positive_int, help="sampling steps (default: the model's own; else 50)")
    parser.add_argument("--guidance", type=non_negative_float,
                        help="classifier-free guidance (default: the model's own, stored by its training run; else 3)")
    parser.add_argument("--eta", type=non_negative_float, default=0.0, help="DDIM noise (0: deterministic)")
    _add_seed(parser)
    _add_new_out(parser, help="new folder for grid.png and one PNG per image")
    _add_device(parser)


def build_parser() -> argparse.ArgumentParser:
    """The full `mmgen` argument parser; each command's parser names its handler (args.run)."""
    parser = _Parser(prog="mmgen", description="Train and sample multimodal generative models.", epilog=EPILOG)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_recipe_commands(commands)
    _add_merge_lora(commands)
    _add_sample(commands)
    _add_clip_commands(commands)
    _add_quickstart(commands)
    _add_convert(commands)
    _add_export(commands)
    add_estimate_command(commands)
    add_split_command(commands)
    return parser


def _add_recipe_commands(commands) -> None:
    """`mmgen train NAME` and `mmgen finetune NAME`: one sub-command per recipe of mmgen.commands.RECIPES."""
    groups = (("train", "train a model from a recipe config", EPILOG, run_train),
              ("finetune", "adapt a trained model: full, LoRA or QLoRA fine-tuning", FINETUNE_EPILOG, run_finetune))
    for group, help_text, epilog, handler in groups:
        group_parser = commands.add_parser(group, help=help_text, epilog=epilog)
        group_parser.set_defaults(run=handler)
        models = group_parser.add_subparsers(dest="model", required=True, parser_class=_Parser)
        for recipe in recipes(group):
            recipe_parser = models.add_parser(recipe.name, help=recipe.help, epilog=epilog)
            if group == "finetune":
                recipe_parser.add_argument("--base", metavar="CHECKPOINT", help="the model to adapt: RUN_DIR or a "
                                           "model folder (sets the config's base; a resumed run knows its own)")
            _add_train_arguments(recipe_parser)


def _add_merge_lora(commands) -> None:
    merge = commands.add_parser("merge-lora", help="fold a LoRA adapter into its base and write a full model folder")
    merge.set_defaults(run=run_merge_lora)
    merge.add_argument("--adapter", required=True, help="adapter folder or adapter run (RUN_DIR)")
    merge.add_argument("--base", metavar="CHECKPOINT", help="the base model (default: the one the adapter records)")
    _add_new_out(merge, help="new folder for the merged model")


def _add_sample(commands) -> None:
    sample = commands.add_parser("sample", help="generate from a trained model")
    sample.set_defaults(run=run_sample)
    sample_models = sample.add_subparsers(dest="model", required=True, parser_class=_Parser)

    sample_lm = sample_models.add_parser("lm", help="generate text from a GPT checkpoint")
    _add_checkpoint(sample_lm)
    sample_lm.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    sample_lm.add_argument("--max-new-tokens", type=positive_int, default=500)
    sample_lm.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    sample_lm.add_argument("--top-k", type=positive_int, default=None)
    sample_lm.add_argument("--top-p", type=probability, default=None)
    sample_lm.add_argument("--stop", default=None, help="stop after this token (e.g. a character)")
    sample_lm.add_argument("--num-samples", type=positive_int, default=1)
    _add_seed(sample_lm)
    _add_device(sample_lm)
    _add_adapter(sample_lm)
    template = sample_lm.add_mutually_exclusive_group()
    template.add_argument("--template", help="instruction prompt template with {instruction} (where --prompt goes); "
                          "\\n in TEXT is a newline")
    template.add_argument("--template-file", metavar="FILE", help="the template read from a file, as it is")

    sample_mlm = sample_models.add_parser("mlm", help="fill in [MASK] tokens with a masked language model")
    _add_checkpoint(sample_mlm)
    sample_mlm.add_argument("--text", required=True, help='text with one or more [MASK], e.g. "To be, or not to [MASK]"')
    sample_mlm.add_argument("--top-k", type=positive_int, default=5, help="fills to show per [MASK]")
    _add_device(sample_mlm)

    text2img = sample_models.add_parser("text2img", help="generate images from a text-to-image diffusion run")
    _add_checkpoint(text2img)
    text2img.add_argument("--prompt", action="append", required=True, dest="prompts", metavar="TEXT",
                          help='text to draw (repeatable); "" samples unconditionally')
    _add_diffusion_sampling(text2img, n_help="images per prompt")
    text2img.add_argument("--guidance-rescale", type=unit_float, default=0.0,
                          help="rescale the guided prediction towards the conditional one's std (0..1, diffusers' "
                               "guidance_rescale)")
    text2img.add_argument("--guidance-interval", type=non_negative_int, nargs=2, metavar=("T_LOW", "T_HIGH"),
                          help="apply classifier-free guidance only at timesteps T_LOW..T_HIGH (default: the "
                               "model's stored interval, if any; else every step)")
    text2img.add_argument("--clip-guidance", type=non_negative_float,
                          help="CLIP guidance scale (default: the model's stored one, config.json's "
                               "clip_guidance_scale; 0: none)")
    text2img.add_argument("--clip-views", type=positive_int, metavar="N",
                          help="shifted copies of each estimate CLIP guidance scores (default: the model's stored "
                               "clip_guidance_views)")
    text2img.add_argument("--clip-rerank", type=positive_int, metavar="K",
                          help="draw K candidates per image and keep the one CLIP matches best to its prompt (default: "
                               "the model's stored one, config.json's clip_rerank; 1: none)")
    text2img.add_argument("--clip-model", help="CLIP folder for --clip-guidance (default: the text encoder)")
    text2img.add_argument("--negative-prompt", action="append", dest="negative_prompts", metavar="TEXT",
                          help="what guidance steers away from, in place of the empty prompt: one for all prompts, or "
                               "one per --prompt (repeatable)")
    text2img.add_argument("--height", type=positive_int, help="image height (default: the model's image size; a "
                          "multiple of its downsampling, e.g. 64 for SD)")
    text2img.add_argument("--width", type=positive_int, help="image width (as --height)")
    text2img.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                          help="precision the model samples in (its weights are cast; the sampler stays fp32)")
    _add_adapter(text2img)
    text2img.add_argument("--decoder", metavar="DECODER_RUN", help="unCLIP: --checkpoint is a prior run, this its "
                          "decoder (run or model folder); --sampler, --steps, --guidance, --guidance-interval, --eta are the "
                          "decoder's")
    text2img.add_argument("--prior-steps", type=positive_int, default=64, help="unCLIP: the prior's DDIM steps")
    text2img.add_argument("--prior-guidance", type=non_negative_float, default=2.0,
                          help="unCLIP: the prior's classifier-free guidance")

    variations = sample_models.add_parser("variations", help="unCLIP image variations: decode the CLIP image "
                                          "embeddings of images with a decoder run")
    _add_checkpoint(variations, help="decoder RUN_DIR, RUN_DIR/final or a model folder")
    _add_diffusion_sampling(variations, n_help="variations per image")
    variations.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")


def _add_clip_commands(commands) -> None:
    """`mmgen zeroshot` and `mmgen eval clip`."""
    zeroshot = commands.add_parser("zeroshot", help="zero-shot classify images with a CLIP checkpoint")
    zeroshot.set_defaults(run=run_zeroshot)
    _add_checkpoint(zeroshot, help="CLIP RUN_DIR or model folder")
    zeroshot.add_argument("--classes", required=True, help='comma-separated class names, e.g. "cat,dog,red circle"')
    _add_templates(zeroshot)
    zeroshot.add_argument("--top-k", type=positive_int, default=5)
    _add_device(zeroshot)
    _add_adapter(zeroshot)
    zeroshot.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")

    evaluate = commands.add_parser("eval", help="evaluate a trained model")
    evaluate.set_defaults(run=run_eval)
    evaluate_models = evaluate.add_subparsers(dest="model", required=True, parser_class=_Parser)
    evaluate_clip = evaluate_models.add_parser("clip", help="zero-shot accuracy and retrieval recall of a CLIP")
    _add_checkpoint(evaluate_clip, help="CLIP RUN_DIR or model folder")
    evaluate_clip.add_argument("--zeroshot-dir", help="labelled image folder (one sub-folder per class), or 'shapes' "
                               "('shapes:extra=heart' adds an extra shape's classes)")
    evaluate_clip.add_argument("--retrieval", help="caption table / shards / 'shapes:val' for image<->text recall")
    _add_templates(evaluate_clip)
    evaluate_clip.add_argument("--max-samples", type=positive_int, default=5000)
    evaluate_clip.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device(evaluate_clip)
    _add_adapter(evaluate_clip)


def _add_quickstart(commands) -> None:
    quickstart = commands.add_parser(
        "quickstart", help="train a small CLIP and text-to-image model on built-in shapes and sample them (~15 min CPU)",
        epilog="Overrides, e.g. --clip train.max_steps=300 --diffusion train.max_steps=500, go to the two recipes "
               "(mmgen/recipes/presets/quickstart-*.yaml).")
    quickstart.set_defaults(run=run_quickstart)
    quickstart.add_argument("--out", default="runs/quickstart", help="new folder for both runs and the samples")
    quickstart.add_argument("--clip", action="append", default=[], dest="clip_overrides", metavar="key=value",
                            help="override of the CLIP recipe (repeatable)")
    quickstart.add_argument("--diffusion", action="append", default=[], dest="diffusion_overrides",
                            metavar="key=value", help="override of the diffusion recipe (repeatable)")
    quickstart.add_argument("--prompts", type=positive_int, default=6, help="held-out prompts to sample")
    quickstart.add_argument("--n", type=positive_int, default=4, help="images per prompt")


def _add_convert(commands) -> None:
    convert = commands.add_parser("convert", help="convert models from other libraries")
    convert.set_defaults(run=run_convert)
    convert_from = convert.add_subparsers(dest="source", required=True, parser_class=_Parser)
    sources = (
        ("gpt2", "a transformers GPT-2 folder -> mmgen GPT folder",
         "folder written by GPT2LMHeadModel.save_pretrained"),
        ("bert", "a transformers BERT / DistilBERT masked-LM folder -> mmgen masked-LM folder",
         "folder written by BertForMaskedLM or DistilBertForMaskedLM.save_pretrained"),
        ("open-clip", "an open_clip model -> mmgen CLIP folder", "open_clip model name, e.g. ViT-B-32"),
        ("diffusers-vae", "a diffusers AutoencoderKL folder -> mmgen VAE folder",
         "folder written by AutoencoderKL.save_pretrained (or a pipeline folder with vae/)"),
        ("hf-clip", "a transformers CLIPModel / CLIPTextModel folder -> mmgen CLIP folder",
         "folder written by CLIPModel.save_pretrained (or a Stable Diffusion folder with text_encoder/)"),
        ("stable-diffusion", "a diffusers Stable Diffusion 1.x / 2.x folder -> mmgen text2img folder",
         "local diffusers folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"),
    )
    for source, help_text, model_help in sources:
        source_parser = convert_from.add_parser(source, help=help_text)
        source_parser.add_argument("--model", required=True, help=model_help)
        if source == "open-clip":
            source_parser.add_argument("--pretrained",
                                       help="a local checkpoint FILE or an open_clip tag (needs internet)")
        _add_new_out(source_parser)


def _add_export(commands) -> None:
    export = commands.add_parser("export", help="write mmgen models in other libraries' formats")
    export.set_defaults(run=run_export)
    export_to = export.add_subparsers(dest="target", required=True, parser_class=_Parser)
    open_clip = export_to.add_parser("open-clip", help="an mmgen CLIP -> open_clip local-dir folder "
                                     "(open_clip_config.json + open_clip_model.safetensors)")
    _add_checkpoint(open_clip, help="CLIP RUN_DIR, RUN_DIR/final or model folder")
    _add_new_out(open_clip, help="new folder; open_clip loads it as local-dir:OUT")
    peft = export_to.add_parser("peft", help="an mmgen LoRA adapter -> peft adapter folder (adapter_config.json + "
                                "adapter_model.safetensors) for PeftModel.from_pretrained on the mmgen base")
    peft.add_argument("--adapter", required=True, help="adapter folder or adapter run (RUN_DIR)")
    _add_new_out(peft, help="new folder for the peft adapter")
    diffusers = export_to.add_parser("stable-diffusion", help="an mmgen latent text2img model in SD's layout -> "
                                     "diffusers StableDiffusionPipeline folder")
    _add_checkpoint(diffusers, help="text2img RUN_DIR, RUN_DIR/final or model folder")
    _add_new_out(diffusers, help="new folder; StableDiffusionPipeline.from_pretrained(OUT) loads it")
    lora = export_to.add_parser("diffusers-lora", help="an mmgen LoRA adapter of a text2img model in SD's layout -> "
                                "diffusers LoRA folder (pytorch_lora_weights.safetensors) for load_lora_weights")
    lora.add_argument("--adapter", required=True, help="adapter folder or adapter run (RUN_DIR)")
    _add_new_out(lora, help="new folder; StableDiffusionPipeline.load_lora_weights(OUT) loads it")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `mmgen` console script."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:  # --help, or a one-line argument error
        return exit_request.code if isinstance(exit_request.code, int) else 1
    try:
        args.run(args)
    except UserError as error:
        print(f"mmgen: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("mmgen: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
