"""Text: tokenizers, the GPT language model, the masked LM, generation, GPT-2 and BERT interop."""

from .generate import filter_logits, generate, sample_next
from .gpt import GPT, GPTConfig
from .mlm import MaskedLM, MLMConfig
from .tokenizers import BPETokenizer, CharTokenizer, load_tokenizer

__all__ = ["BPETokenizer", "CharTokenizer", "GPT", "GPTConfig", "MLMConfig", "MaskedLM", "filter_logits", "generate",
           "load_tokenizer", "sample_next"]
