"""Conversion between mmgen's GPT and transformers' GPT2LMHeadModel (same maths, other parameter names)."""

from __future__ import annotations

from ..errors import UserError
from .gpt import GPT, GPTConfig


def check_gpt2_compatible(config: GPTConfig) -> None:
    """Raise UserError unless the GPT has GPT-2's architecture (what GPT2LMHeadModel can express)."""
    problems = []
    if config.positions != "learned":
        problems.append("positions must be 'learned'")
    if config.norm != "layernorm":
        problems.append("norm must be 'layernorm'")
    if config.mlp not in ("gelu", "gelu_tanh"):
        problems.append("mlp must be 'gelu' or 'gelu_tanh'")
    if not config.bias:
        problems.append("bias must be true")
    if not config.tie_weights:
        problems.append("tie_weights must be true")
    if problems:
        raise UserError("this GPT cannot be expressed as GPT-2: " + "; ".join(problems))


def to_gpt2(model: GPT):
    """A transformers GPT2LMHeadModel computing the same logits as `model`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = model.config
    check_gpt2_compatible(config)
    hf_config = GPT2Config(
        vocab_size=config.vocab_size,
        n_positions=config.context_length,
        n_embd=config.dim,
        n_layer=config.num_layers,
        n_head=config.num_heads,
        n_inner=int(config.dim * config.mlp_ratio),
        activation_function="gelu_new" if config.mlp == "gelu_tanh" else "gelu",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        layer_norm_epsilon=1e-5,
        bos_token_id=None,
        eos_token_id=None,
        tie_word_embeddings=True,
    )
    hf_model = GPT2LMHeadModel(hf_config)
    state = {
        "transformer.wte.weight": model.token_embedding.weight,
        "transformer.wpe.weight": model.position_embedding.weight,
        "transformer.ln_f.weight": model.norm.weight,
        "transformer.ln_f.bias": model.norm.bias,
    }
    for index, block in enumerate(model.transformer.blocks):
        prefix = f"transformer.h.{index}."
        attn = block.attn
        state.update({
            # transformers' Conv1D stores weights as (in, out): the transpose of nn.Linear
            prefix + "attn.c_attn.weight": attn.qkv_proj.weight.T,
            prefix + "attn.c_attn.bias": attn.qkv_proj.bias,
            prefix + "attn.c_proj.weight": attn.out_proj.weight.T,
            prefix + "attn.c_proj.bias": attn.out_proj.bias,
            prefix + "ln_1.weight": block.norm_attn.weight,
            prefix + "ln_1.bias": block.norm_attn.bias,
            prefix + "ln_2.weight": block.norm_mlp.weight,
            prefix + "ln_2.bias": block.norm_mlp.bias,
            prefix + "mlp.c_fc.weight": block.mlp.fc_in.weight.T,
            prefix + "mlp.c_fc.bias": block.mlp.fc_in.bias,
            prefix + "mlp.c_proj.weight": block.mlp.fc_out.weight.T,
            prefix + "mlp.c_proj.bias": block.mlp.fc_out.bias,
        })
    state = {name: tensor.detach().clone().contiguous() for name, tensor in state.items()}
    hf_model.load_state_dict(state, strict=False)
    hf_model.tie_weights()
    return hf_model


def from_gpt2(hf_model) -> GPT:
    """An mmgen GPT with the weights of a transformers GPT2LMHeadModel."""
    hf_config = hf_model.config
    activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(hf_config.activation_function)
    if activation is None:
        raise UserError(f"GPT-2 activation {hf_config.activation_function!r} has no mmgen equivalent")
    hidden = hf_config.n_inner or 4 * hf_config.n_embd
    config = GPTConfig(
        vocab_size=hf_config.vocab_size,
        context_length=hf_config.n_positions,
        num_layers=hf_config.n_layer,
        num_heads=hf_config.n_head,
        dim=hf_config.n_embd,
        mlp_ratio=hidden / hf_config.n_embd,
        mlp=activation,
        dropout=hf_config.resid_pdrop,
    )
    model = GPT(config)
    source = hf_model.state_dict()
    state = {
        "token_embedding.weight": source["transformer.wte.weight"],
        "position_embedding.weight": source["transformer.wpe.weight"],
        "norm.weight": source["transformer.ln_f.weight"],
        "norm.bias": source["transformer.ln_f.bias"],
    }
    for index in range(config.num_layers):
        prefix = f"transformer.h.{index}."
        target = f"transformer.blocks.{index}."
        state.update({
            target + "attn.qkv_proj.weight": source[prefix + "attn.c_attn.weight"].T,
            target + "attn.qkv_proj.bias": source[prefix + "attn.c_attn.bias"],
            target + "attn.out_proj.weight": source[prefix + "attn.c_proj.weight"].T,
            target + "attn.out_proj.bias": source[prefix + "attn.c_proj.bias"],
            target + "norm_attn.weight": source[prefix + "ln_1.weight"],
            target + "norm_attn.bias": source[prefix + "ln_1.bias"],
            target + "norm_mlp.weight": source[prefix + "ln_2.weight"],
            target + "norm_mlp.bias": source[prefix + "ln_2.bias"],
            target + "mlp.fc_in.weight": source[prefix + "mlp.c_fc.weight"].T,
            target + "mlp.fc_in.bias": source[prefix + "mlp.c_fc.bias"],
            target + "mlp.fc_out.weight": source[prefix + "mlp.c_proj.weight"].T,
            target + "mlp.fc_out.bias": source[prefix + "mlp.c_proj.bias"],
        })
    model.load_state_dict({name: tensor.clone().contiguous() for name, tensor in state.items()}, strict=False)
    return model


def convert_gpt2_folder(source, out) -> None:
    """`mmgen convert gpt2`: read a GPT2LMHeadModel folder (no download) and write an mmgen GPT folder.

    Pickled weights (pytorch_model.bin) are read by transformers with torch.load(weights_only=True), which refuses a
    pickle that would run code; that refusal is one line here, and the warnings of a failed read are not shown."""
    import pickle
    import warnings
    from pathlib import Path

    from transformers import GPT2LMHeadModel

    if not (Path(source) / "config.json").is_file():
        raise UserError(f"--model {source}: not a transformers model folder (no config.json)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hf_model = GPT2LMHeadModel.from_pretrained(source, local_files_only=True)
        except pickle.UnpicklingError:
            pickles = ", ".join(path.name for path in sorted(Path(source).glob("*.bin"))) or "its weights file"
            raise UserError(f"--model {source}: {pickles} is a pickle that torch.load(weights_only=True) refuses (it "
                            "would run code or holds more than tensors); convert it to model.safetensors with a "
                            "trusted tool, or get the safetensors weights") from None
        except (OSError, ValueError, RuntimeError) as error:
            raise UserError(f"--model {source}: cannot read it as GPT-2 ({str(error).splitlines()[0]})") from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    from_gpt2(hf_model).save_pretrained(out)
