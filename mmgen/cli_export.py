"""Handlers of `mmgen export`: an mmgen model or adapter -> another library's folder format.

Each imports the model code only when called, so that `mmgen --help` stays fast.
"""

from __future__ import annotations

from .cli_train import check_new_out


def run_export(args) -> None:
    """`mmgen export open-clip | peft | stable-diffusion | diffusers-lora`."""
    check_new_out(args.out)
    if args.target == "open-clip":
        from .clip.model import CLIP
        from .clip.open_clip_interop import export_open_clip
        from .hub import load_as

        export_open_clip(load_as(args.checkpoint, CLIP), args.out)
        print(f"wrote {args.out}: open_clip.create_model_and_transforms('local-dir:{args.out}') loads it")
    if args.target == "peft":
        from .finetune.peft_export import export_peft

        export_peft(args.adapter, args.out)
        print(f"wrote {args.out}: peft.PeftModel.from_pretrained(base, '{args.out}') puts it on its mmgen base")
    if args.target == "stable-diffusion":
        from .diffusion.stable_diffusion import to_stable_diffusion
        from .diffusion.text2img import TextToImage
        from .hub import load_as

        to_stable_diffusion(load_as(args.checkpoint, TextToImage), args.out)
        print(f"wrote {args.out}: diffusers.StableDiffusionPipeline.from_pretrained('{args.out}') loads it")
    if args.target == "diffusers-lora":
        from .finetune.diffusers_lora import export_diffusers_lora

        export_diffusers_lora(args.adapter, args.out)
        print(f"wrote {args.out}: StableDiffusionPipeline.load_lora_weights('{args.out}') puts it on the SD base")
