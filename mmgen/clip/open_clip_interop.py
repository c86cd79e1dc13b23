"""Conversion between mmgen's CLIP and open_clip's ViT CLIP (same maths, other parameter names).

Supported: `open_clip.CLIP` with a VisionTransformer image tower (class-token pooling, ln_pre, a projection)
and the built-in causal text transformer pooled at the argmax token, standard blocks with GELU, tanh-GELU or
QuickGELU and LayerNorm(eps=1e-5). Refused with a UserError: ModifiedResNet / timm image towers, attentional
pooling, average pooling, layer scale, custom blocks (qk-norm, scaled cosine attention, ...), HF or other
custom text towers (CustomTextCLIP, CoCa), non-causal text towers and text projections with a bias.
Patch dropout (a training-time option) is not carried over.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import UserError
from ..io import atomic_folder, save_tensors, write_json
from .model import CLIP, CLIPConfig, CLIPTextConfig, CLIPVisionConfig
from .preprocess import CLIP_MEAN, CLIP_STD

_BLOCK_NAMES = {  # ours -> open_clip's, inside one transformer block
    "norm_attn.weight": "ln_1.weight",
    "norm_attn.bias": "ln_1.bias",
    "attn.qkv_proj.weight": "attn.in_proj_weight",  # both stack [queries; keys; values], heads contiguous
    "attn.qkv_proj.bias": "attn.in_proj_bias",
    "attn.out_proj.weight": "attn.out_proj.weight",
    "attn.out_proj.bias": "attn.out_proj.bias",
    "norm_mlp.weight": "ln_2.weight",
    "norm_mlp.bias": "ln_2.bias",
    "mlp.fc_in.weight": "mlp.c_fc.weight",
    "mlp.fc_in.bias": "mlp.c_fc.bias",
    "mlp.fc_out.weight": "mlp.c_proj.weight",
    "mlp.fc_out.bias": "mlp.c_proj.bias",
}


def _parameter_pairs(config: CLIPConfig):
    """(our name, open_clip's name, transposed) for every parameter; projections are (width, embed) there."""
    pairs = [
        ("vision.patch_embedding.weight", "visual.conv1.weight", False),
        ("vision.class_embedding", "visual.class_embedding", False),
        ("vision.position_embedding.weight", "visual.positional_embedding", False),
        ("vision.norm_pre.weight", "visual.ln_pre.weight", False),
        ("vision.norm_pre.bias", "visual.ln_pre.bias", False),
        ("vision.norm_post.weight", "visual.ln_post.weight", False),
        ("vision.norm_post.bias", "visual.ln_post.bias", False),
        ("vision.projection.weight", "visual.proj", True),
        ("text.token_embedding.weight", "token_embedding.weight", False),
        ("text.position_embedding.weight", "positional_embedding", False),
        ("text.norm_final.weight", "ln_final.weight", False),
        ("text.norm_final.bias", "ln_final.bias", False),
        ("text.projection.weight", "text_projection", True),
        ("logit_scale", "logit_scale", False),
    ]
    if config.init_logit_bias is not None:
        pairs.append(("logit_bias", "logit_bias", False))
    for ours, theirs, layers in (
        ("vision.transformer", "visual.transformer", config.vision.layers),
        ("text.transformer", "transformer", config.text.layers),
    ):
        for index in range(layers):
            for name, their_name in _BLOCK_NAMES.items():
                pairs.append((f"{ours}.blocks.{index}.{name}", f"{theirs}.resblocks.{index}.{their_name}", False))
    return pairs


def _copy_state(source: nn.Module, target: nn.Module, pairs, to_target_name) -> None:
    """Load `source`'s tensors into `target` (strictly), renaming and transposing along `pairs`."""
    source_state, target_state = source.state_dict(), target.state_dict()
    state = {}
    for ours, theirs, transposed in pairs:
        source_name, target_name = (ours, theirs) if to_target_name else (theirs, ours)
        tensor = source_state[source_name]
        tensor = tensor.T if transposed else tensor
        state[target_name] = tensor.reshape(target_state[target_name].shape).clone()  # logit_scale: () or (1,)
    target.load_state_dict(state, strict=True)


def _activation(blocks) -> str | None:
    from open_clip.transformer import QuickGELU

    activation = blocks[0].mlp.gelu
    if isinstance(activation, QuickGELU):
        return "quick_gelu"
    if isinstance(activation, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_tanh"}[activation.approximate]
    return None


def _check_supported(model) -> None:
    """Raise a UserError naming what this open_clip model has that mmgen's CLIP cannot express."""
    import open_clip
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if not isinstance(model, open_clip.CLIP):
        name = type(model).__name__
        raise UserError(f"unsupported open_clip model {name}: only open_clip.CLIP with its own text transformer")
    visual = model.visual
    if not isinstance(visual, VisionTransformer):
        raise UserError(f"unsupported open_clip image tower {type(visual).__name__}: only VisionTransformer")
    problems = []
    if visual.attn_pool is not None:
        problems.append("attentional pooling")
    if visual.pool_type != "tok" or visual.final_ln_after_pool:
        problems.append(f"image pooling {visual.pool_type!r} (only the class token, normed before pooling)")
    if isinstance(visual.ln_pre, nn.Identity):
        problems.append("no ln_pre")
    if visual.proj is None:
        problems.append("no image projection")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        problems.append("non-square images or patches")
    for blocks in (visual.transformer.resblocks, model.transformer.resblocks):
        if any(type(block) is not ResidualAttentionBlock for block in blocks):
            problems.append("custom attention blocks (qk-norm, scaled cosine attention, ...)")
        elif any(not (isinstance(block.ls_1, nn.Identity) and isinstance(block.ls_2, nn.Identity)) for block in blocks):
            problems.append("layer scale")
        elif any(block.attn.in_proj_weight is None or block.attn.in_proj_bias is None for block in blocks):
            problems.append("attention without fused, biased input projection")
    if not problems:
        activations = {_activation(visual.transformer.resblocks), _activation(model.transformer.resblocks)}
        if len(activations) > 1 or None in activations:
            problems.append("MLP activations other than one GELU, tanh-GELU or QuickGELU for both towers")
    if any(isinstance(m, nn.LayerNorm) and (m.eps != 1e-5 or m.bias is None) for m in model.modules()):
        problems.append("LayerNorm other than eps=1e-5 with bias")
    if model.text_pool_type != "argmax":
        problems.append(f"text pooling {model.text_pool_type!r} (only argmax = end-of-text)")
    if model.attn_mask is None:
        problems.append("non-causal text tower")
    if not isinstance(model.text_projection, nn.Parameter):
        problems.append("text projection other than a bias-free matrix")
    if model.positional_embedding.shape[0] != model.context_length:
        problems.append("a text class token")
    if problems:
        raise UserError("this open_clip model cannot be converted to mmgen's CLIP: " + "; ".join(problems))


def _mlp_ratio(hidden: int, width: int) -> float:
    # blocks build int(width * mlp_ratio) hidden units: pick a ratio that gives back `hidden` exactly
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def from_open_clip(model) -> CLIP:
    """An mmgen CLIP with the weights of an open_clip ViT CLIP (UserError for unsupported architectures).

    The config's init_logit_scale / init_logit_bias are set to the converted values.
    """
    _check_supported(model)
    visual = model.visual
    vision_block, text_block = visual.transformer.resblocks[0], model.transformer.resblocks[0]
    vision_width, text_width = visual.class_embedding.shape[0], model.token_embedding.weight.shape[1]
    config = CLIPConfig(
        embed_dim=visual.proj.shape[1],
        vision=CLIPVisionConfig(
            image_size=visual.image_size[0],
            patch_size=visual.patch_size[0],
            width=vision_width,
            layers=len(visual.transformer.resblocks),
            heads=vision_block.attn.num_heads,
            mlp_ratio=_mlp_ratio(vision_block.mlp.c_fc.out_features, vision_width),
        ),
        text=CLIPTextConfig(
            context_length=model.context_length,
            vocab_size=model.vocab_size,
            width=text_width,
            layers=len(model.transformer.resblocks),
            heads=text_block.attn.num_heads,
            mlp_ratio=_mlp_ratio(text_block.mlp.c_fc.out_features, text_width),
        ),
        mlp=_activation(model.transformer.resblocks),
        init_logit_scale=float(model.logit_scale.detach().reshape(())),
        init_logit_bias=None if model.logit_bias is None else float(model.logit_bias.detach().reshape(())),
    )
    clip = CLIP(config)
    _copy_state(model, clip, _parameter_pairs(config), to_target_name=False)
    return clip.train(model.training)


def open_clip_model_config(clip: CLIP) -> dict:
    """open_clip's model config (the `model_cfg` of open_clip_config.json: `open_clip.CLIP(**config)`) of a CLIP
    computing what `clip` computes; a UserError names what open_clip's CLIP cannot express."""
    config = clip.config
    if config.vision is None:
        raise UserError("a CLIP without an image tower (a text encoder alone) cannot be expressed as open_clip's CLIP")
    if config.mlp not in ("gelu", "gelu_tanh", "quick_gelu"):
        raise UserError(f"a CLIP with a {config.mlp} MLP cannot be expressed as open_clip's CLIP "
                        "(gelu, gelu_tanh or quick_gelu only)")
    act_kwargs = {"approximate": "tanh"} if config.mlp == "gelu_tanh" else None
    vision, text = config.vision, config.text
    model_config = {
        "embed_dim": config.embed_dim,
        "vision_cfg": {"layers": vision.layers, "width": vision.width, "head_width": vision.width // vision.heads,
                       "mlp_ratio": vision.mlp_ratio, "patch_size": vision.patch_size,
                       "image_size": vision.image_size, "act_kwargs": act_kwargs},
        "text_cfg": {"context_length": text.context_length, "vocab_size": text.vocab_size, "width": text.width,
                     "heads": text.heads, "layers": text.layers, "mlp_ratio": text.mlp_ratio,
                     "act_kwargs": act_kwargs},
        "quick_gelu": config.mlp == "quick_gelu",
        "init_logit_scale": config.init_logit_scale,
    }
    if config.init_logit_bias is not None:
        model_config["init_logit_bias"] = config.init_logit_bias
    return model_config


def to_open_clip(clip: CLIP):
    """An open_clip.CLIP computing the same embeddings as `clip` (UserError for what it cannot express)."""
    import open_clip

    model = open_clip.CLIP(**open_clip_model_config(clip))
    _copy_state(clip, model, _parameter_pairs(clip.config), to_target_name=True)
    return model.train(clip.training)


def export_open_clip(clip: CLIP, out_dir) -> Path:
    """Write `clip` as an open_clip local-dir folder (open_clip_config.json + open_clip_model.safetensors), atomically,
    so `open_clip.create_model_and_transforms("local-dir:OUT_DIR")` (and CLIP_benchmark's `--model local-dir:OUT_DIR`)
    loads it; its tokenizer is open_clip's default, CLIP's BPE, which mmgen's CLIPTokenizer also uses."""
    model = to_open_clip(clip)
    config = {"model_cfg": open_clip_model_config(clip),
              "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}}
    with atomic_folder(out_dir) as staging:
        write_json(staging / "open_clip_config.json", config)
        save_tensors(staging / "open_clip_model.safetensors", model.state_dict())
    return Path(out_dir)


def convert_open_clip(model_name: str, pretrained: str | None, out_dir) -> CLIP:
    """Build open_clip's `model_name` (random init, a local checkpoint FILE or a tag), convert it, save to out_dir.

    The saved config's `text.context_length` is the context length to give CLIPTokenizer.
    """
    import open_clip

    if model_name not in open_clip.list_models():
        raise UserError(f"unknown open_clip model {model_name!r} (open_clip.list_models() lists the built-in names)")
    if open_clip.get_model_config(model_name)["text_cfg"].get("hf_tokenizer_name"):
        raise UserError(f"open_clip {model_name} uses a Hugging Face tokenizer; mmgen supports CLIP's BPE only")
    is_file = pretrained is not None and Path(pretrained).is_file()
    suffixes = (".pt", ".pth", ".bin", ".safetensors")
    looks_like_path = pretrained and ("/" in pretrained or Path(pretrained).suffix in suffixes)
    if looks_like_path and not is_file:
        raise UserError(f"pretrained checkpoint file not found: {pretrained}")
    try:
        model = open_clip.create_model(model_name, pretrained=pretrained)
    except Exception as error:  # open_clip raises RuntimeError, OSError, network and unpickling errors alike
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        if is_file:
            raise UserError(f"cannot load {pretrained} as open_clip {model_name} weights ({detail})") from None
        raise UserError(
            f"pretrained weights {pretrained!r} for open_clip {model_name} could not be downloaded ({detail}); "
            "pass a local checkpoint FILE as pretrained instead"
        ) from None
    clip = from_open_clip(model.eval())
    clip.save_pretrained(out_dir)
    return clip
