"""GPT: transformers GPT-2 as the oracle, KV-cache decoding, generation controls, save/load."""

import pytest
import torch

import mmgen
from mmgen.errors import UserError
from mmgen.text import GPT, GPTConfig, filter_logits, generate
from mmgen.text.hf_gpt2 import from_gpt2, to_gpt2


def small_config(**changes):
    options = dict(vocab_size=61, context_length=24, num_layers=3, num_heads=4, dim=32, mlp="gelu_tanh")
    options.update(changes)
    return GPTConfig(**options)


@pytest.fixture
def gpt():
    torch.manual_seed(0)
    model = GPT(small_config()).eval()
    with torch.no_grad():  # move norms and biases off their init so the comparison covers them
        for name, parameter in model.named_parameters():
            if parameter.dim() == 1:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


def test_export_to_transformers_gpt2_gives_same_logits(gpt):
    tokens = torch.randint(0, 61, (3, 24))
    hf_model = to_gpt2(gpt).eval()
    torch.testing.assert_close(hf_model(tokens).logits, gpt(tokens), atol=1e-4, rtol=1e-4)


def test_import_from_random_transformers_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    hf_config = GPT2Config(vocab_size=53, n_positions=20, n_embd=48, n_layer=2, n_head=3, bos_token_id=None, eos_token_id=None)
    hf_model = GPT2LMHeadModel(hf_config).eval()
    tokens = torch.randint(0, 53, (2, 20))
    model = from_gpt2(hf_model).eval()
    torch.testing.assert_close(model(tokens), hf_model(tokens).logits, atol=1e-4, rtol=1e-4)
    assert model.config.mlp == "gelu_tanh"


def test_gpt2_export_refuses_other_architectures():
    with pytest.raises(UserError, match="positions must be 'learned'"):
        to_gpt2(GPT(small_config(positions="rotary")))


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_kv_cache_decoding_matches_full_recomputation(positions):
    torch.manual_seed(2)
    model = GPT(small_config(positions=positions)).eval()
    tokens = torch.randint(0, 61, (2, 15))
    full = model(tokens)
    caches = model.new_caches()
    steps = [model(tokens[:, :6], caches=caches)]
    steps += [model(tokens[:, i : i + 1], caches=caches) for i in range(6, 15)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_cached_generation_equals_uncached_beyond_the_context_window(gpt):
    prompt = torch.randint(0, 61, (2, 5))
    cached = generate(gpt, prompt, 30, temperature=0)  # 35 tokens > context 24: the window slides
    uncached = generate(gpt, prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)
    # greedy = argmax of the model's own logits at every step
    for position in range(5, 24):
        assert cached[0, position] == gpt(cached[:1, :position])[0, -1].argmax()


def test_weights_are_tied_and_residual_projections_scaled():
    torch.manual_seed(3)
    model = GPT(small_config(num_layers=8, dim=128))
    assert model.lm_head.weight is model.token_embedding.weight
    out_std = model.transformer.blocks[0].attn.out_proj.weight.std().item()
    in_std = model.transformer.blocks[0].attn.qkv_proj.weight.std().item()
    assert out_std == pytest.approx(0.02 / 4.0, rel=0.1)  # 0.02 / sqrt(2 * 8)
    assert in_std == pytest.approx(0.02, rel=0.1)


def test_sampling_is_seeded_and_temperature_changes_it(gpt):
    prompt = torch.randint(0, 61, (1, 3))
    first = generate(gpt, prompt, 12, generator=torch.Generator().manual_seed(5))
    again = generate(gpt, prompt, 12, generator=torch.Generator().manual_seed(5))
    other = generate(gpt, prompt, 12, generator=torch.Generator().manual_seed(6), temperature=5.0)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_top_k_and_top_p_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    kept = filter_logits(logits, top_k=2).isfinite()
    assert kept.tolist() == [[True, False, False, False, True]]
    probabilities = logits.softmax(-1)[0]  # sorted: 3.0 (0.60), 2.0 (0.22), 1.0 (0.08) ...
    kept = filter_logits(logits, top_p=0.7).isfinite()[0]
    assert kept.tolist() == [True, False, False, False, True]
    assert probabilities[4] < 0.7 < probabilities[4] + probabilities[0]
    # the most likely token always survives
    assert filter_logits(logits, top_p=0.01).isfinite()[0].tolist() == [False, False, False, False, True]


def test_top_k_one_samples_the_argmax(gpt):
    prompt = torch.randint(0, 61, (2, 4))
    sampled = generate(gpt, prompt, 8, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled, generate(gpt, prompt, 8, temperature=0))


def test_stop_token_ends_rows(gpt):
    prompt = torch.randint(0, 61, (1, 4))
    greedy = generate(gpt, prompt, 10, temperature=0)
    stop = int(greedy[0, 6])  # the third generated token
    stopped = generate(gpt, prompt, 10, temperature=0, stop_token=stop)
    first_stop = (stopped[0, 4:] == stop).nonzero()[0].item() + 4
    assert stopped.shape[1] == first_stop + 1 <= 7


def test_generate_rejects_bad_arguments(gpt):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(gpt, torch.zeros(1, 2, dtype=torch.long), 0)


def test_save_and_load_round_trip(gpt, tmp_path):
    gpt.save_pretrained(tmp_path / "model")
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["config.json", "model.safetensors"]
    loaded = mmgen.load(tmp_path / "model").eval()
    tokens = torch.randint(0, 61, (2, 10))
    torch.testing.assert_close(loaded(tokens), gpt(tokens), atol=0, rtol=0)
    assert loaded.lm_head.weight is loaded.token_embedding.weight
    assert isinstance(GPT.from_pretrained(tmp_path / "model"), GPT)


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        GPTConfig(dropout=1.5)
