"""Tokenizers for the language model: characters, or byte-level BPE trained with `tokenizers`."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import CheckpointError, UserError

TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
    """One token per distinct character of the training corpus (nanoGPT's shakespeare_char).

    `specials` (such as "[MASK]" for a masked LM) are whole tokens after the characters; in text they are written
    out and encode to their one id."""

    kind = "char"

    def __init__(self, chars: str, specials: tuple[str, ...] = ()):
        self.chars = chars
        self.specials = tuple(specials)
        self.index = {char: i for i, char in enumerate(chars)}
        self.special_index = {special: len(chars) + i for i, special in enumerate(self.specials)}
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if specials else None

    @classmethod
    def train(cls, text: str, specials: tuple[str, ...] = ()) -> "CharTokenizer":
        """Vocabulary = the sorted set of characters in `text`, then `specials`."""
        return cls("".join(sorted(set(text))), specials)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + len(self.specials)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a character outside the vocabulary is a UserError naming it."""
        parts = self._special_pattern.split(text) if self._special_pattern else [text]
        try:
            return [id for i, part in enumerate(parts)
                    for id in ([self.special_index[part]] if i % 2 else [self.index[char] for char in part])]
        except KeyError as error:
            raise UserError(f"character {error.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] if i < len(self.chars) else self.specials[i - len(self.chars)] for i in ids)

    def token_id(self, text: str) -> int:
        """The id of a single-token string (such as a stop token)."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise UserError(f"{text!r} is not a single character")
        return ids[0]

    def to_json(self) -> str:
        data = {"mmgen_tokenizer": "char", "chars": self.chars}
        if self.specials:
            data["specials"] = list(self.specials)
        return json.dumps(data)


class BPETokenizer:
    """Byte-level BPE (GPT-2 style) trained on the user's corpus with the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int, special_tokens: tuple[str, ...] = ("<|endoftext|>",)) -> "BPETokenizer":
        """Learn merges from `text` until the vocabulary has `vocab_size` entries."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        chunk = 1 << 16
        tokenizer.train_from_iterator((text[i : i + chunk] for i in range(0, len(text), chunk)), trainer=trainer)
        return cls(tokenizer)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    def token_id(self, text: str) -> int:
        """The id of a special or single token."""
        token = self.tokenizer.token_to_id(text)
        if token is None:
            ids = self.encode(text)
            if len(ids) != 1:
                raise UserError(f"{text!r} is not a single token of this tokenizer")
            token = ids[0]
        return token

    def to_json(self) -> str:
        return self.tokenizer.to_str()


def load_tokenizer(folder: str | Path) -> CharTokenizer | BPETokenizer:
    """Read the tokenizer.json saved beside a model."""
    path = Path(folder) / TOKENIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"corrupt tokenizer file: {path}") from None
    if isinstance(data, dict) and data.get("mmgen_tokenizer") == "char" and isinstance(data.get("chars"), str):
        specials = data.get("specials", [])
        if not isinstance(specials, list) or not all(isinstance(item, str) and item for item in specials):
            raise CheckpointError(f"corrupt tokenizer file: {path}")
        return CharTokenizer(data["chars"], tuple(specials))
    from tokenizers import Tokenizer

    try:
        return BPETokenizer(Tokenizer.from_str(path.read_text()))
    except Exception:
        raise CheckpointError(f"corrupt tokenizer file: {path}") from None
