"""transformers' BertForMaskedLM / DistilBertForMaskedLM <-> mmgen's MaskedLM: same logits both ways (1e-4), and
`mmgen convert bert` on saved folders."""

import json

import pytest
import torch

import mmgen
from mmgen.errors import UserError
from mmgen.text.hf_bert import from_hf, to_hf
from mmgen.text.mlm import MaskedLM, MLMConfig
from tests.test_cli import one_line_error, run_cli

VOCAB = 50


def random_hf(kind: str, activation: str = "gelu"):
    """A random-init transformers masked LM whose norms and biases are moved off their init."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    torch.manual_seed(0)
    if kind == "bert":
        model = BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, intermediate_size=48, hidden_act=activation,
                                           max_position_embeddings=24, type_vocab_size=2))
    else:
        model = DistilBertForMaskedLM(DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4,
                                                       hidden_dim=48, activation=activation,
                                                       max_position_embeddings=24))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def batch():
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (3, 20))
    padding = torch.zeros(3, 20, dtype=torch.bool)
    padding[1, 13:] = True
    padding[2, 7:] = True
    return tokens, padding


def hf_logits(model, tokens, padding, token_types=None):
    options = {} if token_types is None else {"token_type_ids": token_types}
    return model(input_ids=tokens, attention_mask=(~padding).long(), **options).logits


@pytest.mark.parametrize("kind,activation", [("bert", "gelu"), ("bert", "gelu_new"), ("distilbert", "gelu")])
def test_transformers_to_mmgen_and_back_give_the_same_logits(kind, activation):
    reference = random_hf(kind, activation)
    tokens, padding = batch()
    real = ~padding
    model = from_hf(reference)
    assert isinstance(model, MaskedLM) and not model.training
    expected = hf_logits(reference, tokens, padding)
    assert (model(tokens, padding_mask=padding) - expected)[real].abs().max() < 1e-4
    back = to_hf(model)
    assert type(back) is type(reference)
    assert (hf_logits(back, tokens, padding) - expected)[real].abs().max() < 1e-4


def test_bert_token_types_match():
    reference = random_hf("bert")
    tokens, padding = batch()
    token_types = (torch.arange(20) >= 6).long().expand(3, 20)
    model = from_hf(reference)
    difference = model(tokens, padding_mask=padding, token_types=token_types) - hf_logits(reference, tokens, padding,
                                                                                          token_types)
    assert difference[~padding].abs().max() < 1e-4


def test_mmgen_model_exports_to_transformers():
    torch.manual_seed(2)
    model = MaskedLM(MLMConfig(vocab_size=VOCAB, context_length=24, num_layers=2, num_heads=4, dim=32,
                               norm_position="post", norm_eps=1e-12, type_vocab_size=2)).eval()
    tokens, padding = batch()
    difference = hf_logits(to_hf(model), tokens, padding) - model(tokens, padding_mask=padding)
    assert difference[~padding].abs().max() < 1e-4
    with pytest.raises(UserError, match="norm_position must be 'post'"):
        to_hf(MaskedLM(MLMConfig(vocab_size=VOCAB, context_length=24, num_layers=1, num_heads=4, dim=32)))


def test_convert_bert_cli_writes_a_loadable_folder(tmp_path, capsys):
    reference = random_hf("distilbert")
    reference.save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # transformers' progress bars
    (tmp_path / "hf" / "tokenizer.json").write_text(json.dumps({"stand-in": True}))
    code, out, err = run_cli(["convert", "bert", "--model", tmp_path / "hf", "--out", tmp_path / "ours"], capsys)
    assert code == 0, err
    model = mmgen.load(tmp_path / "ours")
    tokens, padding = batch()
    difference = model(tokens, padding_mask=padding) - hf_logits(reference, tokens, padding)
    assert difference[~padding].abs().max() < 1e-4
    assert json.loads((tmp_path / "ours" / "tokenizer.json").read_text()) == {"stand-in": True}


def test_convert_bert_refuses_what_it_cannot_read(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["convert", "bert", "--model", tmp_path / "empty", "--out", tmp_path / "a"], capsys)
    one_line_error(code, err, 1, "no config.json")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    code, _, err = run_cli(["convert", "bert", "--model", tmp_path / "gpt2", "--out", tmp_path / "b"], capsys)
    one_line_error(code, err, 1, "not BERT or DistilBERT")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
