"""CLIPTokenizer: same ids as open_clip, truncation keeps end-of-text, empty captions refused."""

import open_clip
import pytest
import torch

from mmgen.clip import CLIPTokenizer
from mmgen.errors import UserError

CAPTIONS = ["a photo of a cat", "Two DOGS playing in the snow!", "an astronaut riding a horse, 4k &amp; detailed"]


def test_ids_equal_open_clip_tokenize_and_get_tokenizer():
    tokenizer = CLIPTokenizer()
    ids = tokenizer(CAPTIONS)
    assert ids.shape == (3, 77) and ids.dtype == torch.long
    assert torch.equal(ids, open_clip.tokenize(CAPTIONS))
    assert torch.equal(ids, open_clip.get_tokenizer("ViT-B-32")(CAPTIONS))
    assert (tokenizer.vocab_size, tokenizer.sot_token_id, tokenizer.eot_token_id) == (49408, 49406, 49407)
    assert torch.equal(ids[:, 0], torch.full((3,), 49406))
    assert torch.equal(ids.argmax(dim=-1), (ids == 49407).int().argmax(dim=-1))  # end of text has the largest id


def test_truncation_keeps_end_of_text_last():
    tokenizer = CLIPTokenizer(context_length=8)
    long_caption = "one two three four five six seven eight nine ten"
    ids = tokenizer([long_caption, "a cat"])
    assert ids.shape == (2, 8)
    assert ids[0, -1] == tokenizer.eot_token_id and ids[0, 0] == tokenizer.sot_token_id
    assert torch.equal(ids[0, 1:-1], torch.tensor(tokenizer.encode(long_caption)[:6]))
    assert torch.equal(ids, open_clip.tokenize([long_caption, "a cat"], context_length=8))
    assert ids[1, 3] == tokenizer.eot_token_id and torch.count_nonzero(ids[1, 4:]) == 0


def test_decode_inverts_encoding_up_to_end_of_text():
    tokenizer = CLIPTokenizer(context_length=16)
    assert tokenizer.decode(tokenizer(["A photo of a cat!"])[0]) == "a photo of a cat !"


@pytest.mark.parametrize("caption", ["", "   \n\t "])
def test_empty_captions_are_user_errors(caption):
    with pytest.raises(UserError, match="empty caption"):
        CLIPTokenizer()(["a dog", caption])
