"""Baseline for `mmgen finetune text-classifier`: bag-of-characters logistic regression (in torch) on a text,label
table, scored on the held-out table; and the Tiny Shakespeare speakers tables (mmgen/data/speakers.py's rule).

    python bench/text_classifier.py --write data/speakers             # build train.jsonl / val.jsonl, then score
    python bench/text_classifier.py --train T.jsonl --val V.jsonl     # score on any two tables
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmgen.data.speakers import write_speaker_tables  # noqa: E402
from mmgen.data.text import read_corpus  # noqa: E402
from mmgen.data.text_table import class_names, read_labelled_texts  # noqa: E402


def character_counts(texts: list[str], alphabet: dict[str, int]) -> torch.Tensor:
    """(texts, characters + 1) character frequencies (each row sums to 1) and a log-length column."""
    features = torch.zeros(len(texts), len(alphabet) + 1)
    for row, text in enumerate(texts):
        for char in text:
            if char in alphabet:
                features[row, alphabet[char]] += 1
        features[row, :-1] /= max(len(text), 1)
        features[row, -1] = torch.log1p(torch.tensor(float(len(text)))) / 10
    return features


def logistic_regression(features: torch.Tensor, labels: torch.Tensor, classes: int, weight_decay: float,
                        steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression fitted with L-BFGS on standardised features."""
    torch.manual_seed(0)
    model = torch.nn.Linear(features.shape[1], classes)
    optimizer = torch.optim.LBFGS(model.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(model(features), labels) + weight_decay * model.weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", metavar="DIR", help="write the Tiny Shakespeare speakers tables here; score them")
    parser.add_argument("--train", help="training table (.csv/.tsv/.jsonl with text,label)")
    parser.add_argument("--val", help="held-out table")
    parser.add_argument("--weight-decay", type=float, default=1e-3)
    parser.add_argument("--max-chars", type=int, help="read only each text's first N characters (as a classifier "
                        "with an N-token context does)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.write:
        args.train, args.val = map(str, write_speaker_tables(read_corpus(None), args.write))
    if not (args.train and args.val):
        parser.error("give --write DIR, or --train and --val")
    train_rows, val_rows = read_labelled_texts(args.train), read_labelled_texts(args.val)
    if args.max_chars:
        train_rows = [(text[: args.max_chars], label) for text, label in train_rows]
        val_rows = [(text[: args.max_chars], label) for text, label in val_rows]
    classes = class_names([label for _, label in train_rows], args.train)
    index = {name: i for i, name in enumerate(classes)}
    alphabet = {char: i for i, char in enumerate(sorted({c for text, _ in train_rows for c in text}))}
    train_x = character_counts([text for text, _ in train_rows], alphabet)
    val_x = character_counts([text for text, _ in val_rows], alphabet)
    mean, std = train_x.mean(0), train_x.std(0).clamp(min=1e-6)
    train_x, val_x = (train_x - mean) / std, (val_x - mean) / std
    train_y = torch.tensor([index[label] for _, label in train_rows])
    val_y = torch.tensor([index.get(label, -1) for _, label in val_rows])
    model = logistic_regression(train_x, train_y, len(classes), args.weight_decay)
    with torch.no_grad():
        accuracy = (model(val_x).argmax(-1) == val_y).float().mean().item()
    majority = int(torch.bincount(train_y, minlength=len(classes)).argmax())
    results = {"train_rows": len(train_rows), "val_rows": len(val_rows), "classes": len(classes),
               "max_chars": args.max_chars,
               "bag_of_characters_accuracy": accuracy,
               "majority_accuracy": (val_y == majority).float().mean().item()}
    print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
