"""Training options of CLIP's towers: locking (LiT), patch dropout (FLIP), gradient checkpointing per tower.

None of them changes the model's shape or its saved weights: they say which weights train and how a step is computed.
- lock_image / lock_text: freeze a tower (LiT: Zhai et al. 2022 lock a pretrained image tower and train the text
  tower). `*_unlocked_layers: N` keeps the last N transformer blocks and what follows them (the final norm and the
  projection) trainable; 0 freezes the whole tower.
- patch_dropout: in training, each image keeps a random 1 - fraction of its patches (FLIP, Li et al. 2023: fewer
  tokens, cheaper steps); evaluation and inference see every patch.
- image_gradient_checkpointing / text_gradient_checkpointing: recompute a tower's blocks in backward instead of
  storing their activations (model.gradient_checkpointing turns on both).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import ConfigError


@dataclass
class TowerTraining:
    """The `towers:` section of the CLIP recipes."""

    lock_image: bool = False
    image_unlocked_layers: int = 0
    lock_text: bool = False
    text_unlocked_layers: int = 0
    patch_dropout: float = 0.0
    image_gradient_checkpointing: bool = False
    text_gradient_checkpointing: bool = False

    def __post_init__(self):
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must lie in [0, 1), got {self.patch_dropout}")
        for tower in ("image", "text"):
            layers = getattr(self, f"{tower}_unlocked_layers")
            if layers < 0:
                raise ValueError(f"{tower}_unlocked_layers must be >= 0, got {layers}")
            if layers and not getattr(self, f"lock_{tower}"):
                raise ValueError(f"{tower}_unlocked_layers needs lock_{tower}: true (it says what stays trainable)")

    @property
    def locks(self) -> bool:
        """Whether some weights are frozen."""
        return self.lock_image or self.lock_text


def lock_tower(tower: nn.Module, unlocked_layers: int, name: str) -> None:
    """Freeze `tower` except its last `unlocked_layers` blocks and, when any stays unlocked, its final norm and
    projection (the modules after the blocks)."""
    blocks = tower.transformer.blocks
    if unlocked_layers > len(blocks):
        raise ConfigError(f"towers.{name}_unlocked_layers={unlocked_layers}: the {name} tower has only "
                          f"{len(blocks)} layers")
    tower.requires_grad_(False)
    if unlocked_layers:
        for block in blocks[len(blocks) - unlocked_layers:]:
            block.requires_grad_(True)
        for child in ("norm_post", "norm_final", "projection"):
            if hasattr(tower, child):
                getattr(tower, child).requires_grad_(True)


def apply_tower_training(model, towers: TowerTraining) -> None:
    """Set `towers`' options on a CLIP in place (before its optimizer is made)."""
    if model.vision is None and (towers.lock_image or towers.patch_dropout or towers.image_gradient_checkpointing):
        raise ConfigError("towers: the image options need a CLIP with an image tower (this one is a text encoder)")
    if towers.lock_image:
        lock_tower(model.vision, towers.image_unlocked_layers, "image")
    if towers.lock_text:
        lock_tower(model.text, towers.text_unlocked_layers, "text")
    if model.vision is not None:
        model.vision.patch_dropout = towers.patch_dropout
        if towers.image_gradient_checkpointing:
            model.vision.transformer.gradient_checkpointing = True
    if towers.text_gradient_checkpointing:
        model.text.transformer.gradient_checkpointing = True


def trainable_summary(model: nn.Module) -> str:
    """"N of M parameters trainable (P%)"."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / total:.2f}%)"
