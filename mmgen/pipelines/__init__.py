"""Pipelines: trained models composed with tokenizers, guidance and samplers (no maths of their own)."""

from .text2img import TextToImagePipeline

__all__ = ["TextToImagePipeline"]
