"""Filling in [MASK] tokens with a trained masked LM folder, as `mmgen sample mlm` does."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..hub import load, resolve_model_folder
from ..text.mlm import MaskedLM
from ..text.tokenizers import load_tokenizer

MASK_TOKEN = "[MASK]"


@torch.no_grad()
def fill_masks(checkpoint, text: str, top_k: int = 5, device: str = "cpu") -> list[list[tuple[str, float]]]:
    """For each [MASK] in `text`, in order: its `top_k` most likely tokens with their probabilities."""
    folder = resolve_model_folder(checkpoint)
    model = load(folder)
    if not isinstance(model, MaskedLM):
        raise UserError(f"{folder} holds a {model.model_type!r} model, not a masked language model")
    tokenizer = load_tokenizer(folder)
    try:
        mask_id = tokenizer.token_id(MASK_TOKEN)
    except UserError:
        raise UserError(f"{folder}: the model's tokenizer has no {MASK_TOKEN} token") from None
    ids = tokenizer.encode(text)
    positions = [index for index, token in enumerate(ids) if token == mask_id]
    if not positions:
        raise UserError(f"--text has no {MASK_TOKEN} to fill in")
    if len(ids) > model.config.context_length:
        raise UserError(f"--text is {len(ids)} tokens long; the model reads at most {model.config.context_length}")
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as error:
        raise UserError(f"--device {device}: {str(error).splitlines()[0]}") from None
    probabilities = model(torch.tensor([ids], device=device))[0, positions].float().softmax(dim=-1)
    top = probabilities.topk(min(top_k, probabilities.shape[-1]), dim=-1)
    return [[(tokenizer.decode([token]), probability) for token, probability in zip(tokens, values)]
            for tokens, values in zip(top.indices.tolist(), top.values.tolist())]
