"""Conversion between mmgen's MaskedLM and transformers' BertForMaskedLM / DistilBertForMaskedLM.

Both are post-norm encoders with learned positions, an embedding LayerNorm and BERT's prediction head; BERT adds
segment (token type) embeddings. transformers keeps query, key and value as three matrices, mmgen as one fused
qkv_proj (rows: queries, then keys, then values).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import UserError
from .mlm import MaskedLM, MLMConfig

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_DISTILBERT_EPS = 1e-12  # DistilBERT's LayerNorms have this eps built in


def check_bert_compatible(config: MLMConfig) -> None:
    """Raise UserError unless the masked LM has BERT's architecture (what transformers can express)."""
    problems = []
    if config.norm_position != "post":
        problems.append("norm_position must be 'post'")
    if not config.bias:
        problems.append("bias must be true")
    if config.type_vocab_size == 0 and config.norm_eps != _DISTILBERT_EPS:
        problems.append(f"without token types (DistilBERT) norm_eps must be {_DISTILBERT_EPS:g}")
    if problems:
        raise UserError("this masked LM cannot be expressed as BERT: " + "; ".join(problems))


def _block_names(architecture: str, index: int) -> dict[str, str]:
    """mmgen block parameter (under transformer.blocks.INDEX.) -> transformers name, q/k/v left out."""
    if architecture == "bert":
        prefix = f"bert.encoder.layer.{index}."
        names = {"attn.out_proj": "attention.output.dense", "norm_attn": "attention.output.LayerNorm",
                 "mlp.fc_in": "intermediate.dense", "mlp.fc_out": "output.dense", "norm_mlp": "output.LayerNorm"}
    else:
        prefix = f"distilbert.transformer.layer.{index}."
        names = {"attn.out_proj": "attention.out_lin", "norm_attn": "sa_layer_norm", "mlp.fc_in": "ffn.lin1",
                 "mlp.fc_out": "ffn.lin2", "norm_mlp": "output_layer_norm"}
    return {ours: prefix + theirs for ours, theirs in names.items()}


def _qkv_names(architecture: str, index: int) -> list[str]:
    if architecture == "bert":
        return [f"bert.encoder.layer.{index}.attention.self.{part}" for part in ("query", "key", "value")]
    return [f"distilbert.transformer.layer.{index}.attention.{part}_lin" for part in ("q", "k", "v")]


def _outer_names(architecture: str) -> dict[str, str]:
    """mmgen parameter -> transformers name, outside the blocks."""
    if architecture == "bert":
        return {"token_embedding.weight": "bert.embeddings.word_embeddings.weight",
                "position_embedding.weight": "bert.embeddings.position_embeddings.weight",
                "token_type_embedding.weight": "bert.embeddings.token_type_embeddings.weight",
                "embedding_norm.weight": "bert.embeddings.LayerNorm.weight",
                "embedding_norm.bias": "bert.embeddings.LayerNorm.bias",
                "head_transform.weight": "cls.predictions.transform.dense.weight",
                "head_transform.bias": "cls.predictions.transform.dense.bias",
                "head_norm.weight": "cls.predictions.transform.LayerNorm.weight",
                "head_norm.bias": "cls.predictions.transform.LayerNorm.bias",
                "lm_head.weight": "cls.predictions.decoder.weight",
                "lm_head.bias": "cls.predictions.bias"}
    return {"token_embedding.weight": "distilbert.embeddings.word_embeddings.weight",
            "position_embedding.weight": "distilbert.embeddings.position_embeddings.weight",
            "embedding_norm.weight": "distilbert.embeddings.LayerNorm.weight",
            "embedding_norm.bias": "distilbert.embeddings.LayerNorm.bias",
            "head_transform.weight": "vocab_transform.weight",
            "head_transform.bias": "vocab_transform.bias",
            "head_norm.weight": "vocab_layer_norm.weight",
            "head_norm.bias": "vocab_layer_norm.bias",
            "lm_head.weight": "vocab_projector.weight",
            "lm_head.bias": "vocab_projector.bias"}


def _name_map(architecture: str, num_layers: int) -> dict[str, str]:
    """Every mmgen parameter name -> transformers name, except the fused qkv projections."""
    names = dict(_outer_names(architecture))
    for index in range(num_layers):
        for ours, theirs in _block_names(architecture, index).items():
            for kind in ("weight", "bias"):
                names[f"transformer.blocks.{index}.{ours}.{kind}"] = f"{theirs}.{kind}"
    return names


