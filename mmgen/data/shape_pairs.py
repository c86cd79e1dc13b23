"""Preference pairs of shape images for Diffusion-DPO: for one caption, a winner that matches it and a loser that
does not.

Item i of a ShapesDataset gives the caption (always complete: "a small red circle at the top left") and the winner,
a render of it. The loser is the same layout with one thing wrong: another colour or another shape (a seeded coin
flip), drawn from the split's own shape x colour pairs, so training on "train" pairs never renders a held-out
pair. A held-out pair whose split offers neither (no other held-out colour of its shape, no other held-out shape of
its colour) takes its loser from every colour or shape: only the few "val" pairs can need this. Winner and loser are
rendered from the same seeded generator: background, jitter, size, rotation, place in the cell and pixel noise are
identical, and the pair differs only in what the caption names.
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset

from .shapes import COLOURS, SPLITS, ShapesDataset, caption, render


class ShapePreferencePairs(Dataset):
    """{"image": winner, "loser": loser, "caption": the winner's complete caption, "mistake": "colour" or "shape"}
    for each item of `shapes` (its split, size, seed, image size, normalisation and extra shapes)."""

    def __init__(self, shapes: ShapesDataset):
        self.shapes = shapes

    def __len__(self) -> int:
        return len(self.shapes)

    def _seed(self, index: int, stream: int) -> list[int]:
        return [self.shapes.seed, SPLITS.index(self.shapes.split), index, stream]

    def loser_attributes(self, index: int) -> tuple[dict, str]:
        """(the loser's attributes, which one is wrong): the winner's with another colour or another shape."""
        winner = self.shapes.attributes(index)
        pairs = self.shapes.pairs
        options = {
            "colour": [colour for shape, colour in pairs if shape == winner["shape"] and colour != winner["colour"]],
            "shape": [shape for shape, colour in pairs if colour == winner["colour"] and shape != winner["shape"]],
        }
        if not any(options.values()):  # an isolated held-out pair: any other colour or shape is wrong
            options = {"colour": [colour for colour in COLOURS if colour != winner["colour"]],
                       "shape": [shape for shape in self.shapes.shapes if shape != winner["shape"]]}
        rng = np.random.default_rng(self._seed(index, 4))
        mistakes = [name for name in ("colour", "shape") if options[name]]
        mistake = mistakes[rng.integers(len(mistakes))]
        return {**winner, mistake: options[mistake][rng.integers(len(options[mistake]))]}, mistake

    def __getitem__(self, index: int) -> dict:
        winner = self.shapes.attributes(index)
        loser, mistake = self.loser_attributes(index)
        size = self.shapes.image_size
        images = [render(attributes, size, np.random.default_rng(self._seed(index, 5))) for attributes in (winner, loser)]
        return {"image": self.shapes.transform(images[0]), "loser": self.shapes.transform(images[1]),
                "caption": caption(winner), "mistake": mistake}

