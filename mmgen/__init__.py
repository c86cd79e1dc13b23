"""mmgen: train multimodal models (CLIP, diffusion, GPT) from one set of blocks and one Trainer."""

__version__ = "0.1.0"

from .hub import load  # noqa: E402

__all__ = ["load", "__version__"]
