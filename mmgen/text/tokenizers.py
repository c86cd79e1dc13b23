"""Tokenizers for the language model: characters, or byte-level BPE trained with `tokenizers`."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, UserError

TOKENIZER_FILE = "tokenizer.json"


class CharTokenizer:
    """One token per distinct character of the training corpus (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {char: i for i, char in enumerate(chars)}

    @classmethod
    def train(cls, text: str) -> "CharTokenizer":
        """Vocabulary = the sorted set of characters in `text`."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; a character outside the vocabulary is a UserError naming it."""
        try:
            return [self.index[char] for char in text]
        except KeyError as error:
            raise UserError(f"character {error.args[0]!r} is not in the model's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i] for i in ids)

    def token_id(self, text: str) -> int:
        """The id of a single-token string (such as a stop token)."""
        ids = self.encode(text)
        if len(ids) != 1:
            raise UserError(f"{text!r} is not a single character")
        return ids[0]

    def to_json(self) -> str:
        return json.dumps({"mmgen_tokenizer": "char", "chars": self.chars})


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
        return CharTokenizer(data["chars"])
    from tokenizers import Tokenizer

    try:
        return BPETokenizer(Tokenizer.from_str(path.read_text()))
    except Exception:
        raise CheckpointError(f"corrupt tokenizer file: {path}") from None
