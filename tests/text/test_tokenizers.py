"""Character and BPE tokenizers."""

import pytest

from mmgen.errors import CheckpointError, UserError
from mmgen.text import BPETokenizer, CharTokenizer, load_tokenizer
from tests.conftest import make_corpus


def test_char_tokenizer_round_trip_and_unknown_character(tmp_path):
    tokenizer = CharTokenizer.train("hello world")
    assert tokenizer.vocab_size == len(set("hello world"))
    assert tokenizer.decode(tokenizer.encode("low hero")) == "low hero"
    with pytest.raises(UserError, match="'Z' is not in the model's vocabulary"):
        tokenizer.encode("heZ")
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    assert load_tokenizer(tmp_path).chars == tokenizer.chars


def test_bpe_tokenizer_trains_on_corpus_and_round_trips(tmp_path):
    text = make_corpus(30000)
    tokenizer = BPETokenizer.train(text, vocab_size=300)
    assert 257 <= tokenizer.vocab_size <= 300
    sample = "KING:\nGood night, sweet queen — ünïcode too."
    assert tokenizer.decode(tokenizer.encode(sample)) == sample
    assert len(tokenizer.encode("the king")) < len("the king")  # merges were learned
    (tmp_path / "tokenizer.json").write_text(tokenizer.to_json())
    reloaded = load_tokenizer(tmp_path)
    assert reloaded.encode(sample) == tokenizer.encode(sample)
    assert tokenizer.token_id("<|endoftext|>") == 0


def test_corrupt_or_missing_tokenizer_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing file"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt tokenizer"):
        load_tokenizer(tmp_path)
