"""CLIP: ViT image tower + causal text tower, contrastive losses, CLIP's BPE tokenizer and open_clip interop."""

from .classifier import CLIPClassifier, CLIPClassifierConfig
from .loss import ClipLoss, SigLipLoss
from .model import CLIP, CLIPConfig, CLIPOutput, CLIPTextConfig, CLIPVisionConfig, TextEncoding, clip_config
from .open_clip_interop import convert_open_clip, from_open_clip, to_open_clip
from .tokenizer import CLIPTokenizer

__all__ = [
    "CLIP",
    "CLIPClassifier",
    "CLIPClassifierConfig",
    "CLIPConfig",
    "CLIPOutput",
    "CLIPTextConfig",
    "CLIPTokenizer",
    "CLIPVisionConfig",
    "ClipLoss",
    "SigLipLoss",
    "TextEncoding",
    "clip_config",
    "convert_open_clip",
    "from_open_clip",
    "to_open_clip",
]