def from_hf(hf_model) -> MaskedLM:
    """An mmgen MaskedLM with the weights of a transformers BertForMaskedLM or DistilBertForMaskedLM."""
    hf_config = hf_model.config
    architecture = hf_config.model_type
    if architecture == "bert":
        activation = hf_config.hidden_act
        shape = dict(dim=hf_config.hidden_size, num_layers=hf_config.num_hidden_layers,
                     num_heads=hf_config.num_attention_heads, hidden=hf_config.intermediate_size,
                     norm_eps=hf_config.layer_norm_eps, type_vocab_size=hf_config.type_vocab_size,
                     dropout=hf_config.hidden_dropout_prob)
    elif architecture == "distilbert":
        activation = hf_config.activation
        if hf_config.sinusoidal_pos_embds:
            raise UserError("DistilBERT with sinusoidal position embeddings has no mmgen equivalent")
        shape = dict(dim=hf_config.dim, num_layers=hf_config.n_layers, num_heads=hf_config.n_heads,
                     hidden=hf_config.hidden_dim, norm_eps=_DISTILBERT_EPS, type_vocab_size=0,
                     dropout=hf_config.dropout)
    else:
        raise UserError(f"a {architecture!r} model is not BERT or DistilBERT")
    if activation not in _ACTIVATIONS:
        raise UserError(f"{architecture} activation {activation!r} has no mmgen equivalent")
    hidden = shape.pop("hidden")
    config = MLMConfig(vocab_size=hf_config.vocab_size, context_length=hf_config.max_position_embeddings,
                       mlp_ratio=hidden / shape["dim"], mlp=_ACTIVATIONS[activation], norm_position="post",
                       tie_weights=bool(getattr(hf_config, "tie_word_embeddings", True)), **shape)
    model = MaskedLM(config)
    source = hf_model.state_dict()
    wanted = model.state_dict()
    state = {ours: source[theirs] for ours, theirs in _name_map(architecture, config.num_layers).items()
             if ours in wanted}
    for index in range(config.num_layers):
        parts = _qkv_names(architecture, index)
        for kind in ("weight", "bias"):
            fused = torch.cat([source[f"{part}.{kind}"] for part in parts])  # rows: queries, keys, values
            state[f"transformer.blocks.{index}.attn.qkv_proj.{kind}"] = fused
    if config.tie_weights:
        state.pop("lm_head.weight")
    model.load_state_dict({name: tensor.clone().contiguous() for name, tensor in state.items()}, strict=False)
    _check_loaded(model, state)
    return model.train(hf_model.training)


def _check_loaded(model: MaskedLM, state: dict) -> None:
    """Every mmgen parameter was given a weight (a transformers model of another layout would leave holes)."""
    tied = {"lm_head.weight"} if model.config.tie_weights else set()
    missing = [name for name, _ in model.named_parameters() if name not in state and name not in tied]
    if missing:
        raise UserError(f"the transformers model has no weights for {missing[0]}")


def to_hf(model: MaskedLM):
    """A transformers BertForMaskedLM (with token types) or DistilBertForMaskedLM (without) computing the same
    logits as `model`."""
    from transformers import BertConfig, BertForMaskedLM, DistilBertConfig, DistilBertForMaskedLM

    config = model.config
    check_bert_compatible(config)
    hidden = int(config.dim * config.mlp_ratio)
    activation = "gelu_new" if config.mlp == "gelu_tanh" else "gelu"
    if config.type_vocab_size:
        architecture = "bert"
        hf_model = BertForMaskedLM(BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.dim, num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads, intermediate_size=hidden, hidden_act=activation,
            max_position_embeddings=config.context_length, type_vocab_size=config.type_vocab_size,
            layer_norm_eps=config.norm_eps, hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout, tie_word_embeddings=config.tie_weights))
    else:
        architecture = "distilbert"
        hf_model = DistilBertForMaskedLM(DistilBertConfig(
            vocab_size=config.vocab_size, dim=config.dim, n_layers=config.num_layers, n_heads=config.num_heads,
            hidden_dim=hidden, activation=activation, max_position_embeddings=config.context_length,
            dropout=config.dropout, attention_dropout=config.dropout, tie_word_embeddings=config.tie_weights))
    ours = model.state_dict()
    state = {theirs: ours[name] for name, theirs in _name_map(architecture, config.num_layers).items() if name in ours}
    for index in range(config.num_layers):
        for kind in ("weight", "bias"):
            fused = ours[f"transformer.blocks.{index}.attn.qkv_proj.{kind}"]
            for name, part in zip(_qkv_names(architecture, index), fused.chunk(3)):
                state[f"{name}.{kind}"] = part
    hf_model.load_state_dict({name: tensor.detach().clone().contiguous() for name, tensor in state.items()},
                             strict=False)
    if config.tie_weights:
        hf_model.tie_weights()
    return hf_model.train(model.training)


def convert_bert_folder(source, out) -> None:
    """`mmgen convert bert`: read a BertForMaskedLM or DistilBertForMaskedLM folder (no download) and write an mmgen
    masked-LM folder; the folder's tokenizer.json, when it has one, is copied beside it."""
    import pickle
    import warnings

    from transformers import AutoConfig, BertForMaskedLM, DistilBertForMaskedLM

    source = Path(source)
    if not (source / "config.json").is_file():
        raise UserError(f"--model {source}: not a transformers model folder (no config.json)")
    architecture = "BERT"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            architecture = AutoConfig.from_pretrained(source, local_files_only=True).model_type
            classes = {"bert": BertForMaskedLM, "distilbert": DistilBertForMaskedLM}
            if architecture not in classes:
                raise UserError(f"--model {source}: a {architecture!r} model, not BERT or DistilBERT")
            hf_model = classes[architecture].from_pretrained(source, local_files_only=True)
        except pickle.UnpicklingError:
            raise UserError(f"--model {source}: its pytorch_model.bin is a pickle that torch.load(weights_only=True) "
                            "refuses; convert it to model.safetensors with a trusted tool") from None
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            first_line = str(error).splitlines()[0]
            raise UserError(f"--model {source}: cannot read it as {architecture} ({first_line})") from None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    model = from_hf(hf_model.eval())
    extra = {}
    if (source / "tokenizer.json").is_file():
        extra["tokenizer.json"] = (source / "tokenizer.json").read_text(encoding="utf-8")
    model.save_pretrained(out, extra_files=extra)

