"""`mmgen merge-lora`: fold an adapter into its base and write a plain model folder (no peft needed to use it)."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..finetune import load_adapter, merge_adapter, read_adapter_config, resolve_adapter_folder
from ..hub import load, resolve_model_folder
from ..text.tokenizers import TOKENIZER_FILE

COPIED_FILES = (TOKENIZER_FILE,)  # files beside the base's weights that the merged model needs too


def merge_lora(adapter, out_dir, base=None) -> Path:
    """Load `base` (default: the base the adapter records), put the adapter on it, merge, save to `out_dir`."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out (nothing is overwritten)")
    adapter = resolve_adapter_folder(adapter)
    base = base if base is not None else read_adapter_config(adapter).get("base")
    if base is None:
        raise UserError(f"{adapter} records no base model: name it with --base")
    folder = resolve_model_folder(base)
    model = merge_adapter(load_adapter(load(folder), adapter))
    extra_files = {name: (folder / name).read_text() for name in COPIED_FILES if (folder / name).is_file()}
    return model.save_pretrained(out_dir, extra_files=extra_files)
