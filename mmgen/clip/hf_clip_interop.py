"""Conversion between mmgen's CLIP and Hugging Face transformers' CLIP (same maths, other parameter names).

Supported: `CLIPModel` (OpenAI's clip-vit-* and LAION's transformers exports), and a text encoder alone —
`CLIPTextModel` (Stable Diffusion's) or `CLIPTextModelWithProjection` — which becomes a CLIP without an image tower
(`vision: null`); a CLIPTextModel's missing projection is the identity. Refused with a UserError: towers with other
activations than one GELU, tanh-GELU or QuickGELU for both, LayerNorm eps other than 1e-5, and text towers pooled at
an end-of-text id that is neither the largest id (what the argmax finds) nor the legacy 2 (which means the argmax).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, UserError
from ..io import read_json
from .model import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig

_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
_TEXT_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")
_CLASSES = ("CLIPModel", *_TEXT_CLASSES)

_BLOCK_NAMES = {  # ours -> transformers', inside one encoder layer; a tuple is stacked in that order
    "norm_attn": "layer_norm1",
    "attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn.out_proj": "self_attn.out_proj",
    "norm_mlp": "layer_norm2",
    "mlp.fc_in": "mlp.fc1",
    "mlp.fc_out": "mlp.fc2",
}


def _module_names(config: CLIPConfig, their_state: dict) -> dict[str, str | tuple[str, ...]]:
    """Our module (or parameter) name -> transformers' for everything with weights in `their_state`.

    The text tower's names start with "text_model." except in transformers 5's CLIPTextModel."""
    text = "text_model" if any(name.startswith("text_model.") for name in their_state) else ""
    prefix = f"{text}." if text else ""
    names: dict[str, str | tuple[str, ...]] = {
        "text.token_embedding": f"{prefix}embeddings.token_embedding",
        "text.position_embedding": f"{prefix}embeddings.position_embedding",
        "text.norm_final": f"{prefix}final_layer_norm",
    }
    has_text_projection = "text_projection.weight" in their_state
    if has_text_projection:
        names["text.projection"] = "text_projection"
    towers = [("text", prefix, config.text.layers)]
    if config.vision is not None:
        names.update({
            "vision.patch_embedding": "vision_model.embeddings.patch_embedding",
            "vision.class_embedding": "vision_model.embeddings.class_embedding",
            "vision.position_embedding": "vision_model.embeddings.position_embedding",
            "vision.norm_pre": "vision_model.pre_layrnorm",
            "vision.norm_post": "vision_model.post_layernorm",
            "vision.projection": "visual_projection",
            "logit_scale": "logit_scale",
        })
        towers.append(("vision", "vision_model.", config.vision.layers))
    for ours, theirs, layers in towers:
        for index in range(layers):
            for our_name, their_name in _BLOCK_NAMES.items():
                layer = f"{theirs}encoder.layers.{index}."
                their = tuple(layer + part for part in their_name) if isinstance(their_name, tuple) else layer + their_name
                names[f"{ours}.transformer.blocks.{index}.{our_name}"] = their
    return names


def _their_names(names: dict, our_parameter: str) -> list[str]:
    """transformers' parameter names behind one of ours (several for a fused projection)."""
    if our_parameter in names:  # a parameter named directly (class_embedding, logit_scale)
        theirs = names[our_parameter]
        return [theirs] if isinstance(theirs, str) else list(theirs)
    module, leaf = our_parameter.rsplit(".", 1)
    theirs = names[module]
    return [f"{part}.{leaf}" for part in ((theirs,) if isinstance(theirs, str) else theirs)]


def _mlp_ratio(hidden: int, width: int) -> float:
    # blocks build int(width * mlp_ratio) hidden units: pick a ratio that gives back `hidden` exactly
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def clip_config_from_hf(config, class_name: str) -> CLIPConfig:
    """The CLIPConfig of a transformers CLIP config of class `class_name` (UserError for what mmgen cannot express)."""
    text = config.text_config if class_name == "CLIPModel" else config
    vision = config.vision_config if class_name == "CLIPModel" else None
    problems = []
    activations = {tower.hidden_act for tower in (text, vision) if tower is not None}
    if len(activations) > 1 or not activations <= set(_ACTIVATIONS):
        problems.append(f"activations {sorted(activations)} (one of {', '.join(_ACTIVATIONS)} for both towers)")
    for tower in (text, vision):
        if tower is not None and tower.layer_norm_eps != 1e-5:
            problems.append(f"layer_norm_eps {tower.layer_norm_eps} (only 1e-5)")
    if text.eos_token_id not in (2, text.vocab_size - 1):
        problems.append(f"eos_token_id {text.eos_token_id} (pooling at the end-of-text token needs it to be the "
                        f"largest id, {text.vocab_size - 1})")
    if vision is not None and vision.num_channels != 3:
        problems.append(f"{vision.num_channels} image channels (only 3)")
    if problems:
        raise UserError(f"this transformers {class_name} cannot be converted to mmgen's CLIP: " + "; ".join(problems))
    if class_name == "CLIPTextModel":
        embed_dim = text.hidden_size
    else:
        embed_dim = config.projection_dim
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=None if vision is None else CLIPVisionConfig(
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            width=vision.hidden_size,
            layers=vision.num_hidden_layers,
            heads=vision.num_attention_heads,
            mlp_ratio=_mlp_ratio(vision.intermediate_size, vision.hidden_size),
        ),
        text=CLIPTextConfig(
            context_length=text.max_position_embeddings,
            vocab_size=text.vocab_size,
            width=text.hidden_size,
            layers=text.num_hidden_layers,
            heads=text.num_attention_heads,
            mlp_ratio=_mlp_ratio(text.intermediate_size, text.hidden_size),
        ),
        mlp=_ACTIVATIONS[activations.pop()],
    )


