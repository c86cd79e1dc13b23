"""The unCLIP diffusion prior (Ramesh et al. 2022, DALL·E 2): CLIP text -> a CLIP image embedding, by diffusion.

A causal transformer from mmgen.nn reads the sequence
    [text token states (projected), text embedding, timestep embedding, noised image embedding, learned query]
and the output at the query, the last position, is the prediction: the clean image embedding by default (as in
DALL·E 2; `schedule.prediction_type: sample`), or epsilon / v. Since the query comes last, the causal mask lets it
see every input, while no input position sees the ones after it.

Scale: CLIP embeddings are unit vectors, so each of their `embed_dim` components is about 1/sqrt(embed_dim) in
size while the diffusion noise has unit variance per component. Diffused as they are, the signal-to-noise ratio at
every timestep would be embed_dim times lower than the schedule was designed for (a 512-d embedding would be
drowned in the first few percent of the timesteps). Both embeddings are therefore multiplied by sqrt(embed_dim),
giving unit variance per component like the [-1, 1] pixels of the image models; a sample is mapped back to a CLIP
embedding by normalising it to unit length (`to_image_embedding`).

Classifier-free guidance uses the empty prompt (CLIP's start + end of text) as the unconditional input, exactly
as TextToImage does (the same `PromptConditioned` interface); training replaces a fraction of the captions with it.
The whole frozen CLIP is part of the module (saved in the same folder), so a prior folder is self-contained and also
gives the true image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from ..clip.frozen import FrozenCLIPMixin
from ..clip.model import CLIP, CLIPConfig, TextEncoding
from ..hub import PretrainedMixin
from ..nn import LearnedPositions, TimestepEmbedding, Transformer
from .schedule import NoiseSchedule
from .text2img import PromptConditioned

# positions after the text tokens: text embedding, timestep, noised image embedding, query
EXTRA_POSITIONS = 4


@dataclass
class PriorTransformerConfig:
    """Shape of the prior's causal transformer."""

    width: int = 512
    layers: int = 6
    heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("width", "layers", "heads", "mlp_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")


def default_prior_schedule() -> NoiseSchedule:
    """The prior's default schedule: cosine betas, x0 ("sample") prediction as in DALL·E 2."""
    return NoiseSchedule(beta_schedule="squaredcos_cap_v2", prediction_type="sample")


@dataclass
class PriorConfig:
    """The transformer, the noise schedule (x0 prediction by default) and the frozen CLIP's config."""

    transformer: PriorTransformerConfig = field(default_factory=PriorTransformerConfig)
    schedule: NoiseSchedule = field(default_factory=default_prior_schedule)
    clip: CLIPConfig = field(default_factory=CLIPConfig)


class DiffusionPrior(FrozenCLIPMixin, PromptConditioned, nn.Module, PretrainedMixin):
    """forward(x_t, t, tokens) -> the prediction for noised, scaled image embeddings x_t (batch, embed_dim)."""

    model_type = "prior"
    config_class = PriorConfig

    def __init__(self, config: PriorConfig):
        super().__init__()
        self.config = config
        self.schedule = config.schedule
        shape = config.transformer
        width, embed_dim = shape.width, config.clip.embed_dim
        self.clip = CLIP(config.clip).requires_grad_(False).eval()
        self.text_proj = nn.Linear(config.clip.text.width, width)
        self.text_embedding_proj = nn.Linear(embed_dim, width)
        self.time_embedding = TimestepEmbedding(width, width)
        self.image_proj = nn.Linear(embed_dim, width)
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.positions = LearnedPositions(config.clip.text.context_length + EXTRA_POSITIONS, width)
        nn.init.normal_(self.positions.weight, std=0.02)
        self.transformer = Transformer(shape.layers, width, shape.heads, mlp_ratio=shape.mlp_ratio,
                                       dropout=shape.dropout)
        self.norm_out = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, embed_dim)

    @classmethod
    def from_clip(cls, clip: CLIP, transformer: PriorTransformerConfig, schedule: NoiseSchedule) -> "DiffusionPrior":
        """A new prior (random transformer) on a copy of `clip`."""
        model = cls(PriorConfig(transformer, schedule, clip.config))
        model.clip.load_state_dict(clip.state_dict())
        return model

    @property
    def embed_dim(self) -> int:
        """Width of the CLIP embeddings the prior maps between."""
        return self.config.clip.embed_dim

    @property
    def embedding_scale(self) -> float:
        """sqrt(embed_dim): turns a unit CLIP embedding into one with unit variance per component (module doc)."""
        return self.embed_dim**0.5

    @torch.no_grad()
    def image_targets(self, images: torch.Tensor) -> torch.Tensor:
        """The clean samples x0 (batch, embed_dim) the prior learns: the scaled CLIP embeddings of CLIP-normalised
        images."""
        return self.clip.encode_image(images) * self.embedding_scale

    def to_image_embedding(self, sample: torch.Tensor) -> torch.Tensor:
        """A sampled x0 (batch, embed_dim) -> a unit-length CLIP image embedding."""
        return F.normalize(sample.float(), dim=-1)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, text: TextEncoding) -> torch.Tensor:
        """The prediction (x0, epsilon or v per the schedule) for x_t (batch, embed_dim) at timesteps t given text."""
        if x_t.ndim != 2 or x_t.shape[1] != self.embed_dim:
            raise ValueError(f"expected x_t of shape (batch, {self.embed_dim}), got {tuple(x_t.shape)}")
        batch = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(batch) if t.ndim == 0 else t
        dtype = self.text_proj.weight.dtype
        sequence = torch.cat(
            [
                self.text_proj(text.token_states.to(dtype)),  # (batch, context, width)
                self.text_embedding_proj((text.embedding * self.embedding_scale).to(dtype))[:, None],
                self.time_embedding(t)[:, None],
                self.image_proj(x_t.to(dtype))[:, None],
                self.query.to(dtype).expand(batch, 1, -1),
            ],
            dim=1,
        )  # (batch, context + 4, width)
        sequence = sequence + self.positions(sequence.shape[1])
        # padding tokens after end-of-text are never attended to; the four last positions are always real
        padding = F.pad(text.padding_mask, (0, EXTRA_POSITIONS), value=False)
        last = torch.full((batch,), sequence.shape[1] - 1, dtype=torch.long, device=sequence.device)
        # the last block computes the query position alone: the only output read
        hidden = self.transformer(sequence, causal=True, key_padding_mask=padding, output_positions=last)
        return self.out_proj(self.norm_out(hidden))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Training entry point: encode `tokens` with the frozen CLIP, then denoise."""
        return self.denoise(x_t, t, self.encode_condition(tokens))
