"""Shared fixtures: a small generated corpus and a tiny LM recipe that trains in seconds."""

import random

import pytest
import torch
import yaml


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Restore torch's thread count after each test: a bench main() run in-process sets it (--threads), and a
    different count in later tests changes float summation order, so in-process runs stop matching subprocess ones."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)

WORDS = "the king queen lord speak hath thou thee my good night day love death sword crown fair".split()


def make_corpus(characters: int = 20000, seed: int = 0) -> str:
    """Play-like text from a small vocabulary (deterministic)."""
    rng = random.Random(seed)
    lines = []
    while sum(len(line) + 1 for line in lines) < characters:
        speaker = rng.choice(["KING", "QUEEN", "LORD"])
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        lines.append(f"{speaker}:\n{words.capitalize()}.\n")
    return "\n".join(lines)


TINY_LM = {
    "model": {"context_length": 16, "num_layers": 2, "num_heads": 2, "dim": 32, "dropout": 0.0},
    "data": {"tokenizer": "char", "val_fraction": 0.1},
    "train": {
        "batch_size": 4,
        "max_steps": 20,
        "lr": 3e-3,
        "min_lr": 3e-4,
        "warmup_steps": 2,
        "eval_every": 10,
        "eval_batches": 2,
        "log_every": 5,
        "checkpoint_every": 10,
        "tensorboard": False,
        "progress": False,
        "seed": 7,
    },
}


@pytest.fixture
def corpus_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(make_corpus())
    return path


@pytest.fixture
def tiny_lm_config(tmp_path, corpus_file):
    """Path of a YAML recipe for a tiny GPT on the generated corpus."""
    config = {section: dict(values) for section, values in TINY_LM.items()}
    config["data"]["path"] = str(corpus_file)
    path = tmp_path / "tiny-lm.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
