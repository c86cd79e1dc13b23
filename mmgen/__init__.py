"""mmgen: train multimodal models (CLIP, diffusion, GPT) from one set of blocks and one Trainer."""

__version__ = "0.1.0"

__all__ = ["load", "__version__"]


def __getattr__(name: str):
    """`mmgen.load`, imported on first use: `import mmgen` (and so `mmgen --help`) does not import torch."""
    if name == "load":
        from .hub import load

        return load
    raise AttributeError(f"module 'mmgen' has no attribute {name!r}")
