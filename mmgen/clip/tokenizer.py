"""CLIP's byte-level BPE tokenizer: open_clip's SimpleTokenizer (its vocabulary ships with open-clip-torch)."""

from __future__ import annotations

from functools import lru_cache

import torch

from ..errors import UserError

CACHE_SIZE = 1 << 16  # captions whose ids a tokenizer remembers (datasets with repeated captions tokenize once)


@lru_cache(maxsize=1)
def _simple_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()  # reads the BPE merges once per process


class CLIPTokenizer:
    """Captions -> (batch, context_length) token ids: start, BPE tokens, end of text, zero padding."""

    def __init__(self, context_length: int = 77):
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2 (start and end of text), got {context_length}")
        self.context_length = context_length
        self._bpe = _simple_tokenizer()
        self._cache: dict[str, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return self._bpe.vocab_size

    @property
    def sot_token_id(self) -> int:
        return self._bpe.sot_token_id

    @property
    def eot_token_id(self) -> int:
        return self._bpe.eot_token_id

    def encode(self, text: str) -> list[int]:
        """BPE ids of one caption (lower-cased, cleaned), without start/end tokens; empty captions are a UserError."""
        ids = self._bpe.encode(text) if isinstance(text, str) and text.strip() else []
        if not ids:
            raise UserError(f"empty caption {text!r}: every caption needs some text")
        return ids

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        """Token ids (batch, context_length); a long caption is cut so that end-of-text stays the last token."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self._padded_ids(text) for text in texts]
        return torch.tensor(rows, dtype=torch.long) if rows else torch.zeros(0, self.context_length, dtype=torch.long)

    def _padded_ids(self, text: str) -> list[int]:
        """start, ids (cut to fit), end of text, zeros up to context_length; remembered per caption."""
        ids = self._cache.get(text) if isinstance(text, str) else None
        if ids is None:
            ids = [self.sot_token_id, *self.encode(text)[: self.context_length - 2], self.eot_token_id]
            ids += [0] * (self.context_length - len(ids))
            if len(self._cache) < CACHE_SIZE:
                self._cache[text] = ids
        return ids

    def decode(self, ids) -> str:
        """Text of token ids up to the first end-of-text (padding id 0 is also "!", so it cannot be skipped by id)."""
        ids = [int(i) for i in ids]
        if self.eot_token_id in ids:
            ids = ids[: ids.index(self.eot_token_id)]
        return self._bpe.decode([i for i in ids if i != self.sot_token_id]).strip()
