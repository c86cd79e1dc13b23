"""Text: tokenizers, the GPT language model, generation, GPT-2 interop."""

from .generate import filter_logits, generate, sample_next
from .gpt import GPT, GPTConfig
from .tokenizers import BPETokenizer, CharTokenizer, load_tokenizer

__all__ = ["BPETokenizer", "CharTokenizer", "GPT", "GPTConfig", "filter_logits", "generate", "load_tokenizer", "sample_next"]
