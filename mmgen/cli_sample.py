"""Handlers of the `mmgen` commands that use a trained model: sample (lm, text2img, variations), zeroshot, eval.

Each takes the parsed arguments (mmgen.cli builds the parser) and imports the model code only when called, so
that `mmgen --help` stays fast; a problem the user can fix is a UserError.
"""

from __future__ import annotations

import sys

from .cli_train import check_new_out
from .errors import UserError


def run_sample(args) -> None:
    """`mmgen sample lm | mlm | text2img | variations`."""
    if args.model in ("text2img", "variations"):
        check_new_out(args.out)
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
    if args.model == "mlm":
        from .recipes.mlm_sample import fill_masks

        for number, fills in enumerate(fill_masks(args.checkpoint, args.text, args.top_k, args.device), start=1):
            print(f"[MASK] {number}: " + ", ".join(f"{token!r} {probability:.3f}" for token, probability in fills))
    if args.model == "text2img":
        import warnings

        from .recipes.text2img_sample import sample_images

        interval = _guidance_interval(args)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            paths = sample_images(args.checkpoint, args.prompts, args.out, num_images_per_prompt=args.n,
                                  clip_model=args.clip_model, device=args.device, sampler=args.sampler,
                                  steps=args.steps, guidance_scale=args.guidance, clip_guidance_scale=args.clip_guidance,
                                  clip_rerank=args.clip_rerank, clip_guidance_views=args.clip_views,
                                  guidance_rescale=args.guidance_rescale, guidance_interval=interval,
                                  eta=args.eta, seed=args.seed, adapter=args.adapter, dtype=args.dtype,
                                  negative_prompt=_negative_prompt(args.negative_prompts), height=args.height,
                                  width=args.width)
        _print_warnings(caught)
        print(f"wrote {len(paths)} images and grid.png to {args.out}")


def _unclip_requested(args) -> bool:
    """Whether `sample text2img` goes through the unCLIP pipeline: --decoder given, or --checkpoint a prior."""
    from .recipes.unclip_sample import model_type

    return args.decoder is not None or model_type(args.checkpoint) == "prior"


def _run_unclip_sample(args) -> None:
    """`sample variations`, and `sample text2img` with a prior and its decoder."""
    import warnings

    from .recipes.unclip_sample import sample_unclip_images, sample_variations

    options = dict(sampler=args.sampler, steps=args.steps, guidance_scale=args.guidance,
                   guidance_interval=_guidance_interval(args), eta=args.eta, seed=args.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if args.model == "variations":
            paths = sample_variations(args.checkpoint, args.images, args.out, num_variations=args.n,
                                      device=args.device, **options)
        else:
            if args.decoder is None:
                raise UserError(f"{args.checkpoint} holds an unCLIP prior: name its decoder with --decoder DECODER_RUN")
            unsupported = [flag for flag, value in (("--clip-guidance", args.clip_guidance),
                                                    ("--clip-rerank", args.clip_rerank),
                                                    ("--clip-views", args.clip_views),
                                                    ("--clip-model", args.clip_model), ("--adapter", args.adapter),
                                                    ("--guidance-rescale", args.guidance_rescale),
                                                    ("--negative-prompt", args.negative_prompts),
                                                    ("--height", args.height), ("--width", args.width),
                                                    ("--dtype", args.dtype != "fp32"))
                           if value]
            if unsupported:
                raise UserError(f"{unsupported[0]} is not supported with an unCLIP prior and decoder")
            paths = sample_unclip_images(args.checkpoint, args.decoder, args.prompts, args.out,
                                         num_images_per_prompt=args.n, device=args.device,
                                         prior_steps=args.prior_steps, prior_guidance_scale=args.prior_guidance,
                                         **options)
    _print_warnings(caught)
    print(f"wrote {len(paths)} images and grid.png to {args.out}")


def _guidance_interval(args) -> tuple[int, int] | None:
    """--guidance-interval as (t_low, t_high), None when not given (or not a flag of the command)."""
    interval = getattr(args, "guidance_interval", None)
    if not interval:
        return None
    if interval[0] > interval[1]:
        raise UserError(f"--guidance-interval needs T_LOW <= T_HIGH, got {interval[0]} {interval[1]}")
    return tuple(interval)


def _negative_prompt(negative_prompts: list[str] | None) -> str | list[str] | None:
    """--negative-prompt given once: every prompt's; given once per --prompt: each its own."""
    if negative_prompts is not None and len(negative_prompts) == 1:
        return negative_prompts[0]
    return negative_prompts


def _print_warnings(caught) -> None:
    """The warnings a sampler raised, one `mmgen: warning:` line each on stderr."""
    for warning in caught:
        print(f"mmgen: warning: {warning.message}", file=sys.stderr)


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
    """`mmgen zeroshot`: the top classes of each image; unreadable images are reported and make the exit code 1."""
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
    """`mmgen eval clip`: zero-shot accuracy and retrieval recall, as a table or one JSON object."""
    import json

    from .recipes.clip_eval import evaluate

    metrics = evaluate(args.checkpoint, zeroshot=args.zeroshot_dir, retrieval=args.retrieval, templates=args.templates,
                       max_samples=args.max_samples, device=args.device, adapter=args.adapter)
    if args.json:
        print(json.dumps(metrics))
    else:
        for name, value in metrics.items():
            print(f"{name:16s} {100 * value:6.2f}%")