def from_hf_clip(model) -> CLIP:
    """An mmgen CLIP (float32) with the weights of a transformers CLIPModel, CLIPTextModel or
    CLIPTextModelWithProjection; a text model gives a CLIP without an image tower."""
    class_name = type(model).__name__
    if class_name not in _CLASSES:
        raise UserError(f"expected a transformers {', '.join(_CLASSES)}, got {class_name}")
    config = clip_config_from_hf(model.config, class_name)
    clip = CLIP(config)
    their_state = model.state_dict()
    names = _module_names(config, their_state)
    state = {}
    for name, tensor in clip.state_dict().items():
        if name == "text.projection.weight" and "text.projection" not in names:
            state[name] = torch.eye(config.embed_dim)  # no projection: the pooled state is the embedding
            continue
        if name == "logit_scale" and config.vision is None:  # a text encoder alone keeps the initial value
            state[name] = tensor
            continue
        their_names = _their_names(names, name)
        missing = [their for their in their_names if their not in their_state]
        if missing:
            raise UserError(f"this transformers {class_name} has no {missing[0]}, which mmgen's CLIP needs")
        parts = [torch.atleast_1d(their_state[their].float()) for their in their_names]
        state[name] = torch.cat(parts).reshape(tensor.shape)
    clip.load_state_dict(state, strict=True)
    return clip.train(model.training)


def to_hf_clip(clip: CLIP):
    """A transformers model computing the same embeddings as `clip`: a CLIPModel, or for a text encoder alone a
    CLIPTextModel (identity projection) or CLIPTextModelWithProjection. UserError for what transformers lacks."""
    import transformers

    config = clip.config
    problems = []
    if config.mlp not in _HF_ACTIVATIONS:
        problems.append(f"the {config.mlp} MLP")
    if config.init_logit_bias is not None:
        problems.append("a logit bias (SigLIP)")
    if config.text.pad_token_id is not None:
        problems.append("re-padding of the tokens after end-of-text (pad_token_id)")
    if problems:
        raise UserError("this CLIP cannot be expressed as a transformers CLIP: " + "; ".join(problems))
    text, vision = config.text, config.vision
    text_config = transformers.CLIPTextConfig(
        vocab_size=text.vocab_size,
        hidden_size=text.width,
        intermediate_size=int(text.width * text.mlp_ratio),
        projection_dim=config.embed_dim,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        max_position_embeddings=text.context_length,
        hidden_act=_HF_ACTIVATIONS[config.mlp],
        eos_token_id=text.vocab_size - 1,  # the first end-of-text = the argmax of the ids, as mmgen pools
        bos_token_id=text.vocab_size - 2,
    )
    if vision is not None:
        vision_config = transformers.CLIPVisionConfig(
            hidden_size=vision.width,
            intermediate_size=int(vision.width * vision.mlp_ratio),
            projection_dim=config.embed_dim,
            num_hidden_layers=vision.layers,
            num_attention_heads=vision.heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act=_HF_ACTIVATIONS[config.mlp],
        )
        model = transformers.CLIPModel(transformers.CLIPConfig(
            text_config=text_config.to_dict(), vision_config=vision_config.to_dict(), projection_dim=config.embed_dim,
            logit_scale_init_value=float(clip.logit_scale.detach())))
    else:
        identity = config.embed_dim == text.width and torch.equal(
            clip.text.projection.weight.detach().cpu(), torch.eye(text.width))
        model_class = transformers.CLIPTextModel if identity else transformers.CLIPTextModelWithProjection
        model = model_class(text_config)
    names = _module_names(config, model.state_dict())
    state = {}
    for name, tensor in clip.state_dict().items():
        if name in ("text.projection.weight", "logit_scale") and name.removesuffix(".weight") not in names:
            continue  # a CLIPTextModel has no projection (ours is the identity), a text model no logit scale
        their_names = _their_names(names, name)
        parts = tensor.chunk(len(their_names), dim=0) if len(their_names) > 1 else [tensor]  # split q, k, v rows
        for their, part in zip(their_names, parts):
            state[their] = part.detach().clone()
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(f"parameter names out of step with transformers: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    return model.to(next(clip.parameters()).device).train(clip.training)


def load_hf_clip(folder: str | Path):
    """A transformers CLIP model (CLIPModel, CLIPTextModel or CLIPTextModelWithProjection, float32) from a local
    folder written by save_pretrained (no download); a Stable Diffusion folder's text_encoder/ is found as well."""
    import transformers

    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"transformers CLIP folder not found: {folder}")
    if not (folder / "config.json").is_file() and (folder / "text_encoder" / "config.json").is_file():
        folder = folder / "text_encoder"
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a transformers model folder (no config.json)")
    meta = read_json(folder / "config.json")
    architectures = meta.get("architectures") or []
    class_name = architectures[0] if architectures else {"clip": "CLIPModel", "clip_text_model": "CLIPTextModel"}.get(
        meta.get("model_type"), meta.get("model_type"))
    if class_name not in _CLASSES:
        raise UserError(f"{folder} holds a transformers {class_name}, not one of {', '.join(_CLASSES)}")
    try:
        model = getattr(transformers, class_name).from_pretrained(folder, local_files_only=True,
                                                                  dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{folder}: cannot load it as transformers' {class_name} ({detail})") from None
    return model.eval()


def convert_hf_clip_folder(source: str | Path, out: str | Path) -> CLIP:
    """Read a local transformers CLIP folder and write an mmgen CLIP folder (for `mmgen convert hf-clip`)."""
    clip = from_hf_clip(load_hf_clip(source))
    clip.save_pretrained(out)
    return clip
