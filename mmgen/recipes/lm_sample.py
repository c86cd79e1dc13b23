"""Sampling text from a trained GPT folder, as `mmgen sample lm` does."""

from __future__ import annotations

import torch

from ..data.instructions import render_prompt
from ..errors import UserError
from ..hub import load, resolve_model_folder
from ..text.generate import generate
from ..text.gpt import GPT
from ..text.tokenizers import load_tokenizer


def sample_text(
    checkpoint,
    prompt: str,
    *,
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: int | None = None,
    top_p: float | None = None,
    stop: str | None = None,
    num_samples: int = 1,
    seed: int = 0,
    device: str = "cpu",
    adapter=None,
    template: str | None = None,
) -> list[str]:
    """`num_samples` continuations of `prompt` (prompt included), reproducible for a given seed.

    `adapter`: a LoRA adapter folder (or adapter run) put on the checkpoint; `template`: an instruction-tuning
    prompt template whose {instruction} becomes `prompt` (as `mmgen finetune lm` rendered its training pairs)."""
    if not prompt:
        raise UserError("empty prompt: give at least one character (the default is a newline)")
    if template is not None:
        prompt = render_prompt(template, prompt)
    folder = resolve_model_folder(checkpoint)
    model = load(folder)
    if not isinstance(model, GPT):
        raise UserError(f"{folder} holds a {model.model_type!r} model, not a language model")
    if adapter is not None:
        from ..finetune import load_adapter

        load_adapter(model, adapter)
    tokenizer = load_tokenizer(folder)
    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens")
    stop_token = tokenizer.token_id(stop) if stop else None
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: {str(error).splitlines()[0]}") from None
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=device)
    output = generate(
        model,
        tokens,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_token=stop_token,
        generator=generator,
        progress=True,
    )
    texts = []
    for row in output.tolist():
        if stop_token is not None and stop_token in row[len(prompt_ids):]:
            row = row[: row.index(stop_token, len(prompt_ids)) + 1]
        texts.append(tokenizer.decode(row))
    return texts
