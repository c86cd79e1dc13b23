"""Pipelines: trained models composed with tokenizers, guidance and samplers (no maths of their own)."""

from .text2img import TextToImagePipeline
from .unclip import DecoderPipeline, PriorPipeline, UnCLIPPipeline

__all__ = ["DecoderPipeline", "PriorPipeline", "TextToImagePipeline", "UnCLIPPipeline"]
